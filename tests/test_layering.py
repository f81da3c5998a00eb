"""The package's dependencies point one way (docs/design.md, "Layout"):

    trainer  ->  integrations  ->  public API (__init__, loss)  ->  ops  ->  core  ->  backends

and the two trainers (iwsft-train in trainer/, IWSFTTrainer in integrations/trl/) share the
reference-log-prob cache (refcache.py), which imports neither.

Checked on the source text (every ``import`` / ``from ... import``, module level or inside
functions), so a cycle cannot creep back in through a lazy import.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "iwsft_kernels"

# layer of each module (lower number = lower in the stack); a module may import only modules of
# a strictly lower layer, or leaf helpers (config, weights, oracle) that import nothing above.
LAYERS = {
    "iwsft_kernels.config": 0,
    "iwsft_kernels.weights": 1,
    "iwsft_kernels.oracle": 1,
    # the reference-log-prob cache (pass, fingerprints, store) of both trainers
    "iwsft_kernels.refcache": 1,
    "iwsft_kernels.backends": 2,
    # vocabulary parallelism's setup (which shard, checked across the group); beside the
    # backends, whose per-chunk merge (backends/vocab_merge.py) it hands the shard to
    "iwsft_kernels.vocab_shard": 2,
    "iwsft_kernels.core": 3,
    "iwsft_kernels.ops": 4,
    "iwsft_kernels.loss": 5,
    "iwsft_kernels": 6,
    "iwsft_kernels.integrations": 7,
    # plots + summary of a run's output folder; imports nothing from the package
    "iwsft_kernels.report": 7,
    "iwsft_kernels.trainer": 8,
}


def _layer(mod: str) -> int | None:
    best = None
    for name, layer in LAYERS.items():
        if mod == name or mod.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, layer)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, mod: str):
    is_pkg = path.name == "__init__.py"
    pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or node.level and not node.module:
                for a in node.names:  # ``from . import x``: x is a module
                    yield f"{target}.{a.name}", node.lineno
            else:
                yield target, node.lineno


SOURCES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    mod = _module_name(path)
    own = _layer(mod)
    assert own is not None, f"{mod} has no layer in tests/test_layering.py"
    bad = []
    for target, line in _imports(path, mod):
        if not (target == "iwsft_kernels" or target.startswith("iwsft_kernels.")):
            continue
        t = _layer(target)
        if t is None:
            continue
        same_subpackage = t == own and own in (2, 7, 8)  # backends/, integrations/, trainer/
        if t < own or same_subpackage:
            continue
        bad.append(f"line {line}: {mod} (layer {own}) imports {target} (layer {t})")
    assert not bad, "imports pointing up the stack:\n" + "\n".join(bad)


def test_loss_and_ops_do_not_import_each_other_both_ways():
    loss = {t for t, _ in _imports(PKG / "loss.py", "iwsft_kernels.loss")}
    ops = {t for t, _ in _imports(PKG / "ops.py", "iwsft_kernels.ops")}
    assert "iwsft_kernels.loss" not in ops
    assert "iwsft_kernels.core" in ops and "iwsft_kernels.core" in loss


def _package_imports(paths):
    for path in paths:
        mod = _module_name(path)
        for target, line in _imports(path, mod):
            yield path.relative_to(PKG), line, target


def _under(target: str, mod: str) -> bool:
    return target == mod or target.startswith(mod + ".")


def test_integrations_never_import_the_trainer():
    bad = [f"{p}:{line} imports {t}" for p, line, t in
           _package_imports((PKG / "integrations").rglob("*.py"))
           if _under(t, "iwsft_kernels.trainer")]
    assert not bad, bad


def test_refcache_imports_neither_trainer():
    paths = [PKG / "refcache.py"] + sorted((PKG / "refcache").rglob("*.py"))
    paths = [p for p in paths if p.exists()]
    assert paths, "iwsft_kernels/refcache not found"
    bad = [f"{p}:{line} imports {t}" for p, line, t in _package_imports(paths)
           if _under(t, "iwsft_kernels.trainer") or _under(t, "iwsft_kernels.integrations")]
    assert not bad, bad
    for trainer in ("trainer", "integrations/trl"):  # and both trainers use it
        used = {t for _, _, t in _package_imports((PKG / trainer).rglob("*.py"))}
        assert "iwsft_kernels.refcache" in used, trainer
