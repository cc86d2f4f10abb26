"""Result rows and their writers: a Markdown table (printed last, and results.md), results.json,
and results.png (achieved vs roof per case, when matplotlib imports)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, List, Optional

COLUMNS = ("case", "backend", "us", "TFLOPS", "GB/s", "% of roof", "x FlashMLA", "note")


@dataclasses.dataclass
class Row:
    case: str
    op: str
    backend: str
    us: Optional[float] = None  # microseconds per call (host overhead rows: host time)
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    pct_roof: Optional[float] = None
    x_flashmla: Optional[float] = None  # FlashMLA's time / this time (> 1: faster than FlashMLA)
    # the plain-PyTorch baseline's time / this time (cases.baseline_of; shown in the note)
    x_baseline: Optional[float] = None
    flops: float = 0.0
    nbytes: float = 0.0
    roof_nbytes: float = 0.0  # the bytes "% of roof" uses (see cli's header)
    method: str = ""  # how it was timed
    note: str = ""  # why it did not run, or a remark

    @property
    def ran(self) -> bool:
        return self.us is not None


def _num(x: Optional[float], digits: int) -> str:
    if x is None:
        return "—"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _us(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:,.1f}" if x < 1e4 else f"{x:,.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: Iterable[Row], header: str = "") -> str:
    lines = []
    if header:
        lines += [header, ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        x = "—" if r.x_flashmla is None else f"{r.x_flashmla:.2f}x"
        cells = [r.case, r.backend, _us(r.us), _num(r.tflops, 1), _num(r.gbps, 0),
                 _num(r.pct_roof, 1), x, r.note]
        lines.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str, rows: List[Row], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def write_png(path: str, rows: List[Row], title: str = "") -> Optional[str]:
    """Horizontal bars: % of the measured roof per case and backend. Returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency ([bench] extra)
        return f"matplotlib unavailable ({type(exc).__name__})"
    plotted = [r for r in rows if r.pct_roof is not None]
    if not plotted:
        return "no row has a roof percentage"
    backends = sorted({r.backend for r in plotted})
    cases = list(dict.fromkeys(r.case for r in plotted))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    height = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(cases) * max(1, len(backends) / 2) + 1.5))
    for j, b in enumerate(backends):
        ys, xs = [], []
        for i, c in enumerate(cases):
            for r in plotted:
                if r.case == c and r.backend == b:
                    ys.append(i + j * height)
                    xs.append(r.pct_roof)
        ax.barh(ys, xs, height=height, color=colors[b], label=b)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100, color="k", lw=0.8)
    ax.set_xlabel("% of roof (max(FLOPs / matmul rate, bytes / copy bandwidth) / time)")
    ax.set_title(title or "achieved vs roof", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out_dir: str, rows: List[Row], meta: dict, table: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    written.append("results.md")
    why = write_png(os.path.join(out_dir, "results.png"), rows, meta.get("device", ""))
    if why is None:
        written.append("results.png")
    else:
        meta["png"] = why
    write_json(os.path.join(out_dir, "results.json"), rows, meta)
    written.append("results.json")
    return written
