"""``python -m torch_mla.bench``: every case x backend, timed, with TFLOPS, GB/s, % of the roof
measured in the same run, and the ratio to FlashMLA on the same inputs (for the DSA indexer's
logits and top-k: the ratio to a plain-PyTorch baseline, in the note).

    python -m torch_mla.bench [--ops OP,...] [--backends B,...] [--quick] [--tiny] [--out DIR]

Progress goes to stderr; the Markdown table is printed last, on stdout. A backend that cannot run
a case is recorded with its reason and the run goes on; the reference is skipped (with a note) on
shapes beyond ``cases.REF_MAX_FLOPS`` / ``REF_MAX_BYTES``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch

from . import cases as C
from . import report, roof, timing
from .report import Row


def _parse_list(text: Optional[str], allowed: Sequence[str], what: str) -> List[str]:
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torch_mla.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", help=f"comma-separated subset of: {', '.join(C.OPS)}")
    p.add_argument("--backends", help=f"comma-separated subset of: {', '.join(C.BACKENDS)}")
    p.add_argument("--quick", action="store_true",
                   help="fewer replays (the roof probes keep their size)")
    p.add_argument("--tiny", action="store_true",
                   help="toy shapes (real head dims); on a machine without CUDA, the only mode: "
                   "host-clock timing on the CPU")
    p.add_argument("--out", metavar="DIR", help="write results.md, results.json, results.png")
    p.add_argument("--match", metavar="TEXT", action="append",
                   help="only cases whose name contains TEXT (repeatable: any of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def _refusal(exc: BaseException) -> str:
    """The reasons of a forced torch_mla backend that refused, or the error."""
    text = str(exc)
    marker = " here ("
    if "cannot run mla::" in text and marker in text:
        return text.split(marker, 1)[1].rstrip(")")[:300]
    return _short(exc)


def _add_note(row: Row, text: str) -> None:
    row.note = (row.note + "; " if row.note else "") + text


def _time(case: C.Case, fn, device: torch.device, quick: bool):
    if case.kind == "host":
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        return timing.host_overhead(fn, replays=50 if quick else 200, sync=sync)
    if device.type == "cuda":
        return timing.cuda_graph_time(fn, replays=10 if quick else 50,
                                      target_s=2e-3 if quick else 5e-3)
    return timing.wall_time(fn, replays=2 if quick else 5)


def run_case(case: C.Case, backends: Sequence[str], device: torch.device, the_roof: roof.Roof,
             quick: bool, seed: int) -> List[Row]:
    rows: List[Row] = []
    try:
        built = C.build(case, device, seed)
    except Exception as exc:  # e.g. out of memory: the case is reported, the run goes on
        return [Row(case.name, case.op, b, note=f"inputs failed: {_short(exc)}") for b in backends]
    for b in backends:
        if b not in built.refused and b not in built.calls:
            continue  # e.g. SDPA for a sparse op: no row
        roof_nbytes = built.nbytes if built.roof_nbytes is None else built.roof_nbytes
        row = Row(case.name, case.op, b, flops=built.flops, nbytes=built.nbytes,
                  roof_nbytes=roof_nbytes)
        rows.append(row)
        if b in built.refused:
            row.note = built.refused[b]
            continue
        if b == "reference" and not built.ref_ok and case.kind != "host":
            row.note = (f"reference skipped at this size ({built.flops:.2g} FLOP, "
                        f"{built.nbytes:.2g} B; limits {C.REF_MAX_FLOPS:.0g} / "
                        f"{C.REF_MAX_BYTES:.0g})")
            continue
        fn = built.calls[b]
        try:
            fn()  # first call: compiles, and raises the backend's refusal
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            row.note = _refusal(exc)
            if device.type == "cuda":
                torch.cuda.synchronize()
            continue
        try:
            secs, method = _time(case, fn, device, quick)
        except Exception as exc:
            row.note = f"timing failed: {_short(exc)}"
            continue
        row.us = secs * 1e6
        row.method = method
        if method.startswith("events"):
            row.note = method
        if built.note:
            row.note = (row.note + "; " if row.note else "") + built.note
        if case.kind == "device" and (built.flops or built.nbytes):
            row.tflops = built.flops / secs / 1e12 if built.flops else None
            row.gbps = built.nbytes / secs / 1e9
            row.pct_roof = the_roof.percent(built.flops, roof_nbytes, secs, built.roof)
            if built.roof == "fp8" and the_roof.fp8_flops is None:
                _add_note(row, the_roof.fp8_how)
            if built.alt_flops:
                _add_note(row, f"{built.alt_flops / secs / 1e12:,.1f} TFLOPS counting "
                          f"{built.alt_flops_what}")
        _log(f"  {b:10s} {row.us:12.1f} us  {method}")
    peer = C.peer_of(case)
    peer_row = next((r for r in rows if r.backend == peer and r.ran), None)
    if peer_row is not None:
        for r in rows:
            if r.ran:
                r.x_flashmla = peer_row.us / r.us
    base = C.baseline_of(case)
    base_row = next((r for r in rows if r.backend == base and r.ran), None)
    if base_row is not None:
        for r in rows:
            if r.ran and r is not base_row:
                r.x_baseline = base_row.us / r.us
                _add_note(r, f"{r.x_baseline:.2f}x {base}")
    built = fn = None  # drop the inputs before the next case builds its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fp8_text(the_roof: roof.Roof) -> str:
    if the_roof.fp8_flops is None:
        return f"none ({the_roof.fp8_how})"
    return f"{the_roof.fp8_flops / 1e12:,.1f} TFLOPS ({the_roof.fp8_how})"


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    tiny = args.tiny
    if not torch.cuda.is_available() and not tiny:
        _log("no CUDA device: running the --tiny cases on the CPU")
        tiny = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = _parse_list(args.ops, C.OPS, "ops")
    backends = _parse_list(args.backends, C.BACKENDS, "backends")
    cases = [c for c in C.all_cases(tiny) if c.op in ops
             and (not args.match or any(m in c.name for m in args.match))]
    if args.list:
        for c in cases:
            print(f"{c.op:20s} {c.name}")
        return []

    _log(f"torch_mla bench on {device} ({'tiny' if tiny else 'full'} shapes"
         f"{', quick' if args.quick else ''}): {len(cases)} cases x {len(backends)} backends")
    the_roof = roof.measure(device, args.quick)
    _log(f"roof: {the_roof.bandwidth / 1e9:,.0f} GB/s, {the_roof.flops / 1e12:,.1f} TFLOPS "
         f"({the_roof.how}); FP8: {_fp8_text(the_roof)}")
    rows: List[Row] = []
    t0 = time.time()
    for case in cases:
        _log(f"{case.name}")
        rows += run_case(case, backends, device, the_roof, args.quick, args.seed)

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "CPU")
    from .peers import flashmla

    mod, why = flashmla()
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "flash_mla": getattr(mod, "__version__", None) if mod is not None else why,
        "tiny": tiny,
        "quick": args.quick,
        "roof_bandwidth_GBps": the_roof.bandwidth / 1e9,
        "roof_TFLOPS": the_roof.flops / 1e12,
        "roof_how": the_roof.how,
        "roof_fp8_TFLOPS": None if the_roof.fp8_flops is None else the_roof.fp8_flops / 1e12,
        "roof_fp8_how": the_roof.fp8_how,
        "seconds": round(time.time() - t0, 1),
        "methods": sorted({r.method for r in rows if r.method}),
    }
    header = (f"torch_mla benchmark on {device_name}, torch {torch.__version__}; roof measured "
              f"in this run: {the_roof.bandwidth / 1e9:,.0f} GB/s, "
              f"{the_roof.flops / 1e12:,.1f} TFLOPS bf16, FP8 {_fp8_text(the_roof)}. "
              f"us = median per call "
              f"({'CUDA-graph replay' if device.type == 'cuda' else 'host clock'}); host "
              f"overhead rows: host time of one eager call. TFLOPS and GB/s use FlashMLA's counts; "
              f"% of roof = max(FLOPs / matmul rate, bytes / copy bandwidth) / time, with "
              f"distinct rows as the bytes of sparse prefill (FlashMLA counts every gathered "
              f"row). x FlashMLA = FlashMLA's time / this time, same inputs, same run. DSA "
              f"indexer logits: FLOPs as DeepGEMM's tests count them (visible (query, key) "
              f"pairs; the head-sum epilogue not counted), bytes with the whole -inf-filled "
              f"output; % of the FP8 roof (ragged) or of the copy bandwidth alone (paged). "
              f"'Nx torch' in a note = the plain-PyTorch baseline's time / this time.")
    table = report.markdown(rows, header)
    if args.out:
        written = report.write_all(args.out, rows, meta, table)
        _log(f"wrote {', '.join(written)} to {args.out}")
    print(table, flush=True)
    return rows
