"""VisionMemory: the original (unpooled) vision tokens every DCAL layer attends to.

CrossLMM feeds the LLM ``n`` pooled tokens per frame, and lets those (V2V) and the text (T2V)
cross-attend to the ``N`` original tokens of every frame. The original tokens never enter the LLM
sequence; they are packed once per forward over the batch (frames of different samples back to
back, padded frames dropped) and shared, read-only, by every DCAL layer. The packed layout is
flash-attn's varlen layout, so the attention needs no padding and no mask:

* ``cu_seqlens`` - one key segment per sample (global scope: a query sees its whole video);
* ``frame_cu_seqlens`` - one key segment per frame (frame scope: a pooled token sees its frame).

On the projection-fused path (:func:`crosslmm_ops.projected_cross_attention`) every DCAL layer
reads the *normalised* tokens, the part of its vision norm that does not depend on the layer (its
weight and bias fold into the layer's K/V projections): :meth:`VisionMemory.normalized_tokens`
computes them once and keeps them here for every layer and every decode step.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Sequence

import torch

from crosslmm_ops.ops.projected_attention import normalize_tokens
from crosslmm_ops.ops.validation import is_int


def _cu_seqlens(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by in-place writes); inference tensors have none: 0."""
    return 0 if torch.is_inference(t) else t._version


_entry_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class VisionMemory:
    """The original (unpooled) vision tokens every DCAL layer attends to, packed over the batch.

    Build it with :meth:`from_features` (a padded ``(B, T, N, Dv)`` batch) or :meth:`from_list`
    (one ``(T_b, N, Dv)`` tensor per sample); the fields are derived from each other and not
    re-checked when the dataclass is built by hand beyond their shapes.

    * ``tokens (total_tokens, Dv)`` - sample ``b``'s frames back to back, frame-major and
      token-major within a frame (the vision encoder's order);
    * ``cu_seqlens`` int32 ``(B + 1,)`` - token offsets per sample;
    * ``frame_cu_seqlens`` int32 ``(F + 1,)`` - token offsets per frame, ``F`` the total number of
      frames over the batch (``F = sum(frames_per_sample)``);
    * ``frames_per_sample`` - ``T_b`` for each sample (0 for a sample without video: its T2V rows
      get zeros from the attention, i.e. pass through unchanged);
    * ``tokens_per_frame`` - ``N`` (729 for SigLIP at 384 px);
    * ``pooled_per_frame`` - ``n``: how many pooled tokens of each frame sit in the LLM sequence
      (sample ``b`` has ``T_b * n`` visual positions in a prefill);
    * ``max_seqlen`` - the longest sample in tokens (``max_seqlen_k`` of the global scope);
    * ``cache_kv`` - opt-in for generation, on the materialised path (``kv_path="materialized"``,
      or ``"auto"`` where the cost model picks it): each layer's keys and values computed without
      gradients are kept here and reused while the layer's K/V weights and the tokens are
      unchanged (tracked by their version counters; swapping LoRA adapters in and out is not
      tracked: leave it off then). Costs ``2 * Hk * d`` values per token per layer; the fused
      path needs no K/V, only :meth:`normalized_tokens`, kept always (one copy for all layers).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    frame_cu_seqlens: torch.Tensor
    frames_per_sample: tuple[int, ...]
    tokens_per_frame: int
    pooled_per_frame: int
    max_seqlen: int
    # Opt-in, for generation: keep each DCAL layer's keys and values (computed under no_grad) with
    # the memory, so decoding steps do not re-project every original token at every step.
    cache_kv: bool = False
    # Frame sharding (crosslmm_ops.distributed.FrameShard, built by its memory() method): this
    # rank holds only its frames' tokens (cu_seqlens / frame_cu_seqlens index them; the frames of
    # other ranks are empty segments) and the DCALs run the sharded attention over its group.
    # frames_per_sample stay the whole batch's. None: every frame is here.
    frame_shard: object | None = None
    # What the DCAL layers derive from the query masks (counts, indices, cu_seqlens), computed by
    # the first layer of a forward and reused by the others (crosslmm_ops.nn.attention.cached_plan).
    _plans: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _kv: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    # normalize_tokens(tokens) per (norm, eps, dtype), for the fused path (see normalized_tokens).
    _normalized: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def plan_cache(self) -> dict:
        """What the DCAL layers of one forward derive from the query masks, by mask (see
        :func:`crosslmm_ops.nn.attention.cached_plan`)."""
        return self._plans

    @property
    def kv_cache(self) -> dict:
        """Materialised keys and values by K projection (``cache_kv=True``; see
        :func:`crosslmm_ops.nn.attention`'s materialised path)."""
        return self._kv

    def __post_init__(self):
        # Shape-level checks only (no device reads): the constructors derive consistent values.
        self.frames_per_sample = tuple(int(t) for t in self.frames_per_sample)
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 2:
            raise ValueError(
                f"VisionMemory.tokens must be a (total_tokens, Dv) tensor, got "
                f"{getattr(self.tokens, 'shape', type(self.tokens).__name__)}"
            )
        if not self.tokens.dtype.is_floating_point:
            raise ValueError(
                f"VisionMemory.tokens must be a floating tensor, got {self.tokens.dtype}"
            )
        if not isinstance(self.cache_kv, bool):
            raise ValueError(f"VisionMemory.cache_kv must be a bool, got {self.cache_kv!r}")
        for name in ("tokens_per_frame", "pooled_per_frame", "max_seqlen"):
            value = getattr(self, name)
            if not is_int(value) or value < (0 if name == "max_seqlen" else 1):
                raise ValueError(
                    f"VisionMemory.{name} must be an int >= "
                    f"{0 if name == 'max_seqlen' else 1}, got {value!r}"
                )
        if any(t < 0 for t in self.frames_per_sample) or not self.frames_per_sample:
            raise ValueError(
                f"VisionMemory.frames_per_sample must be one int >= 0 per sample, got "
                f"{self.frames_per_sample}"
            )
        frames = sum(self.frames_per_sample)
        for name, want in (
            ("cu_seqlens", len(self.frames_per_sample) + 1),
            ("frame_cu_seqlens", frames + 1),
        ):
            cu = getattr(self, name)
            if (
                not isinstance(cu, torch.Tensor)
                or cu.dtype != torch.int32
                or tuple(cu.shape) != (want,)
            ):
                raise ValueError(
                    f"VisionMemory.{name} must be an int32 tensor of shape ({want},), "
                    f"got {getattr(cu, 'dtype', None)} {tuple(getattr(cu, 'shape', ()))}"
                )
            if cu.device != self.tokens.device:
                raise ValueError(
                    f"VisionMemory.{name} must be on the tokens' device "
                    f"{self.tokens.device}, got {cu.device}"
                )
        here = frames if self.frame_shard is None else self.frame_shard.num_local_frames
        if self.tokens.shape[0] != here * self.tokens_per_frame:
            raise ValueError(
                f"VisionMemory.tokens has {self.tokens.shape[0]} rows, but "
                f"{here} frames x {self.tokens_per_frame} tokens per frame = "
                f"{here * self.tokens_per_frame}"
            )

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def _from_packed(
        cls,
        tokens: torch.Tensor,
        frames: Sequence[int],
        tokens_per_frame: int,
        pooled_per_frame: int,
        cache_kv: bool = False,
    ) -> "VisionMemory":
        frames = tuple(int(t) for t in frames)
        N = int(tokens_per_frame)
        return cls(
            tokens=tokens,
            cu_seqlens=_cu_seqlens([t * N for t in frames], tokens.device),
            frame_cu_seqlens=torch.arange(sum(frames) + 1, dtype=torch.int32, device=tokens.device)
            * N,
            frames_per_sample=frames,
            tokens_per_frame=N,
            pooled_per_frame=pooled_per_frame,
            max_seqlen=max(frames, default=0) * N,
            cache_kv=cache_kv,
        )

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        pooled_per_frame: int,
        frame_mask: torch.Tensor | None = None,
        *,
        cache_kv: bool = False,
    ) -> "VisionMemory":
        """From a padded batch ``features (B, T, N, Dv)``; ``frame_mask (B, T)`` bool, True for a
        real frame (the real frames must come first in each row; padded frames are dropped).
        Without ``frame_mask`` every frame is real and ``tokens`` is a view of ``features`` when
        its layout allows one."""
        _check_pooled(pooled_per_frame)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            raise ValueError(
                f"features must have shape (B, T, N, Dv), got "
                f"{getattr(features, 'shape', type(features).__name__)}"
            )
        B, T, N, Dv = features.shape
        if B == 0 or N == 0 or Dv == 0:
            raise ValueError(f"features needs B, N, Dv >= 1, got shape {tuple(features.shape)}")
        if frame_mask is None:
            return cls._from_packed(
                features.reshape(B * T * N, Dv), [T] * B, N, pooled_per_frame, cache_kv
            )
        if (
            not isinstance(frame_mask, torch.Tensor)
            or frame_mask.dtype != torch.bool
            or tuple(frame_mask.shape) != (B, T)
        ):
            raise ValueError(
                f"frame_mask must be a bool tensor of shape (B, T) = {(B, T)}, got "
                f"{getattr(frame_mask, 'dtype', type(frame_mask).__name__)} "
                f"{tuple(getattr(frame_mask, 'shape', ()))}"
            )
        counts = frame_mask.sum(1)
        prefix = torch.arange(T, device=frame_mask.device) < counts.unsqueeze(1)
        # One host read for both the check and the frame counts.
        ok_and_counts = torch.cat([(prefix == frame_mask).all().reshape(1).long(), counts.long()])
        values = ok_and_counts.tolist()
        if not values[0]:
            raise ValueError(
                "frame_mask must mark a prefix of each row (real frames first, padding after)"
            )
        frames = values[1:]
        tokens = features[frame_mask.to(features.device)].reshape(-1, Dv)
        return cls._from_packed(tokens, frames, N, pooled_per_frame, cache_kv)

    @classmethod
    def from_list(
        cls,
        features_per_sample: Sequence[torch.Tensor],
        pooled_per_frame: int,
        *,
        cache_kv: bool = False,
    ) -> "VisionMemory":
        """From one ``(T_b, N, Dv)`` tensor per sample; ``T_b`` may be 0 (a sample without video:
        its T2V rows get zeros from the attention)."""
        _check_pooled(pooled_per_frame)
        feats = list(features_per_sample) if features_per_sample is not None else []
        if not feats:
            raise ValueError(
                "features_per_sample must hold one (T_b, N, Dv) tensor per sample, got none"
            )
        first = feats[0]
        for b, f in enumerate(feats):
            if not isinstance(f, torch.Tensor) or f.dim() != 3:
                raise ValueError(
                    f"features_per_sample[{b}] must have shape (T_b, N, Dv), got "
                    f"{getattr(f, 'shape', type(f).__name__)}"
                )
            if f.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"features_per_sample[{b}] has (N, Dv) = {tuple(f.shape[1:])}, "
                    f"sample 0 has {tuple(first.shape[1:])}: all must match"
                )
            if f.dtype != first.dtype or f.device != first.device:
                raise ValueError(
                    f"features_per_sample[{b}] is {f.dtype} on {f.device}, sample 0 "
                    f"is {first.dtype} on {first.device}: all must match"
                )
        N, Dv = first.shape[1:]
        if N == 0 or Dv == 0:
            raise ValueError(f"features_per_sample needs N, Dv >= 1, got {(N, Dv)}")
        tokens = torch.cat([f.reshape(-1, Dv) for f in feats], 0)
        return cls._from_packed(tokens, [f.shape[0] for f in feats], N, pooled_per_frame, cache_kv)

    # ------------------------------------------------------------------------------------------
    # Derived views
    # ------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.frames_per_sample)

    @property
    def num_frames(self) -> int:
        """``F``: the number of frames over the whole batch."""
        return sum(self.frames_per_sample)

    @property
    def vision_size(self) -> int:
        """``Dv``: the width of the original tokens."""
        return self.tokens.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def visual_tokens_per_sample(self) -> tuple[int, ...]:
        """How many pooled visual positions each sample has in a prefill: ``T_b * n``."""
        return tuple(t * self.pooled_per_frame for t in self.frames_per_sample)

    def per_sample(self) -> list[torch.Tensor]:
        """The tokens of each sample as ``(T_b, N, Dv)`` views (the inverse of
        :meth:`from_list`)."""
        _check_unsharded(self, "per_sample()")
        out, start = [], 0
        for t in self.frames_per_sample:
            n = t * self.tokens_per_frame
            out.append(
                self.tokens[start : start + n].reshape(t, self.tokens_per_frame, self.vision_size)
            )
            start += n
        return out

    def normalized_tokens(
        self, norm: str | None, eps: float, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """:func:`crosslmm_ops.normalize_tokens` ``(tokens, norm, eps)`` in ``dtype`` (default the
        tokens'): what every DCAL layer's vision norm computes before its own weight and bias,
        which the fused path folds into the layer's K/V weights. Computed once and reused by every
        layer, and every decode step, while ``tokens`` is the same tensor, unchanged (its version
        counter).

        Under autograd (grad mode on, tokens that require grad) the entry carries its graph: the
        layers of one forward share it, their gradients add up in it, and it is dropped as soon as
        a backward passes through it, so the next forward builds its own (a freed graph is never
        reused, and the graph is not kept past its backward). An entry computed without a graph
        is not handed out where one is needed (the gradient would not reach the tokens), nor an
        inference-mode tensor outside inference mode (autograd cannot save it)."""
        tokens = self.tokens
        dtype = tokens.dtype if dtype is None else dtype
        if norm is None and dtype == tokens.dtype:
            return tokens
        if torch.compiler.is_compiling():
            # No memo while tracing: the dict would be filled at trace time, not at run time.
            return normalize_tokens(tokens, norm, eps).to(dtype)
        key = (norm, float(eps), dtype)
        hit = self._normalized.get(key)
        if hit is not None and _reusable(hit, tokens):
            return hit[2]
        value = _NormalizeTokens.apply(tokens, norm, float(eps)).to(dtype)
        entry_id = next(_entry_ids)
        self._normalized[key] = (tokens, tensor_version(tokens), value, entry_id)
        if value.requires_grad:
            value.register_hook(_forget_after_backward(self, key, entry_id))
        return value

    # ------------------------------------------------------------------------------------------
    # Moving and reordering
    # ------------------------------------------------------------------------------------------

    def to(self, *args, **kwargs) -> "VisionMemory":
        """``tokens.to(*args, **kwargs)``; the offsets follow to the tokens' device (staying
        int32)."""
        tokens = self.tokens.to(*args, **kwargs)
        if tokens is self.tokens:
            return self
        device = tokens.device
        return dataclasses.replace(
            self,
            tokens=tokens,
            cu_seqlens=self.cu_seqlens.to(device),
            frame_cu_seqlens=self.frame_cu_seqlens.to(device),
        )

    def select(self, batch_indices) -> "VisionMemory":
        """The memory of samples ``batch_indices`` (a list or 1-D integer tensor; repeats allowed),
        in that order: for beam search (``repeat_interleave``) and cache reordering."""
        _check_unsharded(self, "select()")
        idx = torch.as_tensor(batch_indices).reshape(-1)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"batch_indices must be integers, got dtype {idx.dtype}")
        idx = idx.tolist()
        B = self.batch_size
        if not idx:
            raise ValueError("batch_indices must select at least one sample")
        if any(i < -B or i >= B for i in idx):
            raise ValueError(f"batch_indices must index the {B} samples, got {idx}")
        idx = [i % B for i in idx]
        if idx == list(range(B)):
            return self
        starts = [0]
        for t in self.frames_per_sample:
            starts.append(starts[-1] + t * self.tokens_per_frame)
        rows = [torch.arange(starts[i], starts[i + 1]) for i in idx]
        rows = torch.cat(rows).to(self.tokens.device)
        frames = [self.frames_per_sample[i] for i in idx]
        return self._from_packed(
            self.tokens.index_select(0, rows),
            frames,
            self.tokens_per_frame,
            self.pooled_per_frame,
            self.cache_kv,
        )


class _NormalizeTokens(torch.autograd.Function):
    """:func:`normalize_tokens` whose backward recomputes it from the tokens instead of saving
    its statistics through autograd's saved-tensor hooks. The result is shared by every layer,
    but only the first layer of a forward computes it: under non-reentrant activation
    checkpointing (``torch.utils.checkpoint``, transformers' gradient checkpointing) the
    recomputation of that layer finds it cached and would save fewer tensors than the original
    forward, which checkpointing rejects. Saving nothing through the hooks keeps every layer's
    count the same; the tokens themselves are held by the memory anyway."""

    @staticmethod
    def forward(ctx, tokens, norm, eps):
        ctx.tokens, ctx.version, ctx.norm, ctx.eps = tokens, tensor_version(tokens), norm, eps
        return normalize_tokens(tokens, norm, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tokens = ctx.tokens
        if tensor_version(tokens) != ctx.version:  # what autograd checks for a saved tensor
            raise RuntimeError(
                "VisionMemory.tokens were modified in place after the normalised "
                "tokens were computed from them; the gradient would be wrong"
            )
        with torch.enable_grad():
            x = tokens.detach().requires_grad_()
            (dx,) = torch.autograd.grad(normalize_tokens(x, ctx.norm, ctx.eps), x, grad)
        return dx, None, None


def _reusable(entry: tuple, tokens: torch.Tensor) -> bool:
    """Whether a ``_normalized`` entry ``(source, version, value, id)`` still stands for
    ``tokens`` and can be used in the current grad mode."""
    source, version, value, _ = entry
    if source is not tokens or version != tensor_version(tokens):
        return False
    if torch.is_grad_enabled():
        if tokens.requires_grad and not value.requires_grad:
            return False  # computed without a graph: the gradient would not reach the tokens
        if torch.is_inference(value) and not torch.is_inference_mode_enabled():
            return False  # autograd cannot save an inference tensor for backward
    return True


def _forget_after_backward(memory: VisionMemory, key: tuple, entry_id: int):
    """A gradient hook that drops ``memory._normalized[key]`` once a backward reaches it (the
    graph's buffers are freed then). It holds the memory weakly and the entry by its id only, so
    the tensor's hook keeps nothing alive."""
    memory_ref = weakref.ref(memory)

    def hook(grad):
        owner = memory_ref()
        if owner is not None:
            entry = owner._normalized.get(key)
            if entry is not None and entry[3] == entry_id:
                del owner._normalized[key]
        return None

    return hook


def _check_unsharded(memory: VisionMemory, what: str) -> None:
    if memory.frame_shard is not None:
        raise NotImplementedError(
            f"VisionMemory.{what} is not supported on a frame-sharded "
            "memory (it holds only this rank's frames)"
        )


def _check_pooled(pooled_per_frame) -> None:
    if not is_int(pooled_per_frame) or pooled_per_frame < 1:
        raise ValueError(f"pooled_per_frame must be an int >= 1, got {pooled_per_frame!r}")
