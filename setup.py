"""Builds posattn's C++ CPU backend ``posattn._C``; everything else is in pyproject.toml.

Thin by design (docs/design.md, "Layout"): the package layout and metadata live in
pyproject.toml, and CMake (CMakeLists.txt, the only list of C++ sources and flags) builds the
extension. This file only drives CMake with Ninja.

Building needs torch installed first and build isolation turned off
(``pip install --no-build-isolation .``, ``python -m build --wheel --no-isolation``), plus
cmake >= 3.18 and ninja (``pip install cmake ninja``). ``POSATTN_BUILD_CPU=0`` skips the
extension (posattn then imports without it and ``backend="cpu"`` raises an error saying so).
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LICENSE = "MIT"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _torch_or_exit():
    """torch must be importable by the Python that builds: the extension links against it."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        sys.exit(f"posattn: building the CPU backend posattn._C needs torch in the build environment, and this "
                 f"Python ({sys.executable}) cannot import it ({e}). Install torch first, then build without "
                 f"isolation: `pip install --no-build-isolation .` (or -e .), `python -m build --wheel "
                 f"--no-isolation`; or skip the extension with POSATTN_BUILD_CPU=0.")


def _cmake_build_dir():
    """One CMake build folder per (Python, torch) under build/, whichever command builds.

    `setup.py build_ext --inplace`, `pip install [-e] .` and `python -m build --wheel` then
    share one incremental Ninja build instead of compiling everything again (an editable
    install would otherwise compile in a fresh temporary folder every time). Keyed by the
    torch installation, because CMake caches where it found torch.
    """
    import torch
    key = hashlib.sha1(f"{sys.version_info[:2]} {torch.__version__} {Path(torch.__file__).resolve().parent}"
                       .encode()).hexdigest()[:10]
    return ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-{key}"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        _torch_or_exit()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = _cmake_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        # cmake and ninja may be pip-installed next to this Python (the Makefile does that);
        # their scripts live in the environment's bin/, which need not be on PATH.
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        cmake = shutil.which("cmake", path=env["PATH"])
        if cmake is None:
            sys.exit("posattn: cmake >= 3.18 not found (pip install cmake ninja), or set POSATTN_BUILD_CPU=0 to skip "
                     "the CPU backend")
        config = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                  f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                  f"-DCMAKE_BUILD_TYPE={os.environ.get('POSATTN_BUILD_TYPE', 'Release')}"]
        subprocess.run(config, check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True,
                       env=env)


def _wheel_support_or_exit():
    """setuptools < 70.1 builds wheels (and editable installs) only with the `wheel` package."""
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if version >= (70, 1) or not {"dist_info", "bdist_wheel", "editable_wheel"} & set(sys.argv[1:]):
        return
    try:
        import wheel  # noqa: F401
    except ImportError:
        sys.exit(f"posattn: setuptools {setuptools.__version__} (the one `python -m venv` ships on Python 3.11) "
                 f"builds wheels and editable installs only with the `wheel` package, which this environment "
                 f"lacks. Run `pip install wheel` (or `pip install -U setuptools`), then build again with "
                 f"--no-build-isolation.")


def _license():
    # setuptools >= 77 takes an SPDX expression (and deprecates the free-text field);
    # older ones, such as the 65 that `python3.11 -m venv` ships, only know the free text.
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": LICENSE, "license_files": ["LICENSE"]} if major >= 77 else {"license": LICENSE}


_wheel_support_or_exit()
BUILD_CPU = os.environ.get("POSATTN_BUILD_CPU", "1") != "0"
if not BUILD_CPU:
    # e.g. a GPU-only install without cmake: posattn imports, backend="cpu" then says _C is missing
    print("POSATTN_BUILD_CPU=0: not building the C++ CPU backend posattn._C")
setup(
    ext_modules=[CMakeExtension("posattn._C")] if BUILD_CPU else [],
    cmdclass={"build_ext": CMakeBuild},
    **_license(),
)
