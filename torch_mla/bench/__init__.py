"""Benchmarks of torch_mla's ops: ``python -m torch_mla.bench --help``.

Per op x backend x shape: time per call (CUDA-graph replay, median of many), TFLOPS and GB/s with
FLOPs and bytes counted as FlashMLA's tests count them (``flops``), % of the roof measured in the
same run (``roof``), and the ratio to FlashMLA on the same inputs when ``import flash_mla``
works. This package is the only part of torch_mla that may import FlashMLA (``peers``).
"""

from .cli import main  # noqa: F401
