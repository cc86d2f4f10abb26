"""The benchmark harness on the CPU: FLOP/byte formulas on known shapes (checked against the
FlashMLA peer table's published times, TFLOPS and GB/s, and against brute-force counts), the
Markdown writer, and a --tiny --quick dry run of every case (reference backend, host clock)."""

import itertools
import json
import math

import pytest
import torch

from torch_mla.bench import cases as C
from torch_mla.bench import cli, report
from torch_mla.bench import flops as F
from torch_mla.bench.roof import Roof


def _rate(count, us):
    return count / (us * 1e-6)


# ---------------------------------------------------------------------------------------------
# formulas: the peer table (shared/peers/flashmla/README.md) lists time, TFLOPS and GB/s measured
# with FlashMLA's own counts; ours must turn those times back into those rates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,s_q,s_k,us,tflops,gbps", [
    (64, 1, 8192, 240.9, 606, 2582),
    (128, 1, 8192, 513.0, 569, 2424),
    (64, 2, 4096, 216.7, 674, 1558),
])
def test_dense_decode_counts_reproduce_peer_table(b, s_q, s_k, us, tflops, gbps):
    fl, nb = F.dense_decode(b, s_q, 128, 1, b * s_k, 576, 512)
    assert fl == 2 * b * s_q * 128 * s_k * (576 + 512)
    assert nb == 2 * (b * s_k * 576 + b * s_q * 128 * (576 + 512))
    assert _rate(fl, us) / 1e12 == pytest.approx(tflops, rel=2e-3)
    assert _rate(nb, us) / 1e9 == pytest.approx(gbps, rel=2e-3)


@pytest.mark.parametrize("d_qk,h_q,us,tflops,gbps", [
    (576, 128, 4095, 571, 2639),
    (512, 128, 3946, 557, 2449),
    (512, 64, 1868, 589, 4886),
])
def test_sparse_prefill_counts_reproduce_peer_table(d_qk, h_q, us, tflops, gbps):
    s_q, topk = 4096, 2048
    fl, nb = F.sparse_prefill(s_q, h_q, d_qk, 512, s_q * topk, s_q * topk)
    assert fl == 2 * s_q * topk * h_q * (d_qk + 512)
    assert _rate(fl, us) / 1e12 == pytest.approx(tflops, rel=2e-3)
    assert _rate(nb, us) / 1e9 == pytest.approx(gbps, rel=2e-3)


@pytest.mark.parametrize("b,h_q,topk,extra,us,tflops", [
    (64, 128, 2048, 0, 201.7, 362),
    (128, 128, 2048, 0, 389.6, 375),
    (128, 64, 128, 512, 107.1, 200),
    (128, 128, 128, 1024, 216.8, 357),
    (148, 128, 16384, 0, 3206, 421),
])
def test_sparse_decode_flops_reproduce_peer_table(b, h_q, topk, extra, us, tflops):
    s_q = 2
    d_qk = 576 if extra == 0 else 512
    attended = b * s_q * (topk + extra)
    fl, _ = F.sparse_decode(b, s_q, h_q, d_qk, 512, attended, retrieved=0)
    assert _rate(fl, us) / 1e12 == pytest.approx(tflops, rel=3e-3)


def test_sparse_decode_bytes():
    # q and out in bf16, each distinct token once: 656 B (V32), 576 B (MODEL1, as FlashMLA counts)
    _, nb = F.sparse_decode(3, 2, 16, 576, 512, attended=999, retrieved=100)
    assert nb == 2 * 3 * 2 * 16 * (576 + 512) + 100 * 656
    _, nb = F.sparse_decode(3, 2, 16, 512, 512, attended=999, retrieved=100)
    assert nb == 2 * 3 * 2 * 16 * (512 + 512) + 100 * 576


def test_attention_pairs_brute_force():
    for s_q, s_k in itertools.product(range(0, 9), range(0, 9)):
        for causal in (False, True):
            want = sum(1 for i in range(s_q) for j in range(s_k)
                       if not causal or j <= i + s_k - s_q)
            assert F.attn_pairs(s_q, s_k, causal) == want


def test_dense_prefill_counts():
    b, s, h, d, dv = 4, 4096, 128, 192, 128
    pairs = b * s * (s + 1) // 2
    fl, nb = F.dense_prefill(b, s, s, h, h, d, dv, causal=True)
    assert fl == 2 * pairs * h * (d + dv)  # FlashMLA tests/test_fmha_sm100.py, fwd
    assert nb == 2 * b * s * h * (2 * d + 2 * dv)
    fl2, nb2 = F.dense_prefill(b, s, s, h, h, d, dv, causal=True, backward=True)
    assert fl2 == fl + 2 * pairs * h * (3 * d + 2 * dv)  # ... and bwd
    # backward adds reading q, k, v, out, dout and writing dq, dk, dv
    assert nb2 == nb + 2 * b * s * h * (2 * (2 * d + dv) + 2 * dv)


def test_sparse_prefill_backward_and_kv_write_counts():
    fl, nb = F.sparse_prefill_backward(10, 50, 4, 1, 576, 512, 10 * 8, 70)
    assert fl == 2 * 80 * 4 * (3 * 576 + 2 * 512)
    assert nb == 70 * 576 * 2 + 10 * 4 * (576 + 1024) * 2 + 10 * 4 * 4 + 10 * 4 * 576 * 2 \
        + 50 * 576 * 2
    assert F.kv_cache_write(16, 576, 656) == (0.0, 16 * (1152 + 8 + 656))


def test_roof_percent():
    r = Roof(bandwidth=1e12, flops=1e15, how="")
    # memory bound: 1 GB at 1 TB/s = 1 ms; measured 2 ms -> 50 %
    assert r.percent(1e9, 1e9, 2e-3) == pytest.approx(50.0)
    # compute bound: 1e12 FLOP at 1e15 = 1 ms
    assert r.percent(1e12, 1e6, 4e-3) == pytest.approx(25.0)
    assert r.percent(0, 0, 1e-3) is None and r.percent(1, 1, None) is None


# ---------------------------------------------------------------------------------------------
# the Markdown writer
# ---------------------------------------------------------------------------------------------

def test_markdown_table():
    rows = [
        report.Row("case a", "dense_decode", "triton", us=123.456, tflops=500.04, gbps=2100.4,
                   pct_roof=61.23, x_flashmla=0.5),
        report.Row("case a", "dense_decode", "native", note="not | built\nhere"),
        report.Row("case b", "kv_cache_write", "reference", us=12345.6, gbps=3.0),
    ]
    text = report.markdown(rows, header="hdr")
    lines = text.strip().splitlines()
    assert lines[0] == "hdr"
    assert lines[2] == "| case | backend | us | TFLOPS | GB/s | % of roof | x FlashMLA | note |"
    assert lines[3].startswith("|---|---|---:")
    assert lines[4] == "| case a | triton | 123.5 | 500.0 | 2,100 | 61.2 | 0.50x |  |"
    assert lines[5] == "| case a | native | — | — | — | — | — | not \\| built here |"
    assert lines[6] == "| case b | reference | 12,346 | — | 3 | — | — |  |"
    assert all(line.count("|") - line.count("\\|") == 9 for line in lines[2:])


# ---------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------

def test_case_table_covers_the_peer_rows():
    names = [c.name for c in C.all_cases()]
    assert sum(c.op == "dense_decode" for c in C.all_cases()) == 3
    assert sum("V32" in n and n.startswith("sparse_decode") for n in names) == 3
    assert sum("MODEL1" in n and n.startswith("sparse_decode") for n in names) == 2
    assert any("topk=16384" in n for n in names)
    assert sum(c.op == "sparse_prefill" for c in C.all_cases()) == 3
    assert {c.op for c in C.all_cases()} == set(C.OPS)
    assert len(set(names)) == len(names) and len({c.name for c in C.all_cases(True)}) == \
        len(C.all_cases(True))


def test_sparse_decode_inputs_are_valid_and_distinct():
    case = next(c for c in C.all_cases(tiny=True) if c.op == "sparse_decode")
    sp = case.spec
    gen = torch.Generator().manual_seed(0)
    cache, idx, retrieved = C._sparse_scope(gen, torch.device("cpu"), sp["layout"], sp["b"],
                                            sp["s_q"], sp["s_k"], sp["topk"], sp["block_size"])
    num_slots = cache.shape[0] * cache.shape[1]
    assert idx.dtype == torch.int32 and idx.shape == (sp["b"], sp["s_q"], sp["topk"])
    assert bool(((idx >= 0) & (idx < num_slots)).all())
    for row in idx.view(-1, sp["topk"]):
        assert row.unique().numel() == sp["topk"]  # without replacement
    # each batch element reads only its own blocks
    blocks = idx.long() // cache.shape[1]
    for i in range(sp["b"]):
        for j in range(sp["b"]):
            if i != j:
                assert not set(blocks[i].flatten().tolist()) & set(blocks[j].flatten().tolist())
    assert retrieved == idx.unique().numel()


def test_tiny_quick_dry_run(tmp_path, capsys):
    out = tmp_path / "bench"
    rows = cli.main(["--tiny", "--quick", "--backends", "reference,native,flashmla,sdpa",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(report.markdown(rows).rstrip().splitlines()[-1])
    ran = [r for r in rows if r.ran]
    assert {r.op for r in ran} == set(C.OPS)  # the reference ran every case
    for r in ran:
        assert r.us > 0 and math.isfinite(r.us)
        if r.op != "host_overhead":
            assert r.gbps > 0 and r.pct_roof > 0
    # refusals are recorded with a reason, and the run went on
    refused = [r for r in rows if not r.ran]
    assert refused and all(r.note for r in refused)
    assert any(r.backend == "flashmla" and "not importable" in r.note for r in refused) or \
        any(r.backend == "flashmla" and r.ran for r in rows)
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["tiny"] is True
    assert (out / "results.md").read_text().count("\n") >= len(rows) + 2


def test_reference_is_skipped_on_huge_shapes(monkeypatch):
    monkeypatch.setattr(C, "REF_MAX_FLOPS", 0.0)
    rows = cli.main(["--tiny", "--quick", "--ops", "sparse_prefill,host_overhead",
                     "--backends", "reference"])
    notes = {r.op: r for r in rows}
    assert not notes["sparse_prefill"].ran
    assert "reference skipped" in notes["sparse_prefill"].note
    assert notes["host_overhead"].ran  # host overhead is a small call: always measured


def test_unknown_names_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["--tiny", "--ops", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["--tiny", "--backends", "cudnn"])
