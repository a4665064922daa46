"""projected_cross_attention: attention over projected keys and values without materialising them.

For one head ``h`` with ``k_j = Wk_h x_j + bk_h`` and ``v_j = Wv_h x_j + bv_h``::

    q . k_j = (Wk_h^T q) . x_j + q . bk_h     (the second term is the same for every j: it cancels)
    sum_j p_j v_j = Wv_h (sum_j p_j x_j) + bv_h     (sum_j p_j = 1)

so attention over the projected keys equals attention over the raw tokens ``x`` with the per-head
query ``q~ = Wk_h^T q`` (width ``Dv``, 1152 for SigLIP) followed by ``Wv_h``: multi-query attention
whose keys and values are the same tensor. When each key is seen by few queries (frame-local V2V: 9
per frame; T2V decoding: 1 per step) this skips the K/V projections, which dominate the cost, and K
and V themselves: a decode cache holds ``x`` once for every DCAL layer.

Everything about the op lives here, side by side:

* :func:`check_inputs` - the user's arguments, validated, as a :class:`ProjectedLayout`;
* :func:`normalize_tokens` and :func:`_fold` - a LayerNorm/RMSNorm on ``x`` splits into the
  normalisation, computed once and shareable across layers, and its affine part, folded into the
  weights (``W diag(gamma)``) and the biases (``b + W beta``) with differentiable torch ops;
* the core ``crosslmm::projected_attention_core`` / ``..._backward`` custom ops (+ fake
  kernels + autograd, and an eager ``autograd.Function`` with the same code for eager calls), whose
  back ends are CUDA (``_C.projected_attention_core_forward`` / ``..._backward``, csrc/projected/;
  :func:`crosslmm_ops.planner.projected_backward_backend` picks the backward's), Triton
  (crosslmm_ops/triton/projected_attention.py) and the reference
  (:func:`_core_reference_forward` / :func:`_core_reference_backward`, segment runs of equal size
  batched with ``bmm``);
* :func:`_per_head_matmul` (custom op ``crosslmm::per_head_matmul`` + autograd, and its eager
  twin) - the per-head projections ``q~ = Wk_h^T q_h`` and ``Wv_h o~_h``, one batched GEMM each,
  written token-major: the storage the core's tensors have on every back end;
* :class:`CostModel` / :func:`choose_path` - fused or materialised, per call, from the shapes;
* :func:`projected_cross_attention`, the public function, and
  :func:`projected_cross_attention_reference`, the plain-PyTorch oracle (project, then
  :func:`~crosslmm_ops.cross_attention_reference`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils.flop_counter import register_flop_formula

from crosslmm_ops import _backend, environment, planner
from crosslmm_ops.ops import cross_attention as attention
from crosslmm_ops.ops import validation
from crosslmm_ops.ops.cross_attention import (
    accumulation_dtype,
    cross_attention,
    cross_attention_reference,
    lse_batched,
    uniform_cu_seqlens_pair,
)

OP_NAME = "projected_cross_attention"
CORE_OP_NAME = "projected_attention_core"
PATHS = planner.PATHS
PATH_ENV_VAR = environment.PROJECTED_PATH_VAR
NORMS = (None, "layernorm", "rmsnorm")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_MAX_WIDTH = 2048  # the CUDA contract: Dv a multiple of 8, at most 2048
_TRITON_MAX_WIDTH = 2048


# ----------------------------------------------------------------------------------------------
# The arguments, validated
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectedLayout:
    """One call's shapes. ``batch`` is the number of segments; ``seqlen_q/k`` are set for batched
    input; ``lens_q/k`` are the segment lengths when they could be read (``None`` under
    torch.compile or CUDA graph capture)."""

    batched: bool
    batch: int
    heads_q: int
    heads_k: int
    head_dim: int
    width: int
    total_q: int
    total_k: int
    max_seqlen_q: int
    max_seqlen_k: int
    seqlen_q: int | None = None
    seqlen_k: int | None = None
    lens_q: tuple | None = None
    lens_k: tuple | None = None

    @classmethod
    def of_batched(cls, batch, heads_q, heads_k, head_dim, width, seqlen_q, seqlen_k):
        """The layout of batched input: ``batch`` sequences of ``seqlen_q`` queries against
        ``seqlen_k`` tokens each; one shared instance per shape (``_backend.shared_instance``)."""
        return _backend.shared_instance(
            _batched_layout, cls, batch, heads_q, heads_k, head_dim, width, seqlen_q, seqlen_k
        )

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_k

    def pairs(self) -> int:
        """Sum over segments of (queries x keys): exact when the lengths are known, else the
        uniform estimate ``total_q * total_k / batch``."""
        if self.lens_q is not None:
            return sum(a * b for a, b in zip(self.lens_q, self.lens_k))
        return self.total_q * self.total_k // max(self.batch, 1)

    def every_segment_has_keys(self) -> bool | None:
        if self.batched:
            return self.seqlen_k > 0
        if self.lens_k is not None:
            return all(n > 0 for n, m in zip(self.lens_k, self.lens_q) if m > 0)
        return None


def _batched_layout(cls, batch, heads_q, heads_k, head_dim, width, seqlen_q, seqlen_k):
    return cls(
        True,
        batch,
        heads_q,
        heads_k,
        head_dim,
        width,
        batch * seqlen_q,
        batch * seqlen_k,
        seqlen_q,
        seqlen_k,
        seqlen_q,
        seqlen_k,
    )


def _check_vector(name: str, t, size: int, device: torch.device, what: str) -> None:
    if t is None:
        return
    t = validation.floating(name, t, device)
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) ({what}), got {tuple(t.shape)}")


def check_inputs(
    q,
    x,
    w_k,
    w_v,
    b_k,
    b_v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    norm,
    norm_weight,
    norm_bias,
    norm_eps,
) -> ProjectedLayout:
    q, x = validation.tensor("q", q), validation.tensor("x", x)
    dtype, device = q.dtype, q.device
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"q must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {dtype}"
        )
    if x.dtype != dtype:
        raise ValueError(f"x must have q's dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x must be on q's device {device}, got {x.device}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must be given together (packed layout) or "
            "both left out (batched layout)"
        )
    packed = cu_seqlens_q is not None
    q_shape, x_shape = q.shape, x.shape
    if len(q_shape) != (3 if packed else 4) or len(x_shape) != (2 if packed else 3):
        q_text, x_text = (
            ("(total_q, Hq, d)", "(total_k, Dv)") if packed else ("(B, Sq, Hq, d)", "(B, Sk, Dv)")
        )
        with_cu = " with cu_seqlens" if packed else ""
        if len(q_shape) != (3 if packed else 4):
            raise ValueError(f"q must have shape {q_text}{with_cu}, got {tuple(q_shape)}")
        raise ValueError(f"x must have shape {x_text}{with_cu}, got {tuple(x_shape)}")
    Hq, d = q_shape[-2:]
    Dv = x_shape[-1]
    if Hq == 0 or d == 0 or Dv == 0:
        raise ValueError(
            f"q needs at least one head of width >= 1 and x a width >= 1, got q "
            f"{tuple(q_shape)}, x {tuple(x_shape)}"
        )
    w_k = validation.floating("w_k", w_k, device)
    w_v = validation.floating("w_v", w_v, device)
    w_shape = w_k.shape
    if len(w_shape) != 2 or w_shape[1] != Dv or w_shape[0] == 0 or w_shape[0] % d != 0:
        raise ValueError(
            f"w_k must have shape (Hk * d, Dv) = (Hk * {d}, {Dv}) (nn.Linear.weight), "
            f"got {tuple(w_shape)}"
        )
    if w_v.shape != w_shape:
        raise ValueError(f"w_v must have w_k's shape {tuple(w_shape)}, got {tuple(w_v.shape)}")
    Hk = w_shape[0] // d
    if Hq % Hk != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of "
            f"key/value heads (w_k rows / head dim = {Hk})"
        )
    _check_vector("b_k", b_k, Hk * d, device, "Hk * d")
    _check_vector("b_v", b_v, Hk * d, device, "Hk * d")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    _check_vector("norm_weight", norm_weight, Dv, device, "Dv")
    _check_vector("norm_bias", norm_bias, Dv, device, "Dv")
    validation.eps("norm_eps", norm_eps)
    if not packed:
        if x_shape[0] != q_shape[0]:
            raise ValueError(f"x must have q's batch size {q_shape[0]}, got {x_shape[0]}")
        for name, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if given is not None:
                raise ValueError(
                    f"{name} is for the packed layout (with cu_seqlens); batched "
                    "input takes its lengths from the shapes"
                )
        return ProjectedLayout.of_batched(q_shape[0], Hq, Hk, d, Dv, q_shape[1], x_shape[1])
    batch, lens_q, lens_k, max_q, max_k = validation.packed(
        cu_seqlens_q, cu_seqlens_k, q.shape[0], x.shape[0], max_seqlen_q, max_seqlen_k, q.device
    )
    return ProjectedLayout(
        False,
        batch,
        Hq,
        Hk,
        d,
        Dv,
        q.shape[0],
        x.shape[0],
        max_q,
        max_k,
        lens_q=None if lens_q is None else tuple(lens_q),
        lens_k=None if lens_k is None else tuple(lens_k),
    )


_check_inputs = check_inputs  # the name the op's tests use


# ----------------------------------------------------------------------------------------------
# Norm folding
# ----------------------------------------------------------------------------------------------


def normalize_tokens(
    x: torch.Tensor, norm: str | None = "layernorm", eps: float = 1e-6
) -> torch.Tensor:
    """The per-token normalisation of a LayerNorm / RMSNorm without its affine part:
    ``(x - mean) * rstd`` (``"layernorm"``) or ``x * rstd`` (``"rmsnorm"``) over the last dim,
    statistics in float32 (float64 for float64 input), returned in ``x``'s dtype;
    ``norm=None`` returns ``x``. Differentiable.

    Every DCAL layer normalises the same vision tokens with its own ``gamma, beta``; those fold
    into the layer's weights, so a model computes ``normalize_tokens(x)`` once, keeps it (the
    decode cache) and passes it to every layer with ``norm=None, norm_weight=gamma,
    norm_bias=beta``. ``eps``: a finite number >= 0."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    validation.eps("eps", eps)
    x = validation.tensor("x", x)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    return _normalized(x, norm, eps)


def _normalized(x: torch.Tensor, norm: str | None, eps: float) -> torch.Tensor:
    """:func:`normalize_tokens` of arguments already checked (the op's own call)."""
    if norm is None:
        return x
    if norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def _cast(t, dtype):
    """``t.to(dtype)``; ``t`` itself, as ``to`` returns it, when it has that dtype already,
    without the call (the weights of a bf16 model: host time of every short call)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _fold(w_k, w_v, b_k, b_v, norm_weight, norm_bias, dtype, need_b_k: bool = True):
    """``(w_k', w_v', b_k', b_v')`` in ``dtype`` such that ``W (x^ gamma + beta) + b = W' x^ + b'``:
    ``W' = W diag(gamma)``, ``b' = b + W beta`` (``W`` unscaled), computed in float32 (float64)
    with differentiable ops. ``b_k'`` (``None`` without ``b_k`` and ``beta``) is skipped unless
    ``need_b_k``: it only moves the LSE."""
    if norm_weight is None and norm_bias is None:
        return (
            _cast(w_k, dtype),
            _cast(w_v, dtype),
            _cast(b_k, dtype) if need_b_k else None,
            _cast(b_v, dtype),
        )
    cdt = accumulation_dtype(dtype)
    wk, wv = w_k.to(cdt), w_v.to(cdt)
    bk = b_k.to(cdt) if b_k is not None and need_b_k else None
    bv = b_v.to(cdt) if b_v is not None else None
    if norm_bias is not None:
        beta = norm_bias.to(cdt)
        if need_b_k:
            bk = wk @ beta if bk is None else bk + wk @ beta
        bv = wv @ beta if bv is None else bv + wv @ beta
    if norm_weight is not None:
        gamma = norm_weight.to(cdt)
        wk, wv = wk * gamma, wv * gamma
    return _cast(wk, dtype), _cast(wv, dtype), _cast(bk, dtype), _cast(bv, dtype)


class _ZeroGradFor(torch.autograd.Function):
    """Passes ``out`` through and gives ``params`` a zero gradient: ``b_k`` cancels in the softmax,
    but an optimiser (and ``torch.autograd.grad``) still expects it to have a gradient, as it
    does on the materialised path."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs)


# ----------------------------------------------------------------------------------------------
# The core: multi-query attention with K = V = x (reference)
# ----------------------------------------------------------------------------------------------
# Layout (shared by every back end): q and out (dout and dq too) have the "grouped" shape [Hk,
# total_q, G, Dv], head h = k * G + g, in token-major storage: they are permuted views of rows
# [total_q, Hq, Dv] (contiguous [total_q, Hk, G, Dv]). The per-head GEMMs write q~ and read o~ in
# that storage and the CUDA binding reads and writes rows, so nothing is copied between them.
# Every back end's outputs and the fake kernels' have these strides (_new_grouped): torch.compile
# plans with the fake's. Inputs of other strides work (copied where a back end needs it).
# x [total_k, Dv], lse [Hq, total_q].


def _rows_view(q: torch.Tensor) -> torch.Tensor:
    """Grouped ``[Hk, total_q, G, Dv]`` -> rows ``[total_q, Hq, Dv]``: a view when ``q`` is in
    token-major storage, else a copy."""
    hk, total_q, group, dv = q.shape
    return q.permute(1, 0, 2, 3).reshape(total_q, hk * group, dv)


def _grouped(t: torch.Tensor, hk: int) -> torch.Tensor:
    """Rows ``[total_q, Hq, Dv]`` -> grouped ``[Hk, total_q, G, Dv]``, a view (token-major
    storage when ``t`` is contiguous)."""
    total_q, hq, dv = t.shape
    return t.view(total_q, hk, hq // hk, dv).permute(1, 0, 2, 3)


def _new_grouped(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised grouped ``[Hk, total_q, G, Dv]`` output in token-major storage (poisoned
    like :func:`crosslmm_ops._backend.new_output`)."""
    hk, total_q, group, dv = shape
    return _backend.new_output((total_q, hk, group, dv), dtype, device).permute(1, 0, 2, 3)


def _runs(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Consecutive segments of equal (queries, keys) as runs ``(n, q0, lq, k0, lk)``: a run is a
    contiguous block of ``n`` segments, batched as one ``bmm`` (every frame of frame-local V2V is
    one run)."""
    cq, ck = validation.reference_host_values(OP_NAME, cu_seqlens_q, cu_seqlens_k)
    runs = []
    for i in range(len(cq) - 1):
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if runs and runs[-1][2] == lq and runs[-1][4] == lk:
            n, q0, _, k0, _ = runs[-1]
            runs[-1] = (n + 1, q0, lq, k0, lk)
        else:
            runs.append((1, cq[i], lq, ck[i], lk))
    return runs


def _core_reference_forward(q, x, cu_seqlens_q, cu_seqlens_k, scale, compute_dtype):
    """``(out [Hk, total_q, G, Dv], lse [Hq, total_q])`` in ``compute_dtype``, differentiable."""
    hk = q.shape[0]
    qr = _rows_view(q).to(compute_dtype)
    xc = x.to(compute_dtype)
    total_q, hq, dv = qr.shape
    outs, lses = [], []
    for n, q0, lq, k0, lk in _runs(cu_seqlens_q, cu_seqlens_k):
        if lq == 0:
            continue
        qi = qr[q0 : q0 + n * lq].reshape(n, lq * hq, dv)
        if lk == 0:  # no keys: the output is 0 and the LSE -inf (an empty softmax)
            outs.append(torch.zeros_like(qi))
            lses.append(qi.new_full((n, lq * hq), float("-inf")))
            continue
        xi = xc[k0 : k0 + n * lk].reshape(n, lk, dv)
        s = torch.bmm(qi, xi.transpose(1, 2)) * scale  # [n, rows, lk]
        lse = torch.logsumexp(s, -1)
        outs.append(torch.bmm(torch.exp(s - lse.unsqueeze(-1)), xi))
        lses.append(lse)
    out = torch.cat([o.reshape(-1, hq, dv) for o in outs]) if outs else qr.new_zeros(qr.shape)
    lse = torch.cat([l.reshape(-1, hq) for l in lses]).t() if lses else qr.new_zeros(hq, total_q)
    return _grouped(out, hk), lse


def _core_reference_backward(dout, dlse, q, x, out, lse, cu_seqlens_q, cu_seqlens_k, scale):
    """The backward written out (what the kernels compute), per run of equal segments::

    P = exp(S - lse),  dP = dO x^T,  dS = P * (dP - delta),  delta = rowsum(dO * O) - dlse,
    dq = scale * dS x,  dx = P^T dO (x as the value) + scale * dS^T q (x as the key)
    """
    cdt = accumulation_dtype(q.dtype)
    hk = q.shape[0]
    qr, dor, outr = (_rows_view(t).to(cdt) for t in (q, dout, out))
    xc = x.to(cdt)
    total_q, hq, dv = qr.shape
    delta = (dor * outr).sum(-1).t()  # [Hq, total_q]
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    lse = lse.to(cdt)
    # Contiguous rows, whatever the strides of q: dq comes out token-major like every output.
    dq, dx = qr.new_zeros(qr.shape), torch.zeros_like(xc)
    for n, q0, lq, k0, lk in _runs(cu_seqlens_q, cu_seqlens_k):
        if lq == 0 or lk == 0:
            continue
        rows = slice(q0, q0 + n * lq)
        qi, doi = (t[rows].reshape(n, lq * hq, dv) for t in (qr, dor))
        lse_i, delta_i = (t[:, rows].t().reshape(n, lq * hq, 1) for t in (lse, delta))
        xi = xc[k0 : k0 + n * lk].reshape(n, lk, dv)
        p = torch.exp(torch.bmm(qi, xi.transpose(1, 2)) * scale - lse_i)
        ds = p * (torch.bmm(doi, xi.transpose(1, 2)) - delta_i)
        dq[rows] = (torch.bmm(ds, xi) * scale).reshape(n * lq, hq, dv)
        dx[k0 : k0 + n * lk] = (
            torch.bmm(p.transpose(1, 2), doi) + torch.bmm(ds.transpose(1, 2), qi) * scale
        ).reshape(n * lk, dv)
    return _grouped(dq, hk), dx


# ----------------------------------------------------------------------------------------------
# The core: back ends
# ----------------------------------------------------------------------------------------------


def _triton_kernels():
    from crosslmm_ops.triton import projected_attention as kernels

    return kernels


def _cuda_input(t: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel moves 16 bytes at a time: channels contiguous, other strides multiples of
    8 elements, a 16-byte aligned base; anything else is copied once."""
    if t.is_contiguous() and t.shape[-1] % 8 == 0 and t.data_ptr() % 16 == 0:
        return t  # every stride a multiple of the last dim's 8: decided in three cheap calls
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(t.shape[d] <= 1 or t.stride(d) % 8 == 0 for d in range(t.dim() - 1))
    )
    return t if ok else t.contiguous()


def _core_forward(backend, q, x, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits):
    if backend == "torch":
        with torch.no_grad():
            out, lse = _core_reference_forward(q, x, cu_q, cu_k, scale, accumulation_dtype(q.dtype))
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype), lse.to(lse_dtype).contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    cu_q, cu_k = _backend.kernel_index(cu_q), _backend.kernel_index(cu_k)
    if backend == "cuda":
        # The binding takes and returns rows [total_q, Hq, Dv]: views of token-major q and out.
        hk = q.shape[0]
        rows = _rows_view(q)
        kernel, _ = planner.projected_core_kernel(
            q.device, x.shape[-1], max_seqlen_q * rows.shape[1], explain=False
        )
        out, lse = _backend.extension().projected_attention_core_forward(
            _cuda_input(rows),
            _cuda_input(x),
            cu_q,
            cu_k,
            max_seqlen_q,
            max_seqlen_k,
            scale,
            num_splits,
            kernel,
        )
        return _grouped(out, hk), lse
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = _new_grouped(q.shape, q.dtype, q.device)
    lse = _backend.new_output((q.shape[0] * q.shape[2], q.shape[1]), torch.float32, q.device)
    _triton_kernels().projected_attention_core_forward(
        q, x, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits
    )
    return out, lse


def _core_backward(
    backend, dout, dlse, q, x, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits
):
    if backend == "torch":
        with torch.no_grad():
            dq, dx = _core_reference_backward(dout, dlse, q, x, out, lse, cu_q, cu_k, scale)
        return dq.to(q.dtype), dx.to(x.dtype)
    q, x, dout, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, x, dout, out))
    cu_q, cu_k = _backend.kernel_index(cu_q), _backend.kernel_index(cu_k)
    if backend == "cuda":
        # Rows [total_q, Hq, Dv] like the forward's: views of token-major dout, q, out and dq.
        hk = q.shape[0]
        dq, dx = _backend.extension().projected_attention_core_backward(
            _cuda_input(_rows_view(dout)),
            _cuda_input(_rows_view(q)),
            _cuda_input(x),
            _cuda_input(_rows_view(out)),
            lse.contiguous(),
            cu_q,
            cu_k,
            max_seqlen_q,
            max_seqlen_k,
            scale,
            num_splits,
            dlse=None if dlse is None else dlse.float().contiguous(),
        )
        return _grouped(dq, hk), dx
    dq = _new_grouped(q.shape, q.dtype, q.device)
    dx = _backend.new_output(x.shape, x.dtype, x.device)
    _triton_kernels().projected_attention_core_backward(
        dout,
        q,
        x,
        out,
        lse.contiguous(),
        dq,
        dx,
        cu_q,
        cu_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        num_splits,
        dlse=dlse,
    )
    return dq, dx


# ----------------------------------------------------------------------------------------------
# The core: custom ops (what torch.compile sees) and the eager autograd.Function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("crosslmm::projected_attention_core", mutates_args=())
def _projected_attention_core_op(
    q: torch.Tensor,
    x: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _core_forward_impl(
        q,
        x,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
        backend,
    )


def _core_forward_impl(
    q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, num_splits, backend
):
    """The forward custom op's implementation (also the eager function's forward)."""
    out, lse = _core_forward(
        backend,
        q,
        x,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
    )
    planner.note(CORE_OP_NAME, backend, kernel=_core_kernel_that_ran(backend))
    return out, lse


def _core_kernel_that_ran(backend: str) -> str:
    """The kernel of the core call that just ran: the CUDA binding's ("sm90_cluster", "decode",
    "decode_bulk", "mma_sync", "none"), else "triton" / "reference"."""
    if backend == "cuda":
        return _backend.extension().projected_attention_core_forward_kernel_name()
    return {"triton": "triton", "torch": "reference"}[backend]


@_projected_attention_core_op.register_fake
def _(
    q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, num_splits, backend
):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        _new_grouped(q.shape, q.dtype, q.device),
        q.new_empty((q.shape[0] * q.shape[2], q.shape[1]), dtype=lse_dtype),
    )


@torch.library.custom_op("crosslmm::projected_attention_core_backward", mutates_args=())
def _projected_attention_core_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _core_backward_impl(
        dout,
        dlse,
        q,
        x,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
        backend,
    )


def _core_backward_impl(
    dout,
    dlse,
    q,
    x,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    num_splits,
    backend,
):
    """The backward custom op's implementation (also the eager function's backward)."""
    # Where the backward falls back to Triton, its kernels must fit the GPU's shared memory.
    backend = planner.projected_backward_backend(
        backend,
        q.device,
        lambda: (
            _triton_shared_memory_ok(q.shape[-1], q.dtype, q.device) if q.is_cuda else (True, "")
        ),
    )[0]
    grads = _core_backward(
        backend,
        dout,
        dlse,
        q,
        x,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
    )
    planner.note(CORE_OP_NAME + "_backward", backend)
    return grads


@_projected_attention_core_backward_op.register_fake
def _(
    dout,
    dlse,
    q,
    x,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    num_splits,
    backend,
):
    return _new_grouped(q.shape, q.dtype, q.device), x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    q, x, cu_q, cu_k = inputs[:4]
    ctx.params = inputs[4:]  # max_seqlen_q/k, softmax_scale, num_splits, backend
    ctx.save_for_backward(q, x, output[0], output[1], cu_q, cu_k)
    # An unused LSE then arrives as None, not zeros: the common case skips the dlse path.
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, grad_out, grad_lse):
    q, x, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    backward = (
        _core_backward_impl
        if getattr(ctx, "eager", False)
        else _projected_attention_core_backward_op
    )
    dq, dx = backward(grad_out, grad_lse, q, x, out, lse, cu_q, cu_k, *ctx.params)
    return (dq, dx) + (None,) * 7


_projected_attention_core_op.register_autograd(_backward_formula, setup_context=_setup_context)
_ProjectedAttentionCoreFunction = _backend.eager_function(
    "_ProjectedAttentionCoreFunction", _core_forward_impl, _setup_context, _backward_formula
)


def core_backends(layout: ProjectedLayout, dtype: torch.dtype, device: torch.device):
    """``(cuda_ok, triton_ok)`` for the core of one call: each ``(bool, reason)``."""
    cuda = _backend.cuda_runnable(device)
    if cuda[0] and not hasattr(_backend.extension(), "projected_attention_core_forward"):
        cuda = (
            False,
            "the CUDA extension was built without the projected-attention kernel; rebuild it",
        )
    if cuda[0] and dtype not in _CUDA_DTYPES:
        cuda = (False, f"dtype {dtype} is not supported (only float16, bfloat16)")
    if cuda[0] and (layout.width % 8 or layout.width > _CUDA_MAX_WIDTH):
        cuda = (
            False,
            f"x's width {layout.width} is not supported (a multiple of 8, at most "
            f"{_CUDA_MAX_WIDTH})",
        )
    triton_ok = _backend.triton_runnable(device)
    if triton_ok[0] and dtype not in _TRITON_DTYPES:
        triton_ok = (False, f"dtype {dtype} is not supported (only float16, bfloat16, float32)")
    if triton_ok[0]:
        triton_ok = _backend.triton_dot_dtype_ok(dtype)
    if triton_ok[0] and layout.width > _TRITON_MAX_WIDTH:
        triton_ok = (
            False,
            f"x's width {layout.width} is not supported (at most {_TRITON_MAX_WIDTH})",
        )
    if triton_ok[0] and device.type == "cuda":
        triton_ok = _triton_shared_memory_ok(layout.width, dtype, device)
    return cuda, triton_ok


# (width, dtype, device) -> triton_shared_memory_ok's answer: asked by every call on the GPU.
_TRITON_SHARED_MEMORY: dict = {}


def _triton_shared_memory_ok(width: int, dtype: torch.dtype, device: torch.device):
    key = (width, dtype, device.index)
    if key not in _TRITON_SHARED_MEMORY:
        from crosslmm_ops.triton.common import shared_memory_per_block

        capacity = shared_memory_per_block(device)
        _TRITON_SHARED_MEMORY[key] = triton_shared_memory_ok(width, dtype, capacity)
    return _TRITON_SHARED_MEMORY[key]


def triton_shared_memory_ok(width: int, dtype: torch.dtype, capacity: int | None):
    """``(ok, why not)``: whether the Triton core's kernels (forward and backward) fit a GPU
    block's ``capacity`` bytes of shared memory (``None``: no limit) at this width and dtype.
    They keep whole ``[rows, width]`` tiles on chip: float32 fits an H100 up to width 1152 and
    an A100 up to 768; float16 and bfloat16 fit an H100 up to 2048 and an A100 up to 1536."""
    if capacity is None:
        return True, ""
    need = _triton_kernels().shared_memory_bytes(width, dtype)
    if need <= capacity:
        return True, ""
    return False, (
        f"at width {width} in {dtype} its kernels need about {need >> 10} KB of shared memory "
        f"per block, more than this GPU's {capacity >> 10} KB (float16 and bfloat16 need half)"
    )


def _projected_attention_core(
    q, x, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits, backend
):
    """The core op for this call: the custom op, or in plain eager mode its autograd.Function
    twin (the same functions, without torch.library's per-call host cost)."""
    if _backend.eager_function_ok(q, x):
        if not (torch.is_grad_enabled() and (q.requires_grad or x.requires_grad)):
            # no graph to record: skip apply's host cost (decode steps are host-bound)
            return _core_forward_impl(
                q, x, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits, backend
            )
        return _ProjectedAttentionCoreFunction.apply(
            q, x, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits, backend
        )
    return _projected_attention_core_op(
        q, x, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits, backend
    )


def projected_attention_core(
    q: torch.Tensor,
    x: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    backend: str | None = None,
):
    """The core on its own: ``softmax(q x^T * scale) x`` for every query head, i.e.
    ``cross_attention(q, x[..., None, :], x[..., None, :])`` with one key/value head whose width is
    ``x``'s (``Dv`` up to 2048 on Triton/CUDA, any on torch).

    ``q (B, Sq, Hq, Dv)``, ``x (B, Sk, Dv)`` -> ``out (B, Sq, Hq, Dv)``, ``lse (B, Hq, Sq)``; or
    packed ``q (total_q, Hq, Dv)``, ``x (total_k, Dv)`` with ``cu_seqlens`` -> ``out (total_q, Hq,
    Dv)``, ``lse (Hq, total_q)``. ``softmax_scale`` defaults to ``1 / sqrt(Dv)``. Differentiable in
    ``q`` and ``x``; :func:`crosslmm_ops.last_backend` ``("projected_attention_core")`` says
    which ran."""
    q, x = validation.tensor("q", q), validation.tensor("x", x)
    if x.dim() != q.dim() - 1:
        raise ValueError(
            f"x must have shape (B, Sk, Dv) for q (B, Sq, Hq, Dv), or (total_k, Dv) "
            f"for q (total_q, Hq, Dv), got q {tuple(q.shape)}, x {tuple(x.shape)}"
        )
    # Validated as what it is: cross_attention with one key/value head, k = v = x.
    att = attention.check_inputs(
        q, x.unsqueeze(-2), x.unsqueeze(-2), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    layout = ProjectedLayout(
        att.batched,
        att.batch,
        att.heads_q,
        1,
        att.head_dim,
        att.head_dim,
        att.total_q,
        att.total_k,
        att.max_seqlen_q,
        att.max_seqlen_k,
        att.seqlen_q,
        att.seqlen_k,
    )
    scale = validation.softmax_scale(softmax_scale, layout.width)
    _check_flags(num_splits, return_lse)
    cuda_ok, triton_ok = core_backends(layout, q.dtype, q.device)
    chosen = planner.resolve(CORE_OP_NAME, backend, q.device, cuda_ok=cuda_ok, triton_ok=triton_ok)
    qp, xp, cu_q, cu_k = _packed(layout, q, x, cu_seqlens_q, cu_seqlens_k)
    out, lse = _projected_attention_core(
        _grouped(qp, 1),
        xp,
        cu_q,
        cu_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        scale,
        num_splits,
        chosen,
    )
    out = _rows_view(out)
    if layout.batched:
        out = out.reshape(q.shape)
        if return_lse:  # a copy (flash-attn's layout): only when asked for
            lse = lse_batched(lse, layout.batch, layout.seqlen_q)
    return (out, lse) if return_lse else out


def _check_flags(num_splits, return_lse) -> None:
    validation.num_splits(num_splits)
    validation.flag("return_lse", return_lse)


def _packed(layout: ProjectedLayout, q, x, cu_seqlens_q, cu_seqlens_k):
    if not layout.batched:
        return q, x, cu_seqlens_q, cu_seqlens_k
    return (
        q.reshape(-1, *q.shape[2:]),
        x.reshape(-1, x.shape[-1]),
        *uniform_cu_seqlens_pair(layout.batch, layout.seqlen_q, layout.seqlen_k, q.device),
    )


# ----------------------------------------------------------------------------------------------
# The cost model: fused or materialised
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Time estimates of the two paths from the shapes, each stage ``max(FLOPs / rate, bytes /
    bandwidth)``: GPU time, which a captured decode step runs and which decides wherever the GPU
    is behind the host. A call shorter than its own host time (tens to hundreds of microseconds,
    by the machine) is host-bound on either path. Defaults: an H100 in bf16, from the
    measurements in docs/performance.md:

    * ``matmul_tflops`` 700: cuBLAS bf16 (731-802 TFLOP/s at 8192^3; the projection of
      ``x`` is a (T*729) x 1152 x (2*Hk*d) GEMM, as large);
    * ``attention_tflops`` 300: materialised attention on CrossLMM's shapes (SDPA flash
      250-310, cuDNN up to 557, our kernels 126-345 TFLOP/s);
    * ``fused_tflops`` 165: the rate that predicts the whole fused call's GPU time on an H100
      (bf16) where its core runs on the Hopper kernel (``sm90_cluster``), which alone runs
      frame-local V2V at 210 TFLOP/s; the call adds the q~ and output GEMMs through memory, the
      combine and the bias (at 256 frames the whole call takes 0.555 ms for 93 GFLOP, 167
      TFLOP/s). Fitted on GPU time to the grid of benchmarks/projected_paths.py
      (results/projected_paths_h100.json): every rate from 135 to 250 chooses the faster path on
      all 63 cases there;
    * ``fused_mma_sync_tflops`` 90: the same where the core runs on any other kernel: the
      mma.sync kernels (sm_80, Dv above 1152, decode steps, where the rate hardly matters
      beside the read of ``x``) or Triton. Fitted the same way when mma.sync was the only core
      (84-125 TFLOP/s alone);
    * ``bandwidth_tbs`` 2.8: 93% of the measured device copy (2.97-3.02 TB/s).

    Per key, the fused core costs ``4 * Dv * Hq * Lq_seg`` FLOPs (``Lq_seg`` queries per key
    segment), the materialised path ``4 * Dv * Hk * d`` (projections) ``+ 4 * d * Hq * Lq_seg``
    (attention): the fused path wins when each key is seen by few queries. At CrossLMM-2B's
    shapes (Dv 1152, Hq 12, d 128) the FLOP break-even is
    ``Lq_seg = Hk * d * Dv / ((Dv - d) * Hq)`` = 24 queries per key for Hk = 2 and 144 for
    Hk = 12; with the rates above (T = 256 frames):

    ============================  ==========  ======================  ==============
    call (Hk = 2 / 4 / 12)        fused ms    materialised ms         choice
    ============================  ==========  ======================  ==============
    T2V decode, 1 query           0.15        0.38 / 0.77 / 2.3       fused
    V2V frame-local, 9 q/frame    0.61        0.39 / 0.77 / 2.3       materialised at
                                                                      Hk = 2, else fused
    T2V prefill, 128 queries      8.0         0.80 / 1.1 / 2.4        materialised
    ============================  ==========  ======================  ==============

    Measured at T = 256 (H100, GPU time, benchmarks/results/projected_paths_h100.json):
    frame-local V2V fused 0.555 ms against the materialised path's 0.479 ms (Hk = 2), 0.845 ms
    (Hk = 4) and 2.40 ms (Hk = 12). With 2 KV heads the projections (220 GFLOP at cuBLAS's rate)
    still beat the fused core's 93 GFLOP at its rate; from 4 KV heads on, the fused path wins.

    Replace ``crosslmm_ops.ops.projected_attention.COST_MODEL`` (or pass ``path=``, or set
    ``CROSSLMM_PROJECTED_PATH``) to change the choice."""

    matmul_tflops: float = 700.0
    attention_tflops: float = 300.0
    fused_tflops: float = 165.0
    bandwidth_tbs: float = 2.8
    fused_mma_sync_tflops: float = 90.0

    def estimate(
        self, layout: ProjectedLayout, element_size: int = 2, hopper_core: bool = True
    ) -> tuple[float, float]:
        """``(fused_ms, materialized_ms)`` for one call; ``hopper_core``: whether the fused core
        runs on ``sm90_cluster`` (:func:`fused_core_on_hopper`)."""
        e = element_size
        pairs = layout.pairs()
        hq, hk, d, dv = layout.heads_q, layout.heads_k, layout.head_dim, layout.width
        tq, tk = layout.total_q, layout.total_k
        core_tflops = self.fused_tflops if hopper_core else self.fused_mma_sync_tflops
        mm, attn, fused = (
            r * 1e12 for r in (self.matmul_tflops, self.attention_tflops, core_tflops)
        )
        bw = self.bandwidth_tbs * 1e12
        x_bytes = tk * dv * e
        w_bytes = 2 * hk * d * dv * e
        wide = tq * hq * dv * e  # q~ or o~: written by one kernel, read by the next
        io = 2 * tq * hq * d * e  # q read, out written
        fused_s = max(4 * pairs * hq * dv / fused, (x_bytes + 2 * wide) / bw) + max(
            4 * tq * hq * d * dv / mm, (2 * wide + io + w_bytes) / bw
        )
        kv = 2 * tk * hk * d * e
        mat_s = max(4 * tk * dv * hk * d / mm, (x_bytes + w_bytes + kv) / bw) + max(
            4 * pairs * hq * d / attn, (kv + io) / bw
        )
        return fused_s * 1e3, mat_s * 1e3


COST_MODEL = CostModel()


def choose_path(layout: ProjectedLayout, dtype: torch.dtype, path: str = "auto") -> str:
    """``"fused"`` or ``"materialized"`` by the planner from the shapes alone: ``path`` when it
    names one, else ``CROSSLMM_PROJECTED_PATH`` when it does, else the cheaper path by
    :data:`COST_MODEL` with the Hopper core's rate (ties go to fused, which needs less memory)."""
    return planner.choose_path(path, lambda: COST_MODEL.estimate(layout, dtype.itemsize))[0]


def fused_core_on_hopper(
    layout: ProjectedLayout, device: torch.device, backend, cuda_ok: tuple[bool, str]
) -> bool:
    """Whether the fused core of a call would run on ``sm90_cluster``, the kernel whose rate the
    cost model takes (``CostModel.fused_tflops``; any other core: ``fused_mma_sync_tflops``):
    the CUDA back end runs it (``cuda_ok``, from :func:`core_backends`; ``auto`` takes CUDA
    first) and the planner picks that kernel for the call's width and rows."""
    if device.type != "cuda" or not cuda_ok[0]:
        return False
    if planner.requested_backend(backend) not in ("auto", "cuda"):
        return False
    rows = layout.max_seqlen_q * layout.heads_q
    return planner.projected_core_kernel(device, layout.width, rows, explain=False)[0] == (
        "sm90_cluster"
    )


def fused_core_fast(
    layout: ProjectedLayout, dtype: torch.dtype, device: torch.device, backend, cores=None
) -> tuple[bool, str]:
    """Whether the fused core can run on the back end this call asks for, and on a GPU on a
    kernel: the cost model assumes kernels on both paths, and the core has limits the
    materialised attention does not (e.g. a token width above 2048) where ``auto`` would fall to
    the plain-PyTorch reference. ``cores``: :func:`core_backends` of this call where the caller
    has them."""
    cuda_ok, triton_ok = core_backends(layout, dtype, device) if cores is None else cores
    wanted = planner.requested_backend(backend)
    if wanted == "auto":
        if device.type != "cuda" or cuda_ok[0] or triton_ok[0]:
            return True, ""
        return False, f"cuda: {cuda_ok[1]}; triton: {triton_ok[1]}"
    return {"cuda": cuda_ok, "triton": triton_ok, "torch": (True, "")}[wanted]


def plan_path(
    layout,
    dtype: torch.dtype,
    device: torch.device,
    path: str = "auto",
    backend=None,
    *,
    unfused_reason: str | None = None,
    tracing: bool = False,
    cores=None,
    explain: bool = True,
) -> tuple[str, str]:
    """``(path, reason)`` of one call, by :func:`crosslmm_ops.planner.choose_path` with this op's
    cost model (:data:`COST_MODEL`, read at each call) and the fused core's limits
    (:func:`fused_core_fast`). The op and the DCAL modules both ask here; the modules add why the
    fused path cannot stand in for theirs (``unfused_reason``) and whether they are traced, and
    pass ``layout`` as a callable (their layout reads query counts, needed only by the cost
    model). ``cores``: a callable giving :func:`core_backends` of this call, where the caller
    needs them too (asked once); ``explain=False``: the reason is ``""``."""
    known = []

    def shapes() -> ProjectedLayout:  # ``layout`` may be a callable: built only when needed
        if not known:
            known.append(layout() if callable(layout) else layout)
        return known[0]

    asked = []

    def core_backends_of_call():  # asked once, by whichever needs it first
        if not asked:
            asked.append(core_backends(shapes(), dtype, device) if cores is None else cores())
        return asked[0]

    def estimate() -> tuple[float, float]:
        hopper = device.type == "cuda" and fused_core_on_hopper(
            shapes(), device, backend, core_backends_of_call()[0]
        )
        return COST_MODEL.estimate(shapes(), dtype.itemsize, hopper)

    return planner.choose_path(
        path,
        estimate,
        unfused_reason=unfused_reason,
        fused_fast=lambda: fused_core_fast(
            shapes(), dtype, device, backend, core_backends_of_call()
        ),
        tracing=tracing,
        explain=explain,
    )


def last_path() -> str | None:
    """The path (``"fused"`` or ``"materialized"``) of the most recent eager call of
    :func:`projected_cross_attention` in this process (``None`` if none), DCAL modules included."""
    return planner.last_path(OP_NAME)


def attend_materialized(q, k, v, *, attend=cross_attention, **kwargs):
    """The materialised path: ``attend(q, k, v, **kwargs)`` over projected keys and values
    (:func:`~crosslmm_ops.cross_attention`, or a sharded one), recorded as a call of
    :func:`projected_cross_attention` on that path, so that :func:`last_path` and
    ``last_backend("projected_cross_attention")`` describe every projected attention, the op's
    and the DCAL modules' (which project K/V themselves, to share or cache them)."""
    result = attend(q, k, v, **kwargs)
    _note_materialized(q)
    return result


def _note_materialized(q: torch.Tensor) -> None:
    """Record the cross_attention call that just ran as a materialised projected one."""
    if not (torch.compiler.is_compiling() or q.is_meta):  # meta: no back end ran
        planner.note(
            OP_NAME,
            planner.last_backend(attention.OP_NAME),
            path="materialized",
            kernel=planner.last_kernel(attention.OP_NAME),
        )


# ----------------------------------------------------------------------------------------------
# The per-head projections q~ = Wk_h^T q_h and out = Wv_h o~_h, token-major
# ----------------------------------------------------------------------------------------------


def _per_head_matmul_impl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y (T, H, m)`` with ``y[t, h] = x[t, h] @ w[h]``, for ``x (T, H, k)`` and ``w (H, k,
    m)`` of one dtype: one batched GEMM over the heads that writes the token-major ``y`` in
    place (``bmm`` takes a result whose rows are strided as it is), so the caller never copies
    a head-major result into token-major order."""
    y = x.new_empty((x.shape[0], x.shape[1], w.shape[2]))
    torch.bmm(x.transpose(0, 1), w, out=y.transpose(0, 1))
    return y


@torch.library.custom_op("crosslmm::per_head_matmul", mutates_args=())
def _per_head_matmul_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # A custom op under torch.compile: Dynamo does not trace bmm into a non-contiguous out=.
    return _per_head_matmul_impl(x, w)


@_per_head_matmul_op.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], x.shape[1], w.shape[2]))


# FLOPs for torch.utils.flop_counter.FlopCounterMode, which cannot see inside a custom op: the
# projections count as the GEMMs they are.
@register_flop_formula(torch.ops.crosslmm.per_head_matmul, get_raw=True)
def _per_head_matmul_flops(x, w, *args, out_val=None, **kwargs) -> int:
    return 2 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[2]


def _per_head_matmul_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _per_head_matmul_backward(ctx, dy):
    """``dx[t, h] = dy[t, h] @ w[h]^T`` (the same per-head GEMM), ``dw[h] = x[:, h]^T dy[:, h]``."""
    x, w = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        matmul = _per_head_matmul_impl if getattr(ctx, "eager", False) else _per_head_matmul_op
        dx = matmul(dy, w.transpose(1, 2))
    if ctx.needs_input_grad[1]:
        dw = torch.bmm(x.transpose(0, 1).transpose(1, 2), dy.transpose(0, 1))
    return dx, dw


_per_head_matmul_op.register_autograd(
    _per_head_matmul_backward, setup_context=_per_head_matmul_setup_context
)
_PerHeadMatmulFunction = _backend.eager_function(
    "_PerHeadMatmulFunction",
    _per_head_matmul_impl,
    _per_head_matmul_setup_context,
    _per_head_matmul_backward,
)


def _per_head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y (T, H, m)``, ``y[t, h] = x[t, h] @ w[h]``, contiguous (token-major), differentiable:
    the custom op, or in plain eager mode its autograd.Function twin."""
    if not _backend.eager_function_ok(x, w):
        return _per_head_matmul_op(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _PerHeadMatmulFunction.apply(x, w)
    return _per_head_matmul_impl(x, w)  # no graph to record: skip apply's host cost


def _per_query_head(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per kv head ``[Hk, a, b]`` -> per query head ``[Hk * G, a, b]`` (head ``h`` reads kv head
    ``h // G``): a copy of the weights when ``1 < Hk`` and ``1 < G``, else a view."""
    hk, a, b = w.shape
    return w.unsqueeze(1).expand(hk, group, a, b).reshape(hk * group, a, b)


def _per_head_projection(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """``y (T, Hq, b)``, ``y[t, h] = x[t, h] @ w[h // G]``, token-major, for ``x (T, Hq, a)`` and
    per-kv-head ``w (Hk, a, b)``. Two forms of the same function; each copies something when
    ``1 < Hk < Hq``, and the smaller copy wins:

    * weights expanded per query head, then one GEMM that writes ``y`` in place: copies
      ``Hq * a * b`` weight elements (a view when ``Hk`` or ``G`` is 1);
    * one GEMM per kv head on the rows regrouped by kv head: copies ``x`` in and ``y`` out,
      ``T * Hq * (a + b)`` elements.

    For q~ and the output (a, b = d, Dv or Dv, d) the expansion wins from ``T > a b / (a + b)``
    (115 tokens at d = 128, Dv = 1152): prefill expands, a decode step regroups. A token count
    unknown while tracing (torch.compile, data-dependent) expands."""
    hk, a, b = w.shape
    tokens, hq, _ = x.shape
    if hk == 1 or group == 1 or not guard_or_false(tokens * (a + b) < a * b):
        return _per_head_matmul(x, _per_query_head(w, group))
    rows = x.reshape(tokens, hk, group, a).transpose(0, 1).reshape(hk, tokens * group, a)
    y = torch.bmm(rows, w)
    return y.view(hk, tokens, group, b).transpose(0, 1).reshape(tokens, hq, b)


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``t`` runs in: autocast's where it is on for ``t``'s device (float64
    is not cast), else ``t``'s."""
    low = _backend.autocast_dtype(t.device)
    return t.dtype if low is None or t.dtype == torch.float64 else low


# ----------------------------------------------------------------------------------------------
# The public function and the reference
# ----------------------------------------------------------------------------------------------


def _fused(q, xhat, wk, wv, bk, bv, layout, scale, cu_q, cu_k, num_splits, backend):
    """``(out (total_q, Hq, d), lse (Hq, total_q))`` through the core."""
    hk, group, d, dv = layout.heads_k, layout.group, layout.head_dim, layout.width
    tq, hq = layout.total_q, layout.heads_q
    # The projections are matmuls: under autocast they run in its dtype, as nn.Linear does, and
    # the core then multiplies q~ with x in that dtype (a no-op outside autocast).
    dtype = _matmul_dtype(q)
    # q~ = Wk_h^T q_h, token-major: rows [total_q, Hq, Dv], which the core reads as grouped [Hk,
    # total_q, G, Dv] without a copy.
    q_tilde = _per_head_projection(_cast(q, dtype), _cast(wk, dtype).reshape(hk, d, dv), group)
    o_tilde, lse = _projected_attention_core(
        _grouped(q_tilde, hk),
        _cast(xhat, dtype),
        cu_q,
        cu_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        scale,
        num_splits,
        backend,
    )
    # out = Wv_h o~, token-major: the op's (total_q, Hq, d).
    wv_t = _cast(wv, dtype).reshape(hk, d, dv).transpose(1, 2)
    out = _per_head_projection(_rows_view(o_tilde), wv_t, group)
    if bv is not None:
        bias = bv.view(hk, 1, d)
        if not layout.every_segment_has_keys():
            # A query without keys outputs 0, as cross_attention does, not the bias.
            has_keys = torch.isfinite(lse).t().reshape(tq, hk, group, 1)
            bias = bias * has_keys.to(bias.dtype)
        out = (out.view(tq, hk, group, d) + bias).view(tq, hq, d)
    if bk is not None:
        # The term q . bk_h cancels in the softmax but not in the LSE of the projected scores.
        qc = q.reshape(tq, hk, group, d).to(lse.dtype)
        shift = torch.einsum("tkgd,kd->kgt", qc, bk.reshape(hk, d).to(lse.dtype))
        lse = lse + scale * shift.reshape(hq, tq)
    return out, lse


def projected_cross_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    num_splits: int = 0,
    path: str = "auto",
    return_lse: bool = False,
    backend: str | None = None,
):
    """``cross_attention(q, K, V)`` with ``K = n(x) w_k^T + b_k``, ``V = n(x) w_v^T + b_v`` and
    ``n(x) = norm(x) * norm_weight + norm_bias``, computed without materialising K or V when that
    is cheaper.

    * batched: ``q (B, Sq, Hq, d)``, ``x (B, Sk, Dv)`` -> ``out (B, Sq, Hq, d)``, ``lse (B, Hq,
      Sq)``; packed: ``q (total_q, Hq, d)``, ``x (total_k, Dv)`` with int32 ``cu_seqlens_q /
      cu_seqlens_k`` (query segment ``i`` attends to token segment ``i``: frame-local V2V, a batch
      of decoding sequences) -> ``out (total_q, Hq, d)``, ``lse (Hq, total_q)``; as
      :func:`~crosslmm_ops.cross_attention`, including empty segments (zeros, lse ``-inf``);
    * ``w_k, w_v (Hk * d, Dv)``: ``nn.Linear.weight`` of the K and V projections (``Hk`` divides
      ``Hq``; query head ``h`` reads kv head ``h // (Hq // Hk)``); ``b_k, b_v (Hk * d,)``. Weights
      and biases may have another floating dtype than ``q`` (fp32 master weights): they are used
      in ``q``'s dtype. ``b_k`` shifts every score of a query equally, so it cancels in the
      softmax: it only moves the LSE, and its gradient through the output is exactly zero here
      (zero up to rounding on the materialised path);
    * ``norm``: ``None``, ``"layernorm"`` or ``"rmsnorm"`` over ``x``'s last dim (eps
      ``norm_eps``), then the affine ``norm_weight (Dv,)``, ``norm_bias (Dv,)`` (each optional,
      also with ``norm=None``: pass ``x = normalize_tokens(x)`` computed once for every DCAL layer,
      and each layer's own ``gamma, beta`` here). The affine part is folded into the weights
      (``w diag(gamma)``) and the biases (``b + w beta``); everything is differentiable in ``q``,
      ``x``, the weights, the biases and the norm's parameters;
    * ``softmax_scale``: default ``1 / sqrt(d)`` (the projected head dim);
    * ``path``: ``"fused"`` (attention over ``x`` with ``q~ = Wk_h^T q_h``, never K/V),
      ``"materialized"`` (project, then :func:`~crosslmm_ops.cross_attention`) or ``"auto"``
      (``CROSSLMM_PROJECTED_PATH`` if set, else :func:`choose_path`'s cost model);
      :func:`last_path` says which ran;
    * ``backend``: ``"auto"`` (default; env ``CROSSLMM_BACKEND``), ``"cuda"``, ``"triton"`` or
      ``"torch"``, for the fused core
      (``crosslmm_ops.last_backend("projected_attention_core")``: CUDA
      fp16/bf16 with ``Dv`` a multiple of 8 up to 2048, its backward on CUDA too where the
      extension has it, else Triton; Triton
      fp16/bf16/fp32 up to 2048 where its tiles fit the GPU's shared memory:
      :func:`triton_shared_memory_ok`) or for ``cross_attention`` on the materialised path;
      ``last_backend("projected_cross_attention")`` is the one that ran either;
    * ``num_splits``: key splits of the attention (0 = heuristic); ``return_lse``: also return the
      natural-log LSE of the projected scores (``b_k`` included), float32 (float64 for float64).
    """
    layout, scale, chosen_path, _, cores = _prepare(
        q,
        x,
        w_k,
        w_v,
        b_k,
        b_v,
        softmax_scale,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        norm,
        norm_weight,
        norm_bias,
        norm_eps,
        num_splits,
        path,
        return_lse,
        backend,
        explain=False,
    )
    xhat = _normalized(x, norm, norm_eps)  # checked with the other arguments
    if chosen_path == "materialized":
        wk, wv, bk, bv = _fold(w_k, w_v, b_k, b_v, norm_weight, norm_bias, q.dtype)
        kv_shape = (*x.shape[:-1], layout.heads_k, layout.head_dim)
        k = F.linear(xhat, wk, bk).view(kv_shape)
        v = F.linear(xhat, wv, bv).view(kv_shape)
        if k.dtype == q.dtype:
            # Every argument of this cross_attention call was checked above, and its layout is
            # this call's: run it without checking them again (host time of short calls).
            # Under autocast k and v can have another dtype: cross_attention says what is wrong.
            call = attention.call_for(kv_layout(layout), scale, q.dtype, q.device, backend)
            result = attention.run(
                call,
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                num_splits=num_splits,
                return_lse=return_lse,
            )
            _note_materialized(q)
            return result
        return attend_materialized(
            q,
            k,
            v,
            softmax_scale=scale,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            num_splits=num_splits,
            return_lse=return_lse,
            backend=backend,
        )
    cuda_ok, triton_ok = cores()
    core_backend = planner.resolve(OP_NAME, backend, q.device, cuda_ok=cuda_ok, triton_ok=triton_ok)
    wk, wv, bk, bv = _fold(w_k, w_v, b_k, b_v, norm_weight, norm_bias, q.dtype, need_b_k=return_lse)
    qp, xp, cu_q, cu_k = _packed(layout, q, xhat, cu_seqlens_q, cu_seqlens_k)
    out, lse = _fused(qp, xp, wk, wv, bk, bv, layout, scale, cu_q, cu_k, num_splits, core_backend)
    if b_k is not None and b_k.requires_grad and torch.is_grad_enabled():
        # b_k's gradient through the output is zero (it only moves the LSE, which adds its
        # own part when returned): give it that zero, as the materialised path does.
        out = _ZeroGradFor.apply(out, b_k)
    if layout.batched:
        out = out.reshape(q.shape)
        if return_lse:  # a copy (flash-attn's layout): only when asked for
            lse = lse_batched(lse, layout.batch, layout.seqlen_q)
    if not (torch.compiler.is_compiling() or q.is_meta):
        planner.note(OP_NAME, core_backend, path="fused")
    return (out, lse) if return_lse else out


def _prepare(
    q,
    x,
    w_k,
    w_v,
    b_k,
    b_v,
    softmax_scale,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    norm,
    norm_weight,
    norm_bias,
    norm_eps,
    num_splits,
    path,
    return_lse,
    backend,
    *,
    explain: bool = True,
):
    """One call validated, its path chosen: ``(layout, scale, path, reason, cores)``, ``cores`` a
    callable giving :func:`core_backends` of the call (asked once, by whichever needs it first);
    ``explain=False``: the reason is ``""``."""
    layout = check_inputs(
        q,
        x,
        w_k,
        w_v,
        b_k,
        b_v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        norm,
        norm_weight,
        norm_bias,
        norm_eps,
    )
    scale = validation.softmax_scale(softmax_scale, layout.head_dim)
    _check_flags(num_splits, return_lse)
    known = []

    def cores():
        if not known:
            known.append(core_backends(layout, q.dtype, q.device))
        return known[0]

    chosen, reason = plan_path(
        layout, q.dtype, q.device, path, backend, cores=cores, explain=explain
    )
    return layout, scale, chosen, reason, cores


def plan(
    q,
    x,
    w_k,
    w_v,
    b_k=None,
    b_v=None,
    *,
    softmax_scale=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    norm=None,
    norm_weight=None,
    norm_bias=None,
    norm_eps=1e-6,
    num_splits=0,
    path="auto",
    return_lse=False,
    backend=None,
) -> planner.Plan:
    """How :func:`projected_cross_attention` would run this call (:func:`crosslmm_ops.explain`):
    the path, then the back end and kernel of that path."""
    layout, scale, chosen, reason, _ = _prepare(
        q,
        x,
        w_k,
        w_v,
        b_k,
        b_v,
        softmax_scale,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        norm,
        norm_weight,
        norm_bias,
        norm_eps,
        num_splits,
        path,
        return_lse,
        backend,
    )
    return plan_layout(layout, scale, chosen, reason, q.dtype, q.device, backend)


def plan_layout(
    layout: ProjectedLayout,
    scale: float,
    path: str,
    reason: str,
    dtype: torch.dtype,
    device: torch.device,
    backend,
    op: str = OP_NAME,
) -> planner.Plan:
    """The plan of a call whose path is chosen (``reason``: why): the back end and kernel of
    that path (the op's and the DCAL modules' plans)."""
    if path == "materialized":
        inner = attention.call_for(kv_layout(layout), scale, dtype, device, backend, op)
        inner = inner.plan(op, device)
        return dataclasses.replace(inner, path=path, reasons=(f"path: {reason}",) + inner.reasons)
    cuda_ok, triton_ok = core_backends(layout, dtype, device)
    core, why = planner.choose_backend(op, backend, device, cuda_ok=cuda_ok, triton_ok=triton_ok)
    reasons = (f"path: {reason}", why)
    if core == "cuda":
        rows = layout.max_seqlen_q * layout.heads_q
        kernel, kernel_why = planner.projected_core_kernel(device, layout.width, rows)
        reasons += (f"kernel: {kernel_why}",)
    else:
        kernel = {"triton": "triton", "torch": "reference"}[core]
    return planner.Plan(op, core, path, kernel, reasons)


def kv_layout(layout: ProjectedLayout) -> attention.AttentionLayout:
    """The layout of the materialised path's cross_attention call: the same queries against K
    and V of ``layout.heads_k`` heads of ``layout.head_dim``, one key per token of ``x``."""
    return attention.AttentionLayout(
        layout.batched,
        layout.batch,
        layout.heads_q,
        layout.heads_k,
        layout.head_dim,
        layout.total_q,
        layout.total_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        layout.seqlen_q,
        layout.seqlen_k,
    )


planner.register(OP_NAME, projected_cross_attention, plan)


def projected_cross_attention_reference(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Plain PyTorch, the way the op is defined: normalise ``x`` (the norm's own formula, its
    weight and bias applied, not folded), project with ``F.linear`` and call
    :func:`~crosslmm_ops.cross_attention_reference`, everything in ``compute_dtype`` (default
    float32, float64 for float64 input). Differentiable through autograd."""
    layout = check_inputs(
        q,
        x,
        w_k,
        w_v,
        b_k,
        b_v,
        cu_seqlens_q,
        cu_seqlens_k,
        None,
        None,
        norm,
        norm_weight,
        norm_bias,
        norm_eps,
    )
    cdt = compute_dtype or accumulation_dtype(q.dtype)
    cast = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    xc = x.to(cdt)
    if norm == "layernorm":
        mean = xc.mean(-1, keepdim=True)
        xc = (xc - mean) * torch.rsqrt((xc - mean).square().mean(-1, keepdim=True) + norm_eps)
    elif norm == "rmsnorm":
        xc = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + norm_eps)
    if norm_weight is not None:
        xc = xc * cast(norm_weight)
    if norm_bias is not None:
        xc = xc + cast(norm_bias)
    kv_shape = (*x.shape[:-1], layout.heads_k, layout.head_dim)
    k = F.linear(xc, cast(w_k), cast(b_k)).view(kv_shape)
    v = F.linear(xc, cast(w_v), cast(b_v)).view(kv_shape)
    return cross_attention_reference(
        q.to(cdt),
        k,
        v,
        softmax_scale=softmax_scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        return_lse=return_lse,
        compute_dtype=cdt,
    )
