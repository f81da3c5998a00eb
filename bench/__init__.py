"""Benchmarks and paper reproductions for iwsft_kernels (not part of the installed package).

Run from the repository root: ``python -m bench.bench_loss --quick``, ``python -m bench.plot``,
``python -m bench.repro.bandit``. See bench/README.md.
"""
