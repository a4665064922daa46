"""VisionMemory: the original (unpooled) vision tokens every DCAL layer attends to.

CrossLMM feeds the LLM ``n`` pooled tokens per frame, and lets those (V2V) and the text (T2V)
cross-attend to the ``N`` original tokens of every frame. The original tokens never enter the LLM
sequence; they are packed once per forward over the batch (frames of different samples back to
back, padded frames dropped) and shared, read-only, by every DCAL layer. The packed layout is
flash-attn's varlen layout, so the attention needs no padding and no mask:

* ``cu_seqlens`` - one key segment per sample (global scope: a query sees its whole video);
* ``frame_cu_seqlens`` - one key segment per frame (frame scope: a pooled token sees its frame).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


def _cu_seqlens(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    * ``cache_kv`` - opt-in for generation: each layer's keys and values computed without
      gradients are kept here and reused while the layer's K/V weights and the tokens are
      unchanged (tracked by their version counters; swapping LoRA adapters in and out is not
      tracked: leave it off then). Costs ``2 * Hk * d`` values per token per layer.
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
    # What the DCAL layers derive from the query masks (counts, indices, cu_seqlens), computed by
    # the first layer of a forward and reused by the others (crosslmm_ops.nn.attention._cached).
    _plans: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _kv: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        # Shape-level checks only (no device reads): the constructors derive consistent values.
        self.frames_per_sample = tuple(int(t) for t in self.frames_per_sample)
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 2:
            raise ValueError(f"VisionMemory.tokens must be a (total_tokens, Dv) tensor, got "
                             f"{getattr(self.tokens, 'shape', type(self.tokens).__name__)}")
        if not self.tokens.dtype.is_floating_point:
            raise ValueError(f"VisionMemory.tokens must be a floating tensor, got {self.tokens.dtype}")
        if not isinstance(self.cache_kv, bool):
            raise ValueError(f"VisionMemory.cache_kv must be a bool, got {self.cache_kv!r}")
        for name in ("tokens_per_frame", "pooled_per_frame", "max_seqlen"):
            value = getattr(self, name)
            if not _is_int(value) or value < (0 if name == "max_seqlen" else 1):
                raise ValueError(f"VisionMemory.{name} must be an int >= "
                                 f"{0 if name == 'max_seqlen' else 1}, got {value!r}")
        if any(t < 0 for t in self.frames_per_sample) or not self.frames_per_sample:
            raise ValueError(f"VisionMemory.frames_per_sample must be one int >= 0 per sample, got "
                             f"{self.frames_per_sample}")
        frames = sum(self.frames_per_sample)
        for name, want in (("cu_seqlens", len(self.frames_per_sample) + 1),
                           ("frame_cu_seqlens", frames + 1)):
            cu = getattr(self, name)
            if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 \
                    or tuple(cu.shape) != (want,):
                raise ValueError(f"VisionMemory.{name} must be an int32 tensor of shape ({want},), "
                                 f"got {getattr(cu, 'dtype', None)} {tuple(getattr(cu, 'shape', ()))}")
            if cu.device != self.tokens.device:
                raise ValueError(f"VisionMemory.{name} must be on the tokens' device "
                                 f"{self.tokens.device}, got {cu.device}")
        if self.tokens.shape[0] != frames * self.tokens_per_frame:
            raise ValueError(f"VisionMemory.tokens has {self.tokens.shape[0]} rows, but "
                             f"{frames} frames x {self.tokens_per_frame} tokens per frame = "
                             f"{frames * self.tokens_per_frame}")

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def _from_packed(cls, tokens: torch.Tensor, frames: Sequence[int], tokens_per_frame: int,
                     pooled_per_frame: int, cache_kv: bool = False) -> "VisionMemory":
        frames = tuple(int(t) for t in frames)
        N = int(tokens_per_frame)
        return cls(
            tokens=tokens,
            cu_seqlens=_cu_seqlens([t * N for t in frames], tokens.device),
            frame_cu_seqlens=torch.arange(sum(frames) + 1, dtype=torch.int32,
                                          device=tokens.device) * N,
            frames_per_sample=frames,
            tokens_per_frame=N,
            pooled_per_frame=pooled_per_frame,
            max_seqlen=max(frames, default=0) * N,
            cache_kv=cache_kv,
        )

    @classmethod
    def from_features(cls, features: torch.Tensor, pooled_per_frame: int,
                      frame_mask: torch.Tensor | None = None, *,
                      cache_kv: bool = False) -> "VisionMemory":
        """From a padded batch ``features (B, T, N, Dv)``; ``frame_mask (B, T)`` bool, True for a
        real frame (the real frames must come first in each row; padded frames are dropped).
        Without ``frame_mask`` every frame is real and ``tokens`` is a view of ``features`` when
        its layout allows one."""
        _check_pooled(pooled_per_frame)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            raise ValueError(f"features must have shape (B, T, N, Dv), got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        B, T, N, Dv = features.shape
        if B == 0 or N == 0 or Dv == 0:
            raise ValueError(f"features needs B, N, Dv >= 1, got shape {tuple(features.shape)}")
        if frame_mask is None:
            return cls._from_packed(features.reshape(B * T * N, Dv), [T] * B, N, pooled_per_frame,
                                    cache_kv)
        if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool \
                or tuple(frame_mask.shape) != (B, T):
            raise ValueError(f"frame_mask must be a bool tensor of shape (B, T) = {(B, T)}, got "
                             f"{getattr(frame_mask, 'dtype', type(frame_mask).__name__)} "
                             f"{tuple(getattr(frame_mask, 'shape', ()))}")
        counts = frame_mask.sum(1)
        prefix = torch.arange(T, device=frame_mask.device) < counts.unsqueeze(1)
        # One host read for both the check and the frame counts.
        ok_and_counts = torch.cat([(prefix == frame_mask).all().reshape(1).long(), counts.long()])
        values = ok_and_counts.tolist()
        if not values[0]:
            raise ValueError("frame_mask must mark a prefix of each row (real frames first, padding "
                             "after)")
        frames = values[1:]
        tokens = features[frame_mask.to(features.device)].reshape(-1, Dv)
        return cls._from_packed(tokens, frames, N, pooled_per_frame, cache_kv)

    @classmethod
    def from_list(cls, features_per_sample: Sequence[torch.Tensor], pooled_per_frame: int, *,
                  cache_kv: bool = False) -> "VisionMemory":
        """From one ``(T_b, N, Dv)`` tensor per sample; ``T_b`` may be 0 (a sample without video:
        its T2V rows get zeros from the attention)."""
        _check_pooled(pooled_per_frame)
        feats = list(features_per_sample) if features_per_sample is not None else []
        if not feats:
            raise ValueError("features_per_sample must hold one (T_b, N, Dv) tensor per sample, "
                             "got none")
        first = feats[0]
        for b, f in enumerate(feats):
            if not isinstance(f, torch.Tensor) or f.dim() != 3:
                raise ValueError(f"features_per_sample[{b}] must have shape (T_b, N, Dv), got "
                                 f"{getattr(f, 'shape', type(f).__name__)}")
            if f.shape[1:] != first.shape[1:]:
                raise ValueError(f"features_per_sample[{b}] has (N, Dv) = {tuple(f.shape[1:])}, "
                                 f"sample 0 has {tuple(first.shape[1:])}: all must match")
            if f.dtype != first.dtype or f.device != first.device:
                raise ValueError(f"features_per_sample[{b}] is {f.dtype} on {f.device}, sample 0 "
                                 f"is {first.dtype} on {first.device}: all must match")
        N, Dv = first.shape[1:]
        if N == 0 or Dv == 0:
            raise ValueError(f"features_per_sample needs N, Dv >= 1, got {(N, Dv)}")
        tokens = torch.cat([f.reshape(-1, Dv) for f in feats], 0)
        return cls._from_packed(tokens, [f.shape[0] for f in feats], N, pooled_per_frame,
                                cache_kv)

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
        """The tokens of each sample as ``(T_b, N, Dv)`` views (the inverse of :meth:`from_list`)."""
        out, start = [], 0
        for t in self.frames_per_sample:
            n = t * self.tokens_per_frame
            out.append(self.tokens[start: start + n].reshape(t, self.tokens_per_frame, self.vision_size))
            start += n
        return out

    # ------------------------------------------------------------------------------------------
    # Moving and reordering
    # ------------------------------------------------------------------------------------------

    def to(self, *args, **kwargs) -> "VisionMemory":
        """``tokens.to(*args, **kwargs)``; the offsets follow to the tokens' device (staying int32)."""
        tokens = self.tokens.to(*args, **kwargs)
        if tokens is self.tokens:
            return self
        device = tokens.device
        return dataclasses.replace(self, tokens=tokens,
                                   cu_seqlens=self.cu_seqlens.to(device),
                                   frame_cu_seqlens=self.frame_cu_seqlens.to(device))

    def select(self, batch_indices) -> "VisionMemory":
        """The memory of samples ``batch_indices`` (a list or 1-D integer tensor; repeats allowed),
        in that order: for beam search (``repeat_interleave``) and cache reordering."""
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
        return self._from_packed(self.tokens.index_select(0, rows), frames, self.tokens_per_frame,
                                 self.pooled_per_frame, self.cache_kv)


def _check_pooled(pooled_per_frame) -> None:
    if not _is_int(pooled_per_frame) or pooled_per_frame < 1:
        raise ValueError(f"pooled_per_frame must be an int >= 1, got {pooled_per_frame!r}")
