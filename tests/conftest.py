import os
import sys

import torch

# Test modules import shared helpers (samples.py) from this folder; with --import-mode=importlib
# (CPU and GPU test files may share a basename) the folder is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors (a public
# behaviour: TRITON_INTERPRET=1 + torch_mla.use_backend("triton")). Triton reads the variable
# when kernels are decorated, so it must be set before torch_mla is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
