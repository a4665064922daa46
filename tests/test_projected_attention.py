"""projected_cross_attention: equal to projecting x (norm folded in) and calling cross_attention, on
every back end and both paths, forward, LSE and every gradient (q, x, w_k, w_v, b_k, b_v, the norm's
weight and bias); the core (multi-query attention with K = V = x) against cross_attention; gradcheck
in float64; the Triton kernels in the interpreter (outputs poisoned, odd and real widths, splits,
empty segments, non-contiguous input); the cost model and its overrides; bad input; torch.library.

The reference and the error bound are tests/attention_oracle.py's, as in
tests/test_cross_attention.py (flash-attn's): :func:`attention_oracle.projected_attention` (x
normalised and projected to K and V, then the oracle's attention) in float64 is the reference, and
a fast back end's error against it is at most 2x (forward) / 3x (gradients) the error of the same
computation in the inputs' low precision (plain PyTorch), plus a rounding-sized atol, plus a
per-element floor for the rounding noise that the op has and PyTorch's autograd has not
(:func:`rounding_noise`, derived above it; issue #9's campaign failures; passed as
:func:`attention_oracle.check_close`'s ``noise``); tests below show the floors admit those cases
and still fail one perturbed gradient element and classic backward bugs.

CPU tests run in CI (Triton under TRITON_INTERPRET=1, small shapes); tests marked ``cuda`` run on a
GPU at CrossLMM-2B's sizes (Dv 1152, 12 query heads of 128, 2 KV heads).
"""

from __future__ import annotations

import math
import sys

import attention_oracle as oracle
import pytest
import torch
import torch.nn.functional as F
from attention_oracle import check_close, check_lse, lse_err, rounding
from triton_compile import A100_SHARED_MEMORY, H100_SHARED_MEMORY

import crosslmm_ops
from crosslmm_ops import _backend, cross_attention_reference, planner
from crosslmm_ops.ops import projected_attention as pa
from crosslmm_ops.ops.cross_attention import _segments
from crosslmm_ops.ops.projected_attention import (
    CostModel,
    ProjectedLayout,
    choose_path,
    last_path,
    normalize_tokens,
    projected_attention_core,
    projected_cross_attention,
    projected_cross_attention_reference,
)
from crosslmm_ops.testing import cu_seqlens, non_contiguous, poison_outputs

OP = "projected_cross_attention"
CORE = "projected_attention_core"
PARAMS = ("q", "x", "w_k", "w_v", "b_k", "b_v", "norm_weight", "norm_bias")


def triton_cpu() -> bool:
    return _backend.triton_runnable(torch.device("cpu"))[0]


needs_interpreter = pytest.mark.skipif(not triton_cpu(), reason="needs TRITON_INTERPRET=1")


def problem(
    *,
    batch=None,
    lens=None,
    hq=4,
    hk=2,
    d=16,
    dv=40,
    dtype=torch.float32,
    device="cpu",
    biases=True,
    norm_params=True,
):
    """Random inputs: batched ``(B, Sq, Sk)`` or packed ``lens = (lens_q, lens_k)``. Weights are
    scaled so keys and values are O(1), biases and norm parameters are never trivial."""
    make = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)  # noqa: E731
    if lens is not None:
        q, x = make(sum(lens[0]), hq, d), make(sum(lens[1]), dv)
        packed = dict(
            cu_seqlens_q=cu_seqlens(lens[0], device), cu_seqlens_k=cu_seqlens(lens[1], device)
        )
    else:
        b, sq, sk = batch
        q, x = make(b, sq, hq, d), make(b, sk, dv)
        packed = {}
    t = dict(
        q=q,
        x=x * 1.5 + 0.3,
        w_k=make(hk * d, dv) / math.sqrt(dv),
        w_v=make(hk * d, dv) / math.sqrt(dv),
    )
    if biases:
        t.update(b_k=make(hk * d), b_v=make(hk * d))
    if norm_params:
        t.update(norm_weight=1 + 0.3 * make(dv), norm_bias=0.5 * make(dv))
    return {k: v.to(dtype) for k, v in t.items()}, packed


# Rounding-noise floors of check_public: how far a correct implementation may stray from the
# reference beyond "2x / 3x PyTorch's own low-precision error", element by element.
#
# The 2x / 3x rule compares two samples of rounding noise, the op's and plain PyTorch's in the
# same dtype. It fails a correct op wherever the two round differently in kind, as they do here
# (issue #9: 7 failures in 259 torch-back-end cases of the H100 campaign; 2% of CPU draws):
#
# 1. dS = P * (dP - Delta). Every back end (the torch core, cross_attention's torch backward, the
#    Triton and CUDA kernels) forms dP_qj = dO_q . v_j and Delta_q = dO_q . O_q - dlse_q as two
#    float32 dot products, Delta from the output O as stored in the input dtype, and subtracts
#    them; autograd's softmax backward cancels exactly. With one key (P = 1, O = v) the true dq,
#    dk are 0 and the op keeps the residue, which sums over every query of a key (2256 in the fp16
#    w_k failure) into dW_k, db_k, the norm's parameters and dx, where PyTorch's error is ~0.
# 2. The fused path computes in another order than the reference (scores q~ . x^ with
#    q~ = W_k^T q, out = W_v (P x^) + b_v, dW_v = dO^T o~; against K = x^ W_k^T, q . k, P V,
#    dV^T x^): float32 reassociation noise as large as PyTorch's own, so the ratio of the two
#    maxima crosses 2-3x now and then (out 3.44e-6 vs 3.34e-6; w_v; norm_bias).
# 3. The LSE is float32 but computed from operands rounded to the input dtype (K on the
#    materialised path, q~ on the fused one, x^ before both); with 1-3 LSE values (tiny varlen
#    cases) PyTorch's fp16 error is now and then far below the op's by chance.
# 4. The materialised path rounds dk, dv to the input dtype, then the projections' backward sums
#    them over the keys: db_k, 0 in theory (b_k cancels in the softmax), gets that rounding.
#
# Each floor is 4 standard deviations of the noise under the usual model: every rounding an
# independent relative error uniform in [-u, u] (variance u^2 / 3); a float32 sum of n terms a_i
# in one running sum has variance <= n u^2 / 3 * sum_i a_i^2 (each partial sum <= ||a||_2 in
# rms); linear maps carry variances with squared coefficients. Two inequalities keep everything
# P-weighted, i.e. computable like attention itself: P_qj^2 <= P_qj, and (sum_j P_qj c_j)^2 <=
# sum_j P_qj c_j^2 (Jensen, sum_j P_qj = 1) for the Delta_q residue that every key j of row q
# shares. With |a b|^2 = sum_i a_i^2 b_i^2, a gradient element y = sum_qj c_qj dS_qj then has
#
#     Var(y) <= sum_qj P_qj c_qj^2 r_qj,
#     r_qj = n u^2 / 3 (|dO_q v_j|^2 + |dO_q O_q|^2) + |dO_q e_q|^2 + u^2 / 3 dlse_q^2
#
# (u: float32's unit roundoff, u_in: the input dtype's; n = d with dO, v, O on the materialised
# path; n = Dv with dO~ = W_v'^T dO, x^ and O~ = P x^ (|O~|^2 <= P x^2) on the fused one;
# e_qi^2 = min(u_in^2 O_qi^2 / 3, (O_qi - v_j*i)^2) for O's rounding to the input dtype, which is
# at most O's distance to the representable v_j* of the likeliest key j*: 0 with one key) and
# c_qj per leaf: dq_qi: scale k_ji (k without b_k and beta on the fused path); dk_ji (carried
# on): scale q_qi; dW_k[i, c]: scale q_qi xp_jc (xp = gamma x^ + beta, gamma x^ on the fused
# path, where beta only moves the LSE); db_k_i: scale q_qi; d(xp)_jc: scale q~_qc (q~ = W_k^T q:
# the exact coefficient, which sums over i before squaring); dgamma_c: that times x^_jc; dbeta_c:
# that; dx^_jc: that times gamma_c; dx: through the norm's Jacobian rstd (I - 1 1^T / n -
# x^ x^T / n) (RMSNorm: without 1 1^T / n), whose squared rows are at most 3 rstd^2 (v_c +
# (1 + x^_c^2) mean(v)) (RMSNorm: 2 rstd^2 (v_c + x^_c^2 mean(v))) for variances v.
# 2. adds n u^2 / 3 * (sum of squared terms) for each sum the two orders split differently: out
# over Dv (W_v o~) and the scores' noise carried by P (v_j - O); dW_v, db_v over all query
# rows; dx^ as a value over the segment's query rows. 3.: the LSE moves by sum_j P_qj ds_qj,
# ds_qj from the dtype rounding of K (or q~) and of x^ (2 u_in^2 / 3) and the float32 sums
# ((d + Dv) u^2 / 3), times scale^2 (|q_q k_j|^2 + |q~'_q x^_j|^2). 4.: u_in^2 / 3 dk_ji^2 (and
# dv_ji^2) carried to b_k, W_k, xp (b_v, W_v, xp) like the other terms.
#
# The model is pessimistic (CPU BLAS and the GPU kernels sum in blocks, not in one running sum):
# over the CPU draws of tests/fuzz_cases.py reported with issue #9 the largest excess over the
# 2x / 3x bound used under 2 of the 4 sigmas. It stays tight: per element, in float32 units
# (2^-24) except for what the op really stores in the input dtype, and zero where the op and
# PyTorch round alike. test_check_public_catches_* show that one gradient element off by 1e-4 of
# its tensor's largest (fp32), and the classic backward bugs, still fail.
NOISE_SIGMAS = 4.0


def rounding_noise(tensors, packed, *, path, norm, norm_eps=1e-6, ref_out, g=None, g_lse=None):
    """Per-element floors (see above) for ``out``, ``lse`` and, given the output gradient ``g``
    (and ``g_lse``, the LSE's, or ``None``), every leaf's gradient: ``{name: tensor}`` shaped
    like what it bounds, in the accumulation dtype (float32; float64 for float64 input)."""
    dtype = tensors["q"].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.finfo(acc).eps / 2  # unit roundoff of the accumulation
    u_in = torch.finfo(dtype).eps / 2  # ... and of the operands stored in the input dtype
    with torch.no_grad():
        t = {n: v.detach().to(acc) for n, v in tensors.items()}
        q, x = t["q"], t["x"]
        batched = q.dim() == 4
        hq, d = q.shape[-2:]
        dv = x.shape[-1]
        hk = t["w_k"].shape[0] // d
        group = hq // hk
        scale = d**-0.5
        if batched:
            b, sq, sk = q.shape[0], q.shape[1], x.shape[1]
            cu_q, cu_k = cu_seqlens([sq] * b), cu_seqlens([sk] * b)
        else:
            cu_q, cu_k = packed["cu_seqlens_q"], packed["cu_seqlens_k"]
        q, x = q.reshape(-1, hq, d), x.reshape(-1, dv)
        o = ref_out.detach().to(acc).reshape(-1, hq, d)
        grads = g is not None
        g = (g.detach().to(acc) if grads else torch.zeros_like(ref_out, dtype=acc)).reshape(
            -1, hq, d
        )
        xhat = normalize_tokens(x, norm, norm_eps)
        x2 = xhat.square()
        gamma, beta = t.get("norm_weight"), t.get("norm_bias")
        xg = xhat if gamma is None else xhat * gamma
        xn = xg if beta is None else xg + beta
        mat = path == "materialized"
        xp = xn if mat else xg  # what W_k and W_v multiply on this path
        heads = lambda w: w.view(hk, d, dv).repeat_interleave(group, 0)  # noqa: E731
        per_head = lambda t_: t_.view(-1, hk, d).repeat_interleave(group, 1)  # noqa: E731
        k = per_head(F.linear(xn, t["w_k"], t.get("b_k")))  # the reference's keys: its P
        v = per_head(F.linear(xn, t["w_v"], t.get("b_v")))
        kp = per_head(F.linear(xp, t["w_k"], t.get("b_k") if mat else None))
        q_t = torch.einsum("rhd,hdc->rhc", q, heads(t["w_k"]))  # q~ = W_k^T q
        do_t = torch.einsum("rhd,hdc->rhc", g, heads(t["w_v"]))  # dO~ = W_v^T dO
        gamma2 = 1 if gamma is None else gamma.square()
        q_t2, do_t2 = q_t.square() * gamma2, do_t.square() * gamma2  # with W' = W diag(gamma)
        w_v2 = heads(t["w_v"]).square()
        n = d if mat else dv  # the length of the dot products dP and Delta
        dlse = q.new_zeros(q.shape[0], hq)
        if g_lse is not None:
            gl = g_lse.detach().to(acc)
            dlse = gl.transpose(1, 2).reshape(-1, hq) if batched else gl.t()
        dlse2 = dlse.square()
        var_dq, var_out = torch.zeros_like(q), torch.zeros_like(q)
        var_dk = q.new_zeros(x.shape[0], hq, d)
        var_dxp = torch.zeros_like(x)
        var_wv = q.new_zeros(hq, d, dv)
        var_lse = q.new_zeros(q.shape[0], hq)
        dk_true, dv_true = q.new_zeros(x.shape[0], hq, d), q.new_zeros(x.shape[0], hq, d)
        for qs, ks in _segments(cu_q, cu_k):
            if qs.stop == qs.start or ks.stop == ks.start:
                continue  # no (query, key) pair: every back end writes exact zeros
            p = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale, -1)
            px2 = torch.einsum("hqk,kc->qhc", p, x2[ks])
            pxp2 = torch.einsum("hqk,kc->qhc", p, xp[ks].square())
            if grads:  # 1. the dS residue r_qj, then P * r
                g2 = g[qs].square()
                if mat:  # dk, dv themselves (for 4.)
                    ds = torch.einsum("qhd,khd->hqk", g[qs], v[ks])
                    ds -= ((g[qs] * o[qs]).sum(-1) - dlse[qs]).t().unsqueeze(-1)
                    ds *= p
                    dk_true[ks] = scale * torch.einsum("hqk,qhd->khd", ds, q[qs])
                    dv_true[ks] = torch.einsum("hqk,qhd->khd", p, g[qs])
                    del ds
                # The output as stored (input dtype): its rounding error is at most u_in |O|,
                # and at most its distance to a representable point, the most likely value v_j*
                # (0 with one key: O = v).
                star = p.argmax(-1)  # [Hq, Sq]
                if mat:
                    r = torch.einsum("qhd,khd->hqk", g2, v[ks].square())
                    o_q, vals, g2_o = o[qs], v[ks].transpose(0, 1), g2
                    delta2 = (g2 * o[qs].square()).sum(-1).t().unsqueeze(-1)
                else:  # O~ = P x^, |O~_qc|^2 <= (P x^2)_qc
                    r = torch.einsum("qhc,kc->hqk", do_t2[qs], x2[ks])
                    o_q = torch.einsum("hqk,kc->qhc", p, xhat[ks])
                    vals, g2_o = xhat[ks].expand(hq, -1, -1), do_t2[qs]
                    delta2 = (do_t2[qs] * px2).sum(-1).t().unsqueeze(-1)
                nearest = vals.gather(1, star.unsqueeze(-1).expand(-1, -1, vals.shape[-1]))
                o_round2 = torch.minimum(
                    u_in**2 / 3 * o_q.square(), (o_q - nearest.transpose(0, 1)).square()
                )
                r += delta2
                r *= n * u**2 / 3
                r += ((g2_o * o_round2).sum(-1).t() + u**2 / 3 * dlse2[qs].t()).unsqueeze(-1)
                w = r.mul_(p)
                del delta2, o_q, nearest, o_round2
                var_dq[qs] = scale**2 * torch.einsum("hqk,khd->qhd", w, kp[ks].square())
                var_dk[ks] = scale**2 * torch.einsum("hqk,qhd->khd", w, q[qs].square())
                rows = (qs.stop - qs.start) * group
                var_dxp[ks] = scale**2 * torch.einsum(
                    "hqk,qhc->kc", w, q_t[qs].square()
                ) + rows * u**2 / 3 * torch.einsum("hqk,qhc->kc", p, do_t2[qs])
                del r, w
                var_wv += torch.einsum("qhd,qhc->hdc", g2, pxp2)
            # 3. and 2.: score noise |q k_j|^2, |q~' x^_j|^2, carried by P into the LSE and out
            s_k = torch.einsum("qhd,khd->hqk", q[qs].square(), kp[ks].square())
            s_x = torch.einsum("qhc,kc->hqk", q_t2[qs], x2[ks])
            var_lse[qs] = (p * (s_k + s_x)).sum(-1).t()
            ps = p.mul_(s_k.mul_(d).add_(s_x.mul_(dv)))  # P_qj * float32 score variance / u^2
            del s_k, s_x
            spread = (
                torch.einsum("hqk,khd->qhd", ps, v[ks].square())
                - 2 * o[qs] * torch.einsum("hqk,khd->qhd", ps, v[ks])
                + o[qs].square() * ps.sum(-1).t().unsqueeze(-1)
            )  # sum_j P s2 (v_j - O)^2
            var_out[qs] = (
                u**2
                / 3
                * (scale**2 * spread.clamp_min(0) + dv * torch.einsum("qhc,hdc->qhd", pxp2, w_v2))
            )
            del p, ps
        var_lse *= scale**2 * (2 * u_in**2 + (d + dv) * u**2) / 3
        floors = {"out": var_out.reshape(tensors["q"].shape)}
        floors["lse"] = var_lse.view(b, sq, hq).transpose(1, 2) if batched else var_lse.t()
        if grads:
            kv_heads = lambda t_: t_.view(-1, hk, group, d).sum(2)  # noqa: E731
            var_dk = kv_heads(var_dk)
            total_rows = q.shape[0] * group
            var_wv = total_rows * u**2 / 3 * var_wv.view(hk, group, d, dv).sum(1)
            var_bv = total_rows * u**2 / 3 * g.square().sum(0).view(hk, group, d).sum(1)
            if mat:  # 4. dk, dv rounded to the input dtype, then summed over the keys
                dk2, dv2 = (u_in**2 / 3 * kv_heads(t_).square() for t_ in (dk_true, dv_true))
                xp2 = xp.square()
                var_dk_sum = var_dk.sum(0) + dk2.sum(0)
                var_wk = torch.einsum("khd,kc->hdc", var_dk + dk2, xp2)
                var_wv = var_wv + torch.einsum("khd,kc->hdc", dv2, xp2)
                var_bv = var_bv + dv2.sum(0)
                var_dxp = (
                    var_dxp
                    + torch.einsum("khd,hdc->kc", dk2, t["w_k"].view(hk, d, dv).square())
                    + torch.einsum("khd,hdc->kc", dv2, t["w_v"].view(hk, d, dv).square())
                )
            else:  # the fused path gives b_k an exact zero through the output
                var_dk_sum = var_dk.new_zeros(hk, d)
                var_wk = torch.einsum("khd,kc->hdc", var_dk, xp.square())
            var = {"q": var_dq, "w_k": var_wk, "w_v": var_wv}
            if "b_k" in t:
                var["b_k"] = var_dk_sum
            if "b_v" in t:
                var["b_v"] = var_bv
            if "norm_bias" in t:
                var["norm_bias"] = var_dxp.sum(0)
            if "norm_weight" in t:
                var["norm_weight"] = (var_dxp * x2).sum(0)
            var_x = var_dxp * gamma2
            if norm is not None:
                centred = x - x.mean(-1, keepdim=True) if norm == "layernorm" else x
                rstd2 = 1 / (centred.square().mean(-1, keepdim=True) + norm_eps)
                mean = var_x.mean(-1, keepdim=True)
                var_x = (
                    3 * rstd2 * (var_x + (1 + x2) * mean)
                    if norm == "layernorm"
                    else 2 * rstd2 * (var_x + x2 * mean)
                )
            var["x"] = var_x
            floors.update({name: v.reshape(tensors[name].shape) for name, v in var.items()})
        return {name: NOISE_SIGMAS * v.sqrt() for name, v in floors.items()}


def check_public(
    backend,
    tensors,
    packed,
    *,
    path="fused",
    norm="layernorm",
    num_splits=0,
    check_grad=True,
    lse_grad=True,
    ref_dtype=torch.float64,
    fwd_factor=2.0,
    grad_factor=3.0,
):
    """Forward, LSE and every gradient of ``backend`` on ``path`` against the reference in
    ``ref_dtype`` from the same low-precision inputs, bounded per element by plain PyTorch's own
    error in the inputs' dtype (2x forward, 3x gradients, plus a rounding of the magnitude) plus
    :func:`rounding_noise`'s floor. Outputs are poisoned; queries without keys must give exact
    zeros (output and dq) and an LSE of -inf."""
    dtype = tensors["q"].dtype
    names = [n for n in PARAMS if n in tensors]
    leaves = {n: tensors[n].detach().requires_grad_(True) for n in names}
    ref_leaves = {n: t.detach().to(ref_dtype).requires_grad_(True) for n, t in leaves.items()}
    low_leaves = {n: t.detach().requires_grad_(True) for n, t in leaves.items()}
    kw = dict(norm=norm, **packed)
    ref_out, ref_lse = oracle.projected_attention(**ref_leaves, **kw, dtype=ref_dtype)
    low_out, low_lse = oracle.projected_attention(**low_leaves, **kw, dtype=dtype)
    with poison_outputs():
        out, lse = projected_cross_attention(
            **leaves, **kw, return_lse=True, path=path, backend=backend, num_splits=num_splits
        )
    assert last_path() == path
    assert crosslmm_ops.last_backend(OP) == backend
    assert crosslmm_ops.last_backend(CORE if path == "fused" else "cross_attention") == backend
    assert out.dtype == dtype and out.shape == tensors["q"].shape and lse.shape == ref_lse.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten elements"
    finite = torch.isfinite(ref_lse)
    # Rows whose segment has no keys (LSE -inf in the reference, in the (.., Hq, rows) layout).
    keyless = (~finite).transpose(-1, -2).reshape(out.shape[:-1])
    g = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse)
    floor = rounding_noise(
        tensors,
        packed,
        path=path,
        norm=norm,
        ref_out=ref_out,
        g=g if check_grad else None,
        g_lse=g_lse if lse_grad else None,
    )
    check_close(
        "out",
        out,
        low_out,
        ref_out,
        factor=fwd_factor,
        floor=rounding(ref_out, dtype),
        noise=floor["out"],
    )
    assert not out[keyless].any(), "a query without keys must output exactly 0"
    check_lse(lse, low_lse, ref_lse, factor=fwd_factor, floor=1e-5, noise=floor["lse"])
    if not check_grad:
        return

    def grads(o, l, ts):
        loss = (o * g.to(o.dtype)).sum()
        if lse_grad:
            loss = loss + (l.where(finite, 0) * g_lse.to(l.dtype)).sum()
        return torch.autograd.grad(loss, list(ts.values()))

    expected = grads(ref_out, ref_lse, ref_leaves)
    low = grads(low_out, low_lse, low_leaves)
    with poison_outputs():
        actual = grads(out, lse, leaves)
    if path == "fused":
        # A CUDA forward's backward runs on CUDA where the extension has it (the planner's rule).
        ran = crosslmm_ops.planner.projected_backward_backend(backend, out.device)[0]
        assert crosslmm_ops.last_backend(CORE + "_backward") == ran
    for name, a, e, lo in zip(names, actual, expected, low):
        assert a.dtype == leaves[name].dtype and a.shape == leaves[name].shape, name
        check_close(name, a, lo, e, factor=grad_factor, floor=rounding(e, dtype), noise=floor[name])
    assert not actual[0][keyless].any(), "a query without keys must get dq exactly 0"


# ----------------------------------------------------------------------------------------------
# The reference against modules: LayerNorm / RMSNorm -> nn.Linear -> the oracle, float64
# ----------------------------------------------------------------------------------------------


def dense_projected(q, x, w_k, w_v, b_k, b_v, norm, norm_weight, norm_bias, eps, lens=None):
    """What a user writes: torch.nn modules for the norm and the projections, then attention
    (the tests' oracle)."""
    dv = x.shape[-1]
    if norm == "layernorm":
        mod = torch.nn.LayerNorm(dv, eps=eps, dtype=torch.float64)
        mod.weight.data.copy_(norm_weight)
        mod.bias.data.copy_(norm_bias)
        xn = mod(x)
    else:
        mod = torch.nn.RMSNorm(dv, eps=eps, dtype=torch.float64)
        mod.weight.data.copy_(norm_weight)
        xn = mod(x) + norm_bias
    d = q.shape[-1]
    hk = w_k.shape[0] // d
    k = torch.nn.functional.linear(xn, w_k, b_k).unflatten(-1, (hk, d))
    v = torch.nn.functional.linear(xn, w_v, b_v).unflatten(-1, (hk, d))
    segments = () if lens is None else (cu_seqlens(lens[0]), cu_seqlens(lens[1]))
    return oracle.attention(q, k, v, *segments, softmax_scale=d**-0.5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_reference_matches_modules(norm, layout):
    lens = ([3, 0, 5, 2], [7, 4, 0, 9]) if layout == "packed" else None
    t, packed = problem(
        batch=(2, 5, 11) if lens is None else None,
        lens=lens,
        hq=6,
        hk=2,
        d=8,
        dv=24,
        dtype=torch.float64,
    )
    out, lse = projected_cross_attention_reference(
        **t, **packed, norm=norm, norm_eps=1e-5, return_lse=True
    )
    e_out, e_lse = dense_projected(
        *(t[n] for n in PARAMS[:6]), norm, t["norm_weight"], t["norm_bias"], 1e-5, lens
    )
    torch.testing.assert_close(out, e_out, rtol=1e-12, atol=1e-12)
    assert lse_err(lse, e_lse) < 1e-12


# ----------------------------------------------------------------------------------------------
# Both paths on the torch back end equal the oracle exactly (float64), every gradient
# ----------------------------------------------------------------------------------------------

CASES = {
    "batched-gqa": dict(batch=(2, 3, 17), hq=6, hk=2),
    "batched-mha": dict(batch=(1, 4, 9), hq=3, hk=3),
    "frame-local-mqa": dict(lens=([9] * 3, [29] * 3), hq=4, hk=1),  # one bmm run of 3 frames
    "varlen-empty": dict(lens=([2, 0, 3, 1, 4], [5, 3, 0, 6, 6]), hq=4, hk=2),  # odd runs
}


@pytest.mark.parametrize("path", ["fused", "materialized"])
@pytest.mark.parametrize("norm", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("case", list(CASES))
def test_paths_equal_reference_float64(case, norm, path):
    t, packed = problem(**CASES[case], d=8, dv=20, dtype=torch.float64)
    if norm is None:  # then x is taken as normalised; keep an affine part to fold
        t.pop("norm_bias")
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}
    kw = dict(norm=norm, softmax_scale=0.37, **packed)
    e_out, e_lse = oracle.projected_attention(**leaves, **kw)
    out, lse = projected_cross_attention(
        **leaves, **kw, return_lse=True, path=path, backend="torch"
    )
    assert last_path() == path and crosslmm_ops.last_backend(OP) == "torch"
    torch.testing.assert_close(out, e_out, rtol=1e-10, atol=1e-10)
    assert lse_err(lse, e_lse) < 1e-10
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(e_lse)
    loss = lambda o, l: (o * g).sum() + (l.where(finite, 0) * g_lse).sum()  # noqa: E731
    expected = torch.autograd.grad(loss(e_out, e_lse), list(leaves.values()))
    actual = torch.autograd.grad(loss(out, lse), list(leaves.values()))
    for name, a, e in zip(leaves, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_b_k_gradient():
    """b_k cancels in the softmax: its gradient through the output is exactly zero on the fused
    path (and still present, so optimisers and autograd.grad see it); through the LSE it is
    q's sum scaled, as on the materialised path."""
    t, _ = problem(batch=(2, 3, 10), d=8, dv=12, dtype=torch.float64, norm_params=False)
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}
    out = projected_cross_attention(**leaves, path="fused", backend="torch")
    (db_k,) = torch.autograd.grad(out.square().sum(), [leaves["b_k"]])
    assert torch.equal(db_k, torch.zeros_like(db_k))
    ref = projected_cross_attention(**leaves, path="materialized", backend="torch")
    (ref_db_k,) = torch.autograd.grad(ref.square().sum(), [leaves["b_k"]])
    assert ref_db_k.abs().max() < 1e-12  # zero up to rounding
    _, lse = projected_cross_attention(**leaves, path="fused", backend="torch", return_lse=True)
    (db_k,) = torch.autograd.grad(lse.sum(), [leaves["b_k"]])
    q = leaves["q"].detach()  # d lse / d b_k = scale * sum of q over the kv head's queries
    expected = (q.unflatten(2, (2, 2)).sum((0, 1, 3)) / math.sqrt(8)).reshape(-1)
    torch.testing.assert_close(db_k, expected)


def test_normalize_tokens_shared_across_layers():
    """A model normalises x once and passes each layer's gamma, beta: the same result as letting
    every layer normalise."""
    x = torch.randn(2, 13, 24, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(
        normalize_tokens(x, "layernorm", 1e-5), torch.nn.functional.layer_norm(x, (24,), eps=1e-5)
    )
    rms = torch.nn.RMSNorm(24, eps=1e-6, dtype=torch.float64)
    torch.testing.assert_close(normalize_tokens(x, "rmsnorm"), rms(x))
    assert normalize_tokens(x, None) is x
    xh = normalize_tokens(x, "rmsnorm")
    for _layer in range(2):
        t, _ = problem(batch=(2, 4, 13), dv=24, dtype=torch.float64)
        t["x"] = x
        full = projected_cross_attention(**t, norm="rmsnorm", backend="torch")
        shared = projected_cross_attention(**{**t, "x": xh}, norm=None, backend="torch")
        torch.testing.assert_close(shared, full, rtol=1e-12, atol=1e-12)
    bf = x.to(torch.bfloat16)
    assert normalize_tokens(bf, "layernorm").dtype == torch.bfloat16


def test_weights_in_another_dtype():
    """fp32 master weights with fp16 activations: used in q's dtype, gradients in their own."""
    t, _ = problem(batch=(1, 3, 20), dv=24, dtype=torch.float16)
    for n in ("w_k", "w_v", "b_v", "norm_weight"):
        t[n] = t[n].float().requires_grad_(True)
    out = projected_cross_attention(**t, norm="layernorm", backend="torch")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert t["w_k"].grad.dtype == torch.float32 and torch.isfinite(t["w_k"].grad).all()


# ----------------------------------------------------------------------------------------------
# gradcheck (float64, torch back end) and the hand-written core backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["batched", "varlen-empty"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gradcheck_float64(layout, norm):
    kw = dict(batch=(2, 2, 5)) if layout == "batched" else dict(lens=([2, 0, 1], [3, 2, 0]))
    t, packed = problem(**kw, hq=4, hk=2, d=3, dv=6, dtype=torch.float64)
    names = list(t)

    def f(*ts):
        out, lse = projected_cross_attention(
            **dict(zip(names, ts)),
            **packed,
            norm=norm,
            return_lse=True,
            path="fused",
            backend="torch",
        )
        return out, lse.where(torch.isfinite(lse), 0)

    assert torch.autograd.gradcheck(f, tuple(v.requires_grad_(True) for v in t.values()))


def test_gradcheck_core_float64():
    q = torch.randn(2, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = cu_seqlens([2, 0, 3]), cu_seqlens([5, 4, 3])

    def f(q, x):
        out, lse = pa._projected_attention_core(q, x, cu_q, cu_k, 3, 5, 0.4, 0, "torch")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, x))


def test_core_backward_formula_matches_autograd():
    """The registered backward (hand-written, batched over runs of equal segments) equals autograd
    through the reference, LSE gradient included."""
    lens = ([9, 9, 9, 0, 4, 1], [29, 29, 29, 5, 0, 33])
    q = torch.randn(2, sum(lens[0]), 3, 10, dtype=torch.float64)  # grouped: Hk 2, G 3
    x = torch.randn(sum(lens[1]), 10, dtype=torch.float64)
    cu_q, cu_k = cu_seqlens(lens[0]), cu_seqlens(lens[1])
    q.requires_grad_(True)
    x.requires_grad_(True)
    e_out, e_lse = pa._core_reference_forward(q, x, cu_q, cu_k, 0.3, torch.float64)
    out, lse = pa._projected_attention_core(q, x, cu_q, cu_k, 9, 33, 0.3, 0, "torch")
    torch.testing.assert_close(out, e_out)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(e_lse)
    loss = lambda o, l: (o * g).sum() + (l.where(finite, 0) * g_lse).sum()  # noqa: E731
    expected = torch.autograd.grad(loss(e_out, e_lse), [q, x])
    actual = torch.autograd.grad(loss(out, lse), [q, x])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_core_is_cross_attention_with_shared_kv(layout):
    if layout == "batched":
        q, x, kw = torch.randn(2, 5, 3, 12), torch.randn(2, 9, 12), {}
    else:
        q, x = torch.randn(7, 3, 12), torch.randn(11, 12)
        kw = dict(cu_seqlens_q=cu_seqlens([3, 4, 0]), cu_seqlens_k=cu_seqlens([5, 0, 6]))
    out, lse = projected_attention_core(q, x, **kw, return_lse=True, backend="torch")
    e_out, e_lse = cross_attention_reference(
        q, x.unsqueeze(-2), x.unsqueeze(-2), **kw, return_lse=True
    )
    torch.testing.assert_close(out, e_out)
    assert lse_err(lse, e_lse) < 1e-5
    assert crosslmm_ops.last_backend(CORE) == "torch"


# ----------------------------------------------------------------------------------------------
# The Triton kernels in the interpreter
# ----------------------------------------------------------------------------------------------


def core_oracle(q, x, cu_q, cu_k, scale, dtype):
    """The core as the oracle's attention: grouped ``q [Hk, total_q, G, Dv]`` as ``Hk * G``
    query heads (head ``h * G + g``) over one key head that is also the value head, ``x``:
    ``(out [Hk, total_q, G, Dv], lse [Hk * G, total_q])`` in ``dtype``."""
    hk, total_q, group, dv = q.shape
    rows = q.permute(1, 0, 2, 3).reshape(total_q, hk * group, dv)
    kv = x.unsqueeze(-2)
    out, lse = oracle.attention(rows, kv, kv, cu_q, cu_k, softmax_scale=scale, dtype=dtype)
    return out.reshape(total_q, hk, group, dv).permute(1, 0, 2, 3), lse


def check_core(backend, q, x, cu_q, cu_k, *, num_splits=0, scale=0.2, lse_grad=True):
    """The core of ``backend`` (grouped q [Hk, total_q, G, Dv]) against the float64 oracle,
    bounded by the oracle's own error in q's dtype. Outputs poisoned."""
    dtype = q.dtype
    lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
    mq, mk = max(lq, default=0), max(lk, default=0)
    leaves = [q.detach().requires_grad_(True), x.detach().requires_grad_(True)]
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    low = [t.detach().requires_grad_(True) for t in leaves]
    ref_out, ref_lse = core_oracle(*ref, cu_q, cu_k, scale, torch.float64)
    low_out, low_lse = core_oracle(*low, cu_q, cu_k, scale, dtype)
    with poison_outputs():
        out, lse = pa._projected_attention_core(
            *leaves, cu_q, cu_k, mq, mk, scale, num_splits, backend
        )
    assert crosslmm_ops.last_backend(CORE) == backend
    assert out.shape == q.shape and lse.shape == (q.shape[0] * q.shape[2], q.shape[1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten elements"
    check_close("out", out, low_out, ref_out, factor=2, floor=rounding(ref_out, dtype))
    check_lse(lse, low_lse, ref_lse, factor=2, floor=1e-5)
    g = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse) if lse_grad else torch.zeros_like(ref_lse)
    finite = torch.isfinite(ref_lse)

    def grads(o, l, ts):
        loss = (o * g.to(o.dtype)).sum()
        if lse_grad:
            loss = loss + (l.where(finite, 0) * g_lse.to(l.dtype)).sum()
        if not loss.requires_grad:
            return [torch.zeros_like(t) for t in ts]
        return torch.autograd.grad(loss, ts, allow_unused=True, materialize_grads=True)

    expected, lowg = grads(ref_out, ref_lse, ref), grads(low_out, low_lse, low)
    with poison_outputs():
        actual = grads(out, lse, leaves)
    expected_backward = crosslmm_ops.planner.projected_backward_backend(backend, q.device)[0]
    assert crosslmm_ops.last_backend(CORE + "_backward") == expected_backward
    for name, a, e, lo in zip(("dq", "dx"), actual, expected, lowg):
        check_close(name, a, lo, e, factor=3, floor=rounding(e, dtype))


CORE_LENS = {
    "frames": ([3, 3, 3], [29, 29, 29]),
    "decode-batch": ([1, 1, 1], [70, 1, 33]),
    "empty-segments": ([2, 0, 3, 4], [5, 6, 0, 40]),
    "no-queries": ([0, 0], [5, 0]),
}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CORE_LENS))
def test_triton_core_cpu(case, dtype):
    lens = CORE_LENS[case]
    q = torch.randn(2, sum(lens[0]), 3, 40, dtype=dtype)  # Hk 2, G 3: grouped layout
    x = torch.randn(sum(lens[1]), 40, dtype=dtype)
    check_core("triton", q, x, cu_seqlens(lens[0]), cu_seqlens(lens[1]))


@needs_interpreter
@pytest.mark.parametrize("dv", [16, 72, 100, 1152], ids=lambda d: f"dv{d}")
def test_triton_core_widths_cpu(dv):
    """Power-of-two widths (an all-masked second slab), odd ones, and SigLIP's 1152 = 1024 + 128."""
    lens = ([2, 1], [37, 20])
    q = torch.randn(1, 3, 5, dv, dtype=torch.float16)
    x = torch.randn(57, dv, dtype=torch.float16)
    check_core("triton", q, x, cu_seqlens(lens[0]), cu_seqlens(lens[1]), scale=dv**-0.5)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [0, 1, 2, 3, 7])
def test_triton_core_splits_cpu(num_splits):
    lens = ([1, 2, 1], [150, 40, 0])
    q = torch.randn(2, 4, 2, 24)  # 2 kv heads: the merge's row -> (head, token) mapping
    x = torch.randn(190, 24)
    check_core(
        "triton",
        q,
        x,
        cu_seqlens(lens[0]),
        cu_seqlens(lens[1]),
        num_splits=num_splits,
        lse_grad=num_splits == 3,
    )


@needs_interpreter
def test_triton_core_non_contiguous_cpu():
    """q~ in any grouped strides (here token-major, as a permuted view) and x with a row stride."""
    lens = ([3, 4], [30, 15])
    q = torch.randn(7, 2, 3, 24).permute(1, 0, 2, 3)
    x = non_contiguous(torch.randn(45, 24), dim=0)
    assert not q.is_contiguous() and not x.is_contiguous()
    check_core("triton", q, x, cu_seqlens(lens[0]), cu_seqlens(lens[1]))


@needs_interpreter
def test_triton_core_deterministic_cpu():
    q = torch.randn(1, 6, 4, 24, requires_grad=True)
    x = torch.randn(80, 24, requires_grad=True)
    cu_q, cu_k = cu_seqlens([2, 4]), cu_seqlens([50, 30])
    grads = []
    for _ in range(2):
        out, _ = pa._projected_attention_core(q, x, cu_q, cu_k, 4, 50, 0.3, 3, "triton")
        grads.append(torch.autograd.grad(out.sum(), [q, x]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


PUBLIC = {
    "frame-local": dict(lens=([3] * 3, [29] * 3), hq=4, hk=2),
    "decode-batch": dict(lens=([1, 1, 1], [70, 1, 33]), hq=6, hk=2),
    "batched-mqa": dict(batch=(2, 5, 21), hq=4, hk=1),
}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(PUBLIC))
def test_triton_public_cpu(case, dtype):
    t, packed = problem(**PUBLIC[case], d=16, dv=40, dtype=dtype)
    check_public("triton", t, packed, norm="layernorm")


@needs_interpreter
def test_triton_public_splits_cpu():
    t, packed = problem(lens=([1, 2], [130, 0]), hq=6, hk=2, d=16, dv=40)
    check_public("triton", t, packed, num_splits=3)


@needs_interpreter
def test_triton_public_non_contiguous_rmsnorm_cpu():
    t, packed = problem(batch=(2, 3, 25), hq=4, hk=2, d=16, dv=40)
    t["q"], t["x"] = non_contiguous(t["q"], dim=1), non_contiguous(t["x"], dim=1)
    check_public("triton", t, packed, norm="rmsnorm")


def test_torch_backend_low_precision():
    """fp16 through the torch back end on both paths, within PyTorch's own fp16 error."""
    t, packed = problem(lens=([3, 1, 4], [40, 9, 0]), hq=6, hk=2, d=16, dv=40, dtype=torch.float16)
    for path in ("fused", "materialized"):
        check_public("torch", t, packed, path=path)


# ----------------------------------------------------------------------------------------------
# check_public itself: the rounding-noise floors admit the campaign's failures of a correct op
# (issue #9) and still fail real bugs
# ----------------------------------------------------------------------------------------------

F16, F32 = torch.float16, torch.float32
# The kinds of the GPU campaign's 7 failures (torch back end, benchmarks/results/
# fuzz_campaign_h100.json), small enough for CI: before the floors, the one-key cases failed for
# every seed, the tiny LSE cases for 6 (fused) and 2 (materialised) of their 24 seeds.
ROUNDING_CASES = {
    # 1-3 LSE values: PyTorch's fp16 error is sometimes far below the op's by chance.
    "tiny-lse-fused-fp16": (
        dict(lens=([1, 1], [0, 1]), hq=1, hk=1, d=64, dv=64, dtype=F16, biases=False),
        "fused",
        None,
        True,
        24,
    ),
    "tiny-lse-materialized-fp16": (
        dict(lens=([1], [1]), hq=3, hk=3, d=64, dv=200, dtype=F16),
        "materialized",
        "layernorm",
        True,
        24,
    ),
    # One key per segment: dq, dW_k are 0 in theory; the dS residue sums over the queries.
    "one-key-fp16": (
        dict(batch=(2, 800, 1), hq=6, hk=2, d=64, dv=200, dtype=F16, biases=False),
        "materialized",
        None,
        False,
        1,
    ),
    "one-key-materialized-fp32": (
        dict(batch=(2, 200, 1), hq=6, hk=2, d=64, dv=200, dtype=F32),
        "materialized",
        "rmsnorm",
        False,
        2,
    ),
    "one-key-fused-fp32": (
        dict(lens=([100, 3, 50], [1, 7, 1]), hq=4, hk=1, d=64, dv=200, dtype=F32),
        "fused",
        "layernorm",
        False,
        2,
    ),
}


@pytest.mark.parametrize("case", list(ROUNDING_CASES))
def test_check_public_admits_rounding_noise(case):
    kw, path, norm, lse_grad, seeds = ROUNDING_CASES[case]
    for seed in range(seeds):
        torch.manual_seed(seed)
        t, packed = problem(**kw)
        check_public("torch", t, packed, path=path, norm=norm, lse_grad=lse_grad)


class _Nudge(torch.autograd.Function):
    """Identity forward; backward adds ``rel`` times the largest gradient element to it."""

    @staticmethod
    def forward(ctx, t, rel):
        ctx.rel = rel
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        flat = grad.view(-1)
        i = flat.abs().argmax()
        flat[i] += ctx.rel * flat[i].abs()
        return grad, None


# fp32 with a one-key segment (the floors at their largest), keyless queries, a segment without
# queries; fp16 (the 3x PyTorch term dominates there).
NUDGE_CASES = {
    "fused-fp32": (
        dict(lens=([5, 3, 0, 2], [1, 0, 4, 7]), hq=4, hk=2, d=16, dv=40, dtype=F32),
        "fused",
        1e-4,
    ),
    "materialized-fp32": (
        dict(lens=([5, 3, 0, 2], [1, 0, 4, 7]), hq=4, hk=2, d=16, dv=40, dtype=F32),
        "materialized",
        1e-4,
    ),
    "one-key-fp32": (
        dict(batch=(2, 60, 1), hq=6, hk=2, d=64, dv=40, dtype=F32),
        "materialized",
        1e-4,
    ),
    "fused-fp16": (
        dict(lens=([5, 3, 0, 2], [1, 0, 4, 7]), hq=4, hk=2, d=16, dv=40, dtype=F16),
        "fused",
        5e-2,
    ),
}


@pytest.mark.parametrize("leaf", PARAMS)
@pytest.mark.parametrize("case", list(NUDGE_CASES))
def test_check_public_catches_one_perturbed_gradient_element(case, leaf, monkeypatch):
    """One element of one gradient off by 1e-4 of the largest (fp32; the bound catches 1e-5,
    the old one 1e-6 to 1e-5) or 5e-2 (fp16; 1e-2 with or without the floors) fails."""
    kw, path, rel = NUDGE_CASES[case]
    real = projected_cross_attention

    def nudged(**kws):
        kws[leaf] = _Nudge.apply(kws[leaf], rel)
        return real(**kws)

    t, packed = problem(**kw)
    check_public("torch", t, packed, path=path)  # passes as it is
    monkeypatch.setattr(sys.modules[__name__], "projected_cross_attention", nudged)
    with pytest.raises(AssertionError, match=leaf):
        check_public("torch", t, packed, path=path)


def _mutant(kind, rows_dim):
    """A backward with a classic bug: the LSE or the output used by Delta held in bf16 (a
    storage-precision bug), the LSE gradient dropped, the last query row skipped (a tail-mask
    bug). ``rows_dim``: where the query rows are in ``dout``."""

    def bf16(t):
        return t.to(torch.bfloat16).to(t.dtype)

    def wrap(original):
        def backward(dout, dlse, q, kx, *rest):
            rest = list(rest)
            if kind == "lse-bf16":
                rest[-4] = bf16(rest[-4])
            elif kind == "delta-from-bf16-out":
                rest[-5] = bf16(rest[-5])
            elif kind == "no-dlse":
                dlse = None
            elif kind == "tail-query-skipped":
                dout = dout.clone()
                dout.select(rows_dim, -1).zero_()
            return original(dout, dlse, q, kx, *rest)

        return backward

    return wrap


MUTANTS = ["lse-bf16", "delta-from-bf16-out", "no-dlse", "tail-query-skipped"]


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("path", ["fused", "materialized"])
@pytest.mark.parametrize("kind", MUTANTS)
def test_check_public_catches_backward_bugs(kind, path, dtype, monkeypatch):
    """Each mutant of the torch back end's backward (the fused core's, or cross_attention's on
    the materialised path) fails check_public; the precision bugs only need catching in fp32
    (in fp16 they are within PyTorch's own fp16 error)."""
    if dtype == F16 and kind in ("lse-bf16", "delta-from-bf16-out"):
        pytest.skip("within PyTorch's own fp16 error")
    from crosslmm_ops.ops import cross_attention as ca

    module, name, rows_dim = (
        (pa, "_core_reference_backward", 1) if path == "fused" else (ca, "_reference_backward", 0)
    )
    t, packed = problem(lens=([5, 3, 0, 2], [1, 0, 4, 7]), hq=4, hk=2, d=16, dv=40, dtype=dtype)
    check_public("torch", t, packed, path=path)
    monkeypatch.setattr(module, name, _mutant(kind, rows_dim)(getattr(module, name)))
    with pytest.raises(AssertionError):
        check_public("torch", t, packed, path=path)


# ----------------------------------------------------------------------------------------------
# Back-end choice and the cost model
# ----------------------------------------------------------------------------------------------


def _load_projected_paths():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "projected_paths.py"
    spec = importlib.util.spec_from_file_location("crosslmm_benchmarks_projected_paths", path)
    paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paths)
    return paths


def _layout(b, sq, sk, hk, hq=12, d=128, dv=1152):
    return ProjectedLayout.of_batched(b, hq, hk, d, dv, sq, sk)


@pytest.mark.parametrize("hk", [2, 4, 12])
def test_cost_model_choices_at_crosslmm_2b(hk):
    frames = 256
    decode = _layout(1, 1, frames * 729, hk)
    frame_local = _layout(frames, 9, 729, hk)
    prefill = _layout(1, 128, frames * 729, hk)
    bf16 = torch.bfloat16
    assert choose_path(decode, bf16) == "fused"  # 1 query per key: no projection of every key
    assert choose_path(prefill, bf16) == "materialized"  # 1536 rows per key
    # the close call (see CostModel): from 4 KV heads the projections cost more than the core
    assert choose_path(frame_local, bf16) == ("materialized" if hk == 2 else "fused")
    fused_ms, mat_ms = pa.COST_MODEL.estimate(decode)
    assert fused_ms < mat_ms / 2
    # a faster fused kernel moves the close call
    faster = CostModel(fused_tflops=450.0)
    f, m = faster.estimate(_layout(frames, 9, 729, 2))
    assert f < m


def test_cost_model_fit_recovers_the_rates_that_made_the_times():
    # benchmarks/projected_paths.py fits the cost model's rates to measured times. On times made by
    # a known model (with the two paths' times close on some rows), the fitted rates must choose as
    # well as that model: no regret; and the regret of another model is what its choices cost.
    paths = _load_projected_paths()
    truth = CostModel(matmul_tflops=700.0, attention_tflops=400.0, fused_tflops=300.0)
    rows = []
    for kind, frames, hk, (batch, lq, lk) in paths.cases(quick=False):
        fused_ms, mat_ms = truth.estimate(paths.layout_of(batch, lq, lk, hk))
        ms = {"fused": fused_ms, "materialized": mat_ms}
        rows.append(dict(kind=kind, frames=frames, hk=hk, batch=batch, lq=lq, lk=lk, ms=ms))
    assert max(paths.regrets(truth, rows)) == 0.0
    model, worst, mean = paths.fit(rows)
    assert worst == 0.0 and mean == 0.0
    assert paths.regrets(model, rows) == [0.0] * len(rows)
    slow = CostModel(fused_tflops=60.0)  # picks materialised where fused is faster
    regret = paths.regrets(slow, rows)
    picked_wrong = [
        r["ms"]["fused"] < r["ms"]["materialized"]
        and paths.choice(slow, paths.layout_of(r["batch"], r["lq"], r["lk"], r["hk"]))
        == "materialized"
        for r in rows
    ]
    assert any(picked_wrong)
    for r, wrong, x in zip(rows, picked_wrong, regret):
        expect = r["ms"]["materialized"] / r["ms"]["fused"] - 1 if wrong else x
        assert x == pytest.approx(expect)


def test_cost_model_takes_the_rate_of_the_core_kernel_that_would_run(monkeypatch):
    # The fused rate of 165 TFLOP/s is the Hopper core's; a call whose core runs on the mma.sync
    # kernels (sm_80, Dv above 1152 such as ViT-G's 1408, decode) or Triton takes 90, so such a
    # frame-local V2V at 4 KV heads stays materialised.
    frame_local = _layout(256, 9, 729, 4)
    assert choose_path(frame_local, torch.bfloat16) == "fused"
    f, m = pa.COST_MODEL.estimate(frame_local, 2, hopper_core=False)
    assert f > m
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(planner, "_sm90_device", lambda device: (True, ""))
    runs = (True, "")
    assert pa.fused_core_on_hopper(frame_local, gpu, "auto", runs)
    assert pa.fused_core_on_hopper(frame_local, gpu, "cuda", runs)
    assert not pa.fused_core_on_hopper(frame_local, gpu, "triton", runs)
    assert not pa.fused_core_on_hopper(frame_local, gpu, "auto", (False, "not built"))
    assert not pa.fused_core_on_hopper(frame_local, torch.device("cpu"), "auto", runs)
    vit_g = _layout(256, 9, 729, 4, dv=1408)
    assert not pa.fused_core_on_hopper(vit_g, gpu, "auto", runs)
    decode = _layout(1, 1, 256 * 729, 4)  # 12 rows: the mma.sync decode kernel
    assert not pa.fused_core_on_hopper(decode, gpu, "auto", runs)
    # and the op's planner asks it: the same call on a Hopper GPU is fused, elsewhere not
    cores = lambda: (runs, runs)  # noqa: E731
    plan = pa.plan_path(frame_local, torch.bfloat16, gpu, "auto", "cuda", cores=cores)
    assert plan[0] == "fused"
    monkeypatch.setattr(planner, "_sm90_device", lambda device: (False, "the GPU is not sm_90"))
    assert not pa.fused_core_on_hopper(frame_local, gpu, "auto", runs)
    plan = pa.plan_path(frame_local, torch.bfloat16, gpu, "auto", "cuda", cores=cores)
    assert plan[0] == "materialized"


def test_cost_model_chooses_the_faster_path_on_the_measured_grid():
    # The shipped rates against the H100 grid they were fitted to (GPU time of both paths on 63
    # CrossLMM shapes): a change of the rates or of the estimate that would take the slower path
    # by more than 5% on any of them fails here (issue 19, item 4).
    import json
    from pathlib import Path

    paths = _load_projected_paths()
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/projected_paths_h100.json"
    rows = json.loads(results.read_text())["rows"]
    assert len(rows) == 63 and all(len(r["gpu_ms"]) == 2 for r in rows)
    regret = paths.regrets(pa.COST_MODEL, rows)
    worst = max(range(len(rows)), key=regret.__getitem__)
    assert regret[worst] <= 0.05, (rows[worst]["kind"], rows[worst]["frames"], rows[worst]["hk"])
    # and the grid is one where the choice matters: the old rate (90) took the slower path
    assert max(paths.regrets(CostModel(fused_tflops=90.0), rows)) > 0.3


def test_path_overrides(monkeypatch):
    t, _ = problem(batch=(1, 2, 9))
    projected_cross_attention(**t, backend="torch", path="materialized")
    assert last_path() == "materialized"
    assert crosslmm_ops.last_backend(OP) == "torch"
    monkeypatch.setenv(pa.PATH_ENV_VAR, "materialized")
    projected_cross_attention(**t, backend="torch")
    assert last_path() == "materialized"
    projected_cross_attention(**t, backend="torch", path="fused")  # the argument wins
    assert last_path() == "fused"
    monkeypatch.setenv(pa.PATH_ENV_VAR, "sideways")
    with pytest.raises(ValueError, match=pa.PATH_ENV_VAR):
        projected_cross_attention(**t, backend="torch")
    monkeypatch.delenv(pa.PATH_ENV_VAR)
    layout = pa._check_inputs(
        t["q"],
        t["x"],
        t["w_k"],
        t["w_v"],
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        1e-6,
    )
    projected_cross_attention(**t, backend="torch")
    assert last_path() == choose_path(layout, t["q"].dtype)


def test_auto_on_cpu_is_torch_and_recorded():
    t, _ = problem(batch=(1, 2, 9))
    with crosslmm_ops.record_backends() as log:
        projected_cross_attention(**t, path="fused")
    assert log == [(CORE, "torch"), (OP, "torch")]
    with crosslmm_ops.record_backends() as log:
        projected_cross_attention(**t, path="materialized")
    assert log == [("cross_attention", "torch"), (OP, "torch")]


def test_cuda_backward_routing(monkeypatch):
    from crosslmm_ops import _backend, planner

    cpu = torch.device("cpu")
    fallback = "triton" if triton_cpu() else "torch"
    assert planner.projected_backward_backend("triton", cpu)[0] == "triton"
    assert planner.projected_backward_backend("torch", cpu)[0] == "torch"

    class WithBackward:
        def projected_attention_core_backward(self, *args, **kwargs):
            raise AssertionError("not called")

    monkeypatch.setattr(_backend, "extension", lambda: None)
    backend, why = planner.projected_backward_backend("cuda", cpu)
    assert backend == fallback and "without the projected-attention backward" in why
    # The fallback's Triton kernels cannot run this call (e.g. its tiles exceed shared memory).
    monkeypatch.setattr(_backend, "triton_runnable", lambda device: (True, ""))
    backend, why = planner.projected_backward_backend(
        "cuda", cpu, lambda: (False, "at width 2048 its kernels need 210 KB")
    )
    assert backend == "torch" and "without the projected-attention backward" in why
    assert "at width 2048 its kernels need 210 KB" in why
    assert planner.projected_backward_backend("cuda", cpu, lambda: (True, ""))[0] == "triton"
    monkeypatch.undo()
    monkeypatch.setattr(_backend, "extension", WithBackward)
    assert planner.projected_backward_backend("cuda", cpu)[0] == "cuda"
    monkeypatch.setenv("CROSSLMM_PROJECTED_BWD_CUDA", "0")
    backend, why = planner.projected_backward_backend("cuda", cpu)
    assert backend == fallback and "CROSSLMM_PROJECTED_BWD_CUDA=0" in why
    monkeypatch.setenv("CROSSLMM_PROJECTED_BWD_CUDA", "1")
    with pytest.raises(ValueError, match="CROSSLMM_PROJECTED_BWD_CUDA"):
        planner.projected_backward_backend("cuda", cpu)


def test_width_slabs():
    from crosslmm_ops.triton.projected_attention import width_slabs

    assert width_slabs(1152) == (1024, 128)
    assert width_slabs(1024) == (1024, 16)
    assert width_slabs(768) == (512, 256)
    assert width_slabs(40) == (32, 16)
    assert width_slabs(8) == (16, 16)
    assert width_slabs(2048) == (2048, 16)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------------------------


def _args(**over):
    t, packed = problem(batch=(1, 2, 5), hq=4, hk=2, d=8, dv=12)
    t.update(over)
    return t


CU = cu_seqlens([2, 3])
BAD = [
    (lambda: projected_cross_attention(**_args(q=[1.0])), TypeError, "q must be a torch.Tensor"),
    (
        lambda: projected_cross_attention(**_args(q=torch.ones(1, 2, 4, 8, dtype=torch.int32))),
        ValueError,
        "q must be a floating tensor",
    ),
    (
        lambda: projected_cross_attention(**_args(x=torch.randn(1, 5, 12).half())),
        ValueError,
        "x must have q's dtype",
    ),
    (
        lambda: projected_cross_attention(**_args(x=torch.randn(1, 5, 12, device="meta"))),
        ValueError,
        "x must be on q's device",
    ),
    (
        lambda: projected_cross_attention(**_args(q=torch.randn(2, 4, 8))),
        ValueError,
        r"q must have shape \(B, Sq, Hq, d\)",
    ),
    (
        lambda: projected_cross_attention(**_args(x=torch.randn(5, 12))),
        ValueError,
        r"x must have shape \(B, Sk, Dv\)",
    ),
    (lambda: projected_cross_attention(**_args(x=torch.randn(2, 5, 12))), ValueError, "batch size"),
    (
        lambda: projected_cross_attention(**_args(w_k=torch.randn(16, 11))),
        ValueError,
        r"w_k must have shape \(Hk \* d, Dv\)",
    ),
    (
        lambda: projected_cross_attention(
            **_args(w_k=torch.randn(12, 12), w_v=torch.randn(12, 12))
        ),
        ValueError,
        r"w_k must have shape",
    ),
    (
        lambda: projected_cross_attention(**_args(w_v=torch.randn(8, 12))),
        ValueError,
        "w_v must have w_k's shape",
    ),
    (
        lambda: projected_cross_attention(
            **_args(w_k=torch.randn(24, 12), w_v=torch.randn(24, 12), b_k=None, b_v=None)
        ),
        ValueError,
        r"query heads \(4\) must be a multiple",
    ),
    (
        lambda: projected_cross_attention(**_args(w_k=torch.ones(16, 12, dtype=torch.int64))),
        ValueError,
        "w_k must be a floating tensor",
    ),
    (
        lambda: projected_cross_attention(**_args(b_k=torch.randn(8))),
        ValueError,
        r"b_k must have shape \(16,\)",
    ),
    (
        lambda: projected_cross_attention(**_args(b_v=torch.randn(16, device="meta"))),
        ValueError,
        "b_v must be on q's device",
    ),
    (lambda: projected_cross_attention(**_args(), norm="batchnorm"), ValueError, "norm must be"),
    (
        lambda: projected_cross_attention(**_args(norm_weight=torch.randn(11))),
        ValueError,
        r"norm_weight must have shape \(12,\)",
    ),
    (
        lambda: projected_cross_attention(**_args(norm_bias=torch.randn(1, 12))),
        ValueError,
        "norm_bias must have shape",
    ),
    (lambda: projected_cross_attention(**_args(), norm_eps=-1.0), ValueError, "norm_eps"),
    (lambda: projected_cross_attention(**_args(), path="fast"), ValueError, "path must be"),
    (
        lambda: projected_cross_attention(**_args(), softmax_scale=float("nan")),
        ValueError,
        "softmax_scale",
    ),
    (lambda: projected_cross_attention(**_args(), num_splits=-2), ValueError, "num_splits"),
    (lambda: projected_cross_attention(**_args(), return_lse="yes"), ValueError, "return_lse"),
    (
        lambda: projected_cross_attention(**_args(), max_seqlen_q=3),
        ValueError,
        "max_seqlen_q is for the packed layout",
    ),
    (
        lambda: projected_cross_attention(
            **_args(q=torch.randn(5, 4, 8), x=torch.randn(5, 12)), cu_seqlens_q=CU
        ),
        ValueError,
        "given together",
    ),
    (
        lambda: projected_cross_attention(
            **_args(q=torch.randn(5, 4, 8), x=torch.randn(6, 12)), cu_seqlens_q=CU, cu_seqlens_k=CU
        ),
        ValueError,
        "cu_seqlens_k must end at the number of packed tokens 6",
    ),
    (
        lambda: projected_cross_attention(
            **_args(q=torch.randn(5, 4, 8), x=torch.randn(5, 12)),
            cu_seqlens_q=CU.long(),
            cu_seqlens_k=CU,
        ),
        ValueError,
        "cu_seqlens_q must be an int32",
    ),
    (lambda: projected_cross_attention(**_args(), backend="flash"), ValueError, "backend"),
    (
        lambda: projected_cross_attention(**_args(), backend="cuda", path="fused"),
        RuntimeError,
        "projected_cross_attention: backend='cuda' cannot run",
    ),
    (
        lambda: projected_cross_attention(
            **_args(q=torch.randn(1, 2, 4, 8).double(), x=torch.randn(1, 5, 12).double()),
            backend="triton",
            path="fused",
        ),
        RuntimeError,
        "backend='triton' cannot run",
    ),
    (lambda: normalize_tokens(torch.randn(2, 3), "layer"), ValueError, "norm must be"),
    (
        lambda: projected_attention_core(torch.randn(1, 2, 3, 8), torch.randn(1, 4, 6)),
        ValueError,
        "head dim 8",
    ),
    (
        lambda: projected_attention_core(torch.randn(1, 2, 3, 8), torch.randn(4, 8)),
        ValueError,
        r"x must have shape \(B, Sk, Dv\)",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_triton_width_limit_named():
    if not triton_cpu():
        pytest.skip("needs TRITON_INTERPRET=1")
    t = _args(
        x=torch.randn(1, 5, 2056),
        w_k=torch.randn(16, 2056),
        w_v=torch.randn(16, 2056),
        norm_weight=None,
        norm_bias=None,
    )
    with pytest.raises(RuntimeError, match="width 2056"):
        projected_cross_attention(
            **{k: v for k, v in t.items() if v is not None}, backend="triton", path="fused"
        )


@pytest.mark.parametrize(
    "width,dtype,capacity,fits",
    [
        (1152, torch.float32, H100_SHARED_MEMORY, True),
        (1216, torch.float32, H100_SHARED_MEMORY, False),
        (1408, torch.float32, H100_SHARED_MEMORY, False),
        (768, torch.float32, A100_SHARED_MEMORY, True),
        (1152, torch.float32, A100_SHARED_MEMORY, False),
        (2048, torch.bfloat16, H100_SHARED_MEMORY, True),
        (1536, torch.float16, A100_SHARED_MEMORY, True),
        (2048, torch.float16, A100_SHARED_MEMORY, False),
        (2048, torch.float32, None, True),  # the interpreter: no limit
    ],
)
def test_triton_core_shared_memory_limits(width, dtype, capacity, fits):
    """The Triton core keeps whole [rows, width] tiles in shared memory: where they do not fit
    the GPU (float32 at the widest widths, and more on an A100) it says so instead of failing at
    launch. The estimate behind it is checked against Triton's compiler in
    tests/test_triton_compile.py."""
    pytest.importorskip("triton")
    ok, why = pa.triton_shared_memory_ok(width, dtype, capacity)
    assert ok == fits
    if not fits:
        assert f"width {width}" in why and "shared memory" in why and "KB" in why


def test_triton_core_shared_memory_decides_the_back_end(monkeypatch):
    """On a GPU whose blocks cannot hold the tiles, the core's Triton back end is not runnable
    (auto takes the torch reference; asking for Triton is an error that says why)."""
    pytest.importorskip("triton")
    from crosslmm_ops.triton import common

    monkeypatch.setattr(_backend, "cuda_runnable", lambda device: (False, "no extension"))
    monkeypatch.setattr(_backend, "triton_runnable", lambda device: (True, ""))
    monkeypatch.setattr(common, "shared_memory_per_block", lambda device: H100_SHARED_MEMORY)
    monkeypatch.setattr(pa, "_TRITON_SHARED_MEMORY", {})
    cuda = torch.device("cuda", 0)
    wide = pa.ProjectedLayout.of_batched(1, 12, 2, 128, 1408, 9, 729)
    _, triton_ok = pa.core_backends(wide, torch.float32, cuda)
    assert not triton_ok[0] and "width 1408" in triton_ok[1]
    _, triton_ok = pa.core_backends(wide, torch.float16, cuda)
    assert triton_ok == (True, "")


# ----------------------------------------------------------------------------------------------
# torch.library integration: fake kernels, autograd registration, torch.compile
# ----------------------------------------------------------------------------------------------


def test_opcheck():
    q = torch.randn(2, 7, 3, 10, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, 10, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = cu_seqlens([3, 0, 4]), cu_seqlens([5, 6, 0])
    args = (q, x, cu_q, cu_k, 4, 6, 0.3, 0, "torch")
    torch.library.opcheck(pa._projected_attention_core_op, args)
    out, lse = pa._projected_attention_core_op(*args)
    bwd = (
        torch.randn_like(out),
        torch.randn_like(lse),
        q.detach(),
        x.detach(),
        out.detach(),
        lse.detach(),
        cu_q,
        cu_k,
        4,
        6,
        0.3,
        0,
        "torch",
    )
    torch.library.opcheck(pa._projected_attention_core_backward_op, bwd)
    torch.library.opcheck(pa._projected_attention_core_backward_op, bwd[:1] + (None,) + bwd[2:])


def test_torch_compile_fullgraph():
    t, _ = problem(batch=(2, 3, 9), hq=4, hk=2, d=8, dv=12)
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}

    def f(**ts):
        out, lse = projected_cross_attention(
            **ts, norm="layernorm", path="fused", return_lse=True, backend="torch"
        )
        return out.square().sum() + lse.sum()

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(**leaves)
    y.backward()
    torch.testing.assert_close(y, f(**leaves))
    assert all(v.grad is not None for v in leaves.values())


def test_torch_compile_inductor_cpu():
    """Inductor checks every custom op's outputs against its fake kernel's sizes and strides
    (assert_tensor_metadata in the generated code) and passes q~, o~ and their gradients between
    the per-head GEMMs and the core as views: the fused path compiled equals it eager."""
    t, packed = problem(lens=([3, 0, 4], [5, 6, 2]), hq=6, hk=2, d=8, dv=16)
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}

    def f(**ts):
        out, lse = projected_cross_attention(
            **ts,
            **packed,
            max_seqlen_q=4,
            max_seqlen_k=6,
            norm="layernorm",
            path="fused",
            return_lse=True,
            backend="torch",
        )
        return out.square().sum() + lse.where(torch.isfinite(lse), 0).sum()

    y = torch.compile(f, fullgraph=True)(**leaves)
    grads = torch.autograd.grad(y, list(leaves.values()))
    y_eager = f(**leaves)
    torch.testing.assert_close(y, y_eager)
    for a, e in zip(grads, torch.autograd.grad(y_eager, list(leaves.values()))):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# Token-major storage: the per-head projections and the core's output strides
# ----------------------------------------------------------------------------------------------

HEAD_GROUPS = [(2, 1), (2, 3), (1, 4)]  # (Hk, G): G = 1, 1 < Hk < Hq, Hk = 1
head_ids = lambda c: f"hk{c[0]}-g{c[1]}"  # noqa: E731


@pytest.mark.parametrize("call", ["eager", "custom-op"])
@pytest.mark.parametrize("heads", HEAD_GROUPS, ids=head_ids)
def test_per_head_matmul_matches_float64(heads, call):
    """``y[t, h] = x[t, h] @ w[h]`` and its gradients against einsum in float64, for strided
    ``x`` and weights per kv head expanded per query head (``w`` transposed, as the output
    projection's); ``y`` comes out token-major (contiguous ``[T, H, m]``)."""
    hk, group = heads
    x = non_contiguous(torch.randn(7, hk * group, 5), dim=0).requires_grad_(True)
    w_kv = torch.randn(hk, 6, 5).transpose(1, 2).requires_grad_(True)  # [Hk, 5, 6], strided
    matmul = pa._per_head_matmul if call == "eager" else pa._per_head_matmul_op
    y = matmul(x, pa._per_query_head(w_kv, group))
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w_kv))
    w64_heads = w64.repeat_interleave(group, dim=0)  # query head h reads kv head h // G
    expected = torch.einsum("thk,hkm->thm", x64, w64_heads)
    assert y.shape == (7, hk * group, 6) and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(6, 7, hk * group).permute(1, 2, 0)  # a strided output gradient
    actual = torch.autograd.grad(y, [x, w_kv], g)
    wanted = torch.autograd.grad(expected, [x64, w64], g.double())
    for a, e in zip(actual, wanted):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [2, 9], ids=["regrouped", "expanded"])
@pytest.mark.parametrize("heads", HEAD_GROUPS, ids=head_ids)
def test_per_head_projection_both_forms(heads, tokens, monkeypatch):
    """Both forms of ``_per_head_projection`` (regrouped rows below ``a b / (a + b)`` tokens,
    expanded weights above: 2.4 here) give ``y[t, h] = x[t, h] @ w[h // G]`` token-major, values
    and gradients against float64; the form taken is the one the size rule names."""
    hk, group = heads
    x = non_contiguous(torch.randn(tokens, hk * group, 4), dim=0).requires_grad_(True)
    w = torch.randn(hk, 4, 6, requires_grad=True)
    expanded = []
    per_query_head = pa._per_query_head
    monkeypatch.setattr(pa, "_per_query_head", lambda *a: expanded.append(1) or per_query_head(*a))
    y = pa._per_head_projection(x, w, group)
    assert bool(expanded) == (tokens == 9 or hk == 1 or group == 1)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    expected = torch.einsum("thk,hkm->thm", x64, w64.repeat_interleave(group, dim=0))
    assert y.shape == (tokens, hk * group, 6) and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(expected)
    actual = torch.autograd.grad(y, [x, w], g.float())
    for a, e in zip(actual, torch.autograd.grad(expected, [x64, w64], g)):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_per_head_matmul_opcheck_and_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(5, 6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(pa._per_head_matmul_op, (x, w))
    assert torch.autograd.gradcheck(pa._per_head_matmul_op, (x, w))
    with FlopCounterMode(display=False) as counter:
        pa._per_head_matmul(x, w).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 5 * 6 * 4 * 3  # y, dx, dw: one GEMM's each


def significant_strides(t: torch.Tensor):
    """The strides that address memory: of dims longer than 1 (none for an empty tensor)."""
    return tuple(s if n > 1 else None for s, n in zip(t.stride(), t.shape)) if t.numel() else ()


def token_major(t: torch.Tensor) -> bool:
    return t.permute(1, 0, 2, 3).is_contiguous()


@pytest.mark.parametrize("q_layout", ["token-major", "grouped-contiguous"])
@pytest.mark.parametrize("heads", HEAD_GROUPS + [(3, 1), (1, 1)], ids=head_ids)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_core_outputs_token_major_as_the_fake(backend, heads, q_layout):
    """Every back end returns out and dq with the fake kernels' strides (torch.compile plans
    with the fake's), token-major whatever q's strides; dx and lse contiguous as in the fake."""
    if backend == "triton" and not triton_cpu():
        pytest.skip("needs TRITON_INTERPRET=1")
    hk, group = heads
    lens = ([3, 0, 4], [5, 6, 0])
    tq = sum(lens[0])
    if q_layout == "token-major":
        q = torch.randn(tq, hk, group, 16).permute(1, 0, 2, 3)
    else:
        q = torch.randn(hk, tq, group, 16)
    x = torch.randn(sum(lens[1]), 16)
    args = (q, x, cu_seqlens(lens[0]), cu_seqlens(lens[1]), 4, 6, 0.3, 2, backend)
    out, lse = pa._projected_attention_core_op(*args)
    dq, dx = pa._projected_attention_core_backward_op(
        out.clone(), lse.clone(), q, x, out, lse, *args[2:]
    )
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        f_out, f_lse = pa._projected_attention_core_op(*fake)
        f_q = fake[0]
        f_dq, f_dx = pa._projected_attention_core_backward_op(
            f_out, f_lse, f_q, fake[1], f_out, f_lse, *fake[2:]
        )
    assert crosslmm_ops.last_backend(CORE) == backend
    assert token_major(out) and token_major(dq) and token_major(f_out) and token_major(f_dq)
    for real, faked in ((out, f_out), (lse, f_lse), (dq, f_dq), (dx, f_dx)):
        assert real.shape == faked.shape and real.dtype == faked.dtype
        assert significant_strides(real) == significant_strides(faked)
    assert out.stride() == f_out.stride() and dq.stride() == f_dq.stride()


class _RowsExtension:
    """A stand-in for ``crosslmm_ops._C`` on the CPU: the CUDA binding's contract (rows
    ``[total_q, Hq, Dv]`` in and out, contiguous results) computed by the reference, recording
    every tensor it is handed and returns."""

    def __init__(self):
        self.forward_in, self.forward_out, self.backward_in, self.backward_out = [], [], [], []

    def cuda_archs(self):
        return ""

    def projected_attention_core_forward_kernel_name(self):
        return "rows-stand-in"

    def projected_attention_core_forward(self, q, x, cu_q, cu_k, mq, mk, scale, splits, kernel):
        self.forward_in.append(q)
        out, lse = pa._core_reference_forward(q.unsqueeze(0), x, cu_q, cu_k, scale, q.dtype)
        out = out[0].clone()
        self.forward_out.append(out)
        return out, lse.float()

    def projected_attention_core_backward(
        self, dout, q, x, out, lse, cu_q, cu_k, mq, mk, scale, splits, dlse=None
    ):
        self.backward_in.append((dout, q, out))
        dq, dx = pa._core_reference_backward(
            dout.unsqueeze(0), dlse, q.unsqueeze(0), x, out.unsqueeze(0), lse, cu_q, cu_k, scale
        )
        dq = dq[0].clone()
        self.backward_out.append(dq)
        return dq, dx


@pytest.mark.parametrize("heads", HEAD_GROUPS + [(3, 1)], ids=head_ids)
def test_cuda_branch_moves_q_tilde_and_o_tilde_without_copies(heads, monkeypatch):
    """The CUDA core's binding reads and writes rows ``[total_q, Hq, Dv]``; the fused path's
    q~, o~ (forward) and dout~, dq~ (backward) are in that storage already: the binding gets
    the per-head GEMMs' own tensors and its results reach the next GEMM as views. Checked on
    the CPU with a stand-in binding, values against the torch back end."""
    hk, group = heads
    _backend.extension_archs()  # cached before the stand-in replaces the extension
    ext = _RowsExtension()
    t, packed = problem(lens=([3, 0, 4], [5, 6, 2]), hq=hk * group, hk=hk, d=8, dv=16)
    t = {n: t[n].requires_grad_(True) for n in ("q", "x", "w_k", "w_v", "b_v")}
    given = (t["q"], t["x"], t["w_k"], t["w_v"], None, t["b_v"])  # no norm, no b_k
    layout = pa.check_inputs(*given, *packed.values(), None, None, None, None, None, 1e-6)
    grad = torch.randn(layout.total_q, layout.heads_q, layout.head_dim)

    def run(backend):
        out, _ = pa._fused(*given, layout, 0.3, *packed.values(), 0, backend)
        return [out, *torch.autograd.grad(out, list(t.values()), grad)]

    expected = run("torch")
    gemms, rows_views = [], []  # (x, y) of every per-head GEMM, in order; (q, rows)
    differentiable, matmul, rows_view = pa._per_head_matmul, pa._per_head_matmul_impl, pa._rows_view

    def spy(function):
        def call(x, w):
            gemms.append((x, function(x, w)))
            return gemms[-1][1]

        return call

    def spy_rows_view(q):
        rows_views.append((q, rows_view(q)))
        return rows_views[-1][1]

    monkeypatch.setattr(_backend, "extension", lambda: ext)
    monkeypatch.setattr(pa, "_per_head_matmul", spy(differentiable))  # the forward's GEMMs
    monkeypatch.setattr(pa, "_per_head_matmul_impl", spy(matmul))  # the backward's dx GEMMs
    monkeypatch.setattr(pa, "_rows_view", spy_rows_view)
    actual = run("cuda")
    assert crosslmm_ops.last_backend(CORE) == "cuda"
    assert crosslmm_ops.last_backend(CORE + "_backward") == "cuda"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    for q, rows in rows_views:
        assert rows.data_ptr() == q.data_ptr() and rows.is_contiguous(), "a copy of q~ or o~"
    (q_rows,), (o_rows,) = ext.forward_in, ext.forward_out
    ((dout_rows, q_saved, out_saved),), (dq_rows,) = ext.backward_in, ext.backward_out
    # Forward: q~ as the GEMM wrote it; the binding's output is what the output GEMM reads.
    # Backward (the GEMMs in order: the output projection's dx, then q~'s): its dx is dout~,
    # and the binding's dq is what q~'s backward GEMM reads.
    q_gemm, out_gemm, dout_gemm, dq_gemm = gemms
    assert q_rows.data_ptr() == q_gemm[1].data_ptr() == q_saved.data_ptr()
    assert out_gemm[0].data_ptr() == o_rows.data_ptr() == out_saved.data_ptr()
    assert dout_rows.data_ptr() == dout_gemm[1].data_ptr()
    assert dq_gemm[0].data_ptr() == dq_rows.data_ptr()


# ----------------------------------------------------------------------------------------------
# GPU: CUDA and Triton at CrossLMM-2B's sizes (Dv 1152, 12 query heads of 128, 2 KV heads)
# ----------------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def require(backend: str) -> None:
    if backend == "cuda" and not hasattr(_backend.extension(), "projected_attention_core_forward"):
        pytest.skip("the CUDA extension has no projected-attention kernel (not built)")
    ok, why = (_backend.cuda_runnable if backend == "cuda" else _backend.triton_runnable)(
        torch.device("cuda")
    )
    if not ok:
        pytest.fail(f"{backend} back end cannot run on this GPU: {why}")


def crosslmm_2b(lens, dtype=torch.bfloat16, hk=2):
    return problem(lens=lens, hq=12, hk=hk, d=128, dv=1152, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_frame_local(backend, dtype):
    """Frame-local V2V, T = 16: 9 pooled queries per frame against the frame's 729 tokens."""
    require(backend)
    t, packed = crosslmm_2b(([9] * 16, [729] * 16), dtype)
    check_public(backend, t, packed, norm="layernorm")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("hk", [2, 12])
def test_gpu_decode_batch(backend, hk):
    """One T2V decode step for 3 sequences of 32, 17 and 5 frames (+3 tokens) of 729 tokens."""
    require(backend)
    t, packed = crosslmm_2b(([1, 1, 1], [32 * 729, 17 * 729, 5 * 729 + 3]), hk=hk)
    check_public(backend, t, packed, norm="rmsnorm")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3, 16, 128])
def test_gpu_decode_splits(backend, num_splits):
    require(backend)
    t, packed = crosslmm_2b(([1, 1], [32 * 729, 0]))
    check_public(backend, t, packed, num_splits=num_splits, check_grad=num_splits == 3)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_core_non_contiguous_and_empty(backend):
    require(backend)
    lens = ([9, 0, 9, 1], [729, 5, 0, 2000])
    q = torch.randn(sum(lens[0]), 2, 6, 1152, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(lens[1]), 1152, device="cuda", dtype=torch.bfloat16)
    check_core(
        backend,
        q.permute(1, 0, 2, 3),
        non_contiguous(x, dim=0),
        cu_seqlens(lens[0], "cuda"),
        cu_seqlens(lens[1], "cuda"),
        scale=128**-0.5,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_paths_agree_t2v_prefill(backend):
    """128 text queries against 4 frames: the two paths compute the same function."""
    require(backend)
    t, packed = crosslmm_2b(([128], [4 * 729]))
    for path in ("fused", "materialized"):
        if (
            path == "materialized"
            and backend == "cuda"
            and not hasattr(_backend.extension(), "attention_forward")
        ):
            continue
        check_public(backend, t, packed, path=path, norm="layernorm")


@pytest.mark.cuda
def test_gpu_auto_path_and_backend():
    t, packed = crosslmm_2b(([1], [64 * 729]))
    projected_cross_attention(**t, **packed, norm="layernorm")
    assert last_path() == "fused"
    has_cuda = (
        hasattr(_backend.extension(), "projected_attention_core_forward")
        and _backend.cuda_runnable(torch.device("cuda"))[0]
    )
    assert crosslmm_ops.last_backend(CORE) == ("cuda" if has_cuda else "triton")
    t, packed = crosslmm_2b(([128], [64 * 729]))
    projected_cross_attention(**t, **packed, norm="layernorm")
    assert last_path() == "materialized"


@pytest.mark.cuda
def test_gpu_triton_backward_deterministic():
    require("triton")
    t, packed = crosslmm_2b(([9] * 4 + [1], [729] * 4 + [5000]))
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}
    runs = []
    for _ in range(2):
        out = projected_cross_attention(**leaves, **packed, path="fused", backend="triton")
        runs.append(torch.autograd.grad(out.float().square().sum(), list(leaves.values())))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
def test_gpu_torch_compile_fullgraph():
    t, packed = crosslmm_2b(([9] * 4, [729] * 4))
    leaves = {n: v.requires_grad_(True) for n, v in t.items()}

    def f(**ts):
        return (
            projected_cross_attention(
                **ts, **packed, max_seqlen_q=9, max_seqlen_k=729, norm="layernorm", path="fused"
            )
            .float()
            .square()
            .sum()
        )

    y = torch.compile(f, fullgraph=True)(**leaves)
    y.backward()
    assert math.isfinite(y.item()) and torch.isfinite(leaves["x"].grad).all()


def test_cuda_input_copies_what_the_kernel_cannot_read():
    """The CUDA core's input check (16-byte moves: channels contiguous, other strides multiples
    of 8 elements, an aligned base) has a fast path for contiguous tensors; it must copy exactly
    the tensors the full rule copies. (A contiguous tensor on a misaligned base is not copied by
    either: ``contiguous()`` returns it as it is.)"""

    def readable(t):
        return (
            t.stride(-1) == 1
            and t.data_ptr() % 16 == 0
            and all(t.shape[d] <= 1 or t.stride(d) % 8 == 0 for d in range(t.dim() - 1))
        )

    base = torch.randn(4, 6, 40, dtype=torch.float16)
    cases = [
        base,
        base[:, :, :16],
        base[:, :, :12],
        base[:, :, 1:17],
        base.reshape(-1)[1:161].view(4, 40),
        base.transpose(0, 1),
        base[:1],
        torch.randn(3, 1, dtype=torch.float16),
        torch.randn(3, 8, dtype=torch.float16),
        torch.randn(0, 8, dtype=torch.float16),
        torch.randn(1, 7, dtype=torch.float16),
        torch.randn(2, 1, 8, dtype=torch.float16).expand(2, 5, 8),
    ]
    for t in cases:
        out = pa._cuda_input(t)
        # The full rule: t where readable, else t.contiguous() (t itself when contiguous already)
        kept = readable(t) or t.is_contiguous()
        assert (out is t) == kept, (t.shape, t.stride())
        assert torch.equal(out, t) and out.is_contiguous() or kept
