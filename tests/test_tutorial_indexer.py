"""tutorials/04_dsa_indexer.py runs to the end in a fresh process: DSA block with the real
lightning indexer, dense warm-up and sparse training compiled with fullgraph=True (its own
assertions: the losses go down), then paged decoding that reproduces the prefill. Once at the
toy size as documented (float32), once through the realistic (GPU) mode's code path at toy dims
on the CPU: a bf16 model, every tensor made on the chosen device."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    # the tutorial documents a CPU run on the reference backend: no interpreter, no forcing
    env.pop("TRITON_INTERPRET", None)
    env.pop("TORCH_MLA_BACKEND", None)
    r = subprocess.run([sys.executable, os.path.join("tutorials", "04_dsa_indexer.py"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=170, env=env)
    assert r.returncode == 0, f"tutorial failed:\n{r.stdout}\n{r.stderr}"
    out = r.stdout
    assert out.rstrip().endswith("ok")
    assert "dense warm-up: KL" in out and "sparse stage: task" in out
    assert "same top-k as the prefill" in out
    assert "backends on cpu:" in out
    return out


def test_indexer_tutorial_runs():
    out = _run()
    assert "torch.float32 on cpu, torch.compile backend aot_eager" in out


def test_indexer_tutorial_bf16_code_path_at_toy_dims():
    out = _run("--size", "toy", "--device", "cpu", "--dtype", "bfloat16")
    assert "torch.bfloat16 on cpu" in out


def test_indexer_tutorial_realistic_needs_cuda_or_says_so():
    import torch

    if torch.cuda.is_available():
        return  # the realistic run itself is the GPU session's job (minutes)
    r = subprocess.run([sys.executable, os.path.join("tutorials", "04_dsa_indexer.py"), "--size",
                        "realistic"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no CUDA device" in r.stderr, r.stderr
