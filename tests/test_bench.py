"""The benchmark harness on the CPU: FLOP/byte formulas on known shapes (checked against the
FlashMLA peer table's published times, TFLOPS and GB/s, against brute-force counts, and for the
DSA indexer against hand-computed numbers at the production shapes), the roof kinds (FP8 roof
absent on a CPU), the Markdown writer, and a --tiny --quick dry run of every case (reference
backend, host clock)."""

import itertools
import json
import math
import os
import time

import pytest
import torch

from torch_mla.bench import cases as C
from torch_mla.bench import cli, report
from torch_mla.bench import flops as F
from torch_mla.bench import roof as R
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


# ---------------------------------------------------------------------------------------------
# DSA indexer counts (hand-computed at the bench's shapes; sources in flops.py)
# ---------------------------------------------------------------------------------------------

def test_indexer_logits_counts():
    # causal: the last 4096 queries of a 32768-token sequence; query t sees 28673 + t keys
    visible = F.window_pairs(4096, 32768, causal=True)
    assert visible == 125_831_168  # (28673 + 32768) * 4096 / 2
    fl, nb = F.indexer_logits(4096, 32768, 64, 128, visible)
    assert fl == 2_061_617_856_512  # 2 * visible * h * d (DeepGEMM test_mqa_logits)
    # q 33,554,432 + k 4,194,304 + k_scale 131,072 + weights 1,048,576 + k_start/k_end 32,768
    # + the whole f32 output 536,870,912
    assert nb == 575_832_064
    assert F.indexer_logits_all_keys_flops(4096, 32768, 64, 128) == 2_199_023_255_552
    assert F.window_pairs(4096, 32768, causal=False) == 4096 * 32768


def test_indexer_window_pairs_are_deepgemm_cost():
    # DeepGEMM's cost_only count: sum over rows of clamp(ke) - clamp(ks), clamped at 0, with
    # the bench's windows ks = 0, ke = s_k - s_q + t + 1 (causal) or s_k (full)
    for s_q, s_k in itertools.product(range(0, 7), range(0, 7)):
        for causal in (False, True):
            cost = 0
            for t in range(s_q):
                ke = s_k - s_q + t + 1 if causal else s_k
                cost += max(0, min(max(ke, 0), s_k) - 0)
            assert F.window_pairs(s_q, s_k, causal) == cost


def test_indexer_paged_topk_quantize_write_counts():
    fl, nb = F.indexer_logits_paged(128, 2, 64, 128, 128 * 32768, 64, 32768)
    assert fl == 137_438_953_472  # 2 * sum_lens * next_n * h * d (DeepGEMM)
    # q 2,097,152 + weights 65,536 + context_lens 512 + cache 553,648,128 + block table 262,144
    # + output 33,554,432
    assert nb == 589_627_904
    assert F.indexer_topk(4096, 32768, 2048) == (0.0, 570_425_344)  # 536,870,912 + 33,554,432
    # [4096, 64, 128] bf16: 67,108,864 read, 33,554,432 + 1,048,576 written
    assert F.indexer_quantize(4096 * 64, 128) == (0.0, 101_711_872)
    assert F.write_indexer_cache(16384, 128) == (0.0, 6_488_064)  # 16384 * (256 + 8 + 132)


def test_roof_kinds():
    r = Roof(bandwidth=1e12, flops=1e15, how="", fp8_flops=2e15, fp8_how="probe")
    # 1e12 FLOP: 1 ms at the bf16 rate, 0.5 ms at the FP8 rate; 1e8 B: 0.1 ms
    assert r.percent(1e12, 1e8, 1e-3) == pytest.approx(100.0)
    assert r.percent(1e12, 1e8, 1e-3, "fp8") == pytest.approx(50.0)
    assert r.percent(1e12, 1e8, 1e-3, "bytes") == pytest.approx(10.0)
    # memory bound at FP8 too
    assert r.percent(1e9, 1e9, 2e-3, "fp8") == pytest.approx(50.0)
    no_fp8 = Roof(bandwidth=1e12, flops=1e15, how="")
    assert no_fp8.fp8_flops is None and no_fp8.percent(1e12, 1e8, 1e-3, "fp8") is None
    with pytest.raises(ValueError):
        r.time(1.0, 1.0, "fp16")


def test_fp8_roof_is_absent_on_cpu():
    rate, why = R.fp8_matmul_rate(torch.device("cpu"))
    assert rate is None and "no FP8 roof" in why
    measured = R.measure(torch.device("cpu"), quick=True)
    assert measured.fp8_flops is None and "no FP8 roof" in measured.fp8_how


def test_torch_logits_baseline_matches_float64_formula():
    # the "torch" baseline must compute what indexer_logits computes (bf16 rounding aside)
    gen = torch.Generator().manual_seed(1)
    s_q, s_k, h, d = 5, 37, 3, 16
    q8 = (torch.randn(s_q, h, d, generator=gen) * 4).to(torch.float8_e4m3fn)
    k8 = (torch.randn(s_k, d, generator=gen) * 4).to(torch.float8_e4m3fn)
    ks = torch.rand(s_k, generator=gen) + 0.5
    w = torch.randn(s_q, h, generator=gen)
    lo = torch.tensor([0, 3, 10, 0, 36], dtype=torch.int32)
    hi = torch.tensor([37, 20, 10, 1, 40], dtype=torch.int32)
    got = C._torch_logits(q8, k8, ks, w, lo, hi)()
    s = torch.einsum("thd,sd->ths", q8.double(), k8.double()).clamp_min(0)
    want = (w.double()[:, :, None] * s).sum(1) * ks.double()
    pos = torch.arange(s_k)
    inside = (pos[None] >= lo[:, None].long()) & (pos[None] < hi[:, None].long())
    assert torch.equal(torch.isfinite(got), inside)
    assert bool((got[~inside] == float("-inf")).all())
    err = (got[inside].double() - want[inside]).norm() / want[inside].norm()
    assert err < 2e-2


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
        if r.op == "indexer_logits":  # % of the FP8 roof, which a CPU lacks: said so
            assert r.gbps > 0 and r.pct_roof is None and "no FP8 roof" in r.note
        elif r.op != "host_overhead":
            assert r.gbps > 0 and r.pct_roof > 0
    # refusals are recorded with a reason, and the run went on
    refused = [r for r in rows if not r.ran]
    assert refused and all(r.note for r in refused)
    assert any(r.backend == "flashmla" and "not importable" in r.note for r in refused) or \
        any(r.backend == "flashmla" and r.ran for r in rows)
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["tiny"] is True
    assert (out / "results.md").read_text().count("\n") >= len(rows) + 2


def test_indexer_cases_dry_run():
    ops = "indexer_logits,indexer_logits_paged,indexer_topk,indexer_quantize,write_indexer_cache"
    t0 = time.perf_counter()
    rows = cli.main(["--tiny", "--quick", "--ops", ops])
    assert time.perf_counter() - t0 < 20  # a few seconds on 2 cores
    by = {(r.op, r.backend, r.case): r for r in rows}
    assert {r.op for r in rows} == set(C.INDEXER_OPS)
    assert sum(1 for r in rows if r.op == "indexer_logits" and r.backend == "reference") == 2
    for r in rows:
        if r.backend == "reference":
            assert r.ran and r.gbps > 0, r
            if r.op in ("indexer_logits", "indexer_topk"):
                # compared with the plain-PyTorch baseline of the same case, in the note
                base = by[(r.op, "torch", r.case)]
                assert base.ran and r.x_baseline == pytest.approx(base.us / r.us)
                assert f"{r.x_baseline:.2f}x torch" in r.note
            if r.op == "indexer_logits":
                assert r.tflops > 0 and r.pct_roof is None
                assert ("counting all s_k keys" in r.note) == ("causal" in r.case)
            else:
                assert r.pct_roof > 0
        elif r.backend == "native":
            assert not r.ran and "no kernel for" in r.note  # the dispatcher's reason
        elif r.backend == "flashmla":
            assert not r.ran and "no DSA indexer" in r.note
        elif r.backend == "torch" and r.op not in ("indexer_logits", "indexer_topk"):
            assert not r.ran and "baseline" in r.note
    # the causal case counts the visible pairs only
    causal = next(c for c in C.all_cases(True) if c.op == "indexer_logits" and "causal" in c.name)
    sp = causal.spec
    want = 2.0 * F.attn_pairs(sp["s_q"], sp["s_k"], True) * sp["h"] * sp["d"]
    assert by[("indexer_logits", "reference", causal.name)].flops == want


def test_indexer_case_table():
    for tiny in (False, True):
        cs = [c for c in C.all_cases(tiny) if c.op in C.INDEXER_OPS]
        assert [c.op for c in cs].count("indexer_logits") == 2
        assert {c.op for c in cs} == set(C.INDEXER_OPS)
    full = {c.op: c.spec for c in C.all_cases() if c.op in C.INDEXER_OPS}
    assert full["indexer_logits_paged"] == dict(b=128, next_n=2, context=32768, h=64, d=128,
                                                block_size=64)
    assert full["indexer_topk"] == dict(rows=4096, s_k=32768, k=2048)
    assert tuple(full["indexer_quantize"]["shape"]) == (4096, 64, 128)
    assert full["write_indexer_cache"]["n"] == 16384
    assert C.baseline_of(C.all_cases()[0]) is None


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


def test_native_serial_sets_the_switch_around_each_call(monkeypatch):
    # the bench's "native-serial" backend: the native library reads the variable at each
    # call, so it must be set during the call (and during a CUDA-graph capture) and restored
    from torch_mla._dispatch import forced_backend

    monkeypatch.delenv("TORCH_MLA_NATIVE_DECODE_WGMMA", raising=False)
    seen = C._native_serial(
        lambda: (os.environ.get("TORCH_MLA_NATIVE_DECODE_WGMMA"), forced_backend()))()
    assert seen == ("0", "native")
    assert "TORCH_MLA_NATIVE_DECODE_WGMMA" not in os.environ
    monkeypatch.setenv("TORCH_MLA_NATIVE_DECODE_WGMMA", "1")
    C._native_serial(lambda: None)()
    assert os.environ["TORCH_MLA_NATIVE_DECODE_WGMMA"] == "1"
