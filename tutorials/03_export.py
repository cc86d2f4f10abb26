"""Tutorial 3: torch.export of a DSA block, saved and reloaded in a fresh process.

torch_mla's ops are custom ops with fake (meta) implementations, so ``torch.export`` captures a
block that uses them as one graph, with a symbolic sequence length. The exported program is saved
with ``torch.export.save``; a new Python process (which only needs ``import torch_mla`` to know
the ``mla`` ops) loads it, runs it on two sequence lengths and must reproduce the eager outputs.
Runs on the CPU in about ten seconds:  python tutorials/03_export.py
"""

import os
import subprocess
import sys
import tempfile

import torch

from torch_mla.toy_model import ToyConfig, ToyMLABlock

torch.manual_seed(0)
cfg = ToyConfig(hidden=128, n_heads=8, q_rank=64, topk=8)
block = ToyMLABlock(cfg).eval()  # forward(x) is prefill(x): [s, hidden] -> [s, hidden]

# Export with a dynamic sequence length (2..4096 tokens).
seq = torch.export.Dim("seq", min=2, max=4096)
example = torch.randn(20, cfg.hidden)
with torch.no_grad():
    program = torch.export.export(block, (example,), dynamic_shapes={"x": {0: seq}})
ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("mla.")})
print("exported graph calls:", ops)

inputs = [torch.randn(20, cfg.hidden), torch.randn(37, cfg.hidden)]
with torch.no_grad():
    expected = [block(x) for x in inputs]

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "dsa_block.pt2")
    torch.export.save(program, path)
    torch.save({"inputs": inputs, "expected": expected}, os.path.join(tmp, "io.pt"))
    # A fresh interpreter: nothing of this process (model code, weights) is shared with it.
    child = f"""
import torch, torch_mla  # torch_mla registers the mla ops the program calls
program = torch.export.load({path!r})
io = torch.load({os.path.join(tmp, 'io.pt')!r})
for x, want in zip(io["inputs"], io["expected"]):
    got = program.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("reloaded program, seq", x.shape[0], "max abs diff", (got - want).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                            timeout=120)
    print(result.stdout, end="")
    if result.returncode != 0:
        sys.exit(result.stderr)
print("ok")
