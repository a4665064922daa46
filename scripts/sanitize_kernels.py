"""Runs every CUDA kernel of the extension once on small, odd shapes (forward and backward), for
compute-sanitizer (memcheck, racecheck, initcheck): see scripts/gpu_check.sh."""

import torch

import crosslmm_ops
from crosslmm_ops.testing import non_contiguous

assert torch.cuda.is_available(), "needs a GPU"
torch.manual_seed(0)
runs = 0

POOL_CASES = [
    ("avg", dict(kernel_size=3)),
    ("avg", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                 temporal_stride=2)),
    ("max", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, temporal_stride=3)),
    ("adaptive", dict(output_size=1)),  # long rows: taps split across thread groups
    ("adaptive", dict(output_size=4)),
    ("bilinear", dict(output_size=(5, 4), align_corners=True)),
]
for dtype in (torch.bfloat16, torch.float32):
    for channels in (64, 37):  # 37: the narrow-vector path
        base = torch.randn(2, 5, 81, channels, device="cuda", dtype=dtype)
        for x in (base, non_contiguous(base, dim=2)):
            for mode, kw in POOL_CASES:
                x = x.detach().requires_grad_(True)
                out = crosslmm_ops.token_pool(x, 9, mode, backend="cuda", **kw)
                out.backward(torch.randn_like(out))
                runs += 2
torch.cuda.synchronize()

attention = getattr(crosslmm_ops, "cross_attention", None)
ext = crosslmm_ops._backend.extension()
if attention is not None and ext is not None and hasattr(ext, "attention_forward"):
    for sq, sk in ((1, 339), (9, 129), (113, 203), (70, 33)):
        for hd in (64, 128):
            q = torch.randn(2, sq, 4, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, sk, 2, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, sk, 2, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for splits in (1, 3):
                out = attention(q, k, v, num_splits=splits, backend="cuda")
                out.backward(torch.randn_like(out))
                runs += 2
    torch.cuda.synchronize()
if ext is not None and hasattr(ext, "projected_attention_forward"):
    # The projection-fused attention core (csrc/projected/), called directly: 16- and 32-row tiles
    # (1 and 3 queries x 12 heads), Dv with idle warps and a half k-step (64, 200) and the large-Dv
    # bucket (1160), key tails, a segment without keys, one without queries, key splits (3 and the
    # heuristic), a non-contiguous q.
    lens_q, lens_k = [1, 3, 0, 2], [37, 100, 5, 0]
    cu_q = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 37, 137, 142, 142], dtype=torch.int32, device="cuda")
    for dtype, dv in ((torch.bfloat16, 64), (torch.float16, 200), (torch.bfloat16, 1160)):
        x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
        q = torch.randn(sum(lens_q), 12, dv, device="cuda", dtype=dtype)
        for qq in (q, non_contiguous(q, dim=1)):
            for splits in (1, 3, 0):
                ext.projected_attention_forward(qq, x, cu_q, cu_k, 3, 100, 0.1, splits)
                runs += 2 if splits == 3 else 1  # 3 splits: forward + combine
    torch.cuda.synchronize()
print(f"sanitize_kernels: {runs} kernels run")
