"""The attention tests' oracle: one reference for ``cross_attention`` and one error bound.

:func:`attention` is softmax attention written out segment by segment (batched or packed layout,
GQA, the LSE, the ``residual + tanh(gate) * attention`` epilogue), computed in any dtype: in float64
it is the oracle; in the inputs' own low precision it is "plain PyTorch", whose error against the
oracle sets the bound, as in flash-attn's tests (``attention_ref(..., upcast=False)``: matmuls and
softmax in the low dtype; GQA by grouping the query heads of a key head, which computes what
repeating k and v does without the copies: the projection core's one key head of width 1152 shared
by 12 query heads over 186,624 keys would be 20 GB in float64). It is written apart from the
package's ``cross_attention_reference`` (the torch back end, itself under test).
:func:`attention_grads` differentiates it with autograd a block of queries at a time, so problems
like (2304, 186624) fit in memory. Built on it, with the same scores and softmax:
:func:`probabilities` (``attention_weights``) and :func:`projected_attention`
(``projected_cross_attention``: x normalised and projected to K and V in the same dtype, then
:func:`attention`).

The bound (:func:`check_close`): the max error of the code under test against the oracle is at most
``factor`` times plain PyTorch's max error in the same low precision (2 for outputs and LSEs, 3 for
gradients) plus a floor: :func:`magnitude_floor` (1e-3 of the reference's largest magnitude, the
CUDA kernel tests' floor) unless the caller passes another (tests/test_cross_attention.py passes
flash-attn's rounding-sized :func:`rounding`). A caller with a per-element model of rounding noise
that plain PyTorch does not have (tests/test_projected_attention.py's ``rounding_noise``) passes it
as ``noise``: each element's error is taken net of its noise before the max. An LSE must also be
``-inf`` exactly where the reference's is (rows without keys): :func:`check_lse`.
"""

from __future__ import annotations

import math

import torch

# Score elements per block (all heads of a block of queries): 2**27 float64 is 1 GiB.
BLOCK_ELEMENTS = 2**27


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE's dtype, as the kernels return it: float32 (float64 for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(cu_q: torch.Tensor, cu_k: torch.Tensor, heads: int, block: int):
    """``(query rows, key rows)`` of each block: segment by segment, queries in blocks of at most
    ``block`` score elements (every segment with queries appears, keyless ones with no keys)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        rows = max(1, block // max(1, heads * (k1 - k0)))
        for c0 in range(q0, q1, rows):
            yield slice(c0, min(c0 + rows, q1)), slice(k0, k1)


def _scores(q, k, scale: float, dtype: torch.dtype):
    """Scores ``[Hq, Sq, Sk]`` in ``dtype`` of ``q [Sq, Hq, D]`` against one segment's ``k [Sk, Hk,
    D]``: query head ``h`` reads key head ``h // (Hq / Hk)`` (GQA), each score one dot product as
    with repeated keys, the query heads of a key head grouped instead of the keys copied."""
    hq, (sk, hk, d) = q.shape[1], k.shape
    grouped = q.to(dtype).reshape(q.shape[0], hk, hq // hk, d)
    return torch.einsum("qhgd,khd->hgqk", grouped, k.to(dtype)).reshape(hq, q.shape[0], sk) * scale


def _attend(q, k, v, scale: float, dtype: torch.dtype):
    """One block: ``q [Sq, Hq, D]`` against one segment's ``k, v [Sk, Hk, D]`` in ``dtype``:
    ``(out [Sq, Hq, D] in dtype, lse [Hq, Sq])``. Differentiable."""
    sq, hq, hk = q.shape[0], q.shape[1], k.shape[1]
    if k.shape[0] == 0:  # no keys: an empty softmax, output 0 and LSE -inf
        return q.new_zeros(q.shape, dtype=dtype), q.new_full(
            (hq, sq), -math.inf, dtype=_lse_dtype(dtype)
        )
    s = _scores(q, k, scale, dtype)
    lse = torch.logsumexp(s.to(_lse_dtype(dtype)), dim=-1)
    p = torch.softmax(s, dim=-1).reshape(hk, hq // hk, sq, k.shape[0])
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(dtype)).reshape(sq, hq, v.shape[-1])
    return out, lse


def _packed(q, k, v, cu_q, cu_k):
    """Batched ``(B, S, H, D)`` as packed ``(B*S, H, D)`` with uniform cu_seqlens."""
    if cu_q is not None:
        return q, k, v, cu_q, cu_k
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    cu = lambda s: torch.arange(0, (b + 1) * s, s, dtype=torch.int64)  # noqa: E731
    return (
        q.reshape(b * sq, *q.shape[2:]),
        k.reshape(b * sk, *k.shape[2:]),
        v.reshape(b * sk, *v.shape[2:]),
        cu(sq),
        cu(sk),
    )


def attention(
    q,
    k,
    v,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    softmax_scale=None,
    gate=None,
    residual=None,
    dtype=torch.float64,
    block=BLOCK_ELEMENTS,
):
    """``cross_attention(q, k, v, ..., return_lse=True)`` computed in ``dtype``, segment by
    segment: ``(out in dtype, lse)``, the LSE in float32 (float64 for float64) and shaped like
    flash-attn's (``(B, Hq, Sq)`` batched, ``(Hq, total_q)`` packed). Layouts: batched
    ``q (B, Sq, Hq, D), k, v (B, Sk, Hk, D)``, or packed ``(total, H, D)`` with ``cu_seqlens_*``;
    Hq a multiple of Hk. Differentiable through autograd (rows without keys give 0 and ``-inf``
    and no graph)."""
    batched = cu_seqlens_q is None
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qp, kp, vp, cu_q, cu_k = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    outs, lses = [], []
    for qs, ks in _blocks(cu_q, cu_k, qp.shape[1], block):
        block_out, block_lse = _attend(qp[qs], kp[ks], vp[ks], scale, dtype)
        outs.append(block_out)
        lses.append(block_lse)
    out = torch.cat(outs, 0) if outs else qp.new_zeros(qp.shape, dtype=dtype)
    lse = torch.cat(lses, 1) if lses else qp.new_zeros((qp.shape[1], 0), dtype=_lse_dtype(dtype))
    if batched:
        out = out.reshape(q.shape)
        lse = lse.reshape(lse.shape[0], q.shape[0], q.shape[1]).transpose(0, 1)
    if gate is not None:
        g = torch.tanh(gate.to(dtype))
        g = g.reshape(()) if g.numel() == 1 else g.reshape(-1, 1)  # scalar or per head (dim -2)
        out = residual.to(dtype) + g * out
    return out, lse


def attention_grads(
    dout,
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    softmax_scale,
    dtype=torch.float64,
    block=BLOCK_ELEMENTS,
):
    """``(dq, dk, dv)`` in ``dtype`` of :func:`attention` (packed layout) for the output gradient
    ``dout``, through autograd one block at a time (what autograd of the whole computation gives,
    in bounded memory); dk and dv summed over the blocks in float32 (float64 for float64) and
    rounded once."""
    acc = _lse_dtype(dtype)
    dq = torch.zeros(q.shape, device=q.device, dtype=dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=acc)
    dv = torch.zeros(v.shape, device=v.device, dtype=acc)
    with torch.enable_grad():
        for qs, ks in _blocks(cu_seqlens_q, cu_seqlens_k, q.shape[1], block):
            if ks.stop == ks.start:
                continue  # no keys: dq = 0
            leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q[qs], k[ks], v[ks])]
            out, _ = _attend(*leaves, softmax_scale, dtype)
            gq, gk, gv = torch.autograd.grad(out, leaves, dout[qs].to(dtype))
            dq[qs] = gq
            dk[ks] += gk.to(acc)
            dv[ks] += gv.to(acc)
    return dq, dk.to(dtype), dv.to(dtype)


def probabilities(
    q,
    k,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    query_index,
    softmax_scale=None,
    dtype=torch.float64,
):
    """``attention_weights(q, k, ..., query_index)`` computed in ``dtype``: the softmax of
    :func:`attention`'s scores for the queries ``query_index`` (indices into ``Sq`` batched or
    ``total_q`` packed; negative ones count from the end). Batched: ``[B, n, Hq, Sk]``; packed:
    ``[n, Hq, L]``, ``L`` the longest key segment among the chosen queries' segments, each row its
    own segment's keys, then zeros."""
    batched = cu_seqlens_q is None
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qp, kp, _, cu_q, cu_k = _packed(q, k, k, cu_seqlens_q, cu_seqlens_k)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    limit = q.shape[1] if batched else q.shape[0]
    index = [i % limit for i in query_index]
    rows = [b * limit + i for b in range(q.shape[0]) for i in index] if batched else index
    # the segment of packed row r: the one whose (non-empty) query range holds it
    segments = [next(s for s in range(len(bq) - 1) if bq[s] <= r < bq[s + 1]) for r in rows]
    width = max((bk[s + 1] - bk[s] for s in segments), default=0)
    probs = qp.new_zeros((len(rows), qp.shape[1], width), dtype=dtype)
    for n, (r, s) in enumerate(zip(rows, segments)):
        if bk[s + 1] > bk[s]:
            scores = _scores(qp[r : r + 1], kp[bk[s] : bk[s + 1]], scale, dtype)
            probs[n, :, : bk[s + 1] - bk[s]] = torch.softmax(scores, dim=-1)[:, 0]
    return probs.reshape(q.shape[0], len(index), *probs.shape[1:]) if batched else probs


def projected_attention(
    q,
    x,
    w_k,
    w_v,
    b_k=None,
    b_v=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    norm=None,
    norm_weight=None,
    norm_bias=None,
    norm_eps=1e-6,
    softmax_scale=None,
    dtype=torch.float64,
    block=BLOCK_ELEMENTS,
):
    """``projected_cross_attention(q, x, w_k, w_v, ..., return_lse=True)`` computed in ``dtype``:
    ``x`` normalised (``"layernorm"``: ``(x - mean) * rstd``, ``"rmsnorm"``: ``x * rstd``, then
    ``norm_weight`` and ``norm_bias`` applied, whatever the norm), projected to
    ``K = x W_k^T + b_k`` and ``V = x W_v^T + b_v`` (``Hk`` = rows of ``W_k`` / head dim), then
    :func:`attention`; every step in ``dtype``, as plain PyTorch writes it. Layouts as
    :func:`attention` (``x (B, Sk, Dv)`` or ``(total_k, Dv)``). Differentiable."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    xn = x.to(dtype)
    if norm == "layernorm":
        centred = xn - xn.mean(-1, keepdim=True)
        xn = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + norm_eps)
    elif norm == "rmsnorm":
        xn = xn * torch.rsqrt(xn.square().mean(-1, keepdim=True) + norm_eps)
    elif norm is not None:
        raise ValueError(f"norm must be None, 'layernorm' or 'rmsnorm', got {norm!r}")
    if norm_weight is not None:
        xn = xn * cast(norm_weight)
    if norm_bias is not None:
        xn = xn + cast(norm_bias)
    d = q.shape[-1]
    heads = (w_k.shape[0] // d, d)
    k = torch.nn.functional.linear(xn, cast(w_k), cast(b_k)).unflatten(-1, heads)
    v = torch.nn.functional.linear(xn, cast(w_v), cast(b_v)).unflatten(-1, heads)
    return attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        softmax_scale=softmax_scale,
        dtype=dtype,
        block=block,
    )


# ----------------------------------------------------------------------------------------------
# The bound
# ----------------------------------------------------------------------------------------------


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` in float64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def lse_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error of an LSE, which must be -inf exactly where the reference is."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "-inf rows differ"
    finite = torch.isfinite(expected)
    return max_err(actual[finite], expected[finite])


def rounding(x: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attn's atol: the rounding error of ``x``'s magnitude in ``dtype``, and at least a
    fraction of an ulp of 1 (an exactly-zero reference, e.g. dq with one key, leaves no room for
    the rounding of ``delta = rowsum(dO * O)`` from the stored, rounded ``O``)."""
    x = x.detach().to(dtype)
    return 2 * max_err(x + 0.3 - 0.3, x) + torch.finfo(dtype).eps / 8 + 1e-6


def magnitude_floor(ref: torch.Tensor) -> float:
    """1e-3 of the reference's largest magnitude (at least 1e-5): the CUDA kernel tests' floor."""
    return 1e-3 * max(ref.abs().max().item(), 1e-2) if ref.numel() else 0.0


def excess(actual: torch.Tensor, expected: torch.Tensor, noise: torch.Tensor) -> float:
    """``max(|actual - expected| - noise)`` in float64, ``noise`` per element (``-inf`` for empty
    tensors)."""
    if actual.numel() == 0:
        return -math.inf
    return ((actual.double() - expected.double()).abs() - noise.double()).max().item()


def check_close(
    name: str,
    ours: torch.Tensor,
    low_precision: torch.Tensor,
    ref: torch.Tensor,
    *,
    factor: float,
    floor: float | None = None,
    noise: torch.Tensor | None = None,
) -> str:
    """Asserts ``ours`` has no NaN (an unwritten, poisoned element) and ``max |ours - ref| <=
    factor * max |low_precision - ref| + floor`` (``floor``: :func:`magnitude_floor` of ``ref``
    unless given; ``noise``: a per-element allowance shaped like ``ref``, taken off each element's
    error before the max); returns a one-line report of the errors."""
    assert not torch.isnan(ours).any(), (
        f"{name}: NaN in the result (an unwritten or poisoned element, or a NaN computed)"
    )
    if ref.numel() == 0:
        return f"{name}: empty"
    floor = magnitude_floor(ref) if floor is None else floor
    err, base = max_err(ours, ref), max_err(low_precision, ref)
    report = (
        f"{name}: max err {err:.3e} (PyTorch {low_precision.dtype} {base:.3e}, floor {floor:.1e}"
    )
    if noise is not None:
        err = excess(ours, ref, noise)
        report += f"; beyond the noise floor (max {noise.max().item():.1e}): {err:.3e}"
    report += ")"
    assert err <= factor * base + floor, f"{report} exceeds {factor:g}x + floor"
    return report


def check_lse(
    ours: torch.Tensor,
    low_precision: torch.Tensor,
    ref: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    noise: torch.Tensor | None = None,
) -> str:
    """:func:`check_close` on the finite rows, after asserting ``ours`` is ``-inf`` exactly where
    ``ref`` is (rows without keys)."""
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf exactly where a row has no keys"
    keep = ~empty
    return check_close(
        "lse",
        ours[keep],
        low_precision[keep],
        ref[keep],
        factor=factor,
        floor=floor,
        noise=None if noise is None else noise[keep],
    )
