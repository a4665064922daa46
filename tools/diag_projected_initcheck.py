"""Diagnostic for the initcheck finding in the projected path (see tools/README.md).

initcheck flagged uninitialised 2-byte reads in a torch copy kernel called from ``_rows_view`` --
the reshape of the grouped q~, which cuBLAS's batched GEMM wrote. Three sections, each printed
before it runs so that initcheck's reports can be attributed:

  A. torch alone: a bmm into the grouped layout, then the same permute+reshape copy. If initcheck
     flags this, the reads are of memory written by cuBLAS (whose Hopper GEMMs store through TMA,
     which initcheck does not track) -- a false report, not ours.
  B. our projected core, called directly, with NaN left in the caching allocator: an unwritten
     output element reads back as NaN (a real bug), and the clone of the output is checked.
  C. the public fused-path call, as scripts/sanitize_kernels.py makes it.

    python tools/diag_projected_initcheck.py [A|B|C ...]      (default: all three)
    compute-sanitizer --tool initcheck python tools/diag_projected_initcheck.py A
"""

import sys

import torch

import crosslmm_ops
from crosslmm_ops import _backend

ext = _backend.extension()
torch.manual_seed(0)
dev, bf16 = "cuda", torch.bfloat16
cu_q = torch.tensor([0, 9, 18, 19], dtype=torch.int32, device=dev)
cu_k = torch.tensor([0, 729, 1458, 4458], dtype=torch.int32, device=dev)
x = torch.randn(4458, 1152, device=dev, dtype=bf16)


def section_a():
    print("=== A: torch bmm, then the reshape copy of its output", flush=True)
    a = torch.randn(2, 19 * 6, 128, device=dev, dtype=bf16)
    b = torch.randn(2, 128, 1152, device=dev, dtype=bf16)
    c = torch.bmm(a, b).view(2, 19, 6, 1152)
    c.permute(1, 0, 2, 3).reshape(19, 12, 1152)
    torch.cuda.synchronize()


def section_b():
    q = torch.randn(19, 12, 1152, device=dev, dtype=bf16)
    for splits in (1, 4, 0):
        print(f"=== B: core, splits={splits}", flush=True)
        junk = torch.full((19 * 12 * 1152 * 4,), float("nan"), device=dev, dtype=bf16)
        del junk  # NaN left in the allocator's cache: unwritten output elements read back as NaN
        out, lse = ext.projected_attention_core_forward(q, x, cu_q, cu_k, 9, 3000, 0.1, splits)
        torch.cuda.synchronize()
        print(
            f"B splits={splits}: NaN in out {int(torch.isnan(out).sum())}, "
            f"in lse {int(torch.isnan(lse).sum())}",
            flush=True,
        )
        out.clone()
        torch.cuda.synchronize()


def section_c():
    print("=== C: public call", flush=True)
    w = torch.randn(256, 1152, device=dev, dtype=bf16) / 34
    q = torch.randn(19, 12, 128, device=dev, dtype=bf16)
    o = crosslmm_ops.projected_cross_attention(
        q,
        x,
        w,
        w,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        norm="layernorm",
        path="fused",
        backend="cuda",
        num_splits=1,
    )
    torch.cuda.synchronize()
    print("=== C done; NaN in output:", int(torch.isnan(o).sum()), flush=True)


for name in sys.argv[1:] or ["A", "B", "C"]:
    {"A": section_a, "B": section_b, "C": section_c}[name]()
