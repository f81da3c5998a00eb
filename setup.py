"""Packaging is declared in pyproject.toml; this file only (1) ships the native CPU source
inside the package and (2) adds the optional prebuilt native extension.

(1) csrc/iwsft_epilogue.cpp (the one copy of the source, at the top of the repository) is
copied into the built package as iwsft_kernels/csrc/iwsft_epilogue.cpp, so that a wheel or a
non-editable ``pip install .`` carries it and iwsft_kernels/backends/native_cpu.py can compile
it on first use (an editable install reads csrc/ in the checkout directly). MANIFEST.in puts
csrc/ in the sdist.

(2) By default nothing is compiled here: ``pip install .`` needs neither torch nor a compiler
at build time, and the native CPU epilogue is compiled on first use and cached (see
docs/native.md). Set ``IWSFT_BUILD_NATIVE=1`` to build it ahead of time as ``iwsft_kernels._C``
(needs torch importable in the build environment, e.g. ``pip install --no-build-isolation .``,
and a C++ compiler). If torch cannot be imported, nothing is built and the install still
succeeds.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = "csrc"
NATIVE_SOURCES = ["iwsft_epilogue.cpp"]


class BuildPyWithNativeSource(build_py):
    """build_py, plus csrc/*.cpp copied to <build>/iwsft_kernels/csrc/ (not in editable mode:
    there the package reads csrc/ from the checkout)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "iwsft_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for name in NATIVE_SOURCES:
            src = HERE / CSRC / name
            if not src.is_file():
                raise FileNotFoundError(f"{src} is missing: the native CPU source must ship "
                                        f"with the package (is csrc/ in MANIFEST.in?)")
            shutil.copyfile(src, dest / name)

    def get_outputs(self, include_bytecode=True):
        outs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outs += [str(Path(self.build_lib) / "iwsft_kernels" / "csrc" / n)
                     for n in NATIVE_SOURCES]
        return outs


ext_modules, cmdclass = [], {"build_py": BuildPyWithNativeSource}
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
            "iwsft_kernels._C", [f"{CSRC}/iwsft_epilogue.cpp"],
            define_macros=[("IWSFT_PYTHON_MODULE", None)],
            extra_compile_args=["-O3", omp, "-fno-trapping-math"],
        )]
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
