"""Drop-in replacements for other libraries' Python APIs, implemented on torch_mla's ops.

``torch_mla.compat.flash_mla`` mirrors FlashMLA's Python package: a FlashMLA user switches by
importing ``torch_mla.compat.flash_mla`` under the name their code already uses.
"""
