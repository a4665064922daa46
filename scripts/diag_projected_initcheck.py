"""Diagnostic for the open initcheck finding (README, Tests): does the CUDA projected-attention core
leave output elements unwritten? Its binding allocates the output itself (so the Python-level
poisoning of the tests never reaches it): NaN is left in the caching allocator first, so unwritten
elements read back as NaN; run it also under `compute-sanitizer --tool initcheck` to see whether
the clone of the output is what initcheck flags. Not yet run (device time ran out).

    python scripts/diag_projected_initcheck.py
"""
import sys, torch, crosslmm_ops
from crosslmm_ops import _backend
ext = _backend.extension()
torch.manual_seed(0)
cu_q = torch.tensor([0, 9, 18, 19], dtype=torch.int32, device="cuda")
cu_k = torch.tensor([0, 729, 1458, 4458], dtype=torch.int32, device="cuda")
x = torch.randn(4458, 1152, device="cuda", dtype=torch.bfloat16)
q = torch.randn(19, 12, 1152, device="cuda", dtype=torch.bfloat16)
for splits in (1, 4, 0):
    # leave NaN in the allocator's cache so that unwritten output elements read back as NaN
    junk = torch.full((19 * 12 * 1152 * 4,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del junk
    out, lse = ext.projected_attention_forward(q, x, cu_q, cu_k, 9, 3000, 0.1, splits)
    torch.cuda.synchronize()
    print(f"splits={splits}: NaN in out {int(torch.isnan(out).sum())}, in lse {int(torch.isnan(lse).sum())}", flush=True)
    print(f"--- clone of out, splits={splits}", flush=True)
    y = out.clone()
    torch.cuda.synchronize()
    print(f"--- clone done", flush=True)
w = torch.randn(256, 1152, device="cuda", dtype=torch.bfloat16) / 34
q2 = torch.randn(19, 12, 128, device="cuda", dtype=torch.bfloat16)
print("--- public call", flush=True)
o = crosslmm_ops.projected_cross_attention(q2, x, w, w, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, norm="layernorm", path="fused", backend="cuda", num_splits=1)
torch.cuda.synchronize()
print("--- public call done; NaN", int(torch.isnan(o).sum()), flush=True)
