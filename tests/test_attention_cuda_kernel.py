"""The CUDA attention kernels (csrc/attention/) called directly through
``crosslmm_ops._C.attention_forward / attention_backward``, against a dense float32 PyTorch
reference written here, segment by segment.

Error bounds follow flash-attn's tests: the max error of the kernel against the float32 reference is
at most 2x (forward) / 3x (gradients) the max error of plain PyTorch computing the same thing in the
kernel's low precision, plus a small floor relative to the reference's magnitude. Outputs are
poisoned with NaN before every call, so an element a kernel forgets to write fails.

Every test needs a GPU and an extension built with the attention kernels.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch

from crosslmm_ops.testing import cu_seqlens as cu_seqlens_on
from crosslmm_ops import _backend


def _extension():
    ext = _backend.extension()
    return ext if ext is not None and hasattr(ext, "attention_forward") else None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or _extension() is None,
        reason="needs a CUDA GPU and crosslmm_ops._C built with attention_forward",
    ),
]

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
# (Sq, Sk) of the first segment: decode, V2V per frame, Sq != Sk both ways, a long key set, and
# CrossLMM-2B's V2V at 32 frames (288 pooled queries against 32 * 729 keys).
SHAPES = [(1, 339), (3, 799), (9, 729), (113, 203), (203, 113), (16, 20000), (288, 23328)]
HQ, HK = 12, 2  # CrossLMM-2B: 12 query heads, 2 kv heads


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


def segment_lengths(sq: int, sk: int) -> tuple[list[int], list[int]]:
    """The named (Sq, Sk) segment, plus a second, differently sized one when that stays cheap."""
    if sq * sk > 1_000_000:
        return [sq], [sk]
    return [sq, sq // 3 + 1], [sk, sk // 2 + 17]


def make_inputs(lens_q, lens_k, hq, hk, d, dtype):
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def reference(q, k, v, cu_q, cu_k, scale, dtype):
    """Dense attention per segment, computed in ``dtype``: (out [total_q, Hq, D] in dtype,
    lse [Hq, total_q] in float32). Differentiable (inputs are converted with .to, not copied)."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        qi = q[bounds_q[b]:bounds_q[b + 1]].to(dtype)
        ki = k[bounds_k[b]:bounds_k[b + 1]].to(dtype).repeat_interleave(group, dim=1)
        vi = v[bounds_k[b]:bounds_k[b + 1]].to(dtype).repeat_interleave(group, dim=1)
        if ki.shape[0] == 0:
            outs.append(qi * 0)  # keeps the graph: zero gradient for these queries
            lses.append(torch.full((q.shape[1], qi.shape[0]), -math.inf, device=q.device))
            continue
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        lses.append(torch.logsumexp(s.float(), dim=-1))
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vi))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def assert_close_to_reference(name, ours, low_precision, ref, factor):
    """max|ours - ref| <= factor * max|low_precision - ref| + a floor (1e-3 of ref's magnitude)."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in the kernel's result"
    if ref.numel() == 0:
        return
    err = max_error(ours, ref)
    baseline = max_error(low_precision, ref)
    floor = 1e-3 * max(ref.abs().max().item(), 1e-2)
    assert err <= factor * baseline + floor, (
        f"{name}: max error {err:.3e} vs PyTorch low-precision error {baseline:.3e} "
        f"(floor {floor:.1e})"
    )


def assert_lse_close(ours, low_precision, ref, factor=2.0):
    """Rows without keys must be exactly -inf in both; the rest as assert_close_to_reference."""
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf exactly where a row has no keys"
    keep = ~empty
    assert_close_to_reference("lse", ours[keep], low_precision[keep], ref[keep], factor)


def run_forward(q, k, v, cu_q, cu_k, scale, num_splits=0, out=None):
    """Call the kernel with NaN-poisoned outputs; returns (out, lse)."""
    ext = _extension()
    if out is None:
        out = torch.full(q.shape, math.nan, device="cuda", dtype=q.dtype)
    else:
        out.fill_(math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    max_q = int((cu_q[1:] - cu_q[:-1]).max().item()) if cu_q.numel() > 1 else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max().item()) if cu_k.numel() > 1 else 0
    ext.attention_forward(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, num_splits)
    return out, lse


def run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, deterministic=False):
    ext = _extension()
    dq = torch.full(q.shape, math.nan, device="cuda", dtype=q.dtype)
    dk = torch.full(k.shape, math.nan, device="cuda", dtype=k.dtype)
    dv = torch.full(v.shape, math.nan, device="cuda", dtype=v.dtype)
    max_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    max_k = int((cu_k[1:] - cu_k[:-1]).max().item())
    ext.attention_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale,
                           deterministic)
    return dq, dk, dv


def reference_grads(q, k, v, cu_q, cu_k, scale, dout, dtype):
    """(out, lse, dq, dk, dv) of the reference computed in dtype (fp32 leaves for float32)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = reference(*leaves, cu_q, cu_k, scale, dtype)
    out.backward(dout.to(dtype))
    return (out.detach(), lse.detach(), *(x.grad for x in leaves))


def check_forward(q, k, v, cu_q, cu_k, scale, num_splits=0):
    out, lse = run_forward(q, k, v, cu_q, cu_k, scale, num_splits)
    with torch.no_grad():
        out_ref, lse_ref = reference(q, k, v, cu_q, cu_k, scale, torch.float32)
        out_pt, lse_pt = reference(q, k, v, cu_q, cu_k, scale, q.dtype)
    assert_close_to_reference("out", out, out_pt, out_ref, 2.0)
    assert_lse_close(lse, lse_pt, lse_ref)
    return out, lse


def check_backward(q, k, v, cu_q, cu_k, scale):
    out, lse = run_forward(q, k, v, cu_q, cu_k, scale)
    dout = torch.randn_like(out)
    dq, dk, dv = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale)
    _, _, *ref = reference_grads(q, k, v, cu_q, cu_k, scale, dout, torch.float32)
    _, _, *pt = reference_grads(q, k, v, cu_q, cu_k, scale, dout, q.dtype)
    for name, ours, p, r in zip(("dq", "dk", "dv"), (dq, dk, dv), pt, ref):
        assert_close_to_reference(name, ours, p, r, 3.0)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Forward and backward against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{sq}x{sk}" for sq, sk in SHAPES])
def test_forward(shape, dtype, head_dim):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, head_dim, dtype)
    check_forward(q, k, v, cu_q, cu_k, head_dim ** -0.5)


# Up to 16 splits merge with a warp per row, more with a CTA per row (17, 40 on the long keys).
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7, 17, 40])
@pytest.mark.parametrize("shape", [(1, 339), (9, 729), (203, 113), (16, 20000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_num_splits(shape, num_splits):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    check_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, num_splits)


@pytest.mark.parametrize("heads", [(12, 2), (4, 4), (6, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_forward_gqa_groups(heads):
    """Group 6 and 1 (no packing) and multi-query (group 6 over one kv head)."""
    q, k, v, cu_q, cu_k = make_inputs([9, 70], [729, 130], heads[0], heads[1], 64, torch.float16)
    check_forward(q, k, v, cu_q, cu_k, 0.125)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{sq}x{sk}" for sq, sk in SHAPES])
def test_backward(shape, dtype, head_dim):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, head_dim, dtype)
    check_backward(q, k, v, cu_q, cu_k, head_dim ** -0.5)


@pytest.mark.parametrize("heads", [(4, 4), (6, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_backward_gqa_groups(heads):
    q, k, v, cu_q, cu_k = make_inputs([9, 70], [729, 130], heads[0], heads[1], 128, torch.bfloat16)
    check_backward(q, k, v, cu_q, cu_k, 128 ** -0.5)


# ----------------------------------------------------------------------------------------------
# Varlen with empty segments, non-contiguous inputs, determinism
# ----------------------------------------------------------------------------------------------

# Segments: ordinary, no queries, no keys, both empty, tile edges (64, 65, 128, 129), one query.
VARLEN_Q = [5, 0, 7, 0, 64, 1, 129, 33]
VARLEN_K = [100, 50, 0, 0, 65, 1, 300, 128]


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_varlen_empty_segments(head_dim, num_splits):
    q, k, v, cu_q, cu_k = make_inputs(VARLEN_Q, VARLEN_K, HQ, HK, head_dim, torch.bfloat16)
    scale = head_dim ** -0.5
    out, lse = check_forward(q, k, v, cu_q, cu_k, scale, num_splits)
    # The segment with 7 queries and no keys: out exactly 0, lse exactly -inf.
    no_keys = slice(sum(VARLEN_Q[:2]), sum(VARLEN_Q[:3]))
    assert torch.all(out[no_keys] == 0)
    assert torch.all(torch.isneginf(lse[:, no_keys]))

    dq, dk, dv = check_backward(q, k, v, cu_q, cu_k, scale)
    assert torch.all(dq[no_keys] == 0)
    no_queries = slice(sum(VARLEN_K[:1]), sum(VARLEN_K[:2]))  # 50 keys that no query sees
    assert torch.all(dk[no_queries] == 0) and torch.all(dv[no_queries] == 0)


def test_all_segments_without_keys():
    q, k, v, cu_q, cu_k = make_inputs([3, 4], [0, 0], HQ, HK, 64, torch.float16)
    out, lse = run_forward(q, k, v, cu_q, cu_k, 0.125)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_non_contiguous(head_dim, num_splits):
    """q and out as channel slices of wider tensors, k and v as halves of a fused kv tensor."""
    lens_q, lens_k = [9, 40], [729, 333]
    tq, tk, d = sum(lens_q), sum(lens_k), head_dim
    q = torch.randn(tq, HQ, 2 * d, device="cuda", dtype=torch.bfloat16)[..., d:]
    kv = torch.randn(tk, 2 * HK, d, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :HK], kv[:, HK:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    scale = d ** -0.5
    # out as the middle third of a wider buffer: token stride 3 * HQ * d
    out = torch.empty(tq, 3, HQ, d, device="cuda", dtype=torch.bfloat16)[:, 1]
    out, lse = run_forward(q, k, v, cu_q, cu_k, scale, num_splits, out=out)
    out_c, lse_c = run_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, scale,
                               num_splits)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_forward(q, k, v, cu_q, cu_k, scale, num_splits)

    dout = torch.randn(tq, HQ, 2 * d, device="cuda", dtype=torch.bfloat16)[..., :d]
    grads = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale)
    grads_c = run_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                           out_c, lse_c, cu_q, cu_k, scale)
    for g, g_c in zip(grads, grads_c):
        assert torch.equal(g, g_c)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_deterministic(deterministic):
    q, k, v, cu_q, cu_k = make_inputs([9, 288, 1], [729, 4000, 64], HQ, HK, 128, torch.bfloat16)
    scale = 128 ** -0.5
    out, lse = run_forward(q, k, v, cu_q, cu_k, scale)
    dout = torch.randn_like(out)
    first = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, deterministic)
    second = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, deterministic)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    out2, lse2 = run_forward(q, k, v, cu_q, cu_k, scale)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _bad_call(**changes):
    lens = [4, 5]
    q, k, v, cu_q, cu_k = make_inputs(lens, lens, 4, 2, 64, torch.float16)
    args = dict(q=q, k=k, v=v, out=torch.empty_like(q),
                lse=torch.empty(4, q.shape[0], device="cuda", dtype=torch.float32),
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5,
                softmax_scale=0.125, num_splits=0)
    args.update(changes)
    _extension().attention_forward(**args)


def test_bad_input_raises():
    """The checks run in a child process (this file run as a script): a failed check must come
    back as a RuntimeError, and a crash must fail this test rather than end the test session."""
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "bad input checks: ok" in proc.stdout


def _bad_input_checks():
    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    with pytest.raises(RuntimeError, match="head dim"):
        q = t(9, 4, 96)
        _bad_call(q=q, k=t(9, 2, 96), v=t(9, 2, 96), out=torch.empty_like(q))
    with pytest.raises(RuntimeError, match="multiple of num_heads_k"):
        q = t(9, 3, 64)
        _bad_call(q=q, out=torch.empty_like(q), lse=torch.empty(3, 9, device="cuda"))
    with pytest.raises(RuntimeError, match="dtype"):
        _bad_call(k=t(9, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        q = t(9, 4, 64, dtype=torch.float32)
        _bad_call(q=q, k=t(9, 2, 64, dtype=torch.float32), v=t(9, 2, 64, dtype=torch.float32),
                  out=torch.empty_like(q))
    with pytest.raises(RuntimeError, match="channel"):
        _bad_call(v=t(9, 2, 128)[..., ::2])
    with pytest.raises(RuntimeError, match="lse"):
        _bad_call(lse=torch.empty(9, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        _bad_call(cu_seqlens_q=cu_seqlens([4, 5]).long())
    with pytest.raises(RuntimeError, match="CUDA"):
        _bad_call(q=torch.randn(9, 4, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="num_splits"):
        _bad_call(num_splits=-1)
    # head dim 96 in the backward too
    q, k, v = t(9, 4, 96), t(9, 2, 96), t(9, 2, 96)
    cu = cu_seqlens([4, 5])
    with pytest.raises(RuntimeError, match="head dim"):
        _extension().attention_backward(
            torch.randn_like(q), q, k, v, torch.randn_like(q), torch.zeros(4, 9, device="cuda"),
            torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), cu, cu, 5, 5, 0.1, False)


if __name__ == "__main__":  # the child process of test_bad_input_raises
    _bad_input_checks()
    print("bad input checks: ok")
