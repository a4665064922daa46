"""cross_attention: the package's reference against the tests' oracle, gradients, every back end
against the oracle (outputs poisoned, non-contiguous input, odd head dims, GQA, varlen with empty
segments, split-KV), the LSE merge, attention weights, the flash-attn shims, bad input,
torch.library.

The oracle and the error bound are tests/attention_oracle.py's (flash-attn's): the error of a fast
back end against a high-precision reference is at most 2x (forward) / 3x (gradients) the error of
plain PyTorch computing in the same low precision, plus a rounding-sized atol
(:func:`attention_oracle.rounding`).

CPU tests run in CI (the Triton kernels under TRITON_INTERPRET=1, small shapes); tests marked
``cuda`` run on a GPU against the CUDA and Triton back ends.
"""

from __future__ import annotations

import inspect
import math

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, check_lse, lse_err, max_err, rounding

import crosslmm_ops
from crosslmm_ops import (
    _backend,
    attention_weights,
    cross_attention,
    cross_attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
    merge_attention_states,
)
from crosslmm_ops.ops.cross_attention import _cross_attention_bwd_op, _cross_attention_fwd_op
from crosslmm_ops.testing import cu_seqlens, non_contiguous, poison_outputs

# (Sq, Sk): single query, V2V per frame, Sq != Sk both ways.
SHAPES = [(1, 339), (3, 799), (9, 729), (113, 203)]
SHAPES = SHAPES + [(sk, sq) for sq, sk in SHAPES]
# The same kinds of shapes, small enough for the Triton interpreter.
INTERP_SHAPES = [(1, 339), (3, 130), (9, 81), (37, 70), (70, 37), (130, 3)]


def triton_cpu() -> bool:
    return _backend.triton_runnable(torch.device("cpu"))[0]


needs_interpreter = pytest.mark.skipif(not triton_cpu(), reason="needs TRITON_INTERPRET=1")


def varlen_inputs(lens_q, lens_k, hq, hk, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def check_backend(
    backend,
    q,
    k,
    v,
    *,
    cu_q=None,
    cu_k=None,
    num_splits=0,
    gate=None,
    residual=None,
    check_grad=True,
    lse_grad=False,
    ref_dtype=torch.float64,
):
    """Forward (and backward) of ``backend`` against the oracle in ``ref_dtype`` from the same
    low-precision inputs, bounded by plain PyTorch's own error in the inputs' dtype (the oracle
    computed in that dtype). Outputs are poisoned, so an element a kernel forgets to write fails."""
    dtype = q.dtype
    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) if cu_q is not None else {}
    extra = [t for t in (gate, residual) if t is not None]
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, *extra)]
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in leaves]
    low_leaves = [t.detach().requires_grad_(True) for t in leaves]

    def epilogue(ts):
        return dict(gate=ts[3], residual=ts[4]) if extra else {}

    ref_out, ref_lse = oracle.attention(
        *ref_leaves[:3], cu_q, cu_k, **epilogue(ref_leaves), dtype=ref_dtype
    )
    low_out, low_lse = oracle.attention(
        *low_leaves[:3], cu_q, cu_k, **epilogue(low_leaves), dtype=dtype
    )
    with poison_outputs():
        out, lse = cross_attention(
            *leaves[:3],
            **packed,
            **epilogue(leaves),
            return_lse=True,
            backend=backend,
            num_splits=num_splits,
        )
    assert crosslmm_ops.last_backend("cross_attention") == backend
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "unwritten output elements"
    assert not torch.isnan(lse).any(), "unwritten lse elements"
    check_close("out", out, low_out, ref_out, factor=2, floor=rounding(ref_out, dtype))
    check_lse(lse, low_lse, ref_lse, factor=2, floor=1e-5)
    if not check_grad:
        return
    g = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse) if lse_grad else torch.zeros_like(ref_lse)
    finite = torch.isfinite(ref_lse)

    def grads(o, l, ts):
        loss = (o * g.to(o.dtype)).sum()
        if lse_grad:
            loss = loss + (l.where(finite, 0) * g_lse.to(l.dtype)).sum()
        if not loss.requires_grad:  # the reference with no (query, key) pair at all
            return [torch.zeros_like(t) for t in ts]
        return torch.autograd.grad(loss, ts, allow_unused=True, materialize_grads=True)

    expected = grads(ref_out, ref_lse, ref_leaves)
    low = grads(low_out, low_lse, low_leaves)
    with poison_outputs():
        actual = grads(out, lse, leaves)
    # The CUDA backward takes no LSE gradient: that case runs the Triton backward (on record).
    ran = "triton" if backend == "cuda" and lse_grad else backend
    assert crosslmm_ops.last_backend("cross_attention_backward") == ran
    # Every back end forms dS = P * (dO·v - Delta), Delta = rowsum(dO * O), in float32: where the
    # two nearly cancel (one key: P = 1, O = v) the true dq, dk are ~0 but float32 leaves
    # eps32 * |dO·v| * |q or k| behind, while autograd's softmax backward cancels exactly.
    # That float32 floor is negligible next to fp16/bf16 bounds but not in float32.
    mags = [t.detach().abs().max().item() if t.numel() else 0.0 for t in (g, q, k, v)]
    cancel = 8 * torch.finfo(torch.float32).eps * mags[0] * mags[3] * q.shape[-1] * max(mags[1:3])
    for name, a, e, lo in zip(("dq", "dk", "dv", "dgate", "dresidual"), actual, expected, low):
        assert a.dtype == dtype or name == "dgate"
        floor = rounding(e, dtype) + (cancel if name in ("dq", "dk") else 0)
        if name == "dgate":  # a sum over every output element of g * attention, the attention
            # rounded to the low dtype first: its worst case, which does not shrink when the sum
            # cancels (a bound relative to |dgate| did, and failed a fuzz draw on fp16).
            attention = oracle.attention(*ref_leaves[:3], cu_q, cu_k, dtype=ref_dtype)[0].detach()
            floor += torch.finfo(dtype).eps * (g.abs() * attention.abs()).sum().item()
        check_close(name, a, lo, e, factor=3, floor=floor)


# ----------------------------------------------------------------------------------------------
# The package's reference against the tests' oracle, in float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_reference_matches_oracle_batched(sq, sk):
    B, hq, hk, d = 2, 4, 2, 16
    q = torch.randn(B, sq, hq, d, dtype=torch.float64)
    k, v = torch.randn(2, B, sk, hk, d, dtype=torch.float64)
    out, lse = cross_attention_reference(q, k, v, return_lse=True)
    assert out.shape == (B, sq, hq, d) and lse.shape == (B, hq, sq)
    e_out, e_lse = oracle.attention(q, k, v)
    torch.testing.assert_close(out, e_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, e_lse, rtol=1e-12, atol=1e-12)
    # and through the public function on the torch back end, with another scale
    out2, lse2 = cross_attention(q, k, v, softmax_scale=0.3, return_lse=True, backend="torch")
    assert crosslmm_ops.last_backend("cross_attention") == "torch"
    e_out, e_lse = oracle.attention(q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(out2, e_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse2, e_lse, rtol=1e-12, atol=1e-12)


VARLEN = [
    ([3, 0, 5, 17, 2], [7, 4, 0, 33, 65]),  # a segment without queries, one without keys
    ([1, 1, 1], [339, 1, 0]),
    ([9, 9], [729, 729]),
    ([0, 0], [5, 0]),  # no queries at all
]


@pytest.mark.parametrize("lens", VARLEN, ids=[str(i) for i in range(len(VARLEN))])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_reference_matches_oracle_varlen(lens, hq, hk):
    q, k, v, cu_q, cu_k = varlen_inputs(*lens, hq, hk, 8, torch.float64)
    out, lse = cross_attention_reference(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True
    )
    e_out, e_lse = oracle.attention(q, k, v, cu_q, cu_k)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    torch.testing.assert_close(out, e_out, rtol=1e-12, atol=1e-12)
    assert lse_err(lse, e_lse) < 1e-12
    for backend in ["torch"] + (["triton"] if triton_cpu() else []):
        o, l = cross_attention(
            q.float(),
            k.float(),
            v.float(),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            return_lse=True,
            backend=backend,
        )
        assert max_err(o, e_out) < 1e-5 and lse_err(l, e_lse) < 1e-5


def test_reference_epilogue():
    q, k, v = torch.randn(3, 2, 5, 4, 8, dtype=torch.float64)
    residual = torch.randn_like(q)
    for gate in (
        torch.tensor(0.7, dtype=torch.float64),
        torch.tensor([-0.3]),
        torch.randn(4, dtype=torch.float64),
    ):
        out, lse = cross_attention_reference(q, k, v, gate=gate, residual=residual, return_lse=True)
        attn, attn_lse = cross_attention_reference(q, k, v, return_lse=True)
        g = (
            torch.tanh(gate.double()).reshape(-1, 1)
            if gate.numel() > 1
            else torch.tanh(gate.double())
        )
        torch.testing.assert_close(out, residual + g * attn)
        torch.testing.assert_close(lse, attn_lse)  # the LSE is the attention's own
    # alpha = 0 (DCAL's initialisation): the layer is the identity
    out = cross_attention(q, k, v, gate=torch.zeros(()), residual=residual, backend="torch")
    torch.testing.assert_close(out, residual, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Gradients of the torch back end
# ----------------------------------------------------------------------------------------------


def _finite_lse(lse):
    return lse.where(torch.isfinite(lse), 0)


GRAD_CASES = {
    "batched-gqa": lambda: dict(q=(2, 3, 4, 6), k=(2, 5, 2, 6)),
    "batched-sq>sk-mqa": lambda: dict(q=(1, 7, 3, 5), k=(1, 2, 1, 5)),
    "varlen-empty": lambda: dict(q=(9, 4, 6), k=(12, 2, 6), lens=([2, 0, 3, 4], [5, 3, 0, 4])),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
@pytest.mark.parametrize("epilogue", [None, "scalar", "per-head"])
def test_gradcheck_float64(case, epilogue):
    spec = GRAD_CASES[case]()
    q = torch.randn(spec["q"], dtype=torch.float64, requires_grad=True)
    k = torch.randn(spec["k"], dtype=torch.float64, requires_grad=True)
    v = torch.randn(spec["k"], dtype=torch.float64, requires_grad=True)
    packed = {}
    if "lens" in spec:
        packed = dict(
            cu_seqlens_q=cu_seqlens(spec["lens"][0]), cu_seqlens_k=cu_seqlens(spec["lens"][1])
        )
    inputs = [q, k, v]
    if epilogue:
        hq = spec["q"][-2]
        gate = torch.randn(() if epilogue == "scalar" else (hq,), dtype=torch.float64)
        inputs += [gate.requires_grad_(True), torch.randn_like(q).requires_grad_(True)]

    def f(q, k, v, *epi):
        kw = dict(gate=epi[0], residual=epi[1]) if epi else {}
        out, lse = cross_attention(q, k, v, **packed, **kw, return_lse=True, backend="torch")
        return out, _finite_lse(lse)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_backward_formula_matches_autograd_of_reference():
    """The registered backward (hand-written formula) equals autograd through the reference,
    gradients through the LSE included."""
    q, k, v, cu_q, cu_k = varlen_inputs([113, 0, 9, 4], [203, 17, 0, 729], 6, 2, 12, torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    e_out, e_lse = cross_attention_reference(*leaves, **kw)
    out, lse = cross_attention(*leaves, **kw, backend="torch")
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    expected = torch.autograd.grad((e_out * g).sum() + (_finite_lse(e_lse) * g_lse).sum(), leaves)
    actual = torch.autograd.grad((out * g).sum() + (_finite_lse(lse) * g_lse).sum(), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sq,sk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_torch_backend_low_precision(sq, sk):
    """fp16 through the torch back end: computed in float32, within PyTorch's own fp16 error."""
    q = torch.randn(1, sq, 4, 32, dtype=torch.float16)
    k, v = torch.randn(2, 1, sk, 2, 32, dtype=torch.float16)
    check_backend("torch", q, k, v, check_grad=sq * sk < 50_000)


@pytest.mark.parametrize("floor", ["rounding", "magnitude"])
def test_bound_catches_perturbed_results(floor):
    """The oracle's bound, with either floor (flash-attn's rounding here, 1e-3 of the magnitude in
    the CUDA kernel tests), admits the torch back end's fp16 output, LSE and gradients, and fails
    them with one element off by 1e-2 of the largest magnitude, or all of them by 1e-2 relative."""
    q, k, v, cu_q, cu_k = varlen_inputs([113, 9, 3], [203, 729, 1], 4, 2, 32, torch.float16)
    scale = 32**-0.5
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out, lse = cross_attention(
        *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, backend="torch"
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    with torch.no_grad():
        ref_out, ref_lse = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale)
        low_out, low_lse = oracle.attention(
            q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=torch.float16
        )
    ref_grads = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale)
    low_grads = oracle.attention_grads(
        dout, q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=torch.float16
    )

    def check(name, ours, low, ref, factor):
        fl = rounding(ref, torch.float16) if floor == "rounding" else None
        if name == "lse":
            return check_lse(ours, low, ref, factor=factor, floor=fl)
        return check_close(name, ours, low, ref, factor=factor, floor=fl)

    results = [
        ("out", out.detach(), low_out, ref_out, 2),
        ("lse", lse.detach(), low_lse, ref_lse, 2),
    ]
    results += [
        (n, a, lo, r, 3) for n, a, lo, r in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads)
    ]
    for name, ours, low, ref, factor in results:
        check(name, ours, low, ref, factor)
        one = ours.clone()
        i = ref.abs().flatten().argmax()  # an element the floor is largest next to
        one.view(-1)[i] += 1e-2 * ref.abs().max().item()
        everywhere = (ours.double() * (1 + 1e-2)).to(ours.dtype)
        for bad in (one, everywhere):
            with pytest.raises(AssertionError, match="exceeds"):
                check(name, bad, low, ref, factor)


# ----------------------------------------------------------------------------------------------
# The Triton kernels in the interpreter against the reference
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sq,sk", INTERP_SHAPES, ids=[f"{a}x{b}" for a, b in INTERP_SHAPES])
def test_triton_matches_reference_cpu(sq, sk, dtype):
    q = torch.randn(2, sq, 4, 32, dtype=dtype)
    k, v = torch.randn(2, 2, sk, 2, 32, dtype=dtype)
    check_backend("triton", q, k, v)


@needs_interpreter
@pytest.mark.parametrize("sq,sk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_triton_full_shapes_cpu(sq, sk):
    """The listed (Sq, Sk) themselves, with few narrow heads to keep the interpreter quick."""
    q = torch.randn(1, sq, 2, 16, dtype=torch.float16)
    k, v = torch.randn(2, 1, sk, 1, 16, dtype=torch.float16)
    check_backend("triton", q, k, v)


@needs_interpreter
@pytest.mark.parametrize("d", [40, 72, 17, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_triton_head_dims_and_groups_cpu(d, hq, hk):
    q = torch.randn(1, 21, hq, d)
    k, v = torch.randn(2, 1, 67, hk, d)
    check_backend("triton", q, k, v)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("lens", VARLEN[:2], ids=["empty-segments", "one-query"])
def test_triton_varlen_and_splits_cpu(lens, num_splits):
    q, k, v, cu_q, cu_k = varlen_inputs(*lens, 4, 2, 24)
    check_backend(
        "triton", q, k, v, cu_q=cu_q, cu_k=cu_k, num_splits=num_splits, lse_grad=num_splits == 2
    )


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_triton_backward_dq_splits_cpu(num_splits):
    """The dQ kernel's key splits (each writes an fp32 partial, summed in split order), forced,
    against the reference's gradients: GQA rows packed across heads, segments without keys or
    queries, splits left with no key block (7 splits of a 2-block segment)."""
    from crosslmm_ops.triton import cross_attention as tca

    q, k, v, cu_q, cu_k = varlen_inputs([5, 0, 9, 3], [70, 4, 0, 33], 6, 2, 24, torch.float16)
    scale = 24**-0.5
    with torch.no_grad():
        out, lse = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=torch.float64)
    out, lse = out.to(q.dtype), lse.float().contiguous()
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    ran = tca.attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        9,
        70,
        scale,
        True,
        num_splits=num_splits,
    )
    assert ran == "triton"
    ref = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale)
    low = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=q.dtype)
    for name, ours, lo, r in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref):
        assert not torch.isnan(ours).any(), f"unwritten {name} elements"
        check_close(name, ours, lo, r, factor=3, floor=rounding(r, q.dtype))


@needs_interpreter
def test_triton_no_queries_or_keys_cpu():
    for lens in ([0, 0], [5, 0]), ([3, 4], [0, 0]):
        q, k, v, cu_q, cu_k = varlen_inputs(*lens, 2, 1, 16)
        check_backend("triton", q, k, v, cu_q=cu_q, cu_k=cu_k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loose_max_seqlen(backend):
    """flash-attn callers often pass an upper bound for max_seqlen: same result."""
    if backend == "triton" and not triton_cpu():
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v, cu_q, cu_k = varlen_inputs([3, 20], [50, 7], 2, 1, 16)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    exact = cross_attention(q, k, v, **kw)
    loose = cross_attention(q, k, v, max_seqlen_q=64, max_seqlen_k=10**6, **kw)
    torch.testing.assert_close(loose, exact, rtol=0, atol=0)


def test_lse_gradient_routing():
    """Only a gradient reaching the LSE moves a CUDA backward to Triton (or the reference)."""
    from crosslmm_ops.ops.cross_attention import _backward_backend

    cpu = torch.device("cpu")
    assert _backward_backend("cuda", None, cpu) == "cuda"
    assert _backward_backend("cuda", torch.zeros(1), cpu) == ("triton" if triton_cpu() else "torch")
    assert _backward_backend("triton", torch.zeros(1), cpu) == "triton"


@needs_interpreter
@pytest.mark.parametrize(
    "layout", ["tokens-strided", "heads-strided", "channels-strided", "packed-sliced"]
)
def test_triton_non_contiguous_cpu(layout):
    q = torch.randn(2, 13, 4, 32)
    k, v = torch.randn(2, 2, 45, 2, 32)
    if layout == "packed-sliced":  # varlen tensors cut from a wider packed buffer
        q, k, v, cu_q, cu_k = varlen_inputs([5, 8], [30, 15], 4, 2, 32)
        q, k, v = (torch.cat([t, t], dim=1)[:, ::2] for t in (q, k, v))
        assert not q.is_contiguous()
        check_backend("triton", q, k, v, cu_q=cu_q, cu_k=cu_k)
        return
    dim = {"tokens-strided": 1, "heads-strided": 2, "channels-strided": 3}[layout]
    q, k, v = (non_contiguous(t, dim=dim) for t in (q, k, v))
    check_backend("triton", q, k, v)


@needs_interpreter
@pytest.mark.parametrize("gate_shape", [(), (1,), (4,)], ids=["0-dim", "1-element", "per-head"])
def test_triton_epilogue_cpu(gate_shape):
    q = torch.randn(2, 9, 4, 16)
    k, v = torch.randn(2, 2, 40, 2, 16)
    check_backend(
        "triton", q, k, v, gate=torch.randn(gate_shape), residual=torch.randn_like(q), lse_grad=True
    )


def test_num_splits_heuristic():
    from crosslmm_ops.triton.cross_attention import MAX_SPLITS, num_splits_heuristic

    # Whole waves: V2V T=64 at Hk=2 is 54 programs of 729 key blocks on 132 SMs. Three splits
    # (one wave's worth) would make 162 programs, a second wave of 30; seven make three nearly
    # full waves.
    assert num_splits_heuristic(54, 132, 729) == 7
    # V2V T=32: 28 programs. Four splits, one wave 85% full, against nine in two: the merge's
    # loop over the splits decides it (on the H100, 0.142 ms against 0.149).
    assert num_splits_heuristic(28, 132, 365) == 4
    assert num_splits_heuristic(108, 132, 1458) == 6  # V2V T=128: one wave 82% full, unsplit
    assert num_splits_heuristic(132, 132, 365) == 1  # one full wave already
    assert num_splits_heuristic(512, 132, 12) == 1  # per-frame: many programs, few key blocks
    assert num_splits_heuristic(12, 132, 2916) == 11  # T2V T=256: 6 query blocks x 2 KV heads
    assert num_splits_heuristic(12, 132, 16) == 4  # short keys: at least 4 key blocks a split
    # Decoding one query against 32 frames: 61 splits would fill the SMs once, but the merge walks
    # a row's splits one by one (on the H100, 18 splits took 0.042 ms and 61 took 0.056).
    assert num_splits_heuristic(2, 132, 365) == 16
    assert 120 <= num_splits_heuristic(1, 132, 10**6) <= MAX_SPLITS
    assert num_splits_heuristic(0, 132, 10) == 1


# ----------------------------------------------------------------------------------------------
# merge_attention_states and attention_weights
# ----------------------------------------------------------------------------------------------


def _split_keys(cu_k):
    """Each segment's keys cut into three disjoint chunks, the middle one empty: per chunk, its
    key rows and cu_seqlens."""
    starts, lens = cu_k[:-1].tolist(), cu_k.diff().tolist()
    chunks = []
    for p in range(3):
        rows, chunk_lens = [], []
        for start, n in zip(starts, lens):
            lo, hi = [(0, n // 2), (n // 2, n // 2), (n // 2, n)][p]
            rows += range(start + lo, start + hi)
            chunk_lens.append(hi - lo)
        chunks.append((torch.tensor(rows, dtype=torch.long), cu_seqlens(chunk_lens)))
    return chunks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_attention_states_is_exact(backend):
    if backend == "triton" and not triton_cpu():
        pytest.skip("needs TRITON_INTERPRET=1")
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v, cu_q, cu_k = varlen_inputs([3, 0, 5, 4], [7, 4, 9, 0], 4, 2, 16, dtype)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    full, full_lse = cross_attention(
        *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, backend=backend
    )
    outs, lses = [], []
    for rows, cu_part in _split_keys(cu_k):
        o, l = cross_attention(
            q,
            k[rows],
            v[rows],
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_part,
            return_lse=True,
            backend=backend,
        )
        outs.append(o)
        lses.append(l)
    out, lse = merge_attention_states(outs, lses)  # a list
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, full, rtol=tol, atol=tol)
    assert lse_err(lse, full_lse) < tol
    out2, lse2 = merge_attention_states(torch.stack(outs), torch.stack(lses))  # stacked
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    # Training through the merge: gradients (via each partial's LSE) equal the full attention's.
    g = torch.randn_like(full)
    expected = torch.autograd.grad((full * g).sum(), leaves)
    actual = torch.autograd.grad((out * g).sum(), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def test_merge_attention_states_empty_and_batched():
    outs = torch.randn(3, 2, 5, 4, 8)  # batched layout: [S, B, Sq, H, D]
    lses = torch.randn(3, 2, 4, 5)
    lses[:, 0, 1, 2] = float("-inf")  # every split empty for one row
    lses[1, 1] = float("-inf")  # one split empty for a whole batch element
    outs.requires_grad_(True)
    lses.requires_grad_(True)
    out, lse = merge_attention_states(outs, lses)
    assert out.shape == (2, 5, 4, 8) and lse.shape == (2, 4, 5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0, 2, 1], torch.zeros(8)) and lse[0, 1, 2] == float("-inf")
    w = torch.softmax(lses, 0)  # the definition
    expected = (w.transpose(-1, -2).unsqueeze(-1) * outs).sum(0)
    torch.testing.assert_close(out[1], expected[1])
    torch.testing.assert_close(lse[1], torch.logsumexp(lses[:, 1], 0))
    (out.sum() + lse.where(torch.isfinite(lse), 0).sum()).backward()
    assert torch.isfinite(outs.grad).all() and torch.isfinite(lses.grad).all()
    with pytest.raises(ValueError, match="lses"):
        merge_attention_states(outs, lses[:, :, :, :4])


def test_attention_weights_batched():
    q = torch.randn(2, 11, 4, 16)
    k = torch.randn(2, 37, 2, 16)
    index = [0, 5, 10, -1]
    probs = attention_weights(q, k, query_index=index, block_size=8)
    _, lse = cross_attention(q, k, k, return_lse=True, backend="torch")
    given = attention_weights(q, k, query_index=index, lse=lse)
    assert probs.shape == (2, 4, 4, 37)
    expected = oracle.probabilities(q, k, query_index=index)
    tol = dict(rtol=1.3e-6, atol=1e-5)  # float32's defaults, against float64
    torch.testing.assert_close(probs.double(), expected, **tol)
    torch.testing.assert_close(given.double(), expected, **tol)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 4))


def test_attention_weights_varlen():
    q, k, _, cu_q, cu_k = varlen_inputs([3, 2, 4], [5, 0, 9], 2, 1, 8)
    index = torch.tensor([4, 0, 6, 3])  # segments 1 (no keys), 0, 2, 1
    probs = attention_weights(
        q,
        k,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        query_index=index,
        block_size=4,
        softmax_scale=0.5,
    )
    assert probs.shape == (4, 2, 9)
    expected = oracle.probabilities(q, k, cu_q, cu_k, query_index=index.tolist(), softmax_scale=0.5)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)
    for r, seg in enumerate([1, 0, 2, 1]):
        keys = (cu_k[seg + 1] - cu_k[seg]).item()
        assert not probs[r, :, keys:].any()  # zeros past the segment's keys


# ----------------------------------------------------------------------------------------------
# flash-attn shims
# ----------------------------------------------------------------------------------------------

FLASH_FUNC_PARAMS = [
    ("q", inspect.Parameter.empty),
    ("k", inspect.Parameter.empty),
    ("v", inspect.Parameter.empty),
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
FLASH_VARLEN_PARAMS = (
    FLASH_FUNC_PARAMS[:3]
    + [
        (n, inspect.Parameter.empty)
        for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    ]
    + FLASH_FUNC_PARAMS[3:]
    + [("block_table", None)]
)


@pytest.mark.parametrize(
    "fn,params",
    [(flash_attn_func, FLASH_FUNC_PARAMS), (flash_attn_varlen_func, FLASH_VARLEN_PARAMS)],
    ids=["func", "varlen"],
)
def test_flash_attn_signatures(fn, params):
    sig = inspect.signature(fn)
    assert [(p.name, p.default) for p in sig.parameters.values()] == params


def test_flash_attn_shims_compute_cross_attention():
    q = torch.randn(2, 5, 4, 16)
    k, v = torch.randn(2, 2, 7, 2, 16)
    out = flash_attn_func(q, k, v, softmax_scale=0.2)
    torch.testing.assert_close(out, cross_attention(q, k, v, softmax_scale=0.2))
    out, lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32 and s_dmask is None
    qp, kp, vp, cu_q, cu_k = varlen_inputs([2, 3], [4, 0], 4, 2, 16)
    out, lse, _ = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 3, 4, return_attn_probs=True)
    assert out.shape == qp.shape and lse.shape == (4, 5)
    torch.testing.assert_close(
        out, cross_attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    )


UNSUPPORTED = [
    dict(causal=True),
    dict(dropout_p=0.1),
    dict(window_size=(8, 0)),
    dict(softcap=30.0),
    dict(alibi_slopes=torch.ones(4)),
]


@pytest.mark.parametrize(
    "kw",
    UNSUPPORTED + [dict(block_table=torch.zeros(1, 1, dtype=torch.int32))],
    ids=lambda kw: next(iter(kw)),
)
def test_flash_attn_unsupported_options(kw):
    q, k, v, cu_q, cu_k = varlen_inputs([2], [4], 4, 2, 16)
    name = next(iter(kw))
    with pytest.raises(NotImplementedError, match=name):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 4, **kw)
    if name != "block_table":
        with pytest.raises(NotImplementedError, match=name):
            flash_attn_func(q[None], k[None], v[None], **kw)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


CU2, CU3 = cu_seqlens([2, 3]), cu_seqlens([1, 1, 3])
BAD_INPUTS = [
    (
        lambda: cross_attention([1.0], _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
        TypeError,
        "q must be a torch.Tensor",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8, dtype=torch.int64), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
        ValueError,
        "q must be a floating tensor",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8), _t(1, 3, 2, 8, dtype=torch.float16), _t(1, 3, 2, 8)
        ),
        ValueError,
        "k must have q's dtype",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8, dtype=torch.float64)
        ),
        ValueError,
        "v must have q's dtype",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8).to("meta")),
        ValueError,
        "v must be on q's device",
    ),
    (
        lambda: cross_attention(_t(2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
        ValueError,
        r"q must have shape \(B, S, H, D\)",
    ),
    (
        lambda: cross_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2),
        ValueError,
        "given together",
    ),
    (
        lambda: cross_attention(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_k=CU2),
        ValueError,
        "given together",
    ),
    (
        lambda: cross_attention(
            _t(1, 5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2, cu_seqlens_k=CU2
        ),
        ValueError,
        r"q must have shape \(total, H, D\)",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 4, 2, 8)),
        ValueError,
        "k and v must have the same shape",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(2, 3, 2, 8), _t(2, 3, 2, 8)),
        ValueError,
        "batch size",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 6), _t(1, 3, 2, 6)),
        ValueError,
        "head dim 8",
    ),
    (
        lambda: cross_attention(_t(1, 2, 3, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
        ValueError,
        r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
    ),
    (
        lambda: cross_attention(_t(1, 2, 0, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
        ValueError,
        "at least one head",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2.long(), cu_seqlens_k=CU2
        ),
        ValueError,
        "cu_seqlens_q must be an int32",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2, cu_seqlens_k=CU2[None]
        ),
        ValueError,
        "cu_seqlens_k must be 1-D",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8),
            _t(5, 2, 8),
            _t(5, 2, 8),
            cu_seqlens_q=CU2,
            cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32),
        ),
        ValueError,
        "cu_seqlens_k must be non-decreasing",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2 + 1, cu_seqlens_k=CU2
        ),
        ValueError,
        "cu_seqlens_q must start at 0",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(6, 2, 8), _t(6, 2, 8), cu_seqlens_q=CU2, cu_seqlens_k=CU2
        ),
        ValueError,
        "cu_seqlens_k must end at the number of packed tokens 6",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2, cu_seqlens_k=CU3
        ),
        ValueError,
        "cu_seqlens_q and cu_seqlens_k must have the same length",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=CU2, cu_seqlens_k=CU2.to("meta")
        ),
        ValueError,
        "cu_seqlens_k must be on q's device",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8),
            _t(5, 2, 8),
            _t(5, 2, 8),
            cu_seqlens_q=CU2,
            cu_seqlens_k=CU2,
            max_seqlen_q=2,
        ),
        ValueError,
        "max_seqlen_q=2 is smaller than the longest segment",
    ),
    (
        lambda: cross_attention(
            _t(5, 2, 8),
            _t(5, 2, 8),
            _t(5, 2, 8),
            cu_seqlens_q=CU2,
            cu_seqlens_k=CU2,
            max_seqlen_k=-1,
        ),
        ValueError,
        "max_seqlen_k",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), max_seqlen_q=2),
        ValueError,
        "max_seqlen_q is for the packed layout",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), softmax_scale="x"),
        ValueError,
        "softmax_scale",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), num_splits=-1),
        ValueError,
        "num_splits",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), return_lse=1),
        ValueError,
        "return_lse must be a bool",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), gate=_t(3), residual=_t(1, 2, 2, 8)
        ),
        ValueError,
        r"gate must be a scalar.*\(2,\)",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), gate=_t(1), residual=_t(1, 2, 2, 4)
        ),
        ValueError,
        r"residual must have the output's shape \(1, 2, 2, 8\)",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8),
            _t(1, 3, 2, 8),
            _t(1, 3, 2, 8),
            gate=_t(1),
            residual=_t(1, 2, 2, 8, dtype=torch.float16),
        ),
        ValueError,
        "residual must have q's dtype",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), gate=_t(1)),
        ValueError,
        "gate and residual must be given together",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8),
            _t(1, 3, 2, 8),
            _t(1, 3, 2, 8),
            gate=torch.ones(1, dtype=torch.int32),
            residual=_t(1, 2, 2, 8),
        ),
        ValueError,
        "gate must be a floating",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), backend="flash"),
        ValueError,
        "backend",
    ),
    (
        lambda: cross_attention(_t(1, 2, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8), backend="cuda"),
        RuntimeError,
        "backend='cuda' cannot run",
    ),
    (
        lambda: cross_attention(
            _t(1, 2, 2, 8, dtype=torch.float64),
            _t(1, 3, 2, 8, dtype=torch.float64),
            _t(1, 3, 2, 8, dtype=torch.float64),
            backend="triton",
        ),
        RuntimeError,
        "backend='triton' cannot run",
    ),
    (
        lambda: attention_weights(_t(1, 2, 2, 8), _t(1, 3, 2, 8), query_index=[2]),
        ValueError,
        "query_index",
    ),
    (
        lambda: attention_weights(_t(1, 2, 2, 8), _t(1, 3, 2, 8), query_index=[0], lse=_t(2, 1)),
        ValueError,
        r"lse must have shape \(1, 2, 2\)",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_batched_calls_in_inference_mode_then_training():
    """Batched calls share their uniform cu_seqlens, kept between calls: those kept by a call under
    torch.inference_mode (decoding) must serve a later training call of the same shapes, which
    saves them for the backward (an inference tensor cannot be saved)."""
    q, k, v = torch.randn(3, 5, 2, 8), torch.randn(3, 7, 2, 8), torch.randn(3, 7, 2, 8)
    x, w = torch.randn(3, 7, 24), torch.randn(16, 24)
    with torch.inference_mode():
        crosslmm_ops.cross_attention(q, k, v)
        crosslmm_ops.projected_cross_attention(q, x, w, w, path="fused")
    q = q.clone().requires_grad_()
    crosslmm_ops.cross_attention(q, k, v).sum().backward()
    crosslmm_ops.projected_cross_attention(q, x, w, w, path="fused").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_torch_back_end_refuses_a_cuda_graph_capture(monkeypatch):
    """The torch back end loops over segments in Python, reading cu_seqlens on the host: inside a
    CUDA graph capture that read cannot happen, and the error says which back ends can."""
    q, k, v = _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8)
    cu = cu_seqlens([2, 3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot capture; use backend='cuda' or 'triton'"):
        cross_attention(
            q,
            k,
            v,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=3,
            max_seqlen_k=3,
            backend="torch",
        )


def test_reused_cu_seqlens_are_checked_again_after_an_in_place_change():
    """cu_seqlens read once are not read again while unchanged (no host sync per call), but an
    in-place write to them, or to a view of them, is seen at the next call."""
    q, k, v = _t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 8)
    cu_q, cu_k = cu_seqlens([2, 3]), cu_seqlens([2, 3])
    first = cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    again = cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    cu_k[1] = 6  # through the tensor: non-decreasing no more
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    cu_k[1] = 2
    cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    cu_q[:1].add_(1)  # through a view: the shared version counter moves too
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")


def test_triton_limits_named():
    if not triton_cpu():
        pytest.skip("needs TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="head dim 300"):
        cross_attention(_t(1, 2, 1, 300), _t(1, 3, 1, 300), _t(1, 3, 1, 300), backend="triton")


def test_auto_on_cpu_is_torch_and_recorded():
    q = torch.randn(1, 2, 2, 8)
    with crosslmm_ops.record_backends() as log:
        cross_attention(q, q, q, backend="auto")
    assert log == [("cross_attention", "torch")]


# ----------------------------------------------------------------------------------------------
# torch.library integration: fake kernels, autograd registration, torch.compile
# ----------------------------------------------------------------------------------------------


def test_opcheck():
    q, k, v, cu_q, cu_k = varlen_inputs([3, 0, 4], [5, 2, 0], 4, 2, 8, torch.float64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(
        _cross_attention_fwd_op, (q, k, v, cu_q, cu_k, 4, 5, 0.3, 0, False, "torch")
    )
    out, lse = _cross_attention_fwd_op(q, k, v, cu_q, cu_k, 4, 5, 0.3, 0, False, "torch")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    args = (
        dout,
        dlse,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        cu_q,
        cu_k,
        4,
        5,
        0.3,
        True,
        "torch",
    )
    torch.library.opcheck(_cross_attention_bwd_op, args)
    torch.library.opcheck(_cross_attention_bwd_op, (dout, None) + args[2:])


def test_torch_compile_fullgraph():
    def f(q, k, v, gate, residual):
        out, lse = cross_attention(
            q, k, v, gate=gate, residual=residual, return_lse=True, backend="torch"
        )
        return out.square().sum() + lse.sum()

    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 8, requires_grad=True) for _ in range(2))
    gate, residual = torch.tensor(0.3, requires_grad=True), torch.randn(2, 5, 4, 8)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, gate, residual)
    y.backward()
    torch.testing.assert_close(y, f(q, k, v, gate, residual))
    assert q.grad.abs().sum() > 0 and gate.grad is not None


# ----------------------------------------------------------------------------------------------
# GPU: CUDA and Triton against the reference
# ----------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


def require(backend: str) -> None:
    if backend == "cuda" and not hasattr(_backend.extension(), "attention_forward"):
        pytest.skip("the CUDA extension has no attention kernels (not built)")
    ok, why = (_backend.cuda_runnable if backend == "cuda" else _backend.triton_runnable)(
        torch.device("cuda")
    )
    if not ok:
        pytest.fail(f"{backend} back end cannot run on this GPU: {why}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_gpu_matches_reference(backend, dtype, sq, sk):
    require(backend)
    q = torch.randn(2, sq, 12, 128, device="cuda", dtype=dtype)
    k, v = torch.randn(2, 2, sk, 2, 128, device="cuda", dtype=dtype)
    check_backend(backend, q, k, v, ref_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("d", [64, 128, 96, 40])
def test_gpu_varlen_gqa_head_dims(backend, d):
    require(backend)
    if backend == "cuda" and d not in (64, 128):
        pytest.skip("the CUDA kernels take head dims 64 and 128")
    q, k, v, cu_q, cu_k = varlen_inputs(
        [9, 0, 288, 1, 9], [729, 5, 23328, 0, 1], 12, 2, d, torch.bfloat16, "cuda"
    )
    check_backend(backend, q, k, v, cu_q=cu_q, cu_k=cu_k, ref_dtype=torch.float32)
    check_backend(
        backend,
        non_contiguous(q, 1),
        non_contiguous(k, 1),
        v,
        cu_q=cu_q,
        cu_k=cu_k,
        ref_dtype=torch.float32,
        lse_grad=True,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 16, 128])
def test_gpu_split_kv(backend, num_splits):
    require(backend)
    q = torch.randn(1, 288, 12, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 23328, 2, 128, device="cuda", dtype=torch.bfloat16)
    check_backend(
        backend, q, k, v, num_splits=num_splits, ref_dtype=torch.float32, check_grad=False
    )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("sq,sk", [(288, 23328), (2304, 186624)], ids=["T32", "T256"])
def test_gpu_crosslmm_scale_forward(backend, sq, sk):
    """V2V global at CrossLMM-2B's shapes: 12 query heads of 128, 2 KV heads."""
    require(backend)
    q = torch.randn(1, sq, 12, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, sk, 2, 128, device="cuda", dtype=torch.bfloat16)
    with poison_outputs():
        out, lse = cross_attention(q, k, v, return_lse=True, backend=backend)
    assert crosslmm_ops.last_backend("cross_attention") == backend
    with torch.no_grad():  # the oracle works a block of queries at a time (no 2304 x 186624 scores)
        ref = oracle.attention(q, k, v, dtype=torch.float32)[0]
        low = oracle.attention(q, k, v, dtype=q.dtype)[0]
    assert not torch.isnan(lse).any()
    check_close("out", out, low, ref, factor=2, floor=rounding(ref, q.dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backward_is_deterministic(backend):
    require(backend)
    q, k, v, cu_q, cu_k = varlen_inputs(
        [288, 9, 40], [23328, 729, 3], 12, 2, 128, torch.bfloat16, "cuda"
    )
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, deterministic=True, backend=backend)
    out = cross_attention(*leaves, **kw)
    g = torch.randn_like(out)
    first = torch.autograd.grad(cross_attention(*leaves, **kw), leaves, g)
    second = torch.autograd.grad(cross_attention(*leaves, **kw), leaves, g)
    assert crosslmm_ops.last_backend("cross_attention_backward") == backend
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_gpu_auto_picks_by_dtype_and_head_dim():
    has_cuda_kernels = (
        hasattr(_backend.extension(), "attention_forward")
        and _backend.cuda_runnable(torch.device("cuda"))[0]
    )
    for dtype, d, expected in [
        (torch.bfloat16, 128, "cuda" if has_cuda_kernels else "triton"),
        (torch.float16, 64, "cuda" if has_cuda_kernels else "triton"),
        (torch.bfloat16, 96, "triton"),
        (torch.float32, 128, "triton"),
        (torch.float64, 64, "torch"),
    ]:
        q = torch.randn(1, 4, 2, d, device="cuda", dtype=dtype)
        cross_attention(q, q, q)
        assert crosslmm_ops.last_backend("cross_attention") == expected, (dtype, d)


@pytest.mark.cuda
def test_gpu_fp32_triton():
    require("triton")
    q = torch.randn(2, 37, 4, 64, device="cuda")
    k, v = torch.randn(2, 2, 300, 2, 64, device="cuda")
    check_backend("triton", q, k, v, ref_dtype=torch.float64)


@pytest.mark.cuda
def test_gpu_torch_compile_fullgraph():
    def f(q, k, v, gate, residual):
        return cross_attention(q, k, v, gate=gate, residual=residual).float().square().sum()

    q = torch.randn(2, 9, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(2, 729, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    gate = torch.zeros(12, device="cuda", requires_grad=True)
    y = torch.compile(f, fullgraph=True)(q, k, v, gate, torch.randn_like(q))
    y.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(gate.grad).all()
    assert math.isfinite(y.item())
