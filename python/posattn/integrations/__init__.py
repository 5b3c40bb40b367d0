"""Integrations with other libraries, each an optional dependency imported only from its own submodule.

- :mod:`posattn.integrations.transformers`: Hugging Face transformers (``register()`` makes
  ``attn_implementation="posattn"`` available; ``fuse_positions(model)`` moves RoPE, ALiBi and T5's
  relative bias into the kernel).

Importing :mod:`posattn` or this package never imports transformers.
"""
