"""Packaging: a wheel carries the native CPU source (and the trainer's assets); installed into a
fresh environment, away from the source tree, the native epilogue loads from the installed
package and reuses the per-user compile cache. Plus the cache's naming and its one-line
first-compile notice (with a stand-in compiler, so no 20-30 s compile here)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from iwsft_kernels.backends import native_cpu as native

REPO = Path(__file__).resolve().parents[1]
SRC_IN_WHEEL = "iwsft_kernels/csrc/iwsft_epilogue.cpp"


def _copy_project(dst: Path) -> None:
    """The files a build reads (a copy, so no build/ folder is left in the checkout)."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for d in ("csrc", "iwsft_kernels"):
        shutil.copytree(REPO / d, dst / d, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    proj, out = tmp_path_factory.mktemp("proj"), tmp_path_factory.mktemp("wheel")
    _copy_project(proj)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", str(proj), "-w", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = out.glob("iwsft_kernels-*.whl")
    return whl


def test_wheel_carries_native_source_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SRC_IN_WHEEL in names
    assert zipfile.ZipFile(wheel).read(SRC_IN_WHEEL) == (REPO / "csrc/iwsft_epilogue.cpp").read_bytes()
    for asset in ("iwsft_kernels/trainer/assets/s1k_tiny.jsonl",
                  "iwsft_kernels/trainer/assets/model/config.json",
                  "iwsft_kernels/trainer/assets/tokenizer/tokenizer.json"):
        assert asset in names
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names)


CHECK = r"""
import json, sys, torch
import torch.nn.functional as F
import iwsft_kernels
from iwsft_kernels import IWConfig, linear_iwsft_loss
from iwsft_kernels.backends import native_cpu as native
from iwsft_kernels.core import select_ops

lib = native.load()
ops = select_ops("torch", torch.device("cpu"))
g = torch.Generator().manual_seed(0)
h = torch.randn(37, 24, generator=g, dtype=torch.float64)
w = torch.randn(101, 24, generator=g, dtype=torch.float64)
y = torch.randint(0, 101, (37,), generator=g)
ours = linear_iwsft_loss(h.float(), w.float(), y, config=IWConfig(mode="sft"),
                         backend="torch").loss.item()
ref = F.cross_entropy(h @ w.T, y).item()
print(json.dumps({"package": iwsft_kernels.__file__, "source": str(native.source_path()),
                  "origin": native.origin(), "error": native.load_error(),
                  "ops": type(ops).__name__, "loss": ours, "ref": ref}))
"""


def outer_import_paths() -> list[str]:
    """Where the running environment imports packages from: its site-packages folders (a
    venv's own, or the system's; the user site) and any other folder on sys.path (added by a
    .pth file or PYTHONPATH), except the checkout and other source trees of this package."""
    import site
    import sysconfig

    sites = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"],
                                            sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        sites.append(site.getusersitepackages())
    sites = [os.path.abspath(d) for d in sites]
    stdlib = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    out = []
    for d in sites + [os.path.abspath(d) for d in sys.path if d]:
        if d in out or d in stdlib or not os.path.isdir(d):
            continue
        inside_repo = Path(d).is_relative_to(REPO)
        if d not in sites and (inside_repo or (Path(d) / "iwsft_kernels").is_dir()):
            continue  # a source tree: the package must come from the wheel
        out.append(d)
    return out


def test_wheel_in_fresh_venv_loads_native_from_installed_package(wheel, tmp_path):
    if native.disabled():
        pytest.fail("IWSFT_NO_NATIVE is set for this run: the native path cannot be checked")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IWSFT_NO_NATIVE")}
    site = subprocess.run([str(py), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    # torch and pip come from THIS environment (no download): its import folders, as plain
    # path lines of a .pth file in the new venv. Not --system-site-packages: inside a venv that
    # gives the base interpreter's folders, which need not hold torch. Plain lines, so this
    # environment's own .pth files (an editable install of the checkout) are not processed
    # there; the venv's own site-packages (the wheel) comes first on sys.path.
    (Path(site) / "outer_env.pth").write_text("\n".join(outer_import_paths()) + "\n")
    # --ignore-installed: the checkout may be installed in the outer environment (pip -e .)
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed",
                        "-q", str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cwd = tmp_path / "elsewhere"  # not the checkout: nothing can come from the source tree
    cwd.mkdir()
    r = subprocess.run([str(py), "-c", CHECK], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["error"] is None, got["error"]
    pkg = Path(site) / "iwsft_kernels"
    assert Path(got["package"]).parent == pkg
    assert Path(got["source"]) == pkg / "csrc" / "iwsft_epilogue.cpp"
    assert got["ops"] == "NativeTorchOps"
    # the compiled library is the per-user cached one, shared with this (source-tree) process
    assert got["origin"] == str(native.cached_library_path(native.source_path(),
                                                           native.find_compiler()))
    assert got["loss"] == pytest.approx(got["ref"], rel=1e-5)
    # the console script is installed and answers without the [train] extra being touched
    r = subprocess.run([str(venv / "bin" / "iwsft-train"), "--help"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--overwrite" in r.stdout


# ------------------------------------------------------------------- the compile cache
FAKE_CXX = """#!/bin/sh
# stands in for the compiler: writes a file to the -o target
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then echo fake > "$2"; fi
  shift
done
"""


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return str(cxx)


def test_first_compile_says_one_line_then_is_cached(fake_cxx, tmp_path, capfd):
    import torch

    lib = native._jit_build()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    cache = tmp_path / "ext" / "iwsft_kernels"
    assert "compiling the native CPU epilogue" in err[0] and str(cache) in err[0]
    assert "IWSFT_NO_NATIVE=1" in err[0]
    assert lib.parent == cache and lib.is_file()
    assert f"torch{torch.__version__.replace('+', '_')}" in lib.name
    assert native._jit_build() == lib  # cached: no second compile, no second line
    assert capfd.readouterr().err == ""
    assert not list(cache.glob(".build-*"))  # no temp file left


def test_cache_key_ignores_environment_paths(fake_cxx, tmp_path, monkeypatch):
    """Two environments with the same torch version (different install folders for torch's
    headers/libraries and for the package) share one cached library; another source or
    compiler flag does not."""
    from torch.utils import cpp_extension as ce

    src = native.source_path()
    here = native.cached_library_path(src, fake_cxx)
    copy = tmp_path / "other-env" / "iwsft_kernels" / "csrc" / "iwsft_epilogue.cpp"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(src, copy)
    monkeypatch.setattr(ce, "include_paths", lambda *a, **k: ["/elsewhere/include"])
    monkeypatch.setattr(ce, "library_paths", lambda *a, **k: ["/elsewhere/lib"])
    assert native.cached_library_path(copy, fake_cxx) == here
    copy.write_text(src.read_text() + "\n// changed\n")
    assert native.cached_library_path(copy, fake_cxx) != here
    monkeypatch.setattr(native, "_cpu_flags", lambda: ["-mno-such-flag"])
    assert native.cached_library_path(src, fake_cxx) != here


def test_no_native_env_compiles_nothing(fake_cxx, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("IWSFT_NO_NATIVE", "1")
    native._reset_for_tests()
    try:
        assert native.load() is None
        assert capfd.readouterr().err == ""
        assert not (tmp_path / "ext").exists()
    finally:
        native._reset_for_tests()
