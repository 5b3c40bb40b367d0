"""posattn's benchmarks: ``python -m bench`` (providers side by side) and
``python -m bench.gpu_report`` (ahead-of-time compile report of the Triton kernels)."""
