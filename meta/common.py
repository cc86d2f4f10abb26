"""Input checks shared by every op contract.

Each helper raises through ``torch._check`` (so it also works on FakeTensors with symbolic
shapes, and never reads tensor values: no host sync) with a message that names the argument,
the expected value and the given one. Backends rely on these checks and repeat none of them.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

LIB = torch.library.Library("mla", "DEF")  # noqa: TOR901 - the one definition of the namespace

# Dtypes the reference computes in. Fast backends accept a subset and say so in supports().
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


def stats_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of lse / max_logits: f32, or f64 for f64 inputs (so gradcheck can run through lse)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check(cond, message) -> None:
    """``torch._check(cond, message)``, with a fast path for the common eager case: a plain
    ``True`` needs no call (a failing check, or a SymBool under tracing, still goes through
    torch._check, which raises or records the guard). Saves ~1.5 us per check on the host path of
    every eager call, where an op runs dozens of checks."""
    if cond is True:
        return
    torch._check(cond, message)


def define(schema: str) -> str:
    """Define ``mla::<schema>`` and return its qualified name."""
    LIB.define(schema)
    return "mla::" + schema.split("(", 1)[0]


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    check(
        t.dtype in dtypes,
        lambda: f"{name} must have dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}",
    )


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check(
        t.dtype == ref.dtype,
        lambda: f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}",
    )


def check_rank(name: str, t: torch.Tensor, rank: int, shape_doc: str) -> None:
    check(
        t.dim() == rank,
        lambda: f"{name} must be {rank}-D {shape_doc}, got shape {tuple(t.shape)}",
    )


def check_size(name: str, t: torch.Tensor, dim: int, expected, what: str) -> None:
    """t.shape[dim] must equal ``expected`` (``what`` says where the number comes from)."""
    check(
        t.shape[dim] == expected,
        lambda: f"{name}.shape[{dim}] must be {expected} ({what}), got {t.shape[dim]} "
        f"(shape {tuple(t.shape)})",
    )


def check_shape(name: str, t: torch.Tensor, shape: Sequence, shape_doc: str) -> None:
    check_rank(name, t, len(shape), shape_doc)
    for i, s in enumerate(shape):
        check(
            t.shape[i] == s,
            lambda: f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(t.shape)}",
        )


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check(
        t.device == ref.device,
        lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}",
    )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    check(
        t.shape[-1] <= 1 or t.stride(-1) == 1,
        lambda: f"{name} must be contiguous in its last dimension (stride 1), got strides "
        f"{tuple(t.stride())}",
    )


def check_index(name: str, t: torch.Tensor, rank: int, shape_doc: str, ref_name: str,
                ref: torch.Tensor, dtypes=(torch.int32,)) -> None:
    """An index/length tensor: int32 (unless said otherwise), given rank, on ref's device."""
    check_rank(name, t, rank, shape_doc)
    check_dtype(name, t, dtypes)
    check_device(name, t, ref_name, ref)


def check_optional_index(name: str, t: Optional[torch.Tensor], shape: Sequence, shape_doc: str,
                         ref_name: str, ref: torch.Tensor) -> None:
    if t is None:
        return
    check_index(name, t, len(shape), shape_doc, ref_name, ref)
    check_shape(name, t, shape, shape_doc)


def check_attn_sink(attn_sink: Optional[torch.Tensor], h_q, q: torch.Tensor) -> None:
    if attn_sink is None:
        return
    check_dtype("attn_sink", attn_sink, (torch.float32, torch.float64))
    check_shape("attn_sink", attn_sink, (h_q,), "[h_q]")
    check_device("attn_sink", attn_sink, "q", q)


def check_heads(h_q, h_kv, q_name: str = "q", kv_name: str = "kv") -> None:
    check(h_kv >= 1, lambda: f"{kv_name} must have at least one head, got h_kv={h_kv}")
    check(
        h_q % h_kv == 0,
        lambda: f"{q_name} heads (h_q={h_q}) must be a multiple of {kv_name} heads (h_kv={h_kv})",
    )


def check_finite_scale(sm_scale: float) -> None:
    check(
        sm_scale == sm_scale and abs(sm_scale) != float("inf"),
        lambda: f"sm_scale must be a finite number, got {sm_scale}",
    )
