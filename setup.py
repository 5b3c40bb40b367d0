"""posattn: fused attention kernels with the position encoding computed inside the kernel.

Thin by design (DESIGN.md §2): this file maps the source folders onto the installed package
and drives CMake (CMakeLists.txt, the only list of C++ sources and flags) to build the CPU
backend ``posattn._C``. ``triton_kernels/`` is installed as ``posattn.triton_kernels``,
never as a top-level ``triton_kernels`` (Triton ships a package with that name).

Building needs torch installed first (``pip install --no-build-isolation``), cmake ≥ 3.18
and ninja. ``POSATTN_BUILD_CPU=0`` skips the extension (posattn then imports without it and
``backend="cpu"`` raises an error saying so).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("POSATTN_BUILD_CPU", "1") == "0":
            # e.g. a GPU-only install without cmake: posattn imports, backend="cpu" then says _C is missing
            print("POSATTN_BUILD_CPU=0: not building the C++ CPU backend posattn._C")
            return
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                  f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                  f"-DCMAKE_BUILD_TYPE={os.environ.get('POSATTN_BUILD_TYPE', 'Release')}"]
        # cmake and ninja may be pip-installed next to this Python (the Makefile does that).
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        subprocess.run(config, check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True,
                       env=env)


setup(
    name="posattn",
    version="0.1.0",
    description="Fused attention kernels with position encodings computed inside the kernel",
    package_dir={"posattn": "python/posattn", "posattn.triton_kernels": "triton_kernels"},
    packages=["posattn", "posattn.triton_kernels"],
    ext_modules=[CMakeExtension("posattn._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # torch is deliberately unpinned here: the Makefile installs the CPU build on machines
    # without a GPU, and GPU users install the CUDA build of their choice first (README).
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest"]},
)
