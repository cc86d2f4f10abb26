"""Tutorial 2: training through sparse attention.

``torch_mla.sparse_prefill`` has a backward pass (gradients to q, kv and the attention sinks), so a
DSA block trains like any PyTorch module. Here a toy block learns to imitate a "teacher" block of
the same shape with other weights, on random token sequences, for a few Adam steps; the loss must
go down. The top-k selection itself is not differentiable (it picks indices), so the selector's
weights get no gradient here; DeepSeek trains its indexer with a separate distillation loss.
Runs on the CPU in a few seconds:  python tutorials/02_train.py
"""

import torch

from torch_mla.toy_model import ToyConfig, ToyMLABlock

torch.manual_seed(0)
cfg = ToyConfig(hidden=128, n_heads=8, q_rank=64, d_latent=448, d_rope=64, topk=8)
student = ToyMLABlock(cfg)
teacher = ToyMLABlock(cfg).requires_grad_(False)
# Same selector in both, so the student only has to learn the attention itself.
student.w_iq.load_state_dict(teacher.w_iq.state_dict())
student.w_ik.load_state_dict(teacher.w_ik.state_dict())

trainable = [p for n, p in student.named_parameters() if not n.startswith(("w_iq", "w_ik"))]
opt = torch.optim.Adam(trainable, lr=3e-3)
# A small fixed data set (two sequences of 24 tokens) and the teacher's outputs on it.
data = [torch.randn(24, cfg.hidden) for _ in range(2)]
targets = [teacher.prefill(x) for x in data]
steps = 30
losses = []
for step in range(steps):
    x, target = data[step % 2], targets[step % 2]
    # Normalised MSE: 1.0 means "no better than predicting zeros".
    loss = (student.prefill(x) - target).pow(2).mean() / target.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()  # through sparse_prefill's backward op (mla::sparse_prefill_backward)
    opt.step()
    losses.append(loss.item())
    if step % 5 == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.5f}")

# Everything that feeds the attention got a gradient; the selector did not.
assert student.w_kva.weight.grad is not None and student.w_uk.grad is not None
assert student.w_iq.weight.grad is None
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"mean loss of the first 5 steps {first:.5f}, of the last 5 {last:.5f}")
assert last < 0.5 * first, (first, last)
print("ok")
