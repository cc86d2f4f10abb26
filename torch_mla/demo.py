"""``python -m torch_mla.demo``: a DeepSeek-style sparse MLA block, eager and compiled.

Builds the toy block of ``torch_mla.toy_model``, runs the prefill of a short prompt
(``sparse_prefill``), writes the prompt into a paged FP8 cache (``write_kv_cache``), then decodes a
few tokens (``sparse_decode``) eagerly and under ``torch.compile(fullgraph=True)``, on CUDA when
available, else on the CPU. Prints which backend ran each op, how far the compiled steps are from
the eager ones, how far decoding over the FP8 cache is from the exact prefill of the same tokens,
and the time per decode step.

Options: ``--backend`` picks the torch.compile backend (default "inductor"; "aot_eager" skips
code generation, for a quick check), ``--steps`` the number of decode steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import api
from .toy_model import PagedCache, ToyConfig, ToyMLABlock


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode(step, xs, prompt_len, cache, device):
    """Run ``step`` over tokens ``xs [b, n, hidden]`` starting at position ``prompt_len``;
    returns the outputs ``[b, n, hidden]`` and the median seconds per step."""
    b, n = xs.shape[0], xs.shape[1]
    positions = torch.full((b,), prompt_len, dtype=torch.int64, device=device)
    outs, times = [], []
    for i in range(n):
        _sync(device)
        t0 = time.perf_counter()
        outs.append(step(xs[:, i], positions, cache))
        _sync(device)
        times.append(time.perf_counter() - t0)
        positions = positions + 1
    times.sort()
    return torch.stack(outs, dim=1), times[len(times) // 2]


def _first_line(text: str) -> str:
    # "mla::op on device: backend" -> "backend"
    return text.splitlines()[0].split(": ", 1)[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=6, help="decode steps")
    parser.add_argument("--prompt", type=int, default=24, help="prompt length")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 is what the GPU kernels run; the CPU reference is exact in f32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = ToyConfig()
    block = ToyMLABlock(cfg).to(device=device, dtype=dtype).eval()
    b, s, n = 2, args.prompt, args.steps
    prompt = torch.randn(s, cfg.hidden, device=device, dtype=dtype)
    new_tokens = torch.randn(b, n, cfg.hidden, device=device, dtype=dtype)

    # Prefill of the prompt (sparse_prefill) and the same prompt written into two FP8 caches,
    # one for the eager steps, one for the compiled ones, so both start from the same bytes.
    with torch.no_grad():
        prefill_out = block.prefill(prompt)
    caches = []
    for _ in range(2):
        cache = PagedCache.new(cfg, batch=b, max_len=s + n, block_size=16, device=device)
        for seq in range(b):
            block.fill_cache(cache, prompt, seq)
        caches.append(cache)

    eager, t_eager = _decode(block.decode_step, new_tokens, s, caches[0], device)
    compiled_step = torch.compile(block.decode_step, fullgraph=True, backend=args.backend)
    t0 = time.perf_counter()
    # The first call compiles; time it apart and leave it out of the per-step time.
    _decode(compiled_step, new_tokens[:, :1], s, caches[1], device)
    t_compile = time.perf_counter() - t0
    compiled, t_comp = _decode(compiled_step, new_tokens, s, caches[1], device)
    err_compiled = (compiled.float() - eager.float()).abs().max().item()

    # Decoding the prompt's own last token again over the FP8 cache must give (up to FP8
    # rounding) what the exact prefill gave for it.
    check_cache = PagedCache.new(cfg, batch=1, max_len=s, block_size=16, device=device)
    block.fill_cache(check_cache, prompt[: s - 1], 0)
    last = block.decode_step(prompt[s - 1:], torch.tensor([s - 1], device=device), check_cache)
    ref = prefill_out[s - 1:].float()
    err_fp8 = ((last.float() - ref).norm() / ref.norm()).item()

    # Which implementation ran each op (the choice depends only on shapes, dtypes, device).
    q, kv, indices = block.prefill_inputs(prompt)
    prefill_backend = _first_line(api.explain("sparse_prefill", q, kv, indices, block.sm_scale,
                                              cfg.d_latent))
    positions = torch.full((b,), s + n - 1, dtype=torch.int64, device=device)
    q_t, idx_t = block.decode_inputs(new_tokens[:, -1], positions, caches[0])
    decode_backend = _first_line(api.explain("sparse_decode", q_t, caches[0].k_cache, idx_t,
                                             d_v=cfg.d_latent, sm_scale=block.sm_scale))

    rows = [
        ("device / dtype", f"{device.type} / {str(dtype).replace('torch.', '')}"),
        ("block", f"h_q {cfg.n_heads}, d_qk {cfg.d_qk} = {cfg.d_latent} + {cfg.d_rope}, "
                  f"topk {cfg.topk}, FP8 cache layout {cfg.layout}"),
        ("sparse_prefill backend", prefill_backend),
        ("sparse_decode backend", decode_backend),
        ("prompt / batch / steps", f"{s} / {b} / {n}"),
        (f"compile ({args.backend}, fullgraph)", f"{t_compile:.1f} s (first call)"),
        ("max |compiled - eager|", f"{err_compiled:.3g}"),
        ("decode vs prefill (FP8 cache)", f"{err_fp8:.3g} relative error"),
        ("time / decode step, eager", f"{t_eager * 1e3:.2f} ms"),
        ("time / decode step, compiled", f"{t_comp * 1e3:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    print("torch_mla demo: DeepSeek-style sparse MLA block")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
