"""The reference CrossLMM (arXiv 2505.17020): SigLIP -> token pooling -> 2-layer GELU MLP
projector -> Qwen2 with a dual cross-attention layer (DCAL) after the self-attention of every K-th
layer.

How it is put together (DESIGN.md, "Model side"):

* :class:`CrossLMMModel` - ``vision_tower`` (transformers' ``SiglipVisionModel``), ``pooling``
  (:class:`crosslmm_ops.nn.TokenPooling`, no parameters), ``multi_modal_projector`` and
  ``language_model`` (:class:`CrossLMMTextModel`, a ``Qwen2Model``). The video's frames are encoded
  once; their pooled, projected tokens replace the ``video_token_id`` placeholders of
  ``input_ids``, and their *unpooled* tokens become the :class:`~crosslmm_ops.nn.VisionMemory`
  every DCAL attends to.
* :class:`CrossLMMTextModel` - transformers' ``Qwen2Model`` with the DCAL of layer ``i`` at
  ``language_model.layers.<i>.dcal``; every other parameter keeps its Qwen2 name, so a Qwen2
  checkpoint's tensors load into it unchanged. No transformers forward code is copied: the DCALs
  are inserted and fed by :mod:`crosslmm_ops.models.decoder`, the same code ``patch_llava`` uses.
* :class:`CrossLMMForConditionalGeneration` - the model plus ``lm_head``: a training forward with
  ``labels`` -> loss, and ``generate()``. Generation keeps the memory once, in the cache beside the
  self-attention K/V (:class:`~crosslmm_ops.models.decoder.CrossLMMCache`), so decode steps pass
  no pixels and no features.
* :func:`set_training_stage` - the paper's two stages (1: projector + V2V, T2V off, the rest
  frozen; 2: everything, T2V on).

Tested with the oldest and the newest transformers release of the supported range (see
``pyproject.toml``); the cache is passed on under whatever name the release uses. Not
supported: a second video in a conversation that continues a cache (the cache keeps one memory per
sample), chunked prefill
(``prefill_chunk_size``: a chunk would hold only part of the video's placeholders) and
``torch.compile(fullgraph=True)`` (the DCALs read segment lengths on the host). Activation
checkpointing must keep transformers' default ``use_reentrant=False``: the memory reaches the
checkpointed layers as a keyword argument, which reentrant checkpointing does not differentiate.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from crosslmm_ops.models.configuration import CrossLMMConfig, preset_config
from crosslmm_ops.models.decoder import (
    VISION_KWARG,
    CrossLMMCache,
    DCALDecoder,
    ForwardVision,
    cache_vision_memory,
    find_cache,
    in_static_decode_step,
    past_length,
)
from crosslmm_ops.models.graph_decode import generate_with_cuda_graph
from crosslmm_ops.models.vision import (
    CompiledTowerCache,
    auto_chunk_frames,
    check_chunk_frames,
    compiled_tower,
    encode_in_chunks,
)
from crosslmm_ops.nn import DualCrossAttention, TanhGate, TokenPooling, VisionMemory

# ----------------------------------------------------------------------------------------------
# The decoder: Qwen2 with a DCAL after the self-attention of every K-th layer
# ----------------------------------------------------------------------------------------------


class CrossLMMTextModel(Qwen2Model):
    """transformers' ``Qwen2Model`` with a :class:`~crosslmm_ops.nn.DualCrossAttention` after the
    self-attention of the layers ``dcal_layers`` (``layers.<i>.dcal``; every other parameter keeps
    its Qwen2 name, so a Qwen2 checkpoint's tensors load into it unchanged). The DCALs are
    inserted and fed by :class:`~crosslmm_ops.models.decoder.DCALDecoder`, the same code that
    :func:`~crosslmm_ops.models.patch_llava` uses; ``forward`` takes the usual Qwen2 arguments
    plus ``crosslmm_vision`` (:class:`~crosslmm_ops.models.decoder.ForwardVision`; absent: no
    DCAL runs)."""

    def __init__(self, config, dcal_layers: Sequence[int] = (), dcal_kwargs: dict | None = None):
        super().__init__(config)
        dcals = {i: DualCrossAttention(**(dcal_kwargs or {})) for i in dcal_layers}
        self.dcal_decoder = DCALDecoder(self, dcals, who="CrossLMM")
        self.dcal_layers = tuple(dcal_layers)

    @property
    def dcals(self) -> dict[int, DualCrossAttention]:
        """``{layer index: DCAL}``."""
        return self.dcal_decoder.dcals

    def _init_weights(self, module):
        # Qwen2's init leaves unknown modules alone, so a gate materialised empty by
        # from_pretrained (a checkpoint without DCALs) would keep garbage: give it its start value
        # (transformers' init guard skips a gate that was loaded).
        if isinstance(module, TanhGate):
            module.reset_parameters()
            return
        super()._init_weights(module)


# ----------------------------------------------------------------------------------------------
# Vision side
# ----------------------------------------------------------------------------------------------


class CrossLMMMultiModalProjector(nn.Module):
    """The 2-layer MLP from vision width to text width (LLaVA's: ``linear_1``, GELU,
    ``linear_2``)."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, text, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text, text, bias=config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _memory_from_packed(
    tokens: torch.Tensor,
    frames: Sequence[int],
    tokens_per_frame: int,
    pooled_per_frame: int,
    cache_kv: bool = False,
) -> VisionMemory:
    """A VisionMemory over ``tokens (F * N, Dv)`` (the real frames, sample after sample), without
    copying them (``VisionMemory.from_list`` would concatenate per-sample tensors)."""
    N, device = tokens_per_frame, tokens.device
    cu = [0]
    for t in frames:
        cu.append(cu[-1] + t * N)
    return VisionMemory(
        tokens=tokens,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        frame_cu_seqlens=torch.arange(sum(frames) + 1, dtype=torch.int32, device=device) * N,
        frames_per_sample=tuple(frames),
        tokens_per_frame=N,
        pooled_per_frame=pooled_per_frame,
        max_seqlen=max(frames, default=0) * N,
        cache_kv=cache_kv,
    )


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


# Both extend transformers' own output classes, so their cache field has the name the installed
# release gives it (which generate() reads); they are filled from the language model's output
# field by field, never naming that field.


@dataclasses.dataclass
class CrossLMMModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``vision_memory``: the memory the DCALs of this forward
    read (None when there was no video)."""

    vision_memory: VisionMemory | None = None


@dataclasses.dataclass
class CrossLMMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``vision_memory``."""

    vision_memory: VisionMemory | None = None


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------


class CrossLMMPreTrainedModel(PreTrainedModel):
    config_class = CrossLMMConfig
    config: CrossLMMConfig
    base_model_prefix = "model"
    input_modalities = ("video", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Class names (accelerate's device maps): a DCAL stays on its decoder layer's device.
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The DCALs read segment lengths back to the host (varlen attention): no fullgraph compile.
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, TanhGate):
            module.reset_parameters()
            return
        super()._init_weights(module)


class CrossLMMModel(CrossLMMPreTrainedModel):
    """Vision tower, pooling, projector and the DCAL-equipped Qwen2 decoder, without the LM head.

    ``vision_chunk_frames``: how many frames go through the vision tower at once (None: chosen
    from the tower's shape for about 256 MiB of transient activations,
    :func:`~crosslmm_ops.models.vision.auto_chunk_frames`); any value gives the same tokens.

    ``vision_compile``: False (default) runs the tower eagerly; True, or a dict of
    ``torch.compile`` keyword arguments, runs each chunk through the compiled tower
    (:func:`~crosslmm_ops.models.vision.compiled_tower`; the first call compiles)."""

    vision_chunk_frames: int | None = None
    vision_compile: bool | dict | None = False

    def __init__(self, config: CrossLMMConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.pooling = TokenPooling(**config.pool_kwargs())
        self.multi_modal_projector = CrossLMMMultiModalProjector(config)
        self.language_model = CrossLMMTextModel(
            config.text_config, config.dcal_layer_indices, config.dcal_kwargs()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def dcals(self) -> dict[int, DualCrossAttention]:
        """``{decoder layer index: DCAL}``."""
        return self.language_model.dcals

    # ------------------------------------------------------------------------------------------
    # Video -> features
    # ------------------------------------------------------------------------------------------

    def frames_per_sample(self, video_frame_mask, batch: int, frames: int) -> list[int]:
        """Frames per sample from ``video_frame_mask (B, T)`` (True = real frame, a prefix of
        each row; None = every frame real)."""
        if video_frame_mask is None:
            return [frames] * batch
        if not isinstance(video_frame_mask, torch.Tensor) or video_frame_mask.dtype != torch.bool:
            got = getattr(video_frame_mask, "dtype", type(video_frame_mask).__name__)
            raise ValueError(
                f"video_frame_mask must be a bool tensor (True = real frame), got {got}"
            )
        if tuple(video_frame_mask.shape) != (batch, frames):
            raise ValueError(
                f"video_frame_mask must have shape (B, T) = {(batch, frames)}, got "
                f"{tuple(video_frame_mask.shape)}"
            )
        counts = video_frame_mask.sum(1)
        prefix = torch.arange(frames, device=video_frame_mask.device) < counts.unsqueeze(1)
        values = torch.cat(
            [(prefix == video_frame_mask).all().reshape(1).long(), counts.long()]
        ).tolist()  # one host read
        if not values[0]:
            raise ValueError(
                "video_frame_mask must mark a prefix of each row: real frames first, "
                "padding frames after"
            )
        return values[1:]

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        *,
        vision_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """The encoder tokens of the real frames, packed: ``(F, N, Dv)`` with sample 0's frames
        first, and the number of frames of each sample.

        ``pixel_values_videos (B, T, 3, H, W)`` go through the vision tower (only the real frames);
        ``vision_features (B, T, N, Dv)`` are taken as the tower's output (precomputed features,
        e.g. to skip SigLIP in benchmarks). ``video_frame_mask (B, T)`` bool marks the real frames
        (a prefix of each row; None: all).
        """
        config = self.config
        if (pixel_values_videos is None) == (vision_features is None):
            raise ValueError("give exactly one of pixel_values_videos and vision_features")
        if pixel_values_videos is not None:
            x, name = pixel_values_videos, "pixel_values_videos"
            vc = config.vision_config
            if not isinstance(x, torch.Tensor) or x.dim() != 5:
                raise ValueError(
                    f"pixel_values_videos must have shape (B, T, {vc.num_channels}, "
                    f"H, W), got {getattr(x, 'shape', type(x).__name__)}"
                )
            if (
                x.shape[2] != vc.num_channels
                or x.shape[3] != vc.image_size
                or x.shape[4] != vc.image_size
            ):
                raise ValueError(
                    f"pixel_values_videos must have frames of shape "
                    f"({vc.num_channels}, {vc.image_size}, {vc.image_size}) "
                    f"(vision_config), got {tuple(x.shape[2:])}"
                )
        else:
            x, name = vision_features, "vision_features"
            N, Dv = config.tokens_per_frame, config.vision_config.hidden_size
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(
                    f"vision_features must have shape (B, T, N, Dv) = (B, T, {N}, "
                    f"{Dv}), got {getattr(x, 'shape', type(x).__name__)}"
                )
            if x.shape[2] != N:
                grid = config.encoder_grid
                raise ValueError(
                    f"vision_features has N = {x.shape[2]} tokens per frame, but the "
                    f"encoder grid {grid[0]}x{grid[1]} (vision_config image_size "
                    f"{config.vision_config.image_size} / patch_size "
                    f"{config.vision_config.patch_size}) has {N}"
                )
            if x.shape[3] != Dv:
                raise ValueError(
                    f"vision_features has width {x.shape[3]}, the vision tower's is {Dv}"
                )
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a floating tensor (normalised pixels / features), "
                f"got dtype {x.dtype}"
            )
        B, T = x.shape[:2]
        frames = self.frames_per_sample(video_frame_mask, B, T)
        real = (
            x.reshape(B * T, *x.shape[2:])
            if video_frame_mask is None
            else x[video_frame_mask.to(x.device)]
        )
        if pixel_values_videos is None:
            return real, frames
        if real.shape[0] == 0:
            N, Dv = config.tokens_per_frame, config.vision_config.hidden_size
            return real.new_zeros(0, N, Dv, dtype=self.vision_tower.dtype), frames
        return self._encode_frames(real), frames

    def _compiled_tower_cache(self) -> CompiledTowerCache:
        """Where ``vision_compile`` keeps the compiled tower (made on first use, so a model
        unpickled from before the option existed has one too)."""
        cache = self.__dict__.get("_compiled_vision_tower")
        if cache is None:
            cache = self.__dict__["_compiled_vision_tower"] = CompiledTowerCache()
        return cache

    def _encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's tokens ``(F, N, Dv)`` of frames ``(F, 3, H, W)``, encoded
        ``vision_chunk_frames`` at a time (see :mod:`crosslmm_ops.models.vision`)."""
        config, vc = self.config, self.config.vision_config
        tower_dtype = self.vision_tower.dtype
        chunk = check_chunk_frames(self.vision_chunk_frames) or auto_chunk_frames(
            config.tokens_per_frame, vc.hidden_size, vc.intermediate_size, tower_dtype
        )
        layer = config.vision_feature_layer
        tower = compiled_tower(
            self.vision_tower, self.vision_compile, self._compiled_tower_cache(), self.vision_tower
        )

        def encode(x: torch.Tensor) -> torch.Tensor:
            if layer is None:
                return tower(pixel_values=x.to(tower_dtype)).last_hidden_state
            out = tower(pixel_values=x.to(tower_dtype), output_hidden_states=True)
            return out.hidden_states[layer]

        return encode_in_chunks(encode, pixels, chunk)

    # ------------------------------------------------------------------------------------------

    def visual_positions(self, input_ids: torch.Tensor, frames: list[int]) -> torch.Tensor:
        config = self.config
        n = self.pooling.tokens_out
        mask = input_ids == config.video_token_id
        counts = mask.sum(1).tolist()
        for b, (c, t) in enumerate(zip(counts, frames)):
            if c != t * n:
                raise ValueError(
                    f"sample {b} of input_ids has {c} video placeholder tokens (video_token_id="
                    f"{config.video_token_id}), but its {t} frames x {n} pooled tokens per frame "
                    f"need {t * n}: the frame count does not match the placeholders"
                )
        return mask

    def forward_vision(
        self,
        memory: VisionMemory | None,
        visual_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        shape,
        device,
    ) -> ForwardVision:
        """What one forward hands the DCALs (see :mod:`crosslmm_ops.models.decoder`): ``memory``
        (None: a decode step, which reads the cache's), V2V at the pooled positions
        ``visual_mask``, T2V at the text positions that are not padding (none while T2V is
        off)."""
        config = self.config
        if not (config.dcal_t2v and config.dcal_t2v_enabled):
            text_mask = torch.zeros(shape, dtype=torch.bool, device=device)
        elif visual_mask is not None:
            text_mask = ~visual_mask
            # Padding asks nothing. (A compileable cache's generate() passes prepared 4-D masks
            # instead; padding rows then query too, which no real position reads.)
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                text_mask = text_mask & attention_mask.to(torch.bool)
        else:
            text_mask = None  # decoding: every new position is text
        return ForwardVision(memory, visual_mask, text_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CrossLMMModelOutputWithPast | tuple:
        """See :meth:`CrossLMMForConditionalGeneration.forward`. The cache (any
        :class:`~transformers.cache_utils.Cache` in ``kwargs``, under the name the installed
        transformers uses) goes on to the language model as it came."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None and (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
            or input_ids.dim() != 2
        ):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (B, L), got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                f"{tuple(getattr(input_ids, 'shape', ()))}"
            )
        has_video = pixel_values_videos is not None or vision_features is not None
        if has_video and input_ids is None:
            raise ValueError(
                "a video needs input_ids: its pooled tokens replace the video_token_id placeholders"
            )
        if video_frame_mask is not None and not has_video:
            raise ValueError(
                "video_frame_mask was given without pixel_values_videos or vision_features"
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        B = inputs_embeds.shape[0]
        if use_cache is None:
            use_cache = getattr(config.text_config, "use_cache", True)
        if self.language_model.gradient_checkpointing and self.training:
            use_cache = False  # as transformers does: caching and checkpointing do not mix
        cache = find_cache(kwargs)

        memory = None
        visual_mask = None
        features = None
        if has_video:
            source = pixel_values_videos if pixel_values_videos is not None else vision_features
            if source.shape[0] != B:
                raise ValueError(
                    f"the video batch ({source.shape[0]}) must match input_ids' batch ({B})"
                )
            if past_length(cache) > 0:
                raise ValueError(
                    "a video can only come with the first forward of a cache (the "
                    "prefill): the cache keeps one memory per sample"
                )
            features, frames = self.get_video_features(
                pixel_values_videos, video_frame_mask, vision_features=vision_features
            )
            visual_mask = self.visual_positions(input_ids, frames)
            if features.shape[0] == 0:  # every sample without frames: nothing to pool or attend
                features = None
                visual_mask = None
        if features is not None:
            features = features.to(self.multi_modal_projector.linear_1.weight.dtype)
            # Pool before the projector (DESIGN.md): the LLM sees n tokens per frame.
            pooled = self.multi_modal_projector(self.pooling(features))
            inputs_embeds = inputs_embeds.masked_scatter(
                visual_mask.unsqueeze(-1), pooled.to(inputs_embeds.dtype)
            )
            N = features.shape[1]
            flat = features.reshape(-1, features.shape[-1])
            if config.dcal_keys == "projected":
                flat = self.multi_modal_projector(flat)
            memory = _memory_from_packed(
                flat.to(inputs_embeds.dtype),
                frames,
                N,
                self.pooling.tokens_out,
                config.dcal_cache_kv,
            )
        elif (
            not has_video
            and input_ids is not None
            and not in_static_decode_step()
            and past_length(cache) == 0
        ):
            # A prompt with placeholders needs its video (checked in a prefill only: while
            # decoding, the placeholder id is suppressed and no host read is wanted per token).
            placeholders = int((input_ids == config.video_token_id).sum())
            if placeholders:
                raise ValueError(
                    f"input_ids holds {placeholders} video placeholder tokens (video_token_id="
                    f"{config.video_token_id}) but no pixel_values_videos or vision_features "
                    "were given (and the cache holds no video)"
                )

        vision = self.forward_vision(
            memory, visual_mask, attention_mask, inputs_embeds.shape[:2], inputs_embeds.device
        )
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{VISION_KWARG: vision},
            **kwargs,
        )
        if memory is None:  # a decode step: the memory its DCALs read from the cache
            # (not `find_cache(...) or cache`: a cache with no layers yet is falsy)
            out_cache = find_cache(outputs)
            memory = cache_vision_memory(cache if out_cache is None else out_cache)
        out = CrossLMMModelOutputWithPast(**dict(outputs.items()), vision_memory=memory)
        return out.to_tuple() if return_dict is False else out


class CrossLMMForConditionalGeneration(CrossLMMPreTrainedModel, GenerationMixin):
    """A CrossLMM with its LM head: ``forward`` (with ``labels``: the causal-LM loss) and
    ``generate()``.

    Inputs: ``input_ids (B, L)`` holding ``video_token_id`` placeholders, ``pooled_per_frame`` per
    frame, frame after frame; the video as ``pixel_values_videos (B, T, 3, H, W)`` or as
    precomputed encoder tokens ``vision_features (B, T, N, Dv)``; ``video_frame_mask (B, T)`` bool
    when samples have different frame counts (real frames first). Generation encodes the video in
    the prefill only: the decode steps read the memory from the cache.

    Build one with ``CrossLMMForConditionalGeneration(config)``,
    :meth:`from_preset` (``"crosslmm-2b"``, ``"crosslmm-7b"``, ``"crosslmm-tiny"``; random
    weights) or ``from_pretrained(path)`` (safetensors, written by ``save_pretrained``).
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CrossLMMConfig):
        super().__init__(config)
        self.model = CrossLMMModel(config)
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()
        # A video placeholder is never a token to produce: generating one would make the next
        # step's input claim frames that do not exist.
        if self.generation_config is not None and not self.generation_config.suppress_tokens:
            self.generation_config.suppress_tokens = [config.video_token_id]

    @classmethod
    def from_preset(
        cls, name: str, *, dtype: torch.dtype | None = None, **overrides
    ) -> "CrossLMMForConditionalGeneration":
        """A randomly initialised model of preset ``name`` (see :func:`preset_config`;
        ``overrides`` change its config). Build on the GPU directly with
        ``with torch.device("cuda"): CrossLMMForConditionalGeneration.from_preset(...)``."""
        config = preset_config(name, **overrides)
        if dtype is None:
            return cls(config)
        return cls._from_config(config, dtype=dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @property
    def dcals(self) -> dict[int, DualCrossAttention]:
        """``{decoder layer index: DCAL}``."""
        return self.model.dcals

    def get_video_features(self, *args, **kwargs):
        return self.model.get_video_features(*args, **kwargs)

    def set_training_stage(self, stage: int, **kwargs) -> list[str]:
        """See :func:`set_training_stage`."""
        return set_training_stage(self, stage, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CrossLMMCausalLMOutputWithPast | tuple:
        """Logits (and with ``labels`` the shifted causal-LM loss; label -100 is ignored, as for
        padding and the video placeholders, which are not tokens to predict).

        * ``input_ids (B, L)`` with ``pooled_per_frame`` ``video_token_id`` placeholders per frame;
        * ``pixel_values_videos (B, T, 3, H, W)`` or ``vision_features (B, T, N, Dv)``;
        * ``video_frame_mask (B, T)`` bool: real frames (a prefix of each row), for batches whose
          samples have different frame counts;
        * ``attention_mask``, ``position_ids``, the cache (``past_key_values``, or ``cache`` from
          transformers 5.24), ``use_cache``, ``logits_to_keep``: as for any transformers causal
          LM. A cache holds the video's memory after the prefill (:class:`CrossLMMCache`); later
          calls give no video.
        """
        outputs = self.model(
            return_dict=True,
            input_ids=input_ids,
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            vision_features=vision_features,
            video_frame_mask=video_frame_mask,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                **kwargs,
            )
        fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        out = CrossLMMCausalLMOutputWithPast(loss=loss, logits=logits, **fields)
        return out.to_tuple() if return_dict is False else out

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(self, *args, cuda_graph: bool = False, **kwargs):
        """transformers' ``generate()``; with ``cuda_graph=True``, greedy decoding whose decode
        step is captured once in a CUDA graph and replayed for every token
        (:func:`~crosslmm_ops.models.generate_with_cuda_graph`: the same tokens as greedy
        ``generate()``, ``max_new_tokens`` required, a ``LongTensor`` of sequences returned)."""
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        if cuda_graph:
            return generate_with_cuda_graph(self, *args, **kwargs)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # transformers drops pixel_values_videos after the prefill when a cache is used; drop the
        # other video inputs too: the memory is in the cache, the decode steps carry text only.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("pixel_values_videos", "vision_features", "video_frame_mask"):
                model_inputs.pop(key, None)
        return model_inputs


# ----------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------


def _crosslmm_model(model: nn.Module) -> CrossLMMModel:
    if isinstance(model, CrossLMMForConditionalGeneration):
        return model.model
    if isinstance(model, CrossLMMModel):
        return model
    raise ValueError(
        f"model must be a CrossLMMForConditionalGeneration or CrossLMMModel, got "
        f"{type(model).__name__}"
    )


def _v2v_parameters(dcal: DualCrossAttention) -> list[nn.Parameter]:
    """The parameters the V2V branch computes with (its own, and what it shares with T2V)."""
    if dcal.v2v is None:
        return []
    params = list(dcal.v2v.parameters())
    if dcal.shares_kv:
        for name in ("vision_norm", "k_proj", "v_proj"):
            module = getattr(dcal, name, None)
            if module is not None:
                params += list(module.parameters())
    if dcal.shares_gate:
        params += list(dcal.gate.parameters())
    return params


def set_training_stage(
    model: nn.Module,
    stage: int,
    *,
    train_vision_tower: bool = True,
) -> list[str]:
    """Set up the paper's training stages; returns the names of the trainable parameters.

    * ``stage=1``: only the projector and the V2V branch of every DCAL train (with a shared K/V or
      gate, those too); the vision tower, the LLM, the T2V branches (and the LM head) are frozen,
      and T2V does not run (``config.dcal_t2v_enabled = False``).
    * ``stage=2``: everything trains (the vision tower only with ``train_vision_tower=True``), and
      T2V runs.

    ``model``: a :class:`CrossLMMForConditionalGeneration` or :class:`CrossLMMModel`.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if not isinstance(train_vision_tower, bool):
        raise ValueError(f"train_vision_tower must be a bool, got {train_vision_tower!r}")
    inner = _crosslmm_model(model)
    if stage == 1:
        model.requires_grad_(False)
        inner.multi_modal_projector.requires_grad_(True)
        for dcal in inner.dcals.values():
            for p in _v2v_parameters(dcal):
                p.requires_grad_(True)
        enabled = False
    else:
        model.requires_grad_(True)
        inner.vision_tower.requires_grad_(train_vision_tower)
        enabled = True
    # The same config object is shared by the wrapper and the inner model.
    inner.config.dcal_t2v_enabled = enabled
    if model.config is not inner.config:
        model.config.dcal_t2v_enabled = enabled
    return [name for name, p in model.named_parameters() if p.requires_grad]


__all__ = [
    "CrossLMMCache",
    "CrossLMMForConditionalGeneration",
    "CrossLMMModel",
    "CrossLMMPreTrainedModel",
    "CrossLMMTextModel",
    "cache_vision_memory",
    "set_training_stage",
]
