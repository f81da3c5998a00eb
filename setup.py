"""Packaging is declared in pyproject.toml; this file only adds the optional native extension.

By default nothing is compiled here: ``pip install -e .`` needs neither torch nor a compiler
at build time, and the native CPU epilogue (csrc/iwsft_epilogue.cpp) is compiled on first use
by iwsft_kernels/backends/native_cpu.py and cached (see docs/native.md).

Set ``IWSFT_BUILD_NATIVE=1`` to build it ahead of time as ``iwsft_kernels._C`` (needs torch
importable in the build environment, e.g. ``pip install --no-build-isolation -e .``, and a
C++ compiler). If torch cannot be imported, nothing is built and the install still succeeds.
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("IWSFT_BUILD_NATIVE", "0") not in ("", "0"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001
        print(f"iwsft_kernels: IWSFT_BUILD_NATIVE=1 but torch is not importable ({e}); "
              f"not building the native extension (it compiles on first use instead)",
              file=sys.stderr)
    else:
        omp = "-fopenmp" if sys.platform.startswith("linux") else "-fopenmp-simd"
        ext_modules = [CppExtension(
            "iwsft_kernels._C", ["csrc/iwsft_epilogue.cpp"],
            define_macros=[("IWSFT_PYTHON_MODULE", None)],
            extra_compile_args=["-O3", omp, "-fno-trapping-math"],
        )]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
