"""The CUDA backward of the projection-fused attention core (csrc/projected/projected_backward*),
called directly through ``crosslmm_ops._C.projected_attention_core_backward(dout, q, x, out, lse,
cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, num_splits, dlse=None) ->
(dq, dx)``, and through autograd of ``projected_cross_attention``.

The gradients are checked against the float64 oracle (tests/attention_oracle.py: attention with one
key head that is also the value head, ``x``, differentiated by autograd), with the error bounded by
3x plain PyTorch's error computing the same gradients in the kernel's low precision, plus a
rounding-sized floor (flash-attn's bound for gradients). ``out`` and ``lse`` come from the CUDA
forward, as in training. The binding allocates its outputs, so the caching allocator is handed
NaN-filled blocks of their sizes just before each call (``poison_allocator``): an unwritten element
shows as NaN. Inputs are random normal (never zeros), so a stale result cannot pass.

Every test needs a GPU and an extension built with ``projected_attention_core_backward``.
"""

from __future__ import annotations

import functools

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, rounding
from test_projected_cuda_kernel import HQ, SCALE, max_seqlen, poison_allocator

import crosslmm_ops
from crosslmm_ops import _backend
from crosslmm_ops.testing import cu_seqlens as cu_seqlens_on
from crosslmm_ops.testing import non_contiguous


def _extension():
    ext = _backend.extension()
    return ext if ext is not None and hasattr(ext, "projected_attention_core_backward") else None


_needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _extension() is None,
    reason="needs a CUDA GPU and crosslmm_ops._C built with projected_attention_core_backward",
)


def gpu(test):
    """Marks a test `cuda` and skips it without a GPU or without the binding."""
    return pytest.mark.cuda(_needs_gpu(test))


DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
FRAME = 729
cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class Case:
    """Random inputs of one call: q [total_q, H, Dv], x [total_k, Dv], the CUDA forward's out and
    lse, a random output gradient and (with_dlse) a random LSE gradient."""

    def __init__(self, lens_q, lens_k, heads, dv, dtype, with_dlse=False, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.q = torch.randn(sum(lens_q), heads, dv, device="cuda", dtype=dtype, generator=g)
        self.x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype, generator=g)
        self.cu_q, self.cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
        self.max_q, self.max_k = max_seqlen(self.cu_q), max_seqlen(self.cu_k)
        self.out, self.lse = _extension().projected_attention_core_forward(
            self.q, self.x, self.cu_q, self.cu_k, self.max_q, self.max_k, SCALE, 0
        )
        self.dout = torch.randn(self.out.shape, device="cuda", dtype=dtype, generator=g)
        self.dlse = torch.randn(self.lse.shape, device="cuda", generator=g) if with_dlse else None
        self.label = (
            f"[q {tuple(self.q.shape)} {dtype}, x {tuple(self.x.shape)}, segments q "
            f"{list(lens_q)[:12]} k {list(lens_k)[:12]}, dlse {with_dlse}]"
        )

    def run(self, num_splits=0, q=None):
        """The CUDA backward with poisoned memory offered for dq and dx."""
        q = self.q if q is None else q
        poison_allocator((self.q.shape, self.q.dtype), (self.x.shape, self.x.dtype))
        dq, dx = _extension().projected_attention_core_backward(
            self.dout,
            q,
            self.x,
            self.out,
            self.lse,
            self.cu_q,
            self.cu_k,
            self.max_q,
            self.max_k,
            SCALE,
            num_splits,
            dlse=self.dlse,
        )
        assert dq.shape == self.q.shape and dq.dtype == self.q.dtype and dq.is_contiguous()
        assert dx.shape == self.x.shape and dx.dtype == self.x.dtype and dx.is_contiguous()
        return dq, dx

    def reference(self, dtype):
        """(dq, dx) by autograd of the oracle computed in ``dtype``."""
        q = self.q.detach().to(dtype).requires_grad_(True)
        x = self.x.detach().to(dtype).requires_grad_(True)
        kv = x.unsqueeze(1)  # [total_k, 1, Dv]: one key head, also the value head
        with torch.enable_grad():
            out, lse = oracle.attention(
                q, kv, kv, self.cu_q, self.cu_k, softmax_scale=SCALE, dtype=dtype
            )
            loss = (out * self.dout.to(out.dtype)).sum()
            if self.dlse is not None:
                finite = torch.isfinite(lse)
                loss = loss + (lse.where(finite, 0) * self.dlse.to(lse.dtype)).sum()
            if not loss.requires_grad:  # no segment has both queries and keys
                return torch.zeros_like(q), torch.zeros_like(x)
            return torch.autograd.grad(loss, (q, x), allow_unused=True, materialize_grads=True)

    def check(self, num_splits=0, q=None):
        """The kernel's (dq, dx) against the oracle; returns them."""
        dq, dx = self.run(num_splits, q)
        torch.cuda.synchronize()
        expected = self.reference(torch.float64)
        low = self.reference(self.q.dtype)
        for name, ours, ref, lo in zip(("dq", "dx"), (dq, dx), expected, low):
            check_close(
                f"{self.label} num_splits {num_splits} {name}",
                ours,
                lo,
                ref,
                factor=3,
                floor=rounding(ref, self.q.dtype),
            )
        return dq, dx


# ----------------------------------------------------------------------------------------------
# Odd sizes against the oracle
# ----------------------------------------------------------------------------------------------

# (query tokens, keys) per segment: 1, 9, 17, 33 queries (x 12 heads: 12 to 396 rows, row tails of
# the 16-row tiles), key tails of the 16-key tiles (1, 15, 16, 17, 729, 1000), Sq > Sk and Sq < Sk,
# a segment without keys and one without queries.
VARLEN_Q = [1, 9, 17, 33, 33, 9, 3, 0]
VARLEN_K = [1, 15, 16, 17, 1000, 729, 0, 40]


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no-dlse", "dlse"])
@pytest.mark.parametrize("dv", [200, 1152, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_backward_odd_sizes(dtype, dv, with_dlse):
    """Dv 200 (7 busy warps, a half-filled last k-step), 1152 (SigLIP) and 2048 (the large-Dv
    bucket, one pipeline stage)."""
    Case(VARLEN_Q, VARLEN_K, HQ, dv, dtype, with_dlse).check()


@pytest.mark.parametrize("heads", [1, 2, 5, 12])
@pytest.mark.parametrize("lq", [1, 9, 17, 33])
@gpu
def test_backward_rows_per_segment(heads, lq):
    """Rows per segment = lq * heads from 1 to 396 against key counts around the 16-key tile."""
    Case([lq, lq, lq], [16, 17, 729], heads, 1152, torch.bfloat16).check()


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_backward_splits(dtype, num_splits):
    """Key splits of dq and row splits of dx (3 of them, more than some segments have tiles: zero
    partials), and the heuristic, on a long segment next to short ones."""
    case = Case([33, 1, 9, 0], [1000, 1, 729, 5], HQ, 1152, dtype, with_dlse=True)
    case.check(num_splits)


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@gpu
def test_backward_bitwise_deterministic(num_splits):
    case = Case([33, 9, 1], [1000, 729, 17], HQ, 1152, torch.bfloat16, with_dlse=True)
    first = case.run(num_splits)
    second = case.run(num_splits)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@gpu
def test_backward_empty():
    """No queries at all: dx = 0 for every key of a segment; no keys at all: dq = 0."""
    case = Case([0, 0], [5, 17], HQ, 200, torch.float16)
    dq, dx = case.run()
    assert dq.numel() == 0 and torch.equal(dx, torch.zeros_like(dx))
    case = Case([3, 2], [0, 0], HQ, 200, torch.float16)
    dq, dx = case.run()
    assert dx.numel() == 0 and torch.equal(dq, torch.zeros_like(dq))


@gpu
def test_backward_non_contiguous_q():
    """q read through strides (a head slice), and with strides the 16-byte loads cannot follow
    (an odd channel offset: one copy)."""
    case = Case([9, 17], [729, 100], HQ, 1152, torch.bfloat16)
    case.check(q=non_contiguous(case.q, dim=1))
    wide = torch.empty(case.q.shape[0], HQ, 1152 + 3, device="cuda", dtype=case.q.dtype)
    wide[..., 3:] = case.q
    case.check(q=wide[..., 3:])


# ----------------------------------------------------------------------------------------------
# CrossLMM-2B's shapes (Dv 1152, 12 heads)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_backward_frame_local(dtype):
    """Frame-local V2V: 9 queries (108 rows) per frame against its 729 tokens, 16 frames."""
    Case([9] * 16, [FRAME] * 16, HQ, 1152, dtype).check()


@gpu
def test_backward_global():
    """Global V2V at T = 4 (36 queries x 12 heads against 4 x 729 keys) and T2V prefill (128 text
    queries against 4 frames): many key tiles per row tile and row tiles per key tile."""
    Case([36], [4 * FRAME], HQ, 1152, torch.bfloat16).check()
    Case([128], [4 * FRAME], HQ, 1152, torch.bfloat16, with_dlse=True).check()


# ----------------------------------------------------------------------------------------------
# Bad input, and the autograd path
# ----------------------------------------------------------------------------------------------


@gpu
def test_bad_input_names_the_argument():
    case = Case([3, 2], [20, 9], 4, 64, torch.float16)
    args = dict(
        dout=case.dout,
        q=case.q,
        x=case.x,
        out=case.out,
        lse=case.lse,
        cu_seqlens_q=case.cu_q,
        cu_seqlens_k=case.cu_k,
        max_seqlen_q=3,
        max_seqlen_k=20,
        softmax_scale=SCALE,
        num_splits=0,
    )
    bad = {
        "dout must have q's shape": dict(dout=case.dout[:, :2]),
        "out must have q's dtype": dict(out=case.out.float()),
        "lse must have dtype float32": dict(lse=case.lse.half()),
        "lse must have shape": dict(lse=case.lse[:2]),
        "dlse must have shape": dict(dlse=case.lse[:, :3]),
        "x must have q's width": dict(x=case.x[:, :32]),
        "cu_seqlens_k must have dtype int32": dict(cu_seqlens_k=case.cu_k.long()),
        "num_splits must be >= 0": dict(num_splits=-1),
    }
    for message, change in bad.items():
        with pytest.raises(RuntimeError, match=message):
            _extension().projected_attention_core_backward(**{**args, **change})


@pytest.mark.parametrize("num_splits", [1, 0])
@gpu
def test_autograd_through_cuda_backward(num_splits):
    """projected_cross_attention's gradients (q, x, the weights) with the fused core on CUDA both
    ways (Hk = 2, so the grouped layout is copied to rows and back), against the float64 torch
    back end, bounded by the torch back end in bf16."""
    g = torch.Generator(device="cuda").manual_seed(1)
    lens_q, lens_k = [9, 9, 1], [729, 729, 1500]
    dv, hk, d = 1152, 2, 128
    base = dict(
        q=torch.randn(sum(lens_q), HQ, d, device="cuda", generator=g),
        x=torch.randn(sum(lens_k), dv, device="cuda", generator=g),
        w_k=torch.randn(hk * d, dv, device="cuda", generator=g) / dv**0.5,
        w_v=torch.randn(hk * d, dv, device="cuda", generator=g) / dv**0.5,
    )
    grad = torch.randn(sum(lens_q), HQ, d, device="cuda", generator=g)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)

    def grads(dtype, backend):
        leaves = {n: t.to(dtype).requires_grad_(True) for n, t in base.items()}
        out = crosslmm_ops.projected_cross_attention(
            **leaves,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            norm="layernorm",
            path="fused",
            backend=backend,
            num_splits=num_splits,
        )
        return torch.autograd.grad(out, list(leaves.values()), grad.to(dtype))

    expected = grads(torch.float64, "torch")
    low = grads(torch.bfloat16, "torch")
    actual = grads(torch.bfloat16, "cuda")
    assert crosslmm_ops.last_backend("projected_attention_core") == "cuda"
    assert crosslmm_ops.last_backend("projected_attention_core_backward") == "cuda"
    for name, a, e, lo in zip(base, actual, expected, low):
        check_close(f"d{name}", a, lo, e, factor=3, floor=rounding(e, torch.bfloat16))
