"""crosslmm_ops.distributed: frame-sharded cross-attention and training on torch.distributed.

Long videos outgrow one GPU: 1,000 frames are 729k original tokens. CrossLMM's cross-attention has
few queries (the pooled visual tokens, the text) and many keys (every original token), so the
natural split is by frames: each rank of a process group holds its frames' original tokens (and
their K/V, or the raw tokens for the projection-fused path), every rank holds all the (small)
queries, each computes attention over its key shard with its log-sum-exp, and the partial results
are merged exactly by their LSE (the split-KV merge)::

    m = all_reduce_max(lse_r),  w_r = exp(lse_r - m)
    out = all_reduce_sum(w_r * out_r) / all_reduce_sum(w_r),   lse = m + log(all_reduce_sum(w_r))

(a max of the LSE and one sum of ``(w_r * out_r, w_r)`` packed into one buffer, per call). A query
whose keys all live elsewhere gets ``lse_r = -inf`` and weighs nothing; a query without keys
anywhere gets 0 and ``-inf``, as :func:`~crosslmm_ops.cross_attention` gives a segment without keys.

What is replicated and what is sharded:

* **replicated** (the same on every rank): the queries ``q``, ``cu_seqlens_q``, the weights of the
  projection-fused path (``w_k, w_v``, biases, the norm's parameters), the outputs ``out`` and
  ``lse``, and the gradients that reach them (the loss is computed identically on every rank from
  the replicated output, as in Megatron's tensor parallelism);
* **sharded**: the keys and values ``k, v`` (or the tokens ``x``) of this rank's frames, with this
  rank's ``cu_seqlens_k``: segment ``i`` holds this rank's part of key segment ``i`` (possibly
  empty; every rank has the same number of segments).

Backward, exactly: with the *global* ``out`` and ``lse``, the local attention's backward gives this
rank's ``dk, dv`` exactly and its part of ``dq`` (``P = exp(S - lse)`` restricted to the local
keys, ``delta = rowsum(dout * out) - dlse``); ``dq`` is the sum of the parts (one all-reduce). The
materialised path does exactly that with the op's own backward kernels
(:func:`sharded_cross_attention`); the projection-fused path composes the differentiable local op
with the merge (:func:`sharded_projected_cross_attention`), whose reduction has an identity
backward, and all-reduces the gradients of its replicated inputs (one buffer).

Gradient conventions (``grad_scale``; :class:`FrameShard`'s ``gradients``):

* ``"exact"`` (``grad_scale=1``, the ops' default): every rank holds the exact gradient of what it
  holds: replicated inputs the full gradient (the same on every rank), shards their own. A
  parameter that is applied to the local frames *outside* these ops (a vision tower, a projector,
  a K/V projection on the materialised path) then holds this rank's part of its gradient: the
  parts must be *summed* over the group, while parameters used only on replicated data must not.
* ``"mean"`` (``grad_scale=world size``, :class:`FrameShard`'s default): the gradient flowing into
  everything computed from the local frames is multiplied by the group size (the sharded keys,
  values and tokens get ``world_size x`` their exact gradient). Replicated tensors still get their
  exact gradient. Then the *average* over the ranks, which DDP and FSDP take, is the exact
  gradient of every parameter, whichever side it is on. Use this to train.

Frame-local attention (V2V with ``scope="frame"``) needs no communication at all when each rank
holds whole frames *and their queries*: :func:`frame_local_cross_attention` (sharded in and out).
Inside a model whose LLM sequence is replicated the frame-local queries are replicated too; their
outputs then go through the same merge (a query's frame lives on one rank, so the merge returns that
rank's result exactly, bit for bit).

Module level: a :class:`FrameShard` describes how one batch's frames are split over the ranks;
:meth:`FrameShard.memory` builds a :class:`~crosslmm_ops.nn.VisionMemory` holding only this rank's
tokens, and every DCAL (:class:`~crosslmm_ops.nn.DualCrossAttention`) reading that memory runs the
sharded attention. :class:`~crosslmm_ops.models.FrameShardedCrossLMM` wraps the reference model
(:class:`~crosslmm_ops.models.CrossLMMForConditionalGeneration`): the vision tower runs on this
rank's frames only, the pooled tokens (small) are all-gathered so every rank builds the same LLM
sequence, and the memory is sharded. The LLM computation is replicated over the frame group; the
data-parallel dimension is *between* frame groups (ranks of one frame group see the same samples).
With ``gradients="mean"``, DDP or FSDP2 over all ranks averages correctly (see
``examples/train_distributed.py``).

Replicated arguments are checked: before any other collective, each call compares across the
group what is cheap to compare (the shapes and dtype of ``q``, ``cu_seqlens_q`` in full, the head
counts and the number of key segments; one small all-gather, one host read) and whether every
rank's arguments passed its local checks, so that a mismatch is a ``ValueError`` on every rank
instead of a collective that aborts, hangs or silently merges different queries. The debug mode
(``check_replicas=True``, or ``CROSSLMM_CHECK_REPLICAS=1`` in the environment) also compares the
contents of ``q`` and of the other replicated tensors (a host copy and a hash of each, per call).

Collectives: the ops run on ``group`` (default: the default group). Inside DDP/FSDP training give
the frame sharding its own group (:func:`frame_group`), so that its collectives, issued from
autograd, can never interleave differently with DDP's or FSDP's on one communicator.
Not supported: ``torch.compile`` through these functions (collectives and host reads), generation
with a sharded memory (beam reordering), temporal pooling across ranks.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.distributed as dist

from crosslmm_ops import environment, planner
from crosslmm_ops.ops import cross_attention as attention
from crosslmm_ops.ops import projected_attention as projected
from crosslmm_ops.ops import validation
from crosslmm_ops.ops.cross_attention import cross_attention
from crosslmm_ops.ops.projected_attention import projected_cross_attention

GRADIENTS = ("exact", "mean")
OP_NAME = "sharded_cross_attention"
PROJECTED_OP_NAME = "sharded_projected_cross_attention"


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "crosslmm_ops.distributed needs torch.distributed initialised: call "
            "torch.distributed.init_process_group first (torchrun sets the "
            "environment for it)"
        )


def _rank_and_size(group) -> tuple[int, int]:
    _require_initialized()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


_frame_groups: dict = {}


def frame_group(ranks: Sequence[int] | None = None):
    """A process group for frame sharding over ``ranks`` (default: all), created on first use and
    cached. Creating a group is collective: every rank of the default group must call this, in
    the same order (e.g. once at start-up). A dedicated group keeps the frame sharding's
    collectives, which autograd issues during backward, apart from DDP's and FSDP's."""
    _require_initialized()
    key = tuple(range(dist.get_world_size())) if ranks is None else tuple(int(r) for r in ranks)
    if key not in _frame_groups:
        _frame_groups[key] = dist.new_group(list(key))
    return _frame_groups[key]


def _check_grad_scale(grad_scale) -> float:
    if (
        isinstance(grad_scale, bool)
        or not isinstance(grad_scale, (int, float))
        or not math.isfinite(grad_scale)
        or grad_scale <= 0
    ):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")
    return float(grad_scale)


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums over ranks in float32 at least: adding bf16 partial sums would round at every rank.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Replicated arguments: the same on every rank
# ----------------------------------------------------------------------------------------------

CHECK_REPLICAS_ENV = environment.CHECK_REPLICAS_VAR

_SHAPE_SLOTS = 4  # the replicated tensors have at most 4 dims
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def _check_replicas_mode(check_replicas) -> bool:
    if check_replicas is None:
        return environment.CHECK_REPLICAS  # the debug mode's default, read once at import
    if not isinstance(check_replicas, bool):
        raise ValueError(
            f"check_replicas must be a bool or None (None: {CHECK_REPLICAS_ENV}), "
            f"got {check_replicas!r}"
        )
    return check_replicas


def _digest(t: torch.Tensor) -> int:
    """A hash of ``t``'s values (bitwise; host copy), as an int64."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _describe(t, contents: bool) -> list[int]:
    """A fixed-length description of one replicated argument: given, dims, shape, dtype and, with
    ``contents``, a hash of its values (0 where not taken)."""
    if not isinstance(t, torch.Tensor):
        return [0] * (_SHAPE_SLOTS + 4)
    shape = list(t.shape[:_SHAPE_SLOTS]) + [-1] * (_SHAPE_SLOTS - min(t.dim(), _SHAPE_SLOTS))
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    return [1, t.dim(), *shape, code, _digest(t) if contents and not t.is_meta else 0]


def _shape_text(values: list[int]) -> str:
    given, dim, *shape, code, _ = values
    if not given:
        return "None"
    dtype = str(_DTYPES[code]).replace("torch.", "") if code >= 0 else "other"
    return f"{tuple(shape[:dim])} {dtype}"


def _tail(t, n: int) -> tuple[int, ...]:
    """The last ``n`` sizes of ``t`` (zeros for anything else)."""
    if not isinstance(t, torch.Tensor) or t.dim() < n:
        return (0,) * n
    return tuple(t.shape[t.dim() - n :])


def _collective_device(group) -> torch.device:
    """Where a small collective of ``group`` runs: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_replicated(group, check, replicated: dict, matched: dict, check_replicas):
    """Run this rank's argument checks ``check()`` and compare, over the ranks of ``group``, the
    arguments that must agree, raising the same ``ValueError`` on every rank when they do not:

    * ``replicated``: name -> tensor (or None), the same on every rank: shape and dtype always,
      the values of ``cu_seqlens_q`` always, of every other one in the debug mode
      (``check_replicas``: True, or None for ``CROSSLMM_CHECK_REPLICAS``);
    * ``matched``: name -> tuple of ints that every rank must share (head counts, segments).

    One all-gather of a few ints (and one host read of the result), on every call, before any
    other collective: a rank whose local checks fail still takes part, so the others raise too
    instead of waiting in the next collective. Returns what ``check()`` returned."""
    rank, world = _rank_and_size(group)
    full = False
    try:
        full = _check_replicas_mode(check_replicas)
        result, error = check(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective
        result, error = None, exc
    if world == 1:
        if error is not None:
            raise error
        return result
    # The layout of the description depends only on the names, the same on every rank.
    fields = [("check_replicas", [int(full)])]
    for name, t in replicated.items():
        fields.append((name, _describe(t, full or name == "cu_seqlens_q")))
    for name, values in matched.items():
        fields.append((name, list(values)))
    flat = [int(error is None)] + [v for _, values in fields for v in values]
    mine = torch.tensor(flat, dtype=torch.int64, device=_collective_device(group))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world) if not table[r][0]]
    if failed:
        raise ValueError(
            f"rank(s) {failed} of the group rejected their arguments (their error "
            "says why); every rank stops here"
        )
    offset = 1
    for name, values in fields:
        cut = slice(offset, offset + len(values))
        offset += len(values)
        per_rank = [row[cut] for row in table]
        if all(v == per_rank[0] for v in per_rank):
            continue
        if name == "check_replicas":
            raise ValueError(
                f"check_replicas must be the same on every rank (argument or "
                f"{CHECK_REPLICAS_ENV}), got "
                + ", ".join(f"rank {r}: {bool(v[0])}" for r, v in enumerate(per_rank))
            )
        if name in matched:
            raise ValueError(
                f"{name} must be the same on every rank of the group, got "
                + ", ".join(f"rank {r}: {tuple(v)}" for r, v in enumerate(per_rank))
            )
        shapes = [_shape_text(v) for v in per_rank]
        if any(x != shapes[0] for x in shapes):
            raise ValueError(
                f"{name} is replicated: it must have the same shape and dtype on "
                "every rank of the group, got "
                + ", ".join(f"rank {r}: {x}" for r, x in enumerate(shapes))
            )
        differ = [r for r, v in enumerate(per_rank) if v != per_rank[0]]
        raise ValueError(
            f"{name} is replicated: it must hold the same values on every rank of the "
            f"group, but rank(s) {differ} differ from rank 0"
        )
    return result


# ----------------------------------------------------------------------------------------------
# Collectives as autograd functions
# ----------------------------------------------------------------------------------------------


class _ReplicatedInputs(torch.autograd.Function):
    """Replicated tensors entering this rank's local (sharded) computation: identity forward; the
    backward sums their gradients over the group (one all-reduce of one flat buffer for all of
    them, so every call issues exactly one collective) and divides by ``grad_scale``, which
    undoes the scaling of the sharded side (``"mean"``), leaving the exact gradient."""

    @staticmethod
    def forward(ctx, group, grad_scale, *tensors):
        ctx.group, ctx.grad_scale = group, grad_scale
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        if not wanted:
            return (None, None) + (None,) * len(grads)
        dtype = (
            torch.float64 if any(grads[i].dtype == torch.float64 for i in wanted) else torch.float32
        )
        flat = torch.cat([grads[i].reshape(-1).to(dtype) for i in wanted])
        dist.all_reduce(flat, group=ctx.group)
        if ctx.grad_scale != 1.0:
            flat = flat / ctx.grad_scale
        out = [None] * len(grads)
        offset = 0
        for i in wanted:
            n = grads[i].numel()
            out[i] = flat[offset : offset + n].view(grads[i].shape).to(grads[i].dtype)
            offset += n
        return (None, None) + tuple(out)


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` of a tensor each rank computed from its shard. Backward: every rank
    holds the same gradient of the (replicated) sum, which is also the gradient of this rank's
    term: passed through, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        ctx.grad_scale = grad_scale
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.grad_scale if ctx.grad_scale != 1.0 else grad), None, None


def _merge(out_r: torch.Tensor, lse_r: torch.Tensor, group, grad_scale: float):
    """The global ``(out, lse)`` from this rank's partial ``(out_r, lse_r)`` (``out_r [..., S, H,
    D]``, ``lse_r [..., H, S]``, either cross_attention layout). Differentiable in ``out_r`` and
    ``lse_r`` (the reduction's backward is the identity times ``grad_scale``). ``out`` in
    ``out_r``'s dtype, ``lse`` float32 (float64 for float64)."""
    cdt = _reduce_dtype(out_r.dtype)
    lse_r = lse_r.to(cdt)
    # The common reference m only keeps exp() in range: out and lse do not depend on it (their
    # derivative with respect to m is 0), so it is taken without a gradient.
    top = lse_r.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp(lse_r - top)  # an empty shard: exp(-inf) = 0, no NaN
    weighted = w.transpose(-1, -2).unsqueeze(-1) * out_r.to(cdt)
    flat = _SumOverRanks.apply(torch.cat([weighted.reshape(-1), w.reshape(-1)]), group, grad_scale)
    num = flat[: weighted.numel()].view(weighted.shape)
    den = flat[weighted.numel() :].view(w.shape)
    has_keys = den > 0
    safe = torch.where(has_keys, den, torch.ones_like(den))
    out = num / safe.transpose(-1, -2).unsqueeze(-1)
    lse = torch.where(has_keys, top + torch.log(safe), torch.full_like(top, float("-inf")))
    return out.to(out_r.dtype), lse


class _ShardedAttention(torch.autograd.Function):
    """Materialised sharded attention on the packed layout: the local forward kernel, the merge,
    and a backward that runs the local backward kernel with the *global* ``out`` and ``lse``
    (exact: see the module docstring) and all-reduces ``dq``. The CUDA backward kernel runs
    whenever no gradient reaches the LSE, as for :func:`~crosslmm_ops.cross_attention`."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale,
        num_splits,
        deterministic,
        backend,
        group,
        grad_scale,
    ):
        # The custom op's implementation, not the op: inside this Function there is no autograd
        # to record, and torch.library's dispatch costs host time per call.
        out_r, lse_r = attention.forward_impl(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, num_splits, deterministic, backend
        )
        out, lse = _merge(out_r, lse_r, group, 1.0)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.params = (max_q, max_k, scale, deterministic, backend)
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention.backward_impl(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
        if ctx.needs_input_grad[0]:
            total = dq.to(_reduce_dtype(dq.dtype))
            dist.all_reduce(total, group=ctx.group)
            dq = total.to(q.dtype)
        else:
            dq = None
        if ctx.grad_scale != 1.0:
            dk, dv = dk * ctx.grad_scale, dv * ctx.grad_scale
        return (dq, dk, dv) + (None,) * 10


# ----------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------


def sharded_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str | None = None,
    grad_scale: float = 1.0,
    check_replicas: bool | None = None,
):
    """:func:`crosslmm_ops.cross_attention` with the keys and values sharded over the ranks of
    ``group`` (default: the default group); the result is the one attention over all ranks' keys
    would give, on every rank.

    * ``q`` replicated (the same on every rank): ``(B, Sq, Hq, D)`` or packed ``(total_q, Hq, D)``
      with ``cu_seqlens_q`` (the same on every rank);
    * ``k, v`` this rank's shard: ``(B, Sk_r, Hk, D)`` (``Sk_r`` may differ between ranks, 0
      included) or packed ``(total_k_r, Hk, D)`` with this rank's ``cu_seqlens_k`` (segment ``i``
      = this rank's part of key segment ``i``, possibly empty); ``max_seqlen_k``: this rank's;
    * returns ``out`` (``q``'s layout and dtype) and with ``return_lse=True`` the LSE over all
      keys, replicated on every rank. A query without keys on any rank gets 0 and ``-inf``.

    Differentiable: ``dq`` is the full gradient on every rank (one all-reduce in the backward),
    ``dk, dv`` the exact gradient of this rank's shard times ``grad_scale`` (1: exact; the group
    size: the ``"mean"`` convention of the module docstring). The gradient reaching ``out`` and
    ``lse`` must be the same on every rank (a replicated loss). Collectives per call: three in the
    forward (the agreement check below; max of the LSE; one sum of the weighted outputs and
    weights), one in the backward.
    ``softmax_scale``, ``num_splits``, ``deterministic``, ``backend``: as for
    :func:`~crosslmm_ops.cross_attention`, for the local attention
    (``last_backend("sharded_cross_attention")`` says which ran).

    ``q`` and ``cu_seqlens_q`` are checked to agree over the group (shapes always, and
    ``cu_seqlens_q``'s values; ``q``'s values too with ``check_replicas=True`` or
    ``CROSSLMM_CHECK_REPLICAS=1``): a mismatch raises the same ``ValueError`` on every rank."""
    _rank_and_size(group)

    def check():
        # The op's own validation and back-end choice (errors name this op).
        call = attention.prepare(
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
            backend=backend,
            op=OP_NAME,
        )
        return call, _check_grad_scale(grad_scale)

    call, grad_scale = _check_replicated(
        group,
        check,
        {"q": q, "cu_seqlens_q": cu_seqlens_q},
        {
            "the key/value heads and head dim (k.shape[-2:])": _tail(k, 2),
            "the number of key segments (len(cu_seqlens_k))": _tail(cu_seqlens_k, 1),
        },
        check_replicas,
    )
    layout = call.layout
    qp, kp, vp, cu_q, cu_k = attention.packed_inputs(layout, q, k, v, cu_seqlens_q, cu_seqlens_k)
    out, lse = _ShardedAttention.apply(
        qp,
        kp,
        vp,
        cu_q,
        cu_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        call.scale,
        num_splits,
        deterministic,
        call.backend,
        group,
        grad_scale,
    )
    planner.note(OP_NAME, call.backend, kernel=planner.last_kernel(attention.OP_NAME))
    return attention.finish(call, q, out, lse, return_lse)


def sharded_projected_cross_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    *,
    group=None,
    grad_scale: float = 1.0,
    return_lse: bool = False,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    check_replicas: bool | None = None,
    **kwargs,
):
    """:func:`crosslmm_ops.projected_cross_attention` with the tokens ``x`` sharded over the ranks
    of ``group``: ``x`` (``(B, Sk_r, Dv)`` or packed ``(total_k_r, Dv)`` with this rank's
    ``cu_seqlens_k``) holds this rank's tokens; ``q``, the weights, biases and norm parameters are
    replicated. Every other argument (``softmax_scale``, ``cu_seqlens_q/k``, ``max_seqlen_q/k``,
    ``norm``, ``norm_eps``, ``num_splits``, ``path``, ``backend``) as for that op, applied to the
    local tokens.

    Differentiable: ``q``, ``w_k``, ``w_v``, ``b_k``, ``b_v``, ``norm_weight``, ``norm_bias`` get
    their full gradient on every rank (one all-reduce of one buffer in the backward), ``x`` the
    exact gradient of its shard times ``grad_scale``. ``path="auto"`` decides from this rank's
    shapes; the paths give the same function, and the collectives are the same whichever runs.
    The replicated arguments are checked to agree over the group as for
    :func:`sharded_cross_attention` (``check_replicas``: also the values of ``q``, the weights,
    biases and norm parameters).
    """
    _rank_and_size(group)
    names = ("q", "w_k", "w_v", "b_k", "b_v", "norm_weight", "norm_bias")
    tensors = (q, w_k, w_v, b_k, b_v, norm_weight, norm_bias)
    cu_q, cu_k = kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k")

    def check():
        validation.flag("return_lse", return_lse)
        # The op checks these again; here they are checked before the collectives.
        projected.check_inputs(
            q,
            x,
            w_k,
            w_v,
            b_k,
            b_v,
            cu_q,
            cu_k,
            kwargs.get("max_seqlen_q"),
            kwargs.get("max_seqlen_k"),
            kwargs.get("norm"),
            norm_weight,
            norm_bias,
            kwargs.get("norm_eps", 1e-6),
        )
        return _check_grad_scale(grad_scale)

    grad_scale = _check_replicated(
        group,
        check,
        {**dict(zip(names, tensors)), "cu_seqlens_q": cu_q},
        {
            "the token width (x.shape[-1])": _tail(x, 1),
            "the number of key segments (len(cu_seqlens_k))": _tail(cu_k, 1),
        },
        check_replicas,
    )
    given = [(n, t) for n, t in zip(names, tensors) if t is not None]
    # Only the inputs that need a gradient pass through the (collective) backward; which ones do is
    # the same on every rank.
    tracked = [(n, t) for n, t in given if t.requires_grad and torch.is_grad_enabled()]
    if tracked:
        views = _ReplicatedInputs.apply(group, grad_scale, *(t for _, t in tracked))
        replaced = dict(zip((n for n, _ in tracked), views))
    else:
        replaced = {}
    get = lambda n, t: replaced.get(n, t)  # noqa: E731
    out_r, lse_r = projected_cross_attention(
        get("q", q),
        x,
        get("w_k", w_k),
        get("w_v", w_v),
        get("b_k", b_k),
        get("b_v", b_v),
        norm_weight=get("norm_weight", norm_weight),
        norm_bias=get("norm_bias", norm_bias),
        return_lse=True,
        **kwargs,
    )
    out, lse = _merge(out_r, lse_r, group, grad_scale)
    ran = planner.last_record(projected.OP_NAME)
    planner.note(PROJECTED_OP_NAME, ran.backend, path=ran.path, kernel=ran.kernel)
    return (out, lse) if return_lse else out


def frame_local_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    queries_per_frame: int,
    **kwargs,
):
    """Frame-local attention (V2V with ``scope="frame"``) when each rank holds whole frames *and
    their queries*: ``q (F_r * queries_per_frame, Hq, D)``, ``k, v (F_r * N, Hk, D)`` for this
    rank's ``F_r`` frames (0 allowed); query ``i`` attends to frame ``i // queries_per_frame``.
    Sharded in and out, with no communication at all, forward or backward: each rank's result
    is the rows of its frames. Gradients are this rank's (its frames' contribution to a
    parameter's gradient, as in plain data parallelism). ``kwargs``: as for
    :func:`~crosslmm_ops.cross_attention` (not ``cu_seqlens_*``)."""
    validation.positive_int("queries_per_frame", queries_per_frame)
    for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"):
        if name in kwargs:
            raise ValueError(
                f"{name} is derived from queries_per_frame here; call "
                "cross_attention for other segments"
            )
    for name, t in (("q", q), ("k", k)):
        validation.tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed (total, H, D), got {tuple(t.shape)}")
    frames, rest = divmod(q.shape[0], queries_per_frame)
    if rest:
        raise ValueError(
            f"q has {q.shape[0]} rows, not a multiple of queries_per_frame={queries_per_frame}"
        )
    if frames == 0:
        if k.shape[0]:
            raise ValueError(f"q holds no frames but k holds {k.shape[0]} tokens")
        return (
            q.new_zeros(q.shape)
            if not kwargs.get("return_lse")
            else (q.new_zeros(q.shape), q.new_zeros(q.shape[1], 0, dtype=_reduce_dtype(q.dtype)))
        )
    tokens, rest = divmod(k.shape[0], frames)
    if rest:
        raise ValueError(f"k has {k.shape[0]} rows, not a multiple of the {frames} frames of q")
    cu_q = attention.uniform_cu_seqlens(frames, queries_per_frame, q.device)
    cu_k = attention.uniform_cu_seqlens(frames, tokens, q.device)
    return cross_attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=queries_per_frame,
        max_seqlen_k=tokens,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Frames over ranks
# ----------------------------------------------------------------------------------------------


class _GatherFrames(torch.autograd.Function):
    """All ranks' frame-major tensors ``(F_r, ...)`` concatenated in rank order (the global frame
    order). Backward: this rank's rows of the (replicated) gradient, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, local, group, counts, start, grad_scale):
        ctx.start, ctx.stop, ctx.grad_scale = start, start + local.shape[0], grad_scale
        width = max(counts)
        if width == 0:
            return local.new_zeros((0, *local.shape[1:]))
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        mine = grad[ctx.start : ctx.stop]
        return (
            (mine * ctx.grad_scale if ctx.grad_scale != 1.0 else mine.clone()),
            None,
            None,
            None,
            None,
        )


def _balanced(total: int, parts: int) -> list[int]:
    return [total * (r + 1) // parts - total * r // parts for r in range(parts)]


class FrameShard:
    """How one batch's frames are split over the ranks of ``group``.

    The frames of the batch are taken in order (sample 0's real frames, then sample 1's, ...: the
    packed order of :class:`~crosslmm_ops.nn.VisionMemory`), ``F = sum(frames_per_sample)`` of
    them, and rank ``r`` holds a contiguous run of ``frames_per_rank[r]`` (default: as even as
    possible; a rank may hold none). A rank's run may cross samples.

    * ``group``: the process group (default: :func:`frame_group` over all ranks, a group of its
      own; pass the default group ``dist.group.WORLD`` to share it);
    * ``gradients``: ``"mean"`` (default; for DDP/FSDP) or ``"exact"``, see the module docstring.

    :meth:`local` takes this rank's frames out of a packed ``(F, ...)`` tensor, :meth:`gather`
    puts all ranks' ``(F_r, ...)`` back together (differentiable), :meth:`memory` builds the
    sharded :class:`~crosslmm_ops.nn.VisionMemory` every DCAL reads, and
    :meth:`cross_attention` / :meth:`projected_cross_attention` are the sharded ops bound to the
    group (what the DCALs call).
    """

    def __init__(
        self,
        frames_per_sample: Sequence[int],
        group=None,
        *,
        frames_per_rank: Sequence[int] | None = None,
        gradients: str = "mean",
    ):
        if gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {GRADIENTS}, got {gradients!r}")
        frames = tuple(int(t) for t in frames_per_sample)
        if not frames or any(t < 0 for t in frames):
            raise ValueError(
                f"frames_per_sample must hold one int >= 0 per sample, got "
                f"{tuple(frames_per_sample)}"
            )
        self.group = frame_group() if group is None else group
        self.rank, self.world_size = _rank_and_size(self.group)
        total = sum(frames)
        if frames_per_rank is None:
            counts = _balanced(total, self.world_size)
        else:
            counts = [int(c) for c in frames_per_rank]
            if len(counts) != self.world_size or any(c < 0 for c in counts) or sum(counts) != total:
                raise ValueError(
                    f"frames_per_rank must hold one int >= 0 per rank "
                    f"({self.world_size}) summing to the {total} frames, got "
                    f"{tuple(frames_per_rank)}"
                )
        self.frames_per_sample = frames
        self.frames_per_rank = tuple(counts)
        self.gradients = gradients
        self.grad_scale = float(self.world_size) if gradients == "mean" else 1.0
        self.start = sum(counts[: self.rank])
        self.stop = self.start + counts[self.rank]
        local, offset = [], 0
        for t in frames:
            local.append(max(0, min(offset + t, self.stop) - max(offset, self.start)))
            offset += t
        self.local_frames_per_sample = tuple(local)

    @property
    def num_frames(self) -> int:
        """``F``: the frames of the whole batch."""
        return sum(self.frames_per_sample)

    @property
    def num_local_frames(self) -> int:
        """This rank's frames."""
        return self.stop - self.start

    def local(self, packed: torch.Tensor) -> torch.Tensor:
        """This rank's frames ``(F_r, ...)`` of a packed ``(F, ...)`` tensor (a view)."""
        if (
            not isinstance(packed, torch.Tensor)
            or packed.dim() < 1
            or packed.shape[0] != self.num_frames
        ):
            raise ValueError(
                f"packed must be a tensor of the {self.num_frames} frames (F, ...), "
                f"got {getattr(packed, 'shape', type(packed).__name__)}"
            )
        return packed[self.start : self.stop]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' ``(F_r, ...)`` frames as ``(F, ...)``, on every rank (one all-gather).
        Differentiable: this rank's rows of the gradient flow back, times ``grad_scale``."""
        if (
            not isinstance(local, torch.Tensor)
            or local.dim() < 1
            or local.shape[0] != self.num_local_frames
        ):
            raise ValueError(
                f"local must hold this rank's {self.num_local_frames} frames "
                f"(F_r, ...), got {getattr(local, 'shape', type(local).__name__)}"
            )
        return _GatherFrames.apply(
            local, self.group, self.frames_per_rank, self.start, self.grad_scale
        )

    def memory(
        self,
        tokens: torch.Tensor,
        tokens_per_frame: int,
        pooled_per_frame: int,
        *,
        cache_kv: bool = False,
    ):
        """The :class:`~crosslmm_ops.nn.VisionMemory` of this rank: ``tokens (F_r * N, Dv)``,
        this rank's frames back to back. Its segments index the local tokens (sample ``b``'s
        local frames; one per global frame, empty for the frames of other ranks), its
        ``frames_per_sample`` are the global ones (the LLM sequence holds every frame's pooled
        tokens), and every DCAL reading it runs the sharded attention over ``group``."""
        from crosslmm_ops.nn.memory import VisionMemory

        N = int(tokens_per_frame)
        device = tokens.device
        cu = [0]
        for t in self.local_frames_per_sample:
            cu.append(cu[-1] + t * N)
        frame_cu = [0]
        for f in range(self.num_frames):
            frame_cu.append(frame_cu[-1] + (N if self.start <= f < self.stop else 0))
        return VisionMemory(
            tokens=tokens,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
            frame_cu_seqlens=torch.tensor(frame_cu, dtype=torch.int32, device=device),
            frames_per_sample=self.frames_per_sample,
            tokens_per_frame=N,
            pooled_per_frame=pooled_per_frame,
            max_seqlen=max(self.local_frames_per_sample, default=0) * N,
            cache_kv=cache_kv,
            frame_shard=self,
        )

    def cross_attention(self, q, k, v, **kwargs):
        """:func:`sharded_cross_attention` over this shard's group and gradient convention."""
        return sharded_cross_attention(
            q, k, v, group=self.group, grad_scale=self.grad_scale, **kwargs
        )

    def projected_cross_attention(self, q, x, w_k, w_v, b_k=None, b_v=None, **kwargs):
        """:func:`sharded_projected_cross_attention` over this shard's group and convention."""
        return sharded_projected_cross_attention(
            q, x, w_k, w_v, b_k, b_v, group=self.group, grad_scale=self.grad_scale, **kwargs
        )

    def __repr__(self) -> str:
        return (
            f"FrameShard(rank={self.rank}/{self.world_size}, frames {self.start}:{self.stop} "
            f"of {self.num_frames}, frames_per_rank={self.frames_per_rank}, "
            f"gradients={self.gradients!r})"
        )


__all__ = [
    "GRADIENTS",
    "FrameShard",
    "frame_group",
    "frame_local_cross_attention",
    "sharded_cross_attention",
    "sharded_projected_cross_attention",
]


def __getattr__(name: str):
    # The model wrapper lives with the models; the name stays reachable here.
    if name == "FrameShardedCrossLMM":
        from crosslmm_ops.models.frame_sharded import FrameShardedCrossLMM

        return FrameShardedCrossLMM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
