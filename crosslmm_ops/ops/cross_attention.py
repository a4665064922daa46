"""cross_attention: non-causal softmax attention of queries against materialised keys and values,
with flash-attn's layouts, segments (varlen), GQA/MQA, the log-sum-exp, split-KV and a gated
residual epilogue (DCAL's ``out = residual + tanh(gate) * attention``).

Everything about the op lives here, side by side:

* :func:`check_inputs` - the user's arguments, validated, as an :class:`AttentionLayout` (every op
  below works on the packed varlen layout; batched ``(B, S, H, D)`` input is viewed as ``B``
  segments of equal length);
* :func:`cross_attention_reference` - the plain-PyTorch reference (the test oracle), segment by
  segment in float32 (float64 for float64 input), differentiable through autograd; the ``torch``
  back end runs the same code (:func:`_reference_forward`) and the backward written out by hand
  (:func:`_reference_backward`), which is also the formula the kernels implement;
* the ``crosslmm::cross_attention_fwd`` / ``crosslmm::cross_attention_bwd`` custom ops (+ fake
  kernels + autograd), whose implementations run the chosen back end: CUDA in ``csrc/attention/``,
  Triton in ``crosslmm_ops/triton/cross_attention.py``, or the reference;
* :func:`cross_attention`, the public function, and two helpers around the LSE:
  :func:`merge_attention_states` (combine attention over disjoint key sets) and
  :func:`attention_weights` (the probabilities of a few queries, recomputed from the LSE).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from crosslmm_ops import _backend, planner
from crosslmm_ops.ops import validation

OP_NAME = "cross_attention"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)
_TRITON_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# The arguments, validated
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """One call's shapes. ``batch`` is the number of segments; ``seqlen_q/k`` are set for batched
    input (every segment that long) and ``None`` for packed input."""

    batched: bool
    batch: int
    heads_q: int
    heads_k: int
    head_dim: int
    total_q: int
    total_k: int
    max_seqlen_q: int
    max_seqlen_k: int
    seqlen_q: int | None = None
    seqlen_k: int | None = None


def check_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
) -> AttentionLayout:
    for name, t in (("q", q), ("k", k), ("v", v)):
        validation.tensor(name, t)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"q must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {q.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must be given together (packed layout) or "
            "both left out (batched layout)"
        )
    packed = cu_seqlens_q is not None
    want = 3 if packed else 4
    layout_text = "(total, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must have shape {layout_text}, got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    Hq, D = q.shape[-2:]
    Hk, Dk = k.shape[-2:]
    if D == 0 or Hq == 0 or Hk == 0:
        raise ValueError(
            f"q and k need at least one head of width >= 1, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if Dk != D:
        raise ValueError(f"k and v must have q's head dim {D}, got {Dk}")
    if Hq % Hk != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of "
            f"key/value heads ({Hk})"
        )
    if not packed:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k and v must have q's batch size {q.shape[0]}, got {k.shape[0]}")
        for name, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if given is not None:
                raise ValueError(
                    f"{name} is for the packed layout (with cu_seqlens); batched "
                    "input takes its lengths from the shapes"
                )
        return _backend.shared_instance(
            _batched_layout, q.shape[0], Hq, Hk, D, q.shape[1], k.shape[1]
        )
    batch, _, _, max_q, max_k = validation.packed(
        cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, q.device
    )
    return AttentionLayout(False, batch, Hq, Hk, D, q.shape[0], k.shape[0], max_q, max_k)


def _batched_layout(B, Hq, Hk, D, Sq, Sk) -> AttentionLayout:
    """The layout of batched input (shared per shape: see ``_backend.shared_instance``)."""
    return AttentionLayout(True, B, Hq, Hk, D, B * Sq, B * Sk, Sq, Sk, Sq, Sk)


def _check_epilogue(gate, residual, q: torch.Tensor, out_shape: tuple, heads_q: int) -> None:
    if gate is not None:
        gate = validation.tensor("gate", gate)
        if not gate.dtype.is_floating_point:
            raise ValueError(f"gate must be a floating tensor, got dtype {gate.dtype}")
        if gate.device != q.device:
            raise ValueError(f"gate must be on q's device {q.device}, got {gate.device}")
        if gate.numel() != 1 and tuple(gate.shape) != (heads_q,):
            raise ValueError(
                f"gate must be a scalar (0-dim or 1 element) or per head of shape "
                f"({heads_q},), got shape {tuple(gate.shape)}"
            )
    if residual is not None:
        residual = validation.tensor("residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}"
            )
        if residual.dtype != q.dtype:
            raise ValueError(f"residual must have q's dtype {q.dtype}, got {residual.dtype}")
        if residual.device != q.device:
            raise ValueError(f"residual must be on q's device {q.device}, got {residual.device}")
    if (gate is None) != (residual is None):
        raise ValueError(
            "gate and residual must be given together (out = residual + tanh(gate) * attention)"
        )


# ----------------------------------------------------------------------------------------------
# Layouts: batched <-> packed
# ----------------------------------------------------------------------------------------------


# Uniform cu_seqlens of batched calls, kept per (batch, seqlen, device, stream): building them is
# two kernel launches each, a good part of the host time of a short call (decode, T2V) whose GPU
# time is tens of microseconds (on the CPU, two operators each: as long as the rest of a short
# call's checks). Per stream, so a cached tensor is always written earlier on the stream that
# reads it. Never cached under compilation (traced), CUDA graph capture (the tensor would only be
# written when the graph is replayed) or a dispatch mode (fake tensors: not real ones to keep).
# Built outside inference mode: a tensor made in it cannot be saved for backward, and a training
# call may reuse what a decode step under torch.inference_mode built. Nothing writes these
# tensors afterwards.
_UNIFORM_CU_SEQLENS: dict[tuple, torch.Tensor] = {}
_UNIFORM_CU_SEQLENS_MAX = 64


def uniform_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """int32 ``[0, seqlen, 2 * seqlen, ..., batch * seqlen]`` on ``device`` (cached, see above)."""
    return uniform_cu_seqlens_pair(batch, seqlen, seqlen, device)[0]


def uniform_cu_seqlens_pair(batch: int, seqlen_q: int, seqlen_k: int, device: torch.device):
    """The uniform ``(cu_seqlens_q, cu_seqlens_k)`` of a batched call, one cache lookup for both
    (the stream lookup is a good part of the cost)."""

    def build(seqlen: int) -> torch.Tensor:
        return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen

    if device.type not in ("cuda", "cpu") or torch.compiler.is_compiling():
        return build(seqlen_q), build(seqlen_k)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return build(seqlen_q), build(seqlen_k)
        stream = torch.cuda.current_stream(device).cuda_stream
    else:
        stream = None
    if _get_current_dispatch_mode() is not None:
        return build(seqlen_q), build(seqlen_k)
    key = (batch, seqlen_q, seqlen_k, device.type, device.index, stream)
    cached = _UNIFORM_CU_SEQLENS.get(key)
    if cached is None:
        if len(_UNIFORM_CU_SEQLENS) >= _UNIFORM_CU_SEQLENS_MAX:
            _UNIFORM_CU_SEQLENS.clear()
        with torch.inference_mode(False):
            cu_q = build(seqlen_q)
            cu_k = cu_q if seqlen_k == seqlen_q else build(seqlen_k)
        cached = _UNIFORM_CU_SEQLENS[key] = (cu_q, cu_k)
    return cached


def packed_inputs(layout: AttentionLayout, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k)`` in the packed layout. Batched ``(B, S, H, D)``
    becomes ``(B*S, H, D)`` (a view for every layout that allows one, a copy otherwise) with
    uniform cu_seqlens; packed input is returned as it is."""
    if not layout.batched:
        return q, k, v, cu_seqlens_q, cu_seqlens_k
    return (
        q.reshape(-1, *q.shape[2:]),
        k.reshape(-1, *k.shape[2:]),
        v.reshape(-1, *v.shape[2:]),
        *uniform_cu_seqlens_pair(layout.batch, layout.seqlen_q, layout.seqlen_k, q.device),
    )


def lse_batched(lse: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Packed ``[Hq, B*S]`` -> flash-attn's batched ``[B, Hq, S]`` (contiguous)."""
    return lse.reshape(lse.shape[0], batch, seqlen).transpose(0, 1).contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """(query slice, key slice) of every segment, read on the host."""
    cq, ck = validation.reference_host_values(OP_NAME, cu_seqlens_q, cu_seqlens_k)
    return [(slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def _apply_epilogue(attn: torch.Tensor, gate, residual, compute_dtype) -> torch.Tensor:
    """``residual + tanh(gate) * attn`` in ``compute_dtype``; gate scalar or per head (dim -2)."""
    g = torch.tanh(gate.to(compute_dtype))
    g = g.reshape(()) if g.numel() == 1 else g.reshape(-1, 1)
    return residual.to(compute_dtype) + g * attn.to(compute_dtype)


# ----------------------------------------------------------------------------------------------
# The reference (torch back end and test oracle)
# ----------------------------------------------------------------------------------------------


def _segment_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores ``[Hq, Sq, Sk]`` of one segment (``q [Sq, Hq, D]``, ``k [Sk, Hk, D]``, GQA)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("qhd,khd->hqk", q, k) * scale


def _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, compute_dtype):
    """Packed forward, segment by segment: ``(out [total_q, Hq, D], lse [Hq, total_q])`` in
    ``compute_dtype``. Differentiable through autograd."""
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for qs, ks in _segments(cu_seqlens_q, cu_seqlens_k):
        qi, ki, vi = q[qs], k[ks], v[ks]
        if ki.shape[0] == 0:  # no keys: the output is 0 and the LSE -inf (an empty softmax)
            outs.append(torch.zeros_like(qi))
            lses.append(qi.new_full((q.shape[1], qi.shape[0]), float("-inf")))
            continue
        s = _segment_scores(qi, ki, scale)
        lse = torch.logsumexp(s, dim=-1)  # [Hq, Sq]
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("hqk,khd->qhd", p, vi.repeat_interleave(group, dim=1)))
        lses.append(lse)
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0)
    return out, lse


def _reference_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale):
    """The attention backward written out, segment by segment (what the kernels compute)::

        P = exp(S - lse),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - delta),
        delta = rowsum(dO ∘ O) - dlse,  dQ = scale · dS K,  dK = scale · dSᵀ Q

    with dK, dV summed over the query heads of each GQA group."""
    cdt = accumulation_dtype(q.dtype)
    q, k, v, dout, out = (t.to(cdt) for t in (q, k, v, dout, out))
    lse = lse.to(cdt)
    Hq, Hk = q.shape[1], k.shape[1]
    group = Hq // Hk
    delta = (dout * out).sum(-1).transpose(0, 1)  # [Hq, total_q]
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks in _segments(cu_seqlens_q, cu_seqlens_k):
        if qs.stop == qs.start or ks.stop == ks.start:
            continue
        qi, ki, doi = q[qs], k[ks], dout[qs]
        vi = v[ks].repeat_interleave(group, dim=1)
        p = torch.exp(_segment_scores(qi, ki, scale) - lse[:, qs].unsqueeze(-1))  # [Hq, Sq, Sk]
        dv_h = torch.einsum("hqk,qhd->khd", p, doi)
        ds = p * (torch.einsum("qhd,khd->hqk", doi, vi) - delta[:, qs].unsqueeze(-1))
        dq[qs] = torch.einsum("hqk,khd->qhd", ds, ki.repeat_interleave(group, dim=1)) * scale
        dk_h = torch.einsum("hqk,qhd->khd", ds, qi) * scale
        dk[ks] = dk_h.unflatten(1, (Hk, group)).sum(2)
        dv[ks] = dv_h.unflatten(1, (Hk, group)).sum(2)
    return dq, dk, dv


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Plain-PyTorch :func:`cross_attention` (same arguments and layouts), differentiable through
    autograd. Computes in ``compute_dtype`` (default: float32, or float64 for float64 input),
    segment by segment (memory ``O(Hq * Sq_seg * Sk_seg)``), and returns that dtype."""
    layout = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, None, None)
    scale = validation.softmax_scale(softmax_scale, layout.head_dim)
    _check_epilogue(gate, residual, q, tuple(q.shape), layout.heads_q)
    cdt = compute_dtype or accumulation_dtype(q.dtype)
    out, lse = _reference_forward(
        *packed_inputs(layout, q, k, v, cu_seqlens_q, cu_seqlens_k), scale, cdt
    )
    if layout.batched:
        out = out.reshape(q.shape)
        lse = lse_batched(lse, layout.batch, layout.seqlen_q)
    if gate is not None:
        out = _apply_epilogue(out, gate, residual, cdt)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------------


def _kernel_input(x: torch.Tensor, backend: str) -> torch.Tensor:
    """The kernels read any token/head strides but need the channels contiguous; the CUDA kernels
    move 16 bytes at a time, so they also need token/head strides that are multiples of 8
    elements and a 16-byte aligned base. Anything else is copied once."""
    if x.is_contiguous() and (
        backend != "cuda" or (x.shape[-1] % 8 == 0 and x.data_ptr() % 16 == 0)
    ):
        return x  # the common case, decided in two cheap calls (host time of short calls)
    ok = x.stride(-1) == 1
    if backend == "cuda":
        ok = (
            ok
            and x.data_ptr() % 16 == 0
            and all(x.shape[d] <= 1 or x.stride(d) % 8 == 0 for d in range(x.dim() - 1))
        )
    return x if ok else x.contiguous()


def _kernels(backend: str):
    """The module holding ``attention_forward`` / ``attention_backward`` for ``backend``."""
    if backend == "cuda":
        return _backend.extension()
    from crosslmm_ops.triton import cross_attention as triton_kernels

    return triton_kernels


def _forward(backend, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits):
    """``(out, lse, kernel that ran)``."""
    if backend == "torch":
        with _backend.reference_mode(q.device):
            out, lse = _reference_forward(q, k, v, cu_q, cu_k, scale, accumulation_dtype(q.dtype))
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype).contiguous(), lse.to(lse_dtype).contiguous(), "reference"
    q, k, v = (_kernel_input(t, backend) for t in (q, k, v))
    cu_q, cu_k = _backend.kernel_index(cu_q), _backend.kernel_index(cu_k)
    out = _backend.new_output(q.shape, q.dtype, q.device)
    lse = _backend.new_output((q.shape[1], q.shape[0]), torch.float32, q.device)
    args = (q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, num_splits)
    if backend == "cuda":
        kernel = planner.attention_kernel(
            q.device, q.shape[-1], max_seqlen_q, scale, explain=False
        )[0]
        ran = _kernels(backend).attention_forward(*args, kernel)
    else:
        ran = _kernels(backend).attention_forward(*args)
    return out, lse, ran


def _backward_backend(backend: str, dlse, device: torch.device) -> str:
    """The CUDA backward has no LSE-gradient input: a gradient reaching the LSE (merging partial
    attentions in training) runs the Triton backward, or the reference without Triton."""
    if backend == "cuda" and dlse is not None:
        return "triton" if _backend.triton_runnable(device)[0] else "torch"
    return backend


def _backward(
    backend,
    dout,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    cu_q,
    cu_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    deterministic,
):
    if backend == "torch":
        with _backend.reference_mode(q.device):
            grads = _reference_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, scale)
        return tuple(g.to(q.dtype).contiguous() for g in grads) + ("reference",)
    q, k, v, dout, out = (_kernel_input(t, backend) for t in (q, k, v, dout, out))
    cu_q, cu_k = _backend.kernel_index(cu_q), _backend.kernel_index(cu_k)
    dq = _backend.new_output(q.shape, q.dtype, q.device)
    dk = _backend.new_output(k.shape, k.dtype, k.device)
    dv = _backend.new_output(v.shape, v.dtype, v.device)
    args = (
        dout,
        q,
        k,
        v,
        out,
        lse.contiguous(),
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        deterministic,
    )
    if backend == "cuda":  # dlse is None here (see _backward_backend)
        kernel = planner.attention_kernel(
            q.device, q.shape[-1], max_seqlen_q, backward=True, explain=False
        )[0]
        ran = _kernels(backend).attention_backward(*args, kernel)
    else:  # only the Triton kernels take dlse
        ran = _kernels(backend).attention_backward(*args, dlse=dlse)
    return dq, dk, dv, ran


# ----------------------------------------------------------------------------------------------
# The custom ops (torch.library): what torch.compile and autograd see
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("crosslmm::cross_attention_fwd", mutates_args=())
def _cross_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
        deterministic,
        backend,
    )


def forward_impl(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    num_splits,
    deterministic,
    backend,
    op: str = OP_NAME,
):
    """The packed forward on ``backend``, recorded under ``op``: ``(out, lse)``. The forward
    custom op's implementation (also the eager function's forward, and the local attention of
    the sharded op)."""
    out, lse, kernel = _forward(
        backend,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        num_splits,
    )
    planner.note(op, backend, kernel=kernel)
    return out, lse


@_cross_attention_fwd_op.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    num_splits,
    deterministic,
    backend,
):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("crosslmm::cross_attention_bwd", mutates_args=())
def _cross_attention_bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(
        dout,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        deterministic,
        backend,
    )


def backward_impl(
    dout,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    deterministic,
    backend,
):
    """The packed backward: ``(dq, dk, dv)``, recorded as ``cross_attention_backward``. The
    backward custom op's implementation (also the eager function's and the sharded op's)."""
    backend = _backward_backend(backend, dlse, q.device)
    *grads, kernel = _backward(
        backend,
        dout,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        deterministic,
    )
    planner.note(OP_NAME + "_backward", backend, kernel=kernel)
    return tuple(grads)


@_cross_attention_bwd_op.register_fake
def _(
    dout,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    deterministic,
    backend,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    ctx.params = inputs[5:8] + inputs[9:11]  # max_seqlen_q/k, softmax_scale, deterministic, backend
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    # An unused LSE then arrives as None, not zeros: the common case skips the dlse path.
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    backward = backward_impl if getattr(ctx, "eager", False) else _cross_attention_bwd_op
    dq, dk, dv = backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * 8


_cross_attention_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)
_CrossAttentionFunction = _backend.eager_function(
    "_CrossAttentionFunction", forward_impl, _setup_context, _backward_formula
)


def _cross_attention_fwd(q, k, v, *args):
    """The forward op for this call: the custom op, or in plain eager mode its autograd.Function
    twin (the same functions, without torch.library's per-call host cost)."""
    if _backend.eager_function_ok(q, k, v):
        if not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        ):
            return forward_impl(q, k, v, *args)  # no graph to record: skip apply's host cost
        return _CrossAttentionFunction.apply(q, k, v, *args)
    return _cross_attention_fwd_op(q, k, v, *args)


def _attended_pairs(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> int:
    """Σ over segments of (queries x keys): read from cu_seqlens when they are real tensors, else
    (under tracing) the bound from the longest segments."""
    try:
        lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
        return sum(a * b for a, b in zip(lq, lk))
    except Exception:  # noqa: BLE001 - fake/meta tensors have no values
        return (cu_q.shape[0] - 1) * max_q * max_k


# FLOPs for torch.utils.flop_counter.FlopCounterMode (which cannot see inside a custom op): the
# flash-attn's convention, 4·pairs·H·d forward (QKᵀ and PV) and 2.5x that backward.
@register_flop_formula(torch.ops.crosslmm.cross_attention_fwd, get_raw=True)
def _forward_flops(q, k, v, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs) -> int:
    return 4 * _attended_pairs(cu_q, cu_k, max_q, max_k) * q.shape[1] * q.shape[2]


@register_flop_formula(torch.ops.crosslmm.cross_attention_bwd, get_raw=True)
def _backward_flops(
    dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs
) -> int:
    return 10 * _attended_pairs(cu_q, cu_k, max_q, max_k) * q.shape[1] * q.shape[2]


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------


def _fast_ok(
    layout: AttentionLayout,
    dtype: torch.dtype,
    runnable: tuple[bool, str],
    *,
    dtypes: tuple,
    head_dims,
) -> tuple[bool, str]:
    if not runnable[0]:
        return runnable
    if dtype not in dtypes:
        return False, f"dtype {dtype} is not supported (only {', '.join(map(str, dtypes))})"
    if not head_dims(layout.head_dim):
        return False, f"head dim {layout.head_dim} is not supported"
    return True, ""


def _cuda_ok(layout: AttentionLayout, dtype: torch.dtype, device: torch.device):
    runnable = _backend.cuda_runnable(device)
    if runnable[0] and not hasattr(_backend.extension(), "attention_forward"):
        runnable = (False, "the CUDA extension was built without the attention kernels; rebuild it")
    return _fast_ok(
        layout, dtype, runnable, dtypes=_CUDA_DTYPES, head_dims=lambda d: d in _CUDA_HEAD_DIMS
    )


def _triton_ok(layout: AttentionLayout, dtype: torch.dtype, device: torch.device):
    runnable = _backend.triton_runnable(device)
    if runnable[0]:
        runnable = _backend.triton_dot_dtype_ok(dtype)
    return _fast_ok(
        layout,
        dtype,
        runnable,
        dtypes=_TRITON_DTYPES,
        head_dims=lambda d: d <= _TRITON_MAX_HEAD_DIM,
    )


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One validated call of the op and its back end (what :func:`prepare` returns): the op's
    internal interface, shared by :func:`cross_attention`, :func:`plan` and the sharded op."""

    layout: AttentionLayout
    scale: float
    backend: str
    reason: str

    def plan(self, op: str, device: torch.device) -> planner.Plan:
        """How the forward runs: back end, kernel, and why."""
        reasons = [self.reason]
        kernel = {"triton": "triton", "torch": "reference"}.get(self.backend)
        if self.backend == "cuda":
            choice, why = planner.attention_kernel(
                device, self.layout.head_dim, self.layout.max_seqlen_q, self.scale
            )
            kernel = planner.KERNEL_NAMES.get(choice, choice)  # as the extension reports it
            reasons.append(f"kernel: {why}")
            choice, why = planner.attention_kernel(
                device, self.layout.head_dim, self.layout.max_seqlen_q, backward=True
            )
            reasons.append(
                f"backward kernel {planner.KERNEL_NAMES.get(choice, choice)} (without "
                f"a gradient on the LSE): {why}"
            )
        return planner.Plan(op, self.backend, None, kernel, tuple(reasons))


def prepare(
    q,
    k,
    v,
    *,
    softmax_scale=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    num_splits=0,
    return_lse=False,
    deterministic=False,
    gate=None,
    residual=None,
    backend=None,
    op: str = OP_NAME,
) -> AttentionCall:
    """Validate one call of :func:`cross_attention` (the same arguments) and choose its back end
    (:func:`crosslmm_ops.planner.choose_backend`, errors reported under ``op``)."""
    layout = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = validation.softmax_scale(softmax_scale, layout.head_dim)
    validation.num_splits(num_splits)
    validation.flag("return_lse", return_lse)
    validation.flag("deterministic", deterministic)
    _check_epilogue(gate, residual, q, tuple(q.shape), layout.heads_q)
    return call_for(layout, scale, q.dtype, q.device, backend, op)


def call_for(
    layout: AttentionLayout,
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
    backend: str | None,
    op: str = OP_NAME,
) -> AttentionCall:
    """The call of a validated ``layout``, its back end chosen (also what the materialised path
    of projected attention plans with)."""
    chosen, reason = planner.choose_backend(
        op,
        backend,
        device,
        cuda_ok=lambda: _cuda_ok(layout, dtype, device),
        triton_ok=lambda: _triton_ok(layout, dtype, device),
    )
    return AttentionCall(layout, scale, chosen, reason)


def finish(
    call: AttentionCall,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    return_lse: bool,
    gate=None,
    residual=None,
):
    """The packed ``(out, lse)`` of a call in the caller's layout, with the epilogue applied:
    what :func:`cross_attention` returns."""
    layout = call.layout
    if layout.batched:
        out = out.reshape(q.shape)
        if return_lse:  # a copy (flash-attn's layout): only when asked for
            lse = lse_batched(lse, layout.batch, layout.seqlen_q)
    if gate is not None:
        out = _apply_epilogue(out, gate, residual, accumulation_dtype(q.dtype)).to(q.dtype)
    return (out, lse) if return_lse else out


def plan(q, k, v, **kwargs) -> planner.Plan:
    """How :func:`cross_attention` would run this call (:func:`crosslmm_ops.explain`)."""
    return prepare(q, k, v, **kwargs).plan(OP_NAME, q.device)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """``softmax(q kᵀ · softmax_scale) v``, non-causal, with flash-attn's layouts.

    * batched: ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hk, D)`` -> ``out (B, Sq, Hq, D)``, ``lse
      (B, Hq, Sq)``;
    * packed (varlen): ``q (total_q, Hq, D)``, ``k, v (total_k, Hk, D)`` with int32
      ``cu_seqlens_q / cu_seqlens_k`` of shape ``[B + 1]``: query segment ``i`` attends to key
      segment ``i`` only -> ``out (total_q, Hq, D)``, ``lse (Hq, total_q)``. A segment without
      keys outputs zeros (lse ``-inf``); one without queries is skipped. ``max_seqlen_q/k``
      default to the longest segment (read from ``cu_seqlens``, which is also checked).

    Any ``Sq``, ``Sk``; GQA/MQA (``Hq`` a multiple of ``Hk``; query head ``h`` reads key head
    ``h // (Hq // Hk)``). ``softmax_scale`` defaults to ``1 / sqrt(D)``. ``return_lse=True`` also
    returns the natural-log log-sum-exp of the scaled scores, float32 (float64 for float64 input);
    it is differentiable, so partial results can be merged in training
    (:func:`merge_attention_states`).

    ``gate`` and ``residual`` (given together) apply DCAL's epilogue ``out = residual +
    tanh(gate) * attention`` (in float32), ``gate`` a scalar tensor (0-dim or 1 element) or per
    query head ``(Hq,)``, ``residual`` of the output's shape and dtype; differentiable in both. The
    LSE stays the attention's own.

    ``num_splits``: how many ranges each segment's keys are split into (flash-decoding); ``0``
    picks from the occupancy of the GPU. ``deterministic=True`` asks for a backward whose result
    is bitwise reproducible (the Triton backward always is). ``backend``: ``"auto"`` (default; env
    ``CROSSLMM_BACKEND``), ``"cuda"`` (fp16/bf16, head dims 64 and 128), ``"triton"`` (fp16, bf16,
    fp32, head dims up to 256) or ``"torch"``; :func:`crosslmm_ops.last_backend` says which ran.

    Meta (and fake) tensors give outputs of the right shapes and dtypes without running a back
    end; ``max_seqlen_q/k`` then default to the numbers of packed tokens.
    """
    call = prepare(
        q,
        k,
        v,
        softmax_scale=softmax_scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        num_splits=num_splits,
        return_lse=return_lse,
        deterministic=deterministic,
        gate=gate,
        residual=residual,
        backend=backend,
    )
    return run(
        call,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        num_splits=num_splits,
        return_lse=return_lse,
        deterministic=deterministic,
        gate=gate,
        residual=residual,
    )


def run(
    call: AttentionCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    *,
    num_splits: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
):
    """What :func:`cross_attention` returns for a call whose arguments are checked and whose
    back end is chosen (``call``, from :func:`prepare` or :func:`call_for`): the materialised
    path of projected attention checks its own arguments and runs here without a second check."""
    layout = call.layout
    out, lse = _cross_attention_fwd(
        *packed_inputs(layout, q, k, v, cu_seqlens_q, cu_seqlens_k),
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        call.scale,
        num_splits,
        deterministic,
        call.backend,
    )
    return finish(call, q, out, lse, return_lse, gate, residual)


planner.register(OP_NAME, cross_attention, plan)


def _stacked(name: str, value) -> torch.Tensor:
    """A stacked tensor, or a list/tuple of tensors of one shape, dtype and device, stacked."""
    if isinstance(value, torch.Tensor):
        return value
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(t, torch.Tensor) for t in value)
    ):
        raise TypeError(
            f"{name} must be a tensor or a non-empty list of tensors, got {type(value).__name__}"
        )
    first = value[0]
    for i, t in enumerate(value):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, {name}[0] "
                f"is {tuple(first.shape)} {first.dtype} on {first.device}: all must "
                "match"
            )
    return torch.stack(list(value))


def merge_attention_states(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention computed over disjoint key sets into attention over their union.

    ``outs``: ``S`` partial outputs, stacked ``[S, ..., total_q, H, D]`` or a list of
    ``[..., total_q, H, D]``; ``lses``: their LSEs, ``[S, ..., H, total_q]`` or a list (packed
    layout ``outs [S, total_q, H, D]``, ``lses [S, H, total_q]``; batched ``outs [S, B, Sq, H, D]``,
    ``lses [S, B, H, Sq]`` - exactly what :func:`cross_attention` returns with
    ``return_lse=True``). Returns ``(out [..., total_q, H, D]`` in the partials' dtype, ``lse
    [..., H, total_q]`` float32 (float64 for float64 input)). Partials with ``lse = -inf`` (no
    keys) weigh nothing; when every partial is empty the result is 0 and ``-inf``, never NaN.
    Plain differentiable torch ops, on any device.
    """
    outs, lses = _stacked("outs", outs), _stacked("lses", lses)
    if not outs.dtype.is_floating_point or not lses.dtype.is_floating_point:
        raise ValueError(
            f"outs and lses must be floating tensors, got {outs.dtype} and {lses.dtype}"
        )
    if lses.device != outs.device:
        raise ValueError(f"lses must be on outs' device {outs.device}, got {lses.device}")
    if (
        outs.dim() < 4
        or lses.dim() != outs.dim() - 1
        or lses.shape != (*outs.shape[:-3], outs.shape[-2], outs.shape[-3])
    ):
        raise ValueError(
            f"outs must be [S, ..., total_q, H, D] and lses [S, ..., H, total_q], got "
            f"outs {tuple(outs.shape)} and lses {tuple(lses.shape)}"
        )
    cdt = accumulation_dtype(outs.dtype)
    lses = lses.to(cdt)
    top = lses.amax(0)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp(lses - top)  # [S, ..., H, total_q]
    total = w.sum(0)
    has_keys = total > 0
    safe = torch.where(has_keys, total, torch.ones_like(total))
    weights = (w / safe).transpose(-1, -2).unsqueeze(-1)  # [S, ..., total_q, H, 1]
    out = (weights * outs.to(cdt)).sum(0)
    lse = torch.where(has_keys, top + torch.log(safe), torch.full_like(top, float("-inf")))
    return out.to(outs.dtype), lse


def _query_index(query_index) -> torch.Tensor:
    """``query_index`` as a flat int64 CPU tensor; an empty list or tuple is valid (no queries)."""
    if isinstance(query_index, (list, tuple)) and len(query_index) == 0:
        return torch.empty(0, dtype=torch.long)
    idx = torch.as_tensor(query_index)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"query_index must hold integers, got dtype {idx.dtype}")
    return idx.to(torch.long).reshape(-1).cpu()


@torch.no_grad()
def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    query_index,
    lse: torch.Tensor | None = None,
    block_size: int = 4096,
) -> torch.Tensor:
    """The softmax probabilities of a few queries, for inspection (attention maps); not
    differentiable.

    ``query_index``: indices into ``Sq`` (batched) or ``total_q`` (packed). ``lse``: as returned by
    :func:`cross_attention` (``(B, Hq, Sq)`` / ``(Hq, total_q)``); recomputed when left out. Keys
    are visited ``block_size`` at a time, so memory is ``O(n * Hq * Sk)``, never ``Sq * Sk``.

    Returns float32 (float64 for float64 input) probabilities:

    * batched: ``[B, n, Hq, Sk]`` - for each batch element, its queries ``query_index``;
    * packed: ``[n, Hq, L]`` with ``L`` the longest key segment among the chosen queries'
      segments; row ``r`` holds its own segment's keys ``0 .. Sk_seg - 1`` and zeros after.

    An empty ``query_index`` (``[]``) gives ``n = 0`` (and ``L = 0``). On the meta device the
    batched layout returns meta probabilities; the packed layout's ``L`` depends on
    ``cu_seqlens``' values, which meta tensors do not have, so it is refused.
    """
    layout = check_inputs(q, k, k, cu_seqlens_q, cu_seqlens_k, None, None)
    scale = validation.softmax_scale(softmax_scale, layout.head_dim)
    if not validation.is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (keys per block), got {block_size!r}")
    idx = _query_index(query_index)
    limit = layout.seqlen_q if layout.batched else layout.total_q
    if idx.numel() and (idx.min() < -limit or idx.max() >= limit):
        raise ValueError(f"query_index must index the {limit} queries, got {idx.tolist()}")
    idx = idx % max(limit, 1)
    cdt = accumulation_dtype(q.dtype)
    qp, kp, _, cu_q, cu_k = packed_inputs(layout, q, k, k, cu_seqlens_q, cu_seqlens_k)
    if layout.batched:
        rows = (torch.arange(layout.batch).unsqueeze(1) * layout.seqlen_q + idx).reshape(-1)
        expected_lse_shape = (layout.batch, layout.heads_q, layout.seqlen_q)
    else:
        rows = idx
        expected_lse_shape = (layout.heads_q, layout.total_q)
    if lse is not None:
        validation.tensor("lse", lse)
        if lse.device != q.device:
            raise ValueError(f"lse must be on q's device {q.device}, got {lse.device}")
        if tuple(lse.shape) != expected_lse_shape:
            raise ValueError(f"lse must have shape {expected_lse_shape}, got {tuple(lse.shape)}")
        lse = lse.to(cdt)
        lse_p = lse.transpose(0, 1).reshape(layout.heads_q, -1) if layout.batched else lse
    if layout.batched:  # uniform segments: known on the host, no device read (works on meta)
        cq, ck = (
            [i * n for i in range(layout.batch + 1)] for n in (layout.seqlen_q, layout.seqlen_k)
        )
    elif q.device.type == "meta":
        raise NotImplementedError(
            "attention_weights of the packed layout on the meta device: the output's width is the "
            "longest key segment of the chosen queries, which depends on cu_seqlens' values; use "
            "the batched layout or real tensors"
        )
    else:
        cq, ck = cu_q.tolist(), cu_k.tolist()
    seg_of = torch.searchsorted(torch.tensor(cq[1:], dtype=torch.long), rows, right=True)
    width = (
        layout.seqlen_k
        if layout.batched
        else max((ck[s + 1] - ck[s] for s in seg_of.tolist()), default=0)
    )
    probs = torch.zeros(rows.numel(), layout.heads_q, width, dtype=cdt, device=q.device)
    for seg in seg_of.unique().tolist():
        picked = (seg_of == seg).nonzero().reshape(-1)
        qi = qp[rows[picked].to(q.device)].to(cdt)  # [m, Hq, D]
        keys = kp[ck[seg] : ck[seg + 1]]
        blocks = range(0, keys.shape[0], block_size)
        if lse is None:  # running log-sum-exp over key blocks
            seg_lse = qi.new_full((layout.heads_q, qi.shape[0]), float("-inf"))
            for j in blocks:
                s = _segment_scores(qi, keys[j : j + block_size].to(cdt), scale)
                seg_lse = torch.logaddexp(seg_lse, torch.logsumexp(s, -1))
        else:
            seg_lse = lse_p[:, rows[picked].to(q.device)]
        for j in blocks:
            s = _segment_scores(qi, keys[j : j + block_size].to(cdt), scale)  # [Hq, m, blk]
            probs[picked.to(q.device), :, j : j + s.shape[-1]] = torch.exp(
                s - seg_lse.unsqueeze(-1)
            ).transpose(0, 1)
    if layout.batched:
        probs = probs.reshape(layout.batch, idx.numel(), layout.heads_q, width)
    return probs
