"""Backend selection: CPU runs the reference, a forced backend is used alone, explain() reports."""

import os
import subprocess
import sys

import pytest
import torch

import torch_mla
from samples import SAMPLES


def test_cpu_uses_reference():
    q, kv, idx, *_ = SAMPLES["sparse_prefill"]()[0][1]
    text = torch_mla.explain("sparse_prefill", q, kv, idx, d_v=16)
    assert text.startswith("mla::sparse_prefill on cpu: reference"), text


def test_explain_every_public_op():
    for op in ("sparse_decode", "dense_decode", "quantize_kv_cache", "decode_schedule"):
        args = SAMPLES[op]()[0][1]
        if op == "sparse_decode":
            text = torch_mla.explain(op, args[0], args[1], args[2])
        elif op == "dense_decode":
            text = torch_mla.explain(op, *args[:4], d_v=args[4])
        elif op == "decode_schedule":
            text = torch_mla.explain(op, args[0], num_parts=args[1])
        else:
            text = torch_mla.explain(op, *args)
        assert f"mla::{op} on cpu: reference" in text


def test_explain_raises_the_op_error():
    q, kv, idx, *_ = SAMPLES["sparse_prefill"]()[0][1]
    with pytest.raises(RuntimeError, match="indices must have dtype int32"):
        torch_mla.explain("sparse_prefill", q, kv, idx.long(), d_v=16)
    with pytest.raises(ValueError, match="unknown op"):
        torch_mla.explain("flash_attention", q)


def test_forced_backend_missing_raises_with_reasons():
    args = SAMPLES["decode_schedule"]()[0][1]
    with torch_mla.use_backend("native"):
        text = torch_mla.explain("decode_schedule", args[0], num_parts=4)
        assert "no backend applies" in text and "skipped native" in text
        with pytest.raises(RuntimeError, match="backend 'native' was forced"):
            torch.ops.mla.decode_schedule(*args)
    # leaving the block restores the default choice
    torch.ops.mla.decode_schedule(*args)


def test_forced_reference_and_nesting():
    args = SAMPLES["decode_schedule"]()[0][1]
    with torch_mla.use_backend("native"):
        with torch_mla.use_backend("reference"):
            assert "(forced" in torch_mla.explain("decode_schedule", args[0], num_parts=4)
            torch.ops.mla.decode_schedule(*args)


def test_environment_variable():
    code = ("import torch, torch_mla\n"
            "s = torch.tensor([5], dtype=torch.int32)\n"
            "print(torch_mla.explain('decode_schedule', s, num_parts=2))\n")
    env = dict(os.environ, TORCH_MLA_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "reference (forced by use_backend/TORCH_MLA_BACKEND)" in out
    env["TORCH_MLA_BACKEND"] = "bogus"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "unknown torch_mla backend 'bogus'" in res.stderr


def test_triton_kernels_not_gpu_verified_are_not_chosen_unless_forced(monkeypatch):
    """On a GPU, a Triton kernel that has not passed its GPU tests is skipped with a reason unless
    the Triton backend is forced."""
    import types

    import torch_mla.triton as tri
    from torch_mla.triton import _common

    fake_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(_common, "device_reasons", lambda args: [])
    monkeypatch.setattr(_common, "first_tensor", lambda args: fake_cuda)
    op = "sparse_decode"  # as if its GPU tests had not run yet
    monkeypatch.setattr(tri, "GPU_VERIFIED", tri.GPU_VERIFIED - {op})
    monkeypatch.setitem(tri.SUPPORTS, op, lambda *a: [])
    assert "has not passed its GPU tests" in " ".join(tri._supports(op, ()))
    with torch_mla.use_backend("triton"):
        assert tri._supports(op, ()) == []
    verified = next(iter(tri.GPU_VERIFIED & set(tri.IMPLS)))
    monkeypatch.setitem(tri.SUPPORTS, verified, lambda *a: [])
    assert tri._supports(verified, ()) == []
