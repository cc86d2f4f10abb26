"""tutorials/04_dsa_indexer.py runs to the end in a fresh process: DSA block with the real
lightning indexer, dense warm-up and sparse training compiled with fullgraph=True (its own
assertions: the losses go down), then paged decoding that reproduces the prefill."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_indexer_tutorial_runs():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    # the tutorial documents a CPU run on the reference backend: no interpreter, no forcing
    env.pop("TRITON_INTERPRET", None)
    env.pop("TORCH_MLA_BACKEND", None)
    r = subprocess.run([sys.executable, os.path.join("tutorials", "04_dsa_indexer.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=170, env=env)
    assert r.returncode == 0, f"tutorial failed:\n{r.stdout}\n{r.stderr}"
    out = r.stdout
    assert out.rstrip().endswith("ok")
    assert "dense warm-up: KL" in out and "sparse stage: task" in out
    assert "same top-k as the prefill" in out
