"""Gated cross-attention from LLM hidden states to the original vision tokens.

* :class:`TanhGate` - ``tanh(alpha) * x`` with ``alpha`` initialised to 0 (an untrained block is
  the identity);
* :class:`CrossAttention` - the generic block: optional pre-norm of the queries, optional norm of the
  vision tokens, ``q/k/v/o`` projections as plain ``nn.Linear`` (LoRA/PEFT, FSDP and ``state_dict``
  see ordinary weights), GQA, attention through :func:`crosslmm_ops.cross_attention` (packed varlen,
  any back end), the gate and the residual;
* :class:`V2VCrossAttention` - the pooled visual positions query the original tokens of their
  sample (``scope="global"``, the paper) or of their own frame (``scope="frame"``);
* :class:`T2VCrossAttention` - the text positions query the original tokens of their sample.

Queries are gathered with a boolean mask into a packed ``(total_q, Hq, d)`` tensor, keys and values
are projected from the packed :class:`~crosslmm_ops.nn.VisionMemory`, and the gated result is added
back out of place, so nothing is padded and autograd sees ordinary ops.

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

from crosslmm_ops.nn.memory import VisionMemory
from crosslmm_ops.ops.cross_attention import cross_attention

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
        if isinstance(init_value, bool) or not isinstance(init_value, (int, float)) \
                or not math.isfinite(init_value):
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


def _make_norm(kind, size: int, eps: float, name: str) -> nn.Module | None:
    # torch's own norms: their class names contain "RMSNorm"/"LayerNorm", which transformers'
    # _init_weights resets to ones/zeros (the right values), and they upcast half precision.
    if kind is None:
        return None
    if kind == "rmsnorm":
        return nn.RMSNorm(size, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(size, eps=eps)
    raise ValueError(f"{name} must be one of {NORMS}, got {kind!r}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _head_shape(hidden_size, num_heads, num_kv_heads, head_dim) -> tuple[int, int, int]:
    num_heads = _positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads",
                                                                          num_kv_heads)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim is None:
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) is not a multiple of num_heads "
                             f"({num_heads}); give head_dim")
        head_dim = hidden_size // num_heads
    return num_heads, num_kv_heads, _positive_int("head_dim", head_dim)


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by in-place writes); inference tensors have none: 0."""
    return 0 if torch.is_inference(t) else t._version


def _project_kv(memory: VisionMemory, vision_norm, k_proj: nn.Linear, v_proj: nn.Linear,
                num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(total_k, Hk, d)`` of the packed original tokens. The only place K and V
    are computed (a projection-fused attention will replace it where a cost model says so)."""
    cached = memory.cache_kv and not torch.is_grad_enabled()
    if cached:
        modules = [m for m in (vision_norm, k_proj, v_proj) if m is not None]
        autocast = _autocasting(memory.device)
        state = (_version(memory.tokens), memory.tokens.dtype, autocast,
                 torch.get_autocast_dtype(memory.device.type) if autocast else None) + tuple(
            (p.data_ptr(), _version(p)) for m in modules for p in m.parameters())
        hit = memory._kv.get(id(k_proj))
        if hit is not None and hit[0] is k_proj and hit[1] == state:
            return hit[2]
    x = memory.tokens
    if vision_norm is not None:
        x = vision_norm(x)
    rows = x.shape[0]
    kv = (k_proj(x).view(rows, num_kv_heads, head_dim),
          v_proj(x).view(rows, num_kv_heads, head_dim))
    if cached:  # the entry holds k_proj, so its id is not reused while the entry lives
        memory._kv[id(k_proj)] = (k_proj, state, kv)
    return kv


def _autocasting(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except (TypeError, RuntimeError):  # device types without autocast
        return False


def _check_call(hidden_states, memory, hidden_size: int, vision_size: int) -> None:
    """The arguments every block's forward shares: hidden states, memory, and how they match."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must have shape (B, L, hidden_size), got "
                         f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
    if not isinstance(memory, VisionMemory):
        raise ValueError(f"memory must be a crosslmm_ops.nn.VisionMemory, got "
                         f"{type(memory).__name__}")
    B, _, H = hidden_states.shape
    if H != hidden_size:
        raise ValueError(f"hidden_states has hidden size {H}, the module was built for "
                         f"hidden_size={hidden_size}")
    if memory.vision_size != vision_size:
        raise ValueError(f"memory.tokens have width {memory.vision_size}, the module was built for "
                         f"vision_size={vision_size}")
    if memory.batch_size != B:
        raise ValueError(f"memory holds {memory.batch_size} samples, hidden_states has batch "
                         f"size {B}")
    if memory.device != hidden_states.device:
        raise ValueError(f"memory is on {memory.device}, hidden_states on {hidden_states.device}; "
                         "move the memory with memory.to(device)")
    # Under autocast the two may legitimately differ (the projections cast both).
    if memory.dtype != hidden_states.dtype and not _autocasting(hidden_states.device):
        raise ValueError(f"memory.tokens are {memory.dtype}, hidden_states {hidden_states.dtype}; "
                         "convert the memory with memory.to(dtype)")


def _check_mask(name: str, mask, hidden_states: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    B, L = hidden_states.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
            or tuple(mask.shape) != (B, L):
        raise ValueError(f"{name} must be a bool tensor of shape (B, L) = {(B, L)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if mask.device != hidden_states.device:
        raise ValueError(f"{name} is on {mask.device}, hidden_states on {hidden_states.device}")
    return mask


def _check_visual_counts(name: str, counts: list[int], memory: VisionMemory) -> None:
    """Sample ``b`` has either all its ``T_b * n`` pooled tokens in the sequence (prefill) or none
    (decoding): the i-th visual position of a sample belongs to its frame ``i // n``."""
    for b, (c, want) in enumerate(zip(counts, memory.visual_tokens_per_sample())):
        if c != want and c != 0:
            raise ValueError(
                f"{name} marks {c} positions of sample {b}, but its {memory.frames_per_sample[b]} "
                f"frames x pooled_per_frame={memory.pooled_per_frame} make {want} pooled visual "
                "tokens (a sample has all of them in the sequence, in frame order, or none)")


@dataclasses.dataclass
class _Queries:
    """The query rows of one branch in one call: how many per sample (host ints), where they are
    (``index``: the ``nonzero`` of the mask; None: every position, in order), and what the
    attention derives from that, computed on first use."""

    counts: list[int]
    index: tuple[torch.Tensor, torch.Tensor] | None
    _segments: dict = dataclasses.field(default_factory=dict)
    _keep: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def segments(self, scope: str, memory: VisionMemory, device: torch.device):
        """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for ``scope``."""
        if scope not in self._segments:
            if scope == "global":  # one key segment per sample
                cu_q = [0]
                for c in self.counts:
                    cu_q.append(cu_q[-1] + c)
                seg = (torch.tensor(cu_q, dtype=torch.int32, device=device), memory.cu_seqlens,
                       max(self.counts, default=0), memory.max_seqlen)
            else:
                # One key segment per frame: pooled token i of sample b sits in frame i // n; a
                # sample without queries (decoding) has empty query segments for its frames.
                n = memory.pooled_per_frame
                cu_q = [0]
                for c, frames in zip(self.counts, memory.frames_per_sample):
                    step = n if c else 0
                    for _ in range(frames):
                        cu_q.append(cu_q[-1] + step)
                seg = (torch.tensor(cu_q, dtype=torch.int32, device=device),
                       memory.frame_cu_seqlens, n, memory.tokens_per_frame)
            self._segments[scope] = seg
        return self._segments[scope]

    def rows_with_keys(self, memory: VisionMemory, device: torch.device) -> torch.Tensor | None:
        """``(total_q,)`` bool: the rows whose sample has frames; None when all have."""
        if "global" not in self._keep:
            empty = [c > 0 and t == 0 for c, t in zip(self.counts, memory.frames_per_sample)]
            keep = None
            if any(empty):
                has = torch.tensor([not e for e in empty], device=device)
                keep = has.repeat_interleave(torch.tensor(self.counts, device=device))
            self._keep["global"] = keep
        return self._keep["global"]


_PLAN_CACHE_SIZE = 8


def _cached(memory: VisionMemory, key: tuple, masks: tuple, build):
    """``build()``, memoised on ``memory`` for the same mask tensors (unchanged since: their
    ``_version``). Every DCAL layer of a forward gets the same memory and masks, so the host reads
    (counts, ``nonzero``) and the checks happen once per forward, not once per layer. The entry
    holds the masks, so their ids cannot be reused by other tensors while it lives."""
    if torch.compiler.is_compiling():
        return build()
    full_key = key + tuple(None if m is None else (id(m), _version(m)) for m in masks)
    hit = memory._plans.get(full_key)
    if hit is not None and all(a is b for a, b in zip(hit[0], masks)):
        return hit[1]
    value = build()
    memory._plans[full_key] = (masks, value)
    while len(memory._plans) > _PLAN_CACHE_SIZE:
        memory._plans.pop(next(iter(memory._plans)))
    return value


def _branch_queries(memory: VisionMemory, hidden_states: torch.Tensor, mask, name: str,
                    visual: bool) -> _Queries:
    B, L = hidden_states.shape[:2]

    def build():
        counts = [L] * B if mask is None else mask.sum(1).tolist()
        if visual:
            _check_visual_counts(name, counts, memory)
        return _Queries(counts, None if mask is None else mask.nonzero(as_tuple=True))

    return _cached(memory, ("branch", name, visual, B, L), (mask,), build)


def _scatter_add(hidden_states: torch.Tensor, index, delta: torch.Tensor) -> torch.Tensor:
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
    * ``bias``: biases in the four projections; ``softmax_scale`` defaults to ``1 / sqrt(head_dim)``;
    * ``gate=False``: no gate (the result is added ungated); ``gate_init``: ``alpha``'s start value;
    * ``kv_proj=False``: no ``vision_norm``/``k_proj``/``v_proj`` here; the caller passes the keys
      and values (a :class:`DualCrossAttention` sharing them between its branches);
    * ``backend``: the :func:`crosslmm_ops.cross_attention` back end (None = auto).

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
        backend: str | None = None,
    ):
        super().__init__()
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.vision_size = _positive_int("vision_size", vision_size)
        self.num_heads, self.num_kv_heads, self.head_dim = _head_shape(
            hidden_size, num_heads, num_kv_heads, head_dim)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        for name, flag in (("bias", bias), ("gate", gate), ("kv_proj", kv_proj)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
        if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                          or not isinstance(softmax_scale, (int, float))
                                          or not math.isfinite(softmax_scale)):
            raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
        self.scope = scope
        self.softmax_scale = softmax_scale
        self.backend = backend
        inner_q = self.num_heads * self.head_dim
        inner_kv = self.num_kv_heads * self.head_dim
        self.query_norm = _make_norm(query_norm, self.hidden_size, norm_eps, "query_norm")
        self.q_proj = nn.Linear(self.hidden_size, inner_q, bias=bias)
        if kv_proj:
            self.vision_norm = _make_norm(vision_norm, self.vision_size, norm_eps, "vision_norm")
            self.k_proj = nn.Linear(self.vision_size, inner_kv, bias=bias)
            self.v_proj = nn.Linear(self.vision_size, inner_kv, bias=bias)
        else:
            _make_norm(vision_norm, 1, norm_eps, "vision_norm")  # validate the choice anyway
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

    def _keys_values(self, memory: VisionMemory) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_kv_proj:
            raise RuntimeError(f"this {type(self).__name__} was built with kv_proj=False (its keys "
                               "and values belong to its DualCrossAttention); call that instead")
        return _project_kv(memory, self.vision_norm, self.k_proj, self.v_proj, self.num_kv_heads,
                           self.head_dim)

    def _attend(self, hidden_states: torch.Tensor, memory: VisionMemory, queries: _Queries,
                kv=None) -> torch.Tensor:
        """The branch's (gated) update at its query rows, packed ``(total_q, hidden)`` in the
        order of ``queries.index``. ``kv``: keys and values computed by the caller (shared)."""
        B, L, H = hidden_states.shape
        hq = hidden_states.reshape(B * L, H) if queries.index is None \
            else hidden_states[queries.index]
        total_q = hq.shape[0]
        x = self.query_norm(hq) if self.query_norm is not None else hq
        q = self.q_proj(x).view(total_q, self.num_heads, self.head_dim)
        k, v = self._keys_values(memory) if kv is None else kv
        cu_q, cu_k, max_q, max_k = queries.segments(self.scope, memory, q.device)
        attn = cross_attention(q, k, v, softmax_scale=self.softmax_scale, cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                               backend=self.backend)
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

    def forward(self, hidden_states: torch.Tensor, memory: VisionMemory,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states (B, L, hidden)`` -> the same shape: the gated attention added at the
        positions ``mask (B, L)`` selects (every position when None), ``hidden_states`` elsewhere."""
        _check_call(hidden_states, memory, self.hidden_size, self.vision_size)
        mask = _check_mask(self._mask_name, mask, hidden_states)
        queries = _branch_queries(memory, hidden_states, mask, self._mask_name,
                                  self._visual_queries or self.scope == "frame")
        if queries.total == 0:
            return hidden_states
        if not self.has_kv_proj:
            self._keys_values(memory)  # raises the error that says what to call instead
        delta = self._attend(hidden_states, memory, queries)
        return _scatter_add(hidden_states, queries.index, delta)

    def extra_repr(self) -> str:
        parts = [f"hidden_size={self.hidden_size}", f"vision_size={self.vision_size}",
                 f"num_heads={self.num_heads}", f"num_kv_heads={self.num_kv_heads}",
                 f"head_dim={self.head_dim}", f"scope={self.scope!r}"]
        if not self.has_kv_proj:
            parts.append("kv_proj=False")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class V2VCrossAttention(CrossAttention):
    """V2V: the pooled visual positions (``mask``, in frame order: sample ``b`` has ``T_b * n`` of
    them, or none while decoding) query the original tokens of their sample (``scope="global"``,
    the paper) or of their own frame (``scope="frame"``). Arguments as :class:`CrossAttention`."""

    _visual_queries = True
    _mask_name = "mask"

    def __init__(self, hidden_size: int, vision_size: int, num_heads: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 scope: str = "global", **kwargs):
        super().__init__(hidden_size, vision_size, num_heads, num_kv_heads, head_dim, scope=scope,
                         **kwargs)


class T2VCrossAttention(CrossAttention):
    """T2V: the text positions (``mask``; every position when None) query all original tokens of
    their sample. Arguments as :class:`CrossAttention`, without ``scope``."""

    def __init__(self, hidden_size: int, vision_size: int, num_heads: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None, **kwargs):
        if "scope" in kwargs:
            raise ValueError("T2VCrossAttention always attends to the whole sample (no scope)")
        super().__init__(hidden_size, vision_size, num_heads, num_kv_heads, head_dim,
                         scope="global", **kwargs)
