"""posattn: fused attention kernels with the position encoding inside the kernel.

Thin by design (DESIGN.md §2): this file only maps the source folders onto the
installed package. ``triton_kernels/`` is installed as ``posattn.triton_kernels``,
never as a top-level ``triton_kernels`` (Triton ships a package with that name).
The C++ CPU backend (``posattn._C``, built by CMake) is added by its own issue.
"""
from setuptools import setup

setup(
    name="posattn",
    version="0.1.0",
    description="Fused attention kernels with position encodings computed inside the kernel",
    package_dir={"posattn": "python/posattn", "posattn.triton_kernels": "triton_kernels"},
    packages=["posattn", "posattn.triton_kernels"],
    python_requires=">=3.10",
    # torch is deliberately unpinned here: the Makefile installs the CPU build on machines
    # without a GPU, and GPU users install the CUDA build of their choice first (README).
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest"]},
)
