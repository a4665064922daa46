"""Gated cross-attention from LLM hidden states to the original vision tokens.

* :class:`TanhGate` - ``tanh(alpha) * x`` with ``alpha`` initialised to 0 (an untrained block is
  the identity);
* :class:`CrossAttention` - the generic block: optional pre-norm of the queries, optional norm of
the
  vision tokens, ``q/k/v/o`` projections as plain ``nn.Linear`` (LoRA/PEFT, FSDP and ``state_dict``
  see ordinary weights), GQA, attention (packed varlen, any back end), the gate and the residual;
* :class:`V2VCrossAttention` - the pooled visual positions query the original tokens of their
  sample (``scope="global"``, the paper) or of their own frame (``scope="frame"``);
* :class:`T2VCrossAttention` - the text positions query the original tokens of their sample.

Queries are gathered with a boolean mask into a packed ``(total_q, Hq, d)`` tensor and the gated
result is added back out of place, so nothing is padded and autograd sees ordinary ops. The
attention itself takes one of two paths per call (``kv_path``), the same function either way:

* **materialised**: keys and values projected from the packed
  :class:`~crosslmm_ops.nn.VisionMemory` (``vision_norm``, ``k_proj``, ``v_proj``; once per call for
  both branches of a DCAL with ``share_kv``; kept across calls with
  ``VisionMemory(cache_kv=True)``),
  then :func:`crosslmm_ops.cross_attention`;
* **fused**: :func:`crosslmm_ops.projected_cross_attention` over the normalised tokens, which the
  memory computes once for every layer (:meth:`~crosslmm_ops.nn.VisionMemory.normalized_tokens`);
  the queries are folded through ``k_proj``'s weight and the output through ``v_proj``'s, the
  norm's weight and bias folded into both, so K and V are never formed. Cheaper when each token is
  seen by few queries: decoding (1 query per sample) and frame-local V2V.

``kv_path="auto"`` (the default) asks the planner through the op's interface
(:func:`crosslmm_ops.ops.projected_attention.plan_path`: the op's cost model, or
``CROSSLMM_PROJECTED_PATH``); :func:`crosslmm_ops.last_path` says which path ran, and
``crosslmm_ops.explain(module, *forward's arguments)`` which it would take and why.

Transformers' weight initialisation: ``PreTrainedModel._init_weights`` re-initialises ``nn.Linear``
(normal) and modules whose class name holds ``RMSNorm``/``LayerNorm`` (ones/zeros), and leaves
other modules alone, so a ``post_init()`` pass over a model holding these blocks keeps every gate
at 0 and the block the identity. A model loaded with ``from_pretrained`` whose checkpoint lacks the
gates materialises them with ``torch.empty``: its ``_init_weights`` must call
``module.reset_parameters()`` for :class:`TanhGate` (guarded by transformers like any torch init, so
loaded gates keep their values).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from crosslmm_ops import _backend, planner
from crosslmm_ops.nn.memory import VisionMemory, tensor_version
from crosslmm_ops.ops import projected_attention as projected
from crosslmm_ops.ops import validation
from crosslmm_ops.ops.cross_attention import cross_attention
from crosslmm_ops.ops.projected_attention import PATHS, ProjectedLayout, projected_cross_attention
from crosslmm_ops.ops.validation import positive_int

NORMS = ("rmsnorm", "layernorm", None)
SCOPES = ("global", "frame")


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


class TanhGate(nn.Module):
    """``tanh(alpha) * x`` (Flamingo / CrossLMM): ``alpha`` of shape ``(1,)``, initialised to
    ``init_value`` (0: the gated branch adds exactly nothing until trained, while its gradient
    reaches ``alpha``)."""

    def __init__(self, init_value: float = 0.0):
        super().__init__()
        if (
            isinstance(init_value, bool)
            or not isinstance(init_value, (int, float))
            or not math.isfinite(init_value)
        ):
            raise ValueError(f"init_value must be a finite number, got {init_value!r}")
        self.init_value = float(init_value)
        # Shape (1,), not 0-dim: FSDP and optimiser-state code that shards or flattens along dim 0
        # handles it like any other parameter.
        self.alpha = nn.Parameter(torch.full((1,), self.init_value))

    def reset_parameters(self) -> None:
        # Through torch.nn.init so transformers' guard (init.guard_torch_init_functions) skips a
        # gate that was loaded from a checkpoint.
        nn.init.constant_(self.alpha, self.init_value)

    @property
    def value(self) -> torch.Tensor:
        """``tanh(alpha)``."""
        return torch.tanh(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha).to(x.dtype) * x

    def extra_repr(self) -> str:
        return f"init_value={self.init_value}"


def make_norm(kind, size: int, eps: float, name: str) -> nn.Module | None:
    # torch's own norms: their class names contain "RMSNorm"/"LayerNorm", which transformers'
    # _init_weights resets to ones/zeros (the right values), and they upcast half precision.
    if kind is None:
        return None
    if kind == "rmsnorm":
        return nn.RMSNorm(size, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(size, eps=eps)
    raise ValueError(f"{name} must be one of {NORMS}, got {kind!r}")


def head_shape(hidden_size, num_heads, num_kv_heads, head_dim) -> tuple[int, int, int]:
    num_heads = positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if head_dim is None:
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) is not a multiple of num_heads "
                f"({num_heads}); give head_dim"
            )
        head_dim = hidden_size // num_heads
    return num_heads, num_kv_heads, positive_int("head_dim", head_dim)


# Without autograd, the original tokens are normalised and projected this many rows at a time:
# the normalised copy of all of them (as large as the tokens themselves, 0.43 GB at 256 frames,
# more where the norm computes in float32) would otherwise be the largest transient of a prefill
# from pixels. With autograd the projections keep their inputs for the backward anyway.
_PROJECTION_CHUNK_ROWS = 8192


def _project_in_chunks(x: torch.Tensor, vision_norm, k_proj: nn.Linear, v_proj: nn.Linear):
    """``k_proj(norm(x)), v_proj(norm(x))`` computed over row chunks into preallocated outputs."""
    k = v = None
    for start in range(0, x.shape[0], _PROJECTION_CHUNK_ROWS):
        chunk = x[start : start + _PROJECTION_CHUNK_ROWS]
        if vision_norm is not None:
            chunk = vision_norm(chunk)
        k_part, v_part = k_proj(chunk), v_proj(chunk)
        if k is None:  # the projections' output dtype (autocast may change it) sizes the outputs
            k = k_part.new_empty(x.shape[0], k_part.shape[1])
            v = v_part.new_empty(x.shape[0], v_part.shape[1])
        k[start : start + k_part.shape[0]] = k_part
        v[start : start + v_part.shape[0]] = v_part
    return k, v


def _project_kv(
    memory: VisionMemory,
    vision_norm,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(total_k, Hk, d)`` of the packed original tokens: the materialised path
    (the only place K and V are computed)."""
    cached = memory.cache_kv and not torch.is_grad_enabled()
    if cached:
        modules = [m for m in (vision_norm, k_proj, v_proj) if m is not None]
        state = (
            tensor_version(memory.tokens),
            memory.tokens.dtype,
            _backend.autocast_dtype(memory.device),
        ) + tuple((p.data_ptr(), tensor_version(p)) for m in modules for p in m.parameters())
        hit = memory.kv_cache.get(id(k_proj))
        if hit is not None and hit[0] is k_proj and hit[1] == state:
            return hit[2]
    x = memory.tokens
    rows = x.shape[0]
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or rows <= _PROJECTION_CHUNK_ROWS:
        xn = vision_norm(x) if vision_norm is not None else x
        k, v = k_proj(xn), v_proj(xn)
    else:
        k, v = _project_in_chunks(x, vision_norm, k_proj, v_proj)
    kv = (k.view(rows, num_kv_heads, head_dim), v.view(rows, num_kv_heads, head_dim))
    if cached:  # the entry holds k_proj, so its id is not reused while the entry lives
        memory.kv_cache[id(k_proj)] = (k_proj, state, kv)
    return kv


def check_kv_path(value) -> str:
    if value not in PATHS:
        raise ValueError(f"kv_path must be one of {PATHS}, got {value!r}")
    return value


def _unfused_reason(name: str, module: nn.Module, types: tuple) -> str | None:
    """Why the fused path may not read ``module``'s parameters directly, or None if it may."""
    if type(module) not in types:
        # A subclass or wrapper (PEFT/LoRA, a quantised or parametrised layer) computes something
        # other than its ``weight``: reading the weight would silently skip it.
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            return (
                f"{name} is wrapped by an adapter ({type(module).__module__}."
                f"{type(module).__name__}), which the fused path would skip. Merge the "
                "adapter into the weight first (PEFT: merge_and_unload()), or keep adapters "
                "off the DCALs (crosslmm_ops.lora_target_modules) and train the DCALs as "
                "full modules (modules_to_save=['dcal'])"
            )
        return (
            f"{name} is a {type(module).__name__}, not a plain "
            f"{' or '.join(t.__name__ for t in types)}"
        )
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks, which the fused path would not run"
    if hasattr(module, "_hf_hook"):
        # accelerate's offloading wraps forward() to bring the weights in; they are on the meta
        # device until then, so only calling the module works.
        return f"{name} is managed by an accelerate hook (offloaded weights)"
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return f"{name} has parameters on the meta device"
    return None


class KVSource:
    """Where a branch's keys and values come from: the vision norm and K/V projections (the
    branch's own, or its DCAL's with ``share_kv``) and the two ways of attending through them.
    The DCAL hands one instance to both branches, so the materialised K/V are computed once per
    call."""

    def __init__(
        self,
        vision_norm: nn.Module | None,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        num_kv_heads: int,
        head_dim: int,
    ):
        self.vision_norm, self.k_proj, self.v_proj = vision_norm, k_proj, v_proj
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self._kv = None

    def keys_values(self, memory: VisionMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised keys and values (computed on first use)."""
        if self._kv is None:
            self._kv = _project_kv(
                memory, self.vision_norm, self.k_proj, self.v_proj, self.num_kv_heads, self.head_dim
            )
        return self._kv

    def unfused_reason(self, vision_size: int) -> str | None:
        """Why the fused path cannot stand in for these modules (None: it can)."""
        for name, module in (("k_proj", self.k_proj), ("v_proj", self.v_proj)):
            reason = _unfused_reason(name, module, (nn.Linear,))
            if reason is not None:
                return reason
        norm = self.vision_norm
        if norm is not None:
            reason = _unfused_reason("vision_norm", norm, (nn.RMSNorm, nn.LayerNorm))
            if reason is not None:
                return reason
            if tuple(norm.normalized_shape) != (vision_size,):
                return (
                    f"vision_norm normalises over {tuple(norm.normalized_shape)}, not the "
                    f"token width ({vision_size},)"
                )
        return None

    def fused(
        self, q: torch.Tensor, memory: VisionMemory, segments: tuple, softmax_scale, backend
    ) -> torch.Tensor:
        """:func:`projected_cross_attention` over the memory's normalised tokens (shared by every
        layer), with this norm's weight and bias passed as ``norm_weight``/``norm_bias`` (folded
        into the K/V weights by the op, so their gradients are the norm module's)."""
        cu_q, cu_k, max_q, max_k = segments
        norm = self.vision_norm
        kind, eps = None, 0.0
        if norm is not None:
            kind = "layernorm" if isinstance(norm, nn.LayerNorm) else "rmsnorm"
            # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon, as F.rms_norm does.
            eps = norm.eps if norm.eps is not None else torch.finfo(memory.dtype).eps
        # In q's dtype: under autocast the memory may be in another one than the projections.
        x = memory.normalized_tokens(kind, eps, q.dtype)
        # A frame-sharded memory holds this rank's tokens: its shard runs the sharded op.
        shard = memory.frame_shard
        attend = projected_cross_attention if shard is None else shard.projected_cross_attention
        return attend(
            q,
            x,
            self.k_proj.weight,
            self.v_proj.weight,
            self.k_proj.bias,
            self.v_proj.bias,
            softmax_scale=softmax_scale,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            norm_weight=getattr(norm, "weight", None),
            norm_bias=getattr(norm, "bias", None),
            path="fused",
            backend=backend,
        )


def check_call(hidden_states, memory, hidden_size: int, vision_size: int) -> None:
    """The arguments every block's forward shares: hidden states, memory, and how they match."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(
            f"hidden_states must have shape (B, L, hidden_size), got "
            f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}"
        )
    if not isinstance(memory, VisionMemory):
        raise ValueError(
            f"memory must be a crosslmm_ops.nn.VisionMemory, got {type(memory).__name__}"
        )
    B, _, H = hidden_states.shape
    if H != hidden_size:
        raise ValueError(
            f"hidden_states has hidden size {H}, the module was built for hidden_size={hidden_size}"
        )
    if memory.vision_size != vision_size:
        raise ValueError(
            f"memory.tokens have width {memory.vision_size}, the module was built for "
            f"vision_size={vision_size}"
        )
    if memory.batch_size != B:
        raise ValueError(
            f"memory holds {memory.batch_size} samples, hidden_states has batch size {B}"
        )
    if memory.device != hidden_states.device:
        raise ValueError(
            f"memory is on {memory.device}, hidden_states on {hidden_states.device}; "
            "move the memory with memory.to(device)"
        )
    # Under autocast the two may legitimately differ (the projections cast both).
    if (
        memory.dtype != hidden_states.dtype
        and _backend.autocast_dtype(hidden_states.device) is None
    ):
        raise ValueError(
            f"memory.tokens are {memory.dtype}, hidden_states {hidden_states.dtype}; "
            "convert the memory with memory.to(dtype)"
        )


def check_mask(name: str, mask, hidden_states: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    B, L = hidden_states.shape[:2]
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or tuple(mask.shape) != (B, L)
    ):
        raise ValueError(
            f"{name} must be a bool tensor of shape (B, L) = {(B, L)}, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )
    if mask.device != hidden_states.device:
        raise ValueError(f"{name} is on {mask.device}, hidden_states on {hidden_states.device}")
    return mask


def check_visual_counts(name: str, counts: list[int], memory: VisionMemory) -> None:
    """Sample ``b`` has either all its ``T_b * n`` pooled tokens in the sequence (prefill) or none
    (decoding): the i-th visual position of a sample belongs to its frame ``i // n``."""
    for b, (c, want) in enumerate(zip(counts, memory.visual_tokens_per_sample())):
        if torch.compiler.is_compiling():  # c is symbolic: a check the traced graph runs
            message = (
                f"{name} marks a number of positions of sample {b} other than its "
                f"{memory.frames_per_sample[b]} frames x pooled_per_frame="
                f"{memory.pooled_per_frame} = {want} pooled visual tokens, or 0"
            )
            torch._check_value((c == want) | (c == 0), lambda: message)
        elif c != want and c != 0:
            raise ValueError(
                f"{name} marks {c} positions of sample {b}, but its {memory.frames_per_sample[b]} "
                f"frames x pooled_per_frame={memory.pooled_per_frame} make {want} pooled visual "
                "tokens (a sample has all of them in the sequence, in frame order, or none)"
            )


@dataclasses.dataclass
class Queries:
    """The query rows of one branch in one call: how many per sample (host ints), where they are
    (``index``: the ``nonzero`` of the mask; None: every position, in order), and what the
    attention derives from that, computed on first use."""

    counts: list[int]
    index: tuple[torch.Tensor, torch.Tensor] | None
    _lengths: dict = dataclasses.field(default_factory=dict)
    _segments: dict = dataclasses.field(default_factory=dict)
    _keep: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def lengths(self, scope: str, memory: VisionMemory) -> tuple[list[int], list[int]]:
        """Queries and keys per segment of ``scope``, on the host (no device read)."""
        if scope not in self._lengths:
            if scope == "global":  # one key segment per sample
                lens = (
                    list(self.counts),
                    [t * memory.tokens_per_frame for t in memory.frames_per_sample],
                )
            else:
                # One key segment per frame: pooled token i of sample b sits in frame i // n; a
                # sample without queries (decoding) has empty query segments for its frames
                # (a count is 0 or T_b * n, so min(c, n) is n or 0 without a branch on c).
                n = memory.pooled_per_frame
                lens = (
                    [
                        min(c, n)
                        for c, frames in zip(self.counts, memory.frames_per_sample)
                        for _ in range(frames)
                    ],
                    [memory.tokens_per_frame] * memory.num_frames,
                )
            self._lengths[scope] = lens
        return self._lengths[scope]

    def segments(self, scope: str, memory: VisionMemory, device: torch.device):
        """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for ``scope``."""
        if scope not in self._segments:
            lens_q, _ = self.lengths(scope, memory)
            cu_q = [0]
            for c in lens_q:
                cu_q.append(cu_q[-1] + c)
            cu_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
            if scope == "global":
                seg = (cu_q, memory.cu_seqlens, max(self.counts, default=0), memory.max_seqlen)
            else:
                seg = (
                    cu_q,
                    memory.frame_cu_seqlens,
                    memory.pooled_per_frame,
                    memory.tokens_per_frame,
                )
            self._segments[scope] = seg
        return self._segments[scope]

    def layout(
        self, scope: str, memory: VisionMemory, heads: int, kv_heads: int, head_dim: int
    ) -> ProjectedLayout:
        """This call's shapes as :func:`choose_path`'s cost model reads them."""
        lens_q, lens_k = self.lengths(scope, memory)
        return ProjectedLayout(
            batched=False,
            batch=len(lens_q),
            heads_q=heads,
            heads_k=kv_heads,
            head_dim=head_dim,
            # total_k from the segments: the whole batch's tokens, also for a frame-sharded
            # memory, so that every rank of its group picks the same path.
            width=memory.vision_size,
            total_q=sum(lens_q),
            total_k=sum(lens_k),
            max_seqlen_q=max(lens_q, default=0),
            max_seqlen_k=max(lens_k, default=0),
            lens_q=tuple(lens_q),
            lens_k=tuple(lens_k),
        )

    def rows_with_keys(self, memory: VisionMemory, device: torch.device) -> torch.Tensor | None:
        """``(total_q,)`` bool: the rows whose sample has frames; None when all have."""
        if "global" not in self._keep:
            # Decided on the frames (host ints), not on the counts (symbolic under torch.compile).
            has = [t > 0 for t in memory.frames_per_sample]
            keep = None
            if not all(has):
                keep = torch.tensor(has, device=device).repeat_interleave(
                    torch.tensor(self.counts, device=device), output_size=self.total
                )
            self._keep["global"] = keep
        return self._keep["global"]


_PLAN_CACHE_SIZE = 8


def cached_plan(memory: VisionMemory, key: tuple, masks: tuple, build):
    """``build()``, memoised on ``memory`` for the same mask tensors (unchanged since: their
    ``_version``). Every DCAL layer of a forward gets the same memory and masks, so the host reads
    (counts, ``nonzero``) and the checks happen once per forward, not once per layer. The entry
    holds the masks, so their ids cannot be reused by other tensors while it lives."""
    if torch.compiler.is_compiling():
        return build()
    # A plan built in inference mode holds inference tensors (offsets, indices), which autograd
    # cannot save: it is not reused outside inference mode.
    full_key = (
        key
        + (torch.is_inference_mode_enabled(),)
        + tuple(None if m is None else (id(m), tensor_version(m)) for m in masks)
    )
    hit = memory.plan_cache.get(full_key)
    if hit is not None and all(a is b for a, b in zip(hit[0], masks)):
        return hit[1]
    value = build()
    memory.plan_cache[full_key] = (masks, value)
    while len(memory.plan_cache) > _PLAN_CACHE_SIZE:
        memory.plan_cache.pop(next(iter(memory.plan_cache)))
    return value


def branch_queries(
    memory: VisionMemory, hidden_states: torch.Tensor, mask, name: str, visual: bool
) -> Queries:
    B, L = hidden_states.shape[:2]

    def build():
        counts = [L] * B if mask is None else mask.sum(1).tolist()
        if visual:
            check_visual_counts(name, counts, memory)
        return Queries(counts, None if mask is None else mask.nonzero(as_tuple=True))

    return cached_plan(memory, ("branch", name, visual, B, L), (mask,), build)


def scatter_add(hidden_states: torch.Tensor, index, delta: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` with ``delta`` added at the query rows, out of place (autograd-safe)."""
    delta = delta.to(hidden_states.dtype)
    if index is None:  # every position queried
        return hidden_states + delta.view(hidden_states.shape)
    return hidden_states.index_put(index, delta, accumulate=True)


# ----------------------------------------------------------------------------------------------
# The generic gated block
# ----------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Gated cross-attention from hidden states ``(B, L, hidden_size)`` to a
    :class:`~crosslmm_ops.nn.VisionMemory` of width ``vision_size``::

        out = h + tanh(alpha) * o_proj(attention(q_proj(query_norm(h)),
                                                 k_proj(vision_norm(X)), v_proj(vision_norm(X))))

    at the positions ``mask`` selects (all when ``mask`` is None), ``h`` elsewhere.

    * ``num_heads`` query heads, ``num_kv_heads`` key/value heads (GQA; default ``num_heads``),
      ``head_dim`` (default ``hidden_size // num_heads``);
    * ``scope="global"``: a query of sample ``b`` attends to all of ``b``'s original tokens;
      ``"frame"``: the queries are pooled visual tokens in frame order (sample ``b`` has
      ``T_b * n`` of them, or none) and the ``i``-th attends to frame ``i // n`` only;
    * ``query_norm`` / ``vision_norm``: ``"rmsnorm"``, ``"layernorm"`` or None;
    * ``bias``: biases in the four projections; ``softmax_scale`` defaults to ``1 /
    sqrt(head_dim)``;
    * ``gate=False``: no gate (the result is added ungated); ``gate_init``: ``alpha``'s start value;
    * ``kv_proj=False``: no ``vision_norm``/``k_proj``/``v_proj`` here; the caller passes the keys
      and values (a :class:`DualCrossAttention` sharing them between its branches);
    * ``kv_path``: how the attention meets the keys and values, per call (also settable later):
      ``"materialized"`` projects them (``vision_norm``, ``k_proj``, ``v_proj``) and calls
      :func:`crosslmm_ops.cross_attention`; ``"fused"`` calls
      :func:`crosslmm_ops.projected_cross_attention` over the memory's normalised tokens, shared by
      every layer, and never forms K or V; ``"auto"`` (default) takes the one the op's cost model
      (or ``CROSSLMM_PROJECTED_PATH``) finds cheaper: fused for decoding, often for frame-local
      V2V. Both compute the same function with the same gradients. ``auto`` stays materialised
      where the fused path cannot stand in for the modules (``k_proj``/``v_proj`` not plain
      ``nn.Linear``, e.g. under LoRA; a norm other than ``nn.RMSNorm``/``nn.LayerNorm``; forward
      hooks on them), where ``"fused"`` raises;
    * ``backend``: the back end of the attention (:func:`crosslmm_ops.cross_attention`, or the
      fused core of :func:`crosslmm_ops.projected_cross_attention`; None = auto).

    Each call records its path and back end as :func:`projected_cross_attention` does:
    ``crosslmm_ops.ops.projected_attention.last_path()`` and
    ``crosslmm_ops.last_backend("projected_cross_attention")``.

    A query of a sample without frames (global scope) gets zeros from the attention and adds
    nothing (also with biases), so its hidden state passes through unchanged.
    """

    # Subclasses whose queries are always pooled visual tokens (V2V) check their count per sample
    # also in global scope, where the attention itself would not need it.
    _visual_queries = False
    _mask_name = "mask"

    def __init__(
        self,
        hidden_size: int,
        vision_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        scope: str = "global",
        vision_norm: str | None = "rmsnorm",
        query_norm: str | None = "rmsnorm",
        bias: bool = False,
        norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
        gate: bool = True,
        gate_init: float = 0.0,
        kv_proj: bool = True,
        kv_path: str = "auto",
        backend: str | None = None,
    ):
        super().__init__()
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.vision_size = positive_int("vision_size", vision_size)
        self.num_heads, self.num_kv_heads, self.head_dim = head_shape(
            hidden_size, num_heads, num_kv_heads, head_dim
        )
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        for name, value in (("bias", bias), ("gate", gate), ("kv_proj", kv_proj)):
            validation.flag(name, value)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
        if softmax_scale is not None and (
            isinstance(softmax_scale, bool)
            or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale)
        ):
            raise ValueError(
                f"softmax_scale must be a finite number or None, got {softmax_scale!r}"
            )
        self.scope = scope
        self.softmax_scale = softmax_scale
        self.kv_path = kv_path
        self.backend = backend
        inner_q = self.num_heads * self.head_dim
        inner_kv = self.num_kv_heads * self.head_dim
        self.query_norm = make_norm(query_norm, self.hidden_size, norm_eps, "query_norm")
        self.q_proj = nn.Linear(self.hidden_size, inner_q, bias=bias)
        if kv_proj:
            self.vision_norm = make_norm(vision_norm, self.vision_size, norm_eps, "vision_norm")
            self.k_proj = nn.Linear(self.vision_size, inner_kv, bias=bias)
            self.v_proj = nn.Linear(self.vision_size, inner_kv, bias=bias)
        else:
            make_norm(vision_norm, 1, norm_eps, "vision_norm")  # validate the choice anyway
        self.has_kv_proj = kv_proj
        self.o_proj = nn.Linear(inner_q, self.hidden_size, bias=bias)
        self.gate = TanhGate(gate_init) if gate else None

    # ------------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Projections as torch initialises ``nn.Linear``, norms to ones/zeros, the gate to its
        start value (for models whose ``_init_weights`` delegates here)."""
        for m in self.children():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @property
    def kv_path(self) -> str:
        return self._kv_path

    @kv_path.setter
    def kv_path(self, value: str) -> None:
        self._kv_path = check_kv_path(value)

    def kv_source(self) -> KVSource:
        if not self.has_kv_proj:
            raise RuntimeError(
                f"this {type(self).__name__} was built with kv_proj=False (its keys "
                "and values belong to its DualCrossAttention); call that instead"
            )
        return KVSource(
            self.vision_norm, self.k_proj, self.v_proj, self.num_kv_heads, self.head_dim
        )

    def choose_path(
        self,
        source: KVSource,
        memory: VisionMemory,
        queries: Queries,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str:
        """``"fused"`` or ``"materialized"`` for this call (see ``kv_path``)."""
        return self.path_and_reason(source, memory, queries, dtype, device, explain=False)[0]

    def path_and_reason(
        self,
        source: KVSource,
        memory: VisionMemory,
        queries: Queries,
        dtype: torch.dtype,
        device: torch.device,
        explain: bool = True,
    ) -> tuple[str, str]:
        """The path of this call (see ``kv_path``) and why, decided by the planner through the
        op's interface (:func:`~crosslmm_ops.ops.projected_attention.plan_path`): the op's cost
        model, ``CROSSLMM_PROJECTED_PATH``, and whether the fused path can stand in for these
        modules. ``explain=False``: the reason is ``""``."""
        # Only asked when no path is forced (the reason reads the modules' types and hooks).
        reason = (
            None
            if planner.path_override(self.kv_path) == "materialized"
            else source.unfused_reason(self.vision_size)
        )
        return projected.plan_path(
            lambda: queries.layout(
                self.scope, memory, self.num_heads, self.num_kv_heads, self.head_dim
            ),
            dtype,
            device,
            self.kv_path,
            self.backend,
            unfused_reason=reason,
            tracing=torch.compiler.is_compiling(),
            explain=explain,
        )

    def plan(
        self, hidden_states: torch.Tensor, memory: VisionMemory, mask: torch.Tensor | None = None
    ) -> planner.Plan:
        """How ``forward(hidden_states, memory, mask)`` would run its attention: path, back end,
        kernel and why (:func:`crosslmm_ops.explain` of this module), nothing computed."""
        check_call(hidden_states, memory, self.hidden_size, self.vision_size)
        mask = check_mask(self._mask_name, mask, hidden_states)
        queries = branch_queries(
            memory,
            hidden_states,
            mask,
            self._mask_name,
            self._visual_queries or self.scope == "frame",
        )
        return self.plan_queries(hidden_states, memory, queries)

    def plan_queries(
        self,
        hidden_states: torch.Tensor,
        memory: VisionMemory,
        queries: Queries,
        kv: KVSource | None = None,
    ) -> planner.Plan:
        """:meth:`plan` for queries already gathered (``kv``: the caller's K/V source)."""
        name = type(self).__name__
        if queries.total == 0:
            return planner.Plan(name, "none", reasons=("no query positions: nothing runs",))
        source = self.kv_source() if kv is None else kv
        dtype, device = hidden_states.dtype, hidden_states.device
        path, reason = self.path_and_reason(source, memory, queries, dtype, device)
        layout = queries.layout(
            self.scope, memory, self.num_heads, self.num_kv_heads, self.head_dim
        )
        scale = validation.softmax_scale(self.softmax_scale, self.head_dim)
        return projected.plan_layout(
            layout, scale, path, reason, dtype, device, self.backend, op=name
        )

    def attend(
        self,
        hidden_states: torch.Tensor,
        memory: VisionMemory,
        queries: Queries,
        kv: KVSource | None = None,
    ) -> torch.Tensor:
        """The branch's (gated) update at its query rows, packed ``(total_q, hidden)`` in the
        order of ``queries.index``. ``kv``: the caller's K/V source (a DCAL sharing it)."""
        B, L, H = hidden_states.shape
        hq = (
            hidden_states.reshape(B * L, H)
            if queries.index is None
            else hidden_states[queries.index]
        )
        total_q = hq.shape[0]
        x = self.query_norm(hq) if self.query_norm is not None else hq
        q = self.q_proj(x).view(total_q, self.num_heads, self.head_dim)
        source = self.kv_source() if kv is None else kv
        segments = queries.segments(self.scope, memory, q.device)
        if self.choose_path(source, memory, queries, q.dtype, q.device) == "fused":
            attn = source.fused(q, memory, segments, self.softmax_scale, self.backend)
        else:
            k, v = source.keys_values(memory)
            cu_q, cu_k, max_q, max_k = segments
            shard = memory.frame_shard  # this rank's keys: the sharded op merges over ranks
            attend = cross_attention if shard is None else shard.cross_attention
            attn = projected.attend_materialized(
                q,
                k,
                v,
                attend=attend,
                softmax_scale=self.softmax_scale,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
                backend=self.backend,
            )
        out = self.o_proj(attn.reshape(total_q, self.num_heads * self.head_dim))
        if self.o_proj.bias is not None and self.scope == "global":
            # Rows of a sample without frames got zeros from the attention; o_proj's bias would
            # still move them. Keep them exactly unchanged instead.
            keep = queries.rows_with_keys(memory, out.device)
            if keep is not None:
                out = torch.where(keep.unsqueeze(-1), out, torch.zeros_like(out))
        if self.gate is not None:
            out = self.gate(out)
        return out

    def forward(
        self, hidden_states: torch.Tensor, memory: VisionMemory, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``hidden_states (B, L, hidden)`` -> the same shape: the gated attention added at the
        positions ``mask (B, L)`` selects (every position when None), ``hidden_states``
        elsewhere."""
        check_call(hidden_states, memory, self.hidden_size, self.vision_size)
        mask = check_mask(self._mask_name, mask, hidden_states)
        queries = branch_queries(
            memory,
            hidden_states,
            mask,
            self._mask_name,
            self._visual_queries or self.scope == "frame",
        )
        if queries.total == 0:
            return hidden_states
        if not self.has_kv_proj:
            self.kv_source()  # raises the error that says what to call instead
        delta = self.attend(hidden_states, memory, queries)
        return scatter_add(hidden_states, queries.index, delta)

    def extra_repr(self) -> str:
        parts = [
            f"hidden_size={self.hidden_size}",
            f"vision_size={self.vision_size}",
            f"num_heads={self.num_heads}",
            f"num_kv_heads={self.num_kv_heads}",
            f"head_dim={self.head_dim}",
            f"scope={self.scope!r}",
        ]
        if not self.has_kv_proj:
            parts.append("kv_proj=False")
        if self.kv_path != "auto":
            parts.append(f"kv_path={self.kv_path!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class V2VCrossAttention(CrossAttention):
    """V2V: the pooled visual positions (``mask``, in frame order: sample ``b`` has ``T_b * n`` of
    them, or none while decoding) query the original tokens of their sample (``scope="global"``,
    the paper) or of their own frame (``scope="frame"``). Arguments as :class:`CrossAttention`."""

    _visual_queries = True
    _mask_name = "mask"

    def __init__(
        self,
        hidden_size: int,
        vision_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        scope: str = "global",
        **kwargs,
    ):
        super().__init__(
            hidden_size, vision_size, num_heads, num_kv_heads, head_dim, scope=scope, **kwargs
        )


class T2VCrossAttention(CrossAttention):
    """T2V: the text positions (``mask``; every position when None) query all original tokens of
    their sample. Arguments as :class:`CrossAttention`, without ``scope``."""

    def __init__(
        self,
        hidden_size: int,
        vision_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        **kwargs,
    ):
        if "scope" in kwargs:
            raise ValueError("T2VCrossAttention always attends to the whole sample (no scope)")
        super().__init__(
            hidden_size, vision_size, num_heads, num_kv_heads, head_dim, scope="global", **kwargs
        )
