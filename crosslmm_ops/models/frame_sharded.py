"""The reference CrossLMM with its video sharded by frames over a process group, for DDP/FSDP2
training of long videos: each rank encodes and keeps its own frames, the DCALs run the sharded
attention of :mod:`crosslmm_ops.distributed`, and the LLM runs replicated on every rank of the
group."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crosslmm_ops.distributed import GRADIENTS, FrameShard, frame_group
from crosslmm_ops.models.crosslmm import (
    CrossLMMCausalLMOutputWithPast,
    CrossLMMForConditionalGeneration,
)
from crosslmm_ops.models.decoder import VISION_KWARG


class FrameShardedCrossLMM(nn.Module):
    """A :class:`~crosslmm_ops.models.CrossLMMForConditionalGeneration` whose video is sharded by
    frames over ``group``: wrap it, then wrap this in DDP or apply FSDP2 as usual.

    Per forward: this rank's frames go through the vision tower (or are taken as encoder
    tokens), are pooled and projected, and the pooled tokens of all ranks are all-gathered (one
    small collective) so that every rank builds the same LLM sequence; the original tokens stay
    on their rank as a sharded :class:`~crosslmm_ops.nn.VisionMemory`, so every DCAL runs the
    sharded attention. The LLM runs, replicated, on every rank of the group: the data-parallel
    dimension is between groups. Logits and loss are the unsharded model's (up to rounding).

    ``gradients``: ``"mean"`` (default: after DDP's/FSDP's average over the ranks every gradient
    is exact) or ``"exact"``; see :mod:`crosslmm_ops.distributed`. ``group``: default
    :func:`~crosslmm_ops.distributed.frame_group` (all ranks, a group of its own). Training
    forward only (no cache, no generation).
    """

    def __init__(self, model: nn.Module, group=None, *, gradients: str = "mean"):
        super().__init__()
        if not isinstance(model, CrossLMMForConditionalGeneration):
            raise ValueError(
                f"model must be a CrossLMMForConditionalGeneration, got {type(model).__name__}"
            )
        if gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {GRADIENTS}, got {gradients!r}")
        if model.model.pooling.temporal_stride != 1:
            raise NotImplementedError("temporal pooling would mix frames of different ranks")
        self.model = model
        self.group = frame_group() if group is None else group
        self.gradients = gradients

    def frame_shard(
        self, frames_per_sample: Sequence[int], frames_per_rank: Sequence[int] | None = None
    ) -> FrameShard:
        return FrameShard(
            frames_per_sample, self.group, frames_per_rank=frames_per_rank, gradients=self.gradients
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        frames_per_sample: Sequence[int] | None = None,
        frames_per_rank: Sequence[int] | None = None,
        logits_to_keep: int = 0,
    ):
        """The model's training forward (``input_ids``, ``attention_mask``, ``position_ids``,
        ``labels`` replicated on every rank of the group), with the video given either

        * whole, on every rank: ``pixel_values_videos (B, T, 3, H, W)`` or ``vision_features (B,
          T, N, Dv)`` (+ ``video_frame_mask (B, T)``); this rank takes its frames, or
        * already sharded: ``frames_per_sample`` (the batch's frame counts) and the video as this
          rank's frames only, packed ``(F_r, 3, H, W)`` / ``(F_r, N, Dv)`` (the frames
          :class:`FrameShard` assigns to this rank with ``frames_per_rank``).

        Returns the model's output (``loss``, ``logits``, ``vision_memory``: this rank's)."""
        outer, inner = self.model, self.model.model
        config = inner.config
        if (pixel_values_videos is None) == (vision_features is None):
            raise ValueError("give exactly one of pixel_values_videos and vision_features")
        pixels = pixel_values_videos is not None
        video = pixel_values_videos if pixels else vision_features
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"the video must be a tensor, got {type(video).__name__}")
        if frames_per_sample is None:
            if video.dim() != (5 if pixels else 4):
                raise ValueError(f"the whole video must be (B, T, ...), got {tuple(video.shape)}")
            B, T = video.shape[:2]
            frames = inner.frames_per_sample(video_frame_mask, B, T)
            packed = (
                video.reshape(B * T, *video.shape[2:])
                if video_frame_mask is None
                else video[video_frame_mask.to(video.device)]
            )
            shard = self.frame_shard(frames, frames_per_rank)
            local = shard.local(packed)
        else:
            if video_frame_mask is not None:
                raise ValueError(
                    "video_frame_mask is for the whole video; with frames_per_sample "
                    "the video is this rank's frames"
                )
            shard = self.frame_shard(frames_per_sample, frames_per_rank)
            local = video
            if local.dim() != (4 if pixels else 3) or local.shape[0] != shard.num_local_frames:
                raise ValueError(
                    f"with frames_per_sample the video must hold this rank's "
                    f"{shard.num_local_frames} frames packed (F_r, ...), got "
                    f"{tuple(local.shape)}"
                )
        if shard.num_frames == 0:  # no video anywhere: the plain model
            return outer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        if input_ids.shape[0] != len(shard.frames_per_sample):
            raise ValueError(
                f"the video has {len(shard.frames_per_sample)} samples, input_ids "
                f"{input_ids.shape[0]}"
            )

        # This rank's frames only through the tower (a batch of one video of F_r frames).
        empty = local.shape[0] == 0
        if empty:
            # Neither SigLIP nor token_pool runs on no frames. A rank without frames runs its
            # vision side on one blank frame and keeps none of it (adding 0 x its sum): the
            # parameters then take part in the backward on every rank (zero gradients here),
            # as DDP and FSDP expect.
            local = local.new_zeros(1, *local.shape[1:])
        key = "pixel_values_videos" if pixels else "vision_features"
        features, _ = inner.get_video_features(**{key: local.unsqueeze(0)})
        features = features.to(inner.multi_modal_projector.linear_1.weight.dtype)
        pooled = inner.multi_modal_projector(inner.pooling(features))
        if empty:
            features = features[:0] + 0 * features.sum()
            pooled = pooled[:0] + 0 * pooled.sum()
        pooled = shard.gather(pooled)
        inputs_embeds = inner.get_input_embeddings()(input_ids)
        visual_mask = inner.visual_positions(input_ids, list(shard.frames_per_sample))
        inputs_embeds = inputs_embeds.masked_scatter(
            visual_mask.unsqueeze(-1), pooled.to(inputs_embeds.dtype)
        )
        flat = features.reshape(-1, features.shape[-1])
        if config.dcal_keys == "projected":
            flat = inner.multi_modal_projector(flat)
        memory = shard.memory(
            flat.to(inputs_embeds.dtype), config.tokens_per_frame, inner.pooling.tokens_out
        )

        # The DCALs read the sharded memory; masks as in the unsharded forward.
        vision = inner.forward_vision(
            memory, visual_mask, attention_mask, visual_mask.shape, visual_mask.device
        )
        outputs = inner.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **{VISION_KWARG: vision},
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = outer.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = outer.loss_function(
                logits=logits, labels=labels, vocab_size=config.text_config.vocab_size
            )
        return CrossLMMCausalLMOutputWithPast(loss=loss, logits=logits, vision_memory=memory)


__all__ = ["FrameShardedCrossLMM"]
