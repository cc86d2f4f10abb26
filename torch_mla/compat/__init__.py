"""Drop-in replacements for other libraries' Python APIs, implemented on torch_mla's ops.

``torch_mla.compat.flash_mla`` mirrors FlashMLA's ``flash_mla`` package: change
``import flash_mla`` to ``import torch_mla.compat.flash_mla as flash_mla``.
"""

from . import flash_mla  # noqa: F401

__all__ = ["flash_mla"]
