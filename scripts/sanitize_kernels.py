"""Runs every CUDA kernel of the extension once on small, odd shapes (forward and backward), for
compute-sanitizer (memcheck, racecheck, initcheck): see scripts/gpu_check.sh.

Kernels: token pooling (every mode, fwd + bwd), the attention forward on its three kernels (the
sm90 wgmma + TMA one, chosen for head dim 128 fp16/bf16 with >= 64 query rows, the GQA-packed
sm90 one for fewer, and the mma.sync one, forced per call with CROSSLMM_ATTENTION_SM90=0, which
the planner reads at every call), their
split-KV combine, the attention backward, and the projection-fused core (direct and through
projected_cross_attention) on its kernels (mma_sync; the decode kernel with cp.async and bulk-copy
loads; sm90_cluster on an sm_90 GPU), with its split combine, and its backward (direct).
CROSSLMM_SANITIZE_SECTIONS (comma-separated section names) runs some sections only."""

import os

import torch

import crosslmm_ops
from crosslmm_ops.testing import non_contiguous

assert torch.cuda.is_available(), "needs a GPU"
torch.manual_seed(0)
runs = 0
# CROSSLMM_SANITIZE_SECTIONS="projected sm90_cluster,attention" runs only those sections (names as
# the section lines print them); unset, every section runs.
SECTIONS = os.environ.get("CROSSLMM_SANITIZE_SECTIONS")
REQUESTED = None if SECTIONS is None else {n.strip() for n in SECTIONS.split(",")}
seen = set()


def section(name: str) -> bool:
    """Whether section ``name`` runs; its header line either way."""
    seen.add(name)
    wanted = REQUESTED is None or name in REQUESTED
    print(f"sanitize_kernels: section {name}{'' if wanted else ' skipped'}", flush=True)
    return wanted


POOL_CASES = [
    ("avg", dict(kernel_size=3)),
    (
        "avg",
        dict(
            kernel_size=3,
            stride=2,
            padding=1,
            ceil_mode=True,
            count_include_pad=False,
            temporal_stride=2,
        ),
    ),
    ("max", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, temporal_stride=3)),
    ("adaptive", dict(output_size=1)),  # long rows: taps split across thread groups
    ("adaptive", dict(output_size=4)),
    ("bilinear", dict(output_size=(5, 4), align_corners=True)),
]
if section("token_pool"):
    for dtype in (torch.bfloat16, torch.float32):
        for channels in (64, 37):  # 37: the narrow-vector path
            base = torch.randn(2, 5, 81, channels, device="cuda", dtype=dtype)
            for x in (base, non_contiguous(base, dim=2)):
                for mode, kw in POOL_CASES:
                    x = x.detach().requires_grad_(True)
                    out = crosslmm_ops.token_pool(x, 9, mode, backend="cuda", **kw)
                    out.backward(torch.randn_like(out))
                    with torch.no_grad():  # max without winners: its own kernel path
                        crosslmm_ops.token_pool(x, 9, mode, backend="cuda", **kw)
                    runs += 3
    # Long rows, few of them (the mean over a 27x27 frame, over one and over two frames).
    for temporal_stride in (1, 2):
        x = torch.randn(1, 3, 729, 64, device="cuda", requires_grad=True)
        out = crosslmm_ops.token_pool(
            x, 27, "adaptive", output_size=1, temporal_stride=temporal_stride, backend="cuda"
        )
        out.backward(torch.randn_like(out))
        runs += 2
    torch.cuda.synchronize()

attention = getattr(crosslmm_ops, "cross_attention", None)
ext = crosslmm_ops._backend.extension()
if section("attention") and attention is not None and hasattr(ext, "attention_forward"):
    kernels = set()  # the forward kernels that ran (auto: head dim 128 with < 64 queries on sm_90
    # takes the GQA-packed wgmma kernel, sm90_packed; head dim 64 the mma.sync one)
    for sq, sk in ((1, 339), (9, 129), (113, 203), (70, 33)):
        for hd in (64, 128):
            q = torch.randn(2, sq, 4, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, sk, 2, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, sk, 2, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for splits in (1, 3):
                out = attention(q, k, v, num_splits=splits, backend="cuda")
                kernels.add(ext.attention_forward_kernel_name())
                out.backward(torch.randn_like(out))
                runs += 2
    # Many splits (> 16): the CTA-per-row combine; fewer take the warp-per-row one (above).
    q = torch.randn(2, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2100, 2, 128, device="cuda", dtype=torch.bfloat16)
    attention(q, k, k, num_splits=24, backend="cuda")
    runs += 2
    # The sm90 forwards (auto, head dim 128: the sm90 kernel for >= 64 query rows, sm90_packed
    # for fewer; fp16 and bf16; a key tail, GQA, varlen with an empty segment, splits) and the
    # same calls on mma.sync (SM90=0).
    print("sanitize_kernels: section attention sm90/mma", flush=True)
    for sm90 in ("auto", "0"):
        os.environ["CROSSLMM_ATTENTION_SM90"] = sm90
        for dtype in (torch.bfloat16, torch.float16):
            for sq, sk in ((9, 200), (64, 200), (130, 333)):
                q = torch.randn(1, sq, 4, 128, device="cuda", dtype=dtype)
                k = torch.randn(1, sk, 2, 128, device="cuda", dtype=dtype)
                for splits in (1, 3, 0):
                    attention(q, k, k, num_splits=splits, backend="cuda")
                    kernels.add(ext.attention_forward_kernel_name())
                    runs += 1 if splits == 1 else 2
            # Varlen with an empty segment: query segments of 70 / 0 / 65 (the sm90 kernel) and
            # of 9 / 0 / 5 (sm90_packed under auto), keys 129 / 40 / 0.
            for lens_q in ([70, 0, 65], [9, 0, 5]):
                cu_q = torch.tensor([0, lens_q[0], lens_q[0], sum(lens_q)], device="cuda")
                cu_k = torch.tensor([0, 129, 169, 169], device="cuda")
                q = torch.randn(sum(lens_q), 4, 128, device="cuda", dtype=dtype)
                k = torch.randn(169, 2, 128, device="cuda", dtype=dtype)
                attention(
                    q,
                    k,
                    k,
                    cu_seqlens_q=cu_q.int(),
                    cu_seqlens_k=cu_k.int(),
                    num_splits=2,
                    backend="cuda",
                )
                kernels.add(ext.attention_forward_kernel_name())
                runs += 2
        torch.cuda.synchronize()
    os.environ.pop("CROSSLMM_ATTENTION_SM90", None)
    print(f"sanitize_kernels: attention forward kernels run: {sorted(kernels)}")
if section("projected core") and hasattr(ext, "projected_attention_core_forward"):
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
                ext.projected_attention_core_forward(qq, x, cu_q, cu_k, 3, 100, 0.1, splits)
                runs += 2 if splits == 3 else 1  # 3 splits: forward + combine
    # One query per segment (12 rows, one m16 tile: the decode launch, 32-key x tiles where two
    # stages fit), key tails that are not multiples of 32, with and without splits.
    lens_k = [37, 100, 0, 45]
    cu_q = torch.arange(0, 5, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 37, 137, 137, 182], dtype=torch.int32, device="cuda")
    for dtype, dv in ((torch.bfloat16, 1152), (torch.float16, 200)):
        x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
        q = torch.randn(4, 12, dv, device="cuda", dtype=dtype)
        for splits in (1, 3, 0):
            ext.projected_attention_core_forward(q, x, cu_q, cu_k, 1, 100, 0.1, splits)
            runs += 2 if splits == 3 else 1
    # The decode kernel (projected_decode_kernel.cuh: one m16 tile, Dv <= 1152, where its 207.6 KB
    # fit) with cp.async and with bulk-copy loads, and the general 32-key kernel (kernel
    # "mma_sync") on the same calls: 12 and 5 heads, keys around its 16-key slots and 32-key tiles
    # (1, 31, 33, 65) and a long segment (1000), an empty segment, one split, 3 (empty splits in
    # the short segments) and the heuristic, whose combine is a programmatic dependent launch on
    # sm_90.
    lens_k = [1, 31, 33, 0, 65, 1000]
    cu_q = torch.arange(0, len(lens_k) + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    for kernel in ("decode", "decode_bulk", "mma_sync"):
        for dtype, dv, heads in ((torch.bfloat16, 1152, 12), (torch.float16, 200, 5)):
            x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
            q = torch.randn(len(lens_k), heads, dv, device="cuda", dtype=dtype)
            for splits in (1, 3, 0):
                ext.projected_attention_core_forward(q, x, cu_q, cu_k, 1, 1000, 0.1, splits, kernel)
                runs += 1 if splits == 1 else 2
        torch.cuda.synchronize()
    torch.cuda.synchronize()
if section("projected sm90_cluster") and hasattr(ext, "projected_attention_core_forward"):
    # The Hopper core (sm90_cluster), where it can run: rows per segment 1..129 around its 64-row
    # tiles, key tails around its 32-key tiles, a segment without keys, Dv 1152 and 512 (atoms
    # past Dv: TMA zero fill), key splits 1, 3 and the heuristic.
    sm90 = "90a" in ext.cuda_archs().split(",") and torch.cuda.get_device_capability() == (9, 0)
    print(f"sanitize_kernels: sm90_cluster {'runs' if sm90 else 'skipped (not sm_90/90a)'}")
    if sm90 and hasattr(ext, "projected_attention_core_forward_kernel_name"):
        lens_q, lens_k = [1, 0, 9, 63, 65, 129, 4], [33, 7, 1, 31, 729, 100, 0]
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
        cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
        for dtype, dv in ((torch.bfloat16, 1152), (torch.float16, 512)):
            x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
            q = torch.randn(sum(lens_q), 1, dv, device="cuda", dtype=dtype)
            for splits in (1, 3, 0):
                ext.projected_attention_core_forward(
                    q, x, cu_q, cu_k, max(lens_q), max(lens_k), 0.1, splits, "sm90_cluster"
                )
                ran = ext.projected_attention_core_forward_kernel_name()
                assert ran == "sm90_cluster", ran
                runs += 2 if splits == 3 else 1
        torch.cuda.synchronize()
if section("projected core backward") and hasattr(ext, "projected_attention_core_backward"):
    # The core's backward called directly (delta, dx, dq and, with splits, the split-sum kernels):
    # 16-row tiles with row and key tails, a segment without keys and one without queries, Dv with
    # idle warps (200), the large-Dv bucket (1160, one pipeline stage), splits 1 / 3 / heuristic,
    # dlse given and not, a non-contiguous q.
    lens_q, lens_k = [1, 3, 0, 2], [37, 100, 5, 0]
    cu_q = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 37, 137, 142, 142], dtype=torch.int32, device="cuda")
    for dtype, dv in ((torch.bfloat16, 1152), (torch.float16, 200), (torch.bfloat16, 1160)):
        x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
        q = torch.randn(sum(lens_q), 12, dv, device="cuda", dtype=dtype)
        out, lse = ext.projected_attention_core_forward(q, x, cu_q, cu_k, 3, 100, 0.1, 1)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse)
        for qq in (q, non_contiguous(q, dim=1)):
            for splits in (1, 3, 0):
                for g in (None, dlse):
                    ext.projected_attention_core_backward(
                        dout, qq, x, out, lse, cu_q, cu_k, 3, 100, 0.1, splits, dlse=g
                    )
                    runs += 5 if splits == 3 else 3  # delta, dx, dq (+ 2 split sums)
    torch.cuda.synchronize()
public = section("projected public")
if public and os.environ.get("CROSSLMM_SANITIZE_TOOL") in ("initcheck", "racecheck"):
    # The public call below runs our core (checked above, called directly) between cuBLAS GEMMs,
    # and both tools report inside cuBLAS's Hopper GEMMs (nvjet_sm90_*), not in our code:
    # initcheck flags every read of memory such a GEMM wrote (it stores through TMA, which
    # initcheck does not track: torch.bmm then a copy, none of our code, gives the same reports,
    # tools/diag_projected_initcheck.py section A), and racecheck reports hazards inside the
    # GEMM itself (mbarrier-ordered shared memory). So only memcheck runs this section.
    print(
        "sanitize_kernels: public projected call skipped under "
        f"{os.environ['CROSSLMM_SANITIZE_TOOL']} (cuBLAS GEMMs; see the comment)",
        flush=True,
    )
elif public and hasattr(ext, "projected_attention_core_forward"):
    # Through the public op: the fused path's forward on CUDA (its backward on CUDA where the
    # extension has it, else Triton),
    # frame-local segments and a decode row against a long segment, with splits.
    lens_q, lens_k = [9, 9, 1], [729, 729, 3000]
    cu_q = torch.tensor([0, 9, 18, 19], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 729, 1458, 4458], dtype=torch.int32, device="cuda")
    q = torch.randn(19, 12, 128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4458, 1152, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 1152, device="cuda", dtype=torch.bfloat16) / 34
    for splits in (1, 4, 0):
        crosslmm_ops.projected_cross_attention(
            q,
            x,
            w,
            w,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            norm="layernorm",
            path="fused",
            backend="cuda",
            num_splits=splits,
        )
        runs += 1 if splits == 1 else 2
    torch.cuda.synchronize()
print(f"sanitize_kernels: {runs} kernels run")
if REQUESTED is not None and REQUESTED - seen:
    raise SystemExit(f"CROSSLMM_SANITIZE_SECTIONS: no section {sorted(REQUESTED - seen)}")
