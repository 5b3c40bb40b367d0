"""Differences between the Triton versions posattn runs on, hidden in one place.

The GPU machine runs Triton 3.6 (Python 3.12, torch 2.11), CI Triton 3.9. Kernels and
launchers ask this module, never ``triton.__version__``: every answer is feature-detected
(a name exists, a keyword is accepted), once, on first use. Nothing here touches a GPU.

What differs or may differ, and what is asked here:

- TMA tensor descriptors: device-side ``tl.make_tensor_descriptor`` (its older name
  ``tl._experimental_make_tensor_descriptor``) and the host-side
  ``triton.tools.tensor_descriptor.TensorDescriptor``; device-side descriptors need a
  global-memory allocator (``triton.set_allocator``).
- Warp specialization: the ``warp_specialize`` keyword of ``tl.range``.
- Block pointers (``tl.make_block_ptr``): the name still exists in 3.9, but compiling one
  fails ("removed in favor of the tensor descriptor API"), so they are never used.
"""
import functools
import inspect

import triton
import triton.language as tl


@functools.cache
def device_tensor_descriptor():
    """The device-side descriptor constructor (``tl.make_tensor_descriptor`` or its older
    experimental name), or None when this Triton has neither."""
    for name in ("make_tensor_descriptor", "_experimental_make_tensor_descriptor"):
        fn = getattr(tl, name, None)
        if fn is not None:
            return fn
    return None


@functools.cache
def host_tensor_descriptor():
    """``TensorDescriptor`` (host-built TMA descriptors, passed as kernel arguments), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


@functools.cache
def has_warp_specialize() -> bool:
    """Whether ``tl.range`` takes ``warp_specialize=`` (producer / consumer warp groups on sm_90+)."""
    try:
        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def has_allocator() -> bool:
    """Whether ``triton.set_allocator`` exists (device-side descriptors need its scratch memory)."""
    return callable(getattr(triton, "set_allocator", None))


def features() -> dict:
    """What this Triton offers, by name: for reports (``python -m bench.gpu_report``) and tests."""
    return dict(triton=triton.__version__, device_tensor_descriptor=device_tensor_descriptor() is not None,
                host_tensor_descriptor=host_tensor_descriptor() is not None, warp_specialize=has_warp_specialize(),
                allocator=has_allocator())
