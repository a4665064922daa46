"""``patch_llava``: turn a transformers LLaVA-style model into a CrossLMM, in place.

Supported (transformers 5.x): ``LlavaOnevisionForConditionalGeneration`` and
``LlavaNextVideoForConditionalGeneration`` (their video path) and ``LlavaForConditionalGeneration``
(its image path: an image is a one-frame video), or their inner ``*Model``. What the patch does:

1. **Pooling before the projector.** The vision tower's selected features ``X`` (after the layer
   selection and the CLS crop, i.e. the projector's input, ``N`` tokens per frame) are pooled per
   frame to ``n`` tokens with :class:`~crosslmm_ops.nn.TokenPooling` (default: adaptive average to
   ``pooled_grid x pooled_grid``), and only those are projected into the LLM sequence. The model's
   own video pooling (LLaVA-OneVision's bilinear ``apply_pooling`` after the projector,
   LLaVA-NeXT-Video's ``vision_resampler`` before it) is bypassed. The prompt must then hold
   ``frames * n`` placeholders per video (+1 for LLaVA-OneVision's newline token), ``n`` per LLaVA
   image: :func:`patch_llava_processor` makes the processor write those counts.
2. **The unpooled tokens kept.** ``X`` of every video/image is kept and packed per sample into a
   :class:`~crosslmm_ops.nn.VisionMemory` (a sample's videos back to back; a sample without any has
   zero frames). On transformers releases whose ``generate()`` encodes the vision on the inner
   model before the prefill (``mm_encoder_outputs``), the unpooled tokens ride along under the key
   ``crosslmm_encoded`` of the encoder's output; beams expand the batch after that, which the
   memory follows.
3. **DCALs.** A :class:`~crosslmm_ops.nn.DualCrossAttention` is added as ``dcal`` to every
   ``every``-th decoder layer (layers ``every-1, 2*every-1, ...``) and runs after the layer's
   self-attention and its residual add, before ``post_attention_layernorm`` and the MLP:
   the pooled visual positions query ``X`` (V2V), the text positions query ``X`` (T2V); both are
   non-causal (a position sees all of its sample's frames). Gates start at 0. The DCALs are
   inserted, fed, and given the memory through generation (kept on the cache, reordered with
   beams) by :mod:`crosslmm_ops.models.decoder`, the same code the reference model uses; this
   module only says, per forward, what the vision is and which positions query it.
4. **Saved with the model.** The patch (layers, pooling, DCAL arguments) is recorded in the
   model's config under ``crosslmm_patch``, so ``save_pretrained`` keeps it and
   :func:`load_patched` patches the loaded model the same way and loads the DCAL weights.

Everything is done with torch module hooks and instance attributes, never by replacing a module, so
the original ``state_dict`` keys stay as they were (the DCALs add ``...layers.{i}.dcal.*``),
accelerate's device hooks (which replace ``module.forward``) keep working, and gradient
checkpointing recomputes the DCALs with the layer.

With every gate at 0 the patched model's logits are bitwise those of the same model patched with
``dcal=False`` (pooling only). That is what makes patching a pretrained model safe.

Not thread-safe: one patched model runs one forward at a time (as with any stateful module).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from crosslmm_ops.models.decoder import (
    VISION_KWARG,
    DCALDecoder,
    ForwardVision,
    cache_vision_memory,
    check_decoder_layers,
)
from crosslmm_ops.models.vision import (
    CompiledTowerCache,
    auto_chunk_frames,
    check_chunk_frames,
    compiled_tower,
    concat_outputs,
)
from crosslmm_ops.nn import DualCrossAttention, TokenPooling, VisionMemory

# Where the unpooled tokens travel with the vision encoder's output (a ModelOutput key, not a plain
# attribute: accelerate's hooks rebuild ModelOutputs from their items when they move the inputs,
# calling ``.to`` on every value that has one).
_ENCODED_KEY = "crosslmm_encoded"
# The attribute that marks a patched model (the outer one and its inner *Model) and holds the patch,
# and the config key under which save_pretrained keeps what load_patched needs.
PATCH_ATTR = "crosslmm_patch"
CONFIG_KEY = "crosslmm_patch"
# The key under which a patched processor's placeholder count is saved.
PROCESSOR_KEY = "crosslmm_pooled_per_frame"

_MIN_TRANSFORMERS = (5, 17)


# ----------------------------------------------------------------------------------------------
# The supported families
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    modality: str  # "video" or "image": the input that is pooled and remembered
    token_attr: str  # config attribute of that input's placeholder token id
    extra_tokens: int  # placeholders per item that are not pooled frame tokens
    other_token_attrs: tuple  # placeholders of other inputs: neither V2V nor T2V queries
    bypass: str | None  # the model's own video pooling, switched off while encoding


_FAMILIES = {
    # LLaVA-OneVision: pooler_output of a video is frames*n pooled tokens + one image_newline.
    "llava_onevision": _Family(
        "llava_onevision", "video", "video_token_id", 1, ("image_token_id",), "apply_pooling"
    ),
    "llava_next_video": _Family(
        "llava_next_video", "video", "video_token_id", 0, ("image_token_id",), "vision_resampler"
    ),
    "llava": _Family("llava", "image", "image_token_id", 0, (), None),
}


def _family_of(model: nn.Module) -> tuple[_Family, nn.Module]:
    """The family of ``model`` and its inner ``*Model`` (vision tower + projector + LM)."""
    import transformers

    classes = {
        "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
        "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"),
        "llava": ("LlavaForConditionalGeneration", "LlavaModel"),
    }
    for name, (outer_name, inner_name) in classes.items():
        outer_cls = getattr(transformers, outer_name, None)
        inner_cls = getattr(transformers, inner_name, None)
        if outer_cls is not None and isinstance(model, outer_cls):
            return _FAMILIES[name], model.model
        if inner_cls is not None and isinstance(model, inner_cls):
            return _FAMILIES[name], model
    supported = ", ".join(c for pair in classes.values() for c in pair)
    raise ValueError(
        f"patch_llava supports {supported} (transformers); got {type(model).__name__}. "
        "Other LLaVA variants (LLaVA-NeXT images, VipLlava, Video-LLaVA, ...) are not supported."
    )


def _transformers_version() -> tuple[int, int]:
    import transformers

    parts = transformers.__version__.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


# ----------------------------------------------------------------------------------------------
# Small records passed between the hooks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Encoded:
    """What one patched get_*_features call produced: the unpooled tokens of each item (video or
    image) in encoding order, ``(T_v, N, Dv)`` each, and how many placeholders each item fills."""

    items: list
    placeholders: list

    def to(self, *args, **kwargs) -> "_Encoded":
        return _Encoded([t.to(*args, **kwargs) for t in self.items], self.placeholders)


@dataclasses.dataclass(eq=False)
class _Recording:
    """Open while a patched get_*_features call runs: the projector's (unpooled) input."""

    raw: torch.Tensor | None = None


@dataclasses.dataclass(eq=False)
class _ForwardState:
    """One forward of the inner model: its token inputs, and the encoded vision (if any)."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: Any
    encoded: _Encoded | None = None


class _FeaturesWithMemory:
    """Replaces the inner model's ``get_video_features`` / ``get_image_features`` (an instance
    attribute, so the class and other models are untouched): runs the original with the pooling
    switched on and keeps the unpooled tokens. ``__wrapped__`` makes ``inspect.signature`` report
    the original's parameters, which ``generate()`` reads to pick the encoder's arguments."""

    def __init__(self, patch: "CrossLMMPatch", original):
        self._patch = patch
        self.__wrapped__ = original
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return self._patch._encode(self.__wrapped__, args, kwargs)


class _BypassedPooling:
    """LLaVA-OneVision's ``apply_pooling`` (bilinear, after the projector) as the identity while a
    patched encode runs: the tokens were already pooled before the projector."""

    def __init__(self, patch: "CrossLMMPatch", original):
        self._patch = patch
        self.__wrapped__ = original

    def __call__(self, features):
        if self._patch._recordings:
            return features
        return self.__wrapped__(features)


class _ChunkedTower:
    """The vision tower's ``forward`` over the frames of a patched encode, ``chunk`` frames at a
    time (:mod:`crosslmm_ops.models.vision`); its outputs concatenated, so the model sees one
    output. Calls outside a patched encode (OneVision/NeXT-Video images) run as they were."""

    def __init__(self, patch: "CrossLMMPatch", tower: nn.Module, original):
        self._patch, self._tower = patch, tower
        self.__wrapped__ = original
        self._compiled = CompiledTowerCache()

    def __call__(self, pixel_values=None, *args, **kwargs):
        patch = self._patch
        if not patch._recordings or not isinstance(pixel_values, torch.Tensor):
            return self.__wrapped__(pixel_values, *args, **kwargs)
        chunk = check_chunk_frames(patch.vision_chunk_frames)
        if chunk is None:
            config = getattr(self._tower, "config", None)
            inner = getattr(config, "vision_config", config)
            chunk = auto_chunk_frames(
                patch.tokens_per_frame,
                inner.hidden_size,
                inner.intermediate_size,
                pixel_values.dtype,
            )
        forward = compiled_tower(
            self.__wrapped__, patch.vision_compile, self._compiled, self._tower
        )
        total = pixel_values.shape[0]
        if chunk >= total:
            return forward(pixel_values, *args, **kwargs)
        return concat_outputs(
            [forward(pixel_values[i : i + chunk], *args, **kwargs) for i in range(0, total, chunk)]
        )


# ----------------------------------------------------------------------------------------------
# The patch
# ----------------------------------------------------------------------------------------------


class CrossLMMPatch:
    """What :func:`patch_llava` did to a model; found at ``model.crosslmm_patch``.

    * ``family`` (``"llava_onevision"``, ``"llava_next_video"``, ``"llava"``), ``modality``
      (``"video"`` or ``"image"``);
    * ``pooling`` (the :class:`~crosslmm_ops.nn.TokenPooling`), ``grid`` (the encoder's token
      grid), ``tokens_per_frame`` ``N``, ``pooled_per_frame`` ``n``;
    * ``layers``: indices of the decoder layers with a DCAL; ``dcals``: ``{index: module}``
      (empty with ``dcal=False``);
    * :meth:`placeholders_per_item` (how many placeholder tokens a video/image now takes),
      :meth:`memory` (the vision memory a cache holds), :meth:`remove`.
    """

    def __init__(
        self,
        model,
        inner,
        family: _Family,
        pooling: TokenPooling,
        layers,
        dcal: bool,
        dcal_kwargs: dict,
    ):
        self.model = model
        self.inner = inner
        self.family = family.name
        self.modality = family.modality
        self._family = family
        self.pooling = pooling
        self.grid = pooling.grid
        self.tokens_per_frame = pooling.tokens_in
        self.pooled_per_frame = pooling.tokens_out
        self.layers = tuple(layers) if dcal else ()
        self.dcal_enabled = dcal
        self.dcal_kwargs = dict(dcal_kwargs)
        config = inner.config
        self.token_id = getattr(config, family.token_attr)
        self.other_token_ids = tuple(
            t for t in (getattr(config, a, None) for a in family.other_token_attrs) if t is not None
        )
        self._hooks: list = []
        self.decoder: DCALDecoder | None = None
        # Frames per vision-tower call while encoding a video (None: automatic); any value gives
        # the same tokens. vision_compile: run those calls through torch.compile (True, or a dict
        # of its keyword arguments; see crosslmm_ops.models.vision.compiled_tower).
        self.vision_chunk_frames: int | None = None
        self.vision_compile: bool | dict | None = False
        self._overrides: list[tuple[object, str]] = []
        self._recordings: list[_Recording] = []
        self._states: list[_ForwardState] = []

    # -- public helpers ------------------------------------------------------------------------

    @property
    def dcals(self) -> dict[int, nn.Module]:
        """``{layer index: the layer's DCAL}``."""
        return self.decoder.dcals if self.decoder is not None else {}

    def placeholders_per_item(self, frames: int = 1) -> int:
        """Placeholder tokens one video of ``frames`` frames (one image: ``frames=1``) takes in
        the prompt of the patched model."""
        return frames * self.pooled_per_frame + self._family.extra_tokens

    @staticmethod
    def memory(cache) -> VisionMemory | None:
        """The :class:`~crosslmm_ops.nn.VisionMemory` stored on a cache by a patched forward."""
        return cache_vision_memory(cache)

    def remove(self) -> None:
        """Undo the patch: hooks, instance attributes and the DCAL modules go (their weights with
        them); the model is the unpatched model again (with its original pooling)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for obj, name in self._overrides:
            if name in obj.__dict__:
                delattr(obj, name)
        self._overrides.clear()
        if self.decoder is not None:
            self.decoder.remove()
            self.decoder = None
        self.layers = ()
        for obj in (self.model, self.inner):
            if obj.__dict__.get(PATCH_ATTR) is self:
                delattr(obj, PATCH_ATTR)
        if CONFIG_KEY in self.inner.config.__dict__:
            delattr(self.inner.config, CONFIG_KEY)

    def saved_record(self) -> dict:
        """The patch as ``save_pretrained`` writes it into the model's config (key
        ``crosslmm_patch``), for :func:`load_patched`: layers, pooling, DCAL arguments."""
        return {
            "format": 1,
            "family": self.family,
            "layers": list(self.layers),
            "dcal": self.dcal_enabled,
            "pooling": _jsonable(self.pooling.arguments),
            "dcal_kwargs": _jsonable(self.dcal_kwargs),
        }

    def __repr__(self) -> str:
        return (
            f"CrossLMMPatch(family={self.family!r}, grid={self.grid}, "
            f"pooled_per_frame={self.pooled_per_frame}, layers={list(self.layers)})"
        )

    # -- installing ----------------------------------------------------------------------------

    def _override(self, obj, name: str, value) -> None:
        setattr(obj, name, value)
        self._overrides.append((obj, name))

    def _install(self, dcals: dict[int, nn.Module]) -> None:
        inner = self.inner
        features_name = f"get_{self.modality}_features"
        self._override(
            inner, features_name, _FeaturesWithMemory(self, getattr(inner, features_name))
        )
        tower = inner.vision_tower
        self._override(tower, "forward", _ChunkedTower(self, tower, tower.forward))
        self._hooks.append(
            inner.multi_modal_projector.register_forward_pre_hook(self._projector_pre)
        )
        bypass = self._family.bypass
        if bypass == "apply_pooling":
            self._override(inner, "apply_pooling", _BypassedPooling(self, inner.apply_pooling))
        elif bypass == "vision_resampler":
            self._hooks.append(inner.vision_resampler.register_forward_hook(self._resampler_post))
        if not self.dcal_enabled:
            return
        self._hooks.append(inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))
        self._hooks.append(inner.register_forward_hook(self._inner_post, always_call=True))
        lm = inner.language_model
        # Registered before the decoder's own pre-hook, which reads what this one hands it.
        self._hooks.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.decoder = DCALDecoder(lm, dcals, who="patch_llava")

    # -- encoding: pooling before the projector, keeping the unpooled tokens -------------------

    def _encode(self, original, args, kwargs):
        if self.family == "llava" and kwargs.get("image_sizes") is not None:
            raise ValueError(
                "patch_llava: LLaVA with image_sizes (variable-resolution vision towers "
                "such as Pixtral) is not supported; its features are split by image "
                "size, which pooling changes"
            )
        pixels = (
            args[0]
            if args
            else next(
                (
                    kwargs[k]
                    for k in ("pixel_values_videos", "pixel_values")
                    if kwargs.get(k) is not None
                ),
                None,
            )
        )
        record = _Recording()
        self._recordings.append(record)
        try:
            out = original(*args, **kwargs)
        finally:
            self._recordings.pop()
        if not self.dcal_enabled:
            return out
        if record.raw is None:
            raise RuntimeError(
                f"patch_llava: {type(self.inner).__name__}.get_{self.modality}"
                "_features did not call multi_modal_projector; this transformers "
                "version's model code is not supported"
            )
        raw = record.raw
        if self.modality == "video":
            if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
                raise ValueError(
                    "patch_llava: pixel_values_videos must be a (videos, frames, "
                    "channels, height, width) tensor, got "
                    f"{getattr(pixels, 'shape', type(pixels).__name__)}"
                )
            videos, frames = pixels.shape[:2]
            items = list(raw.reshape(videos, frames, *raw.shape[1:]).unbind(0))
        else:  # an image is a one-frame video
            items = [x.unsqueeze(0) for x in raw.unbind(0)]
        encoded = _Encoded(items, [self.placeholders_per_item(t.shape[0]) for t in items])
        if isinstance(out, dict):  # a ModelOutput (return_dict=True): generate()'s path
            # It travels to the forward in mm_encoder_outputs.
            out[_ENCODED_KEY] = encoded
        if self._states:
            self._states[-1].encoded = encoded
            # Before the model's own check, which only says that the counts differ.
            self._check_placeholder_total(self._states[-1])
        return out

    def _projector_pre(self, module, args):
        if not self._recordings:  # the projector outside a patched encode (e.g. OV/NV images)
            return None
        x = args[0]
        if x.dim() != 3 or x.shape[1] != self.tokens_per_frame:
            raise ValueError(
                f"patch_llava: the projector's input has shape {tuple(x.shape)}, expected "
                f"(frames, {self.tokens_per_frame}, D) for the {self.grid[0]}x{self.grid[1]} token "
                "grid (with a CLS token, use vision_feature_select_strategy='default')"
            )
        record = self._recordings[-1]
        if self.dcal_enabled:
            if record.raw is not None:
                raise RuntimeError("patch_llava: the projector ran twice in one encode")
            record.raw = x
        # TokenPooling takes [..., T, N, D]: the frames of all videos are one batch of frames.
        return (self.pooling(x.unsqueeze(0)).squeeze(0),) + tuple(args[1:])

    def _resampler_post(self, module, args, output):
        # LLaVA-NeXT-Video pools before the projector in its vision_resampler: return its input,
        # which the projector's pre-hook pools instead.
        return args[0] if self._recordings else None

    # -- the forward: memory and masks for the DCALs -------------------------------------------

    def _inner_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state = _ForwardState(
            input_ids=input_ids,
            inputs_embeds=kwargs.get("inputs_embeds"),
            attention_mask=kwargs.get("attention_mask"),
        )
        mm = kwargs.get("mm_encoder_outputs")
        if isinstance(mm, dict) and mm.get(self.modality) is not None:
            output = mm[self.modality]
            state.encoded = output.get(_ENCODED_KEY) if isinstance(output, dict) else None
        if state.encoded is not None:
            self._check_placeholder_total(state)
        self._states.append(state)

    def _check_placeholder_total(self, state: _ForwardState) -> None:
        if state.input_ids is None:  # inputs_embeds: the model's own check
            return
        have = int((state.input_ids == self.token_id).sum())
        sizes = state.encoded.placeholders
        need = sum(sizes)
        # generate() may have expanded the rows (beams) after the encode: a whole multiple.
        if have == need or (need and have > need and have % need == 0):
            return
        raise ValueError(self._count_message(have, sizes))

    def _count_message(self, have, sizes) -> str:
        per = "frames x " if self.modality == "video" else ""
        newline = " + 1 newline" if self._family.extra_tokens else ""
        return (
            f"patch_llava: the prompt has {have} {self.modality} placeholder tokens"
            f"{' per sample' if isinstance(have, list) else ''}, but the {len(sizes)} encoded "
            f"{self.modality}(s) need {sizes} ({per}{self.pooled_per_frame} pooled tokens"
            f"{newline} each). Write the prompt with the patched count: "
            "patch_llava_processor(processor, model) makes the processor do it"
        )

    def _inner_post(self, module, args, output):
        if self._states:
            self._states.pop()

    def _token_mask(self, state: _ForwardState, token_id: int, shape) -> torch.Tensor:
        if state.input_ids is not None:
            ids = state.input_ids
            if tuple(ids.shape) != tuple(shape):
                raise ValueError(
                    f"patch_llava: input_ids has shape {tuple(ids.shape)}, the "
                    f"language model got {tuple(shape)} positions"
                )
            return ids == token_id
        embeds = state.inputs_embeds
        embedding = self.inner.get_input_embeddings()
        token = embedding(
            torch.tensor(token_id, dtype=torch.long, device=embedding.weight.device)
        ).to(embeds.device, embeds.dtype)
        return (embeds == token).all(-1)

    def _assign(self, encoded: _Encoded, placeholders: torch.Tensor):
        """Which items (videos/images) belong to which sample, from the placeholder counts per
        row; returns the memory and the visual mask (placeholders minus non-frame tokens)."""
        B = placeholders.shape[0]
        counts = placeholders.sum(1).tolist()
        sizes = encoded.placeholders
        total_rows, total_items = sum(counts), sum(sizes)
        expand = 1
        if total_rows != total_items:
            # generate() with num_beams / num_return_sequences > 1 expands input_ids (each row
            # repeated `expand` times in place) after the vision was encoded.
            ratio = total_rows // total_items if total_items else 0
            if not (
                ratio > 1
                and total_rows == ratio * total_items
                and B % ratio == 0
                and all(counts[i] == counts[i - i % ratio] for i in range(B))
            ):
                raise ValueError(
                    self._count_message(counts, sizes) + "; chunked prefill, which "
                    "splits a video across forwards, is not supported"
                )
            expand = ratio
        owners: list[list[int]] = []
        item = 0
        for b, count in enumerate(counts[::expand]):
            mine, filled = [], 0
            while filled < count and item < len(sizes):
                mine.append(item)
                filled += sizes[item]
                item += 1
            if filled != count:
                raise ValueError(
                    f"patch_llava: sample {b} has {count} {self.modality} placeholder tokens, "
                    f"which is not a whole number of its {self.modality}s ({sizes} tokens each, "
                    "in order)"
                )
            owners.append(mine)
        owners = [mine for mine in owners for _ in range(expand)]
        first = encoded.items[0]
        per_sample = [
            torch.cat([encoded.items[i] for i in mine])
            if mine
            else first.new_zeros((0,) + tuple(first.shape[1:]))
            for mine in owners
        ]
        memory = VisionMemory.from_list(per_sample, self.pooled_per_frame)
        visual = placeholders
        extra = self._family.extra_tokens
        if extra and total_rows:
            # The last `extra` placeholders of each item (LLaVA-OneVision's newline) are not
            # frame tokens: neither V2V nor T2V queries.
            item_sizes = torch.tensor([sizes[i] for mine in owners for i in mine])
            ends = item_sizes.cumsum(0)
            keep = torch.ones(total_rows, dtype=torch.bool)
            for e in range(1, extra + 1):
                keep[ends - e] = False
            flat = placeholders.nonzero(as_tuple=True)
            visual = torch.zeros_like(placeholders)
            keep = keep.to(placeholders.device)
            visual[flat[0][keep], flat[1][keep]] = True
        return memory, visual

    def _lm_pre(self, module, args, kwargs):
        """Hand the language model this forward's vision (:class:`ForwardVision`): the memory of
        the videos/images it encoded (None: a decode step, which reads the cache's) and which
        positions query V2V and T2V."""
        if not self._states:  # the language model called on its own: no vision, no DCAL
            return None
        state = self._states[-1]
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        shape = embeds.shape[:2]
        placeholders = self._token_mask(state, self.token_id, shape)
        not_text = placeholders
        for token_id in self.other_token_ids:
            not_text = not_text | self._token_mask(state, token_id, shape)
        memory = visual = None
        if state.encoded is not None:
            memory, visual = self._assign(state.encoded, placeholders)
        text = ~not_text
        mask = state.attention_mask
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[0] == shape[0]
            and mask.shape[1] >= shape[1]
        ):
            text = text & mask[:, -shape[1] :].to(device=text.device, dtype=torch.bool)
        kwargs = dict(kwargs)
        kwargs[VISION_KWARG] = ForwardVision(memory, visual, text)
        return args, kwargs


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

_DCAL_PARAMS = {
    name for name in inspect.signature(DualCrossAttention.__init__).parameters if name != "self"
}


def _default_layers(num_layers: int, every) -> list[int]:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if every > num_layers:
        raise ValueError(
            f"every={every} is larger than the language model's {num_layers} layers: "
            "no layer would get a DCAL"
        )
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def _parameter_of(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    raise ValueError(
        f"patch_llava: {type(module).__name__} has no parameters to take the device and dtype from"
    )


def patch_llava(
    model: nn.Module,
    every: int = 4,
    pooled_grid: int | Sequence[int] = 3,
    *,
    layers: Sequence[int] | None = None,
    pooling: TokenPooling | None = None,
    dcal: bool = True,
    **dcal_kwargs,
) -> nn.Module:
    """Turn a transformers LLaVA-style model into a CrossLMM, in place; returns ``model``.

    Args:
        model: ``LlavaOnevisionForConditionalGeneration``,
        ``LlavaNextVideoForConditionalGeneration``
            or ``LlavaForConditionalGeneration`` (or their inner ``*Model``).
        every: a DCAL after the self-attention of every ``every``-th decoder layer (the paper's
            K = 4): layers ``every-1, 2*every-1, ...``.
        pooled_grid: pool each frame's token grid to ``pooled_grid x pooled_grid`` (or an
            ``(h, w)`` pair) tokens by adaptive averaging, before the projector (3: 9 tokens).
        layers: the decoder layer indices that get a DCAL (instead of ``every``).
        pooling: a :class:`~crosslmm_ops.nn.TokenPooling` to use instead of the adaptive average
            (e.g. ``TokenPooling(grid, "avg", kernel_size=3)``); its grid must be the encoder's,
            ``temporal_stride`` 1.
        dcal: False patches the pooling only (no DCALs, no memory): the baseline that a patched
            model with all gates at 0 reproduces exactly.
        **dcal_kwargs: passed to :class:`~crosslmm_ops.nn.DualCrossAttention` (``v2v``, ``t2v``,
            ``v2v_scope``, ``share_kv``, ``share_gate``, ``vision_norm``, ``query_norm``, ``bias``,
            ``gate_init``, ``backend``, ...). Defaults: ``hidden_size``, ``num_heads``,
            ``num_kv_heads``, ``head_dim`` and ``norm_eps`` from the text config, ``vision_size``
            the projector's input width (the vision tower's hidden size).

    The prompt of a patched model holds ``frames * n`` placeholders per video (+1 newline for
    LLaVA-OneVision) and ``n`` per LLaVA image, ``n`` = pooled tokens per frame
    (``model.crosslmm_patch.pooled_per_frame``); :func:`patch_llava_processor` fixes a processor.
    LLaVA-OneVision / LLaVA-NeXT-Video images keep their original (unpooled, anyres) path; their
    placeholders are neither V2V nor T2V queries.

    Raises ``ValueError`` for an unsupported model, a model that is already patched, or bad
    arguments. Patch before ``accelerate``'s ``dispatch_model`` / ``device_map`` placement or
    after it (the DCALs are created on their layer's device), but not on offloaded (meta) weights.
    """
    major_minor = _transformers_version()
    if major_minor[0] < 5:
        import transformers

        raise RuntimeError(
            f"patch_llava needs transformers>=5.17,<6; found {transformers.__version__}"
        )
    if major_minor < _MIN_TRANSFORMERS:
        import transformers

        warnings.warn(
            f"patch_llava is tested with transformers>=5.17; found {transformers.__version__}",
            stacklevel=2,
        )
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be a transformers model (nn.Module), got {type(model).__name__}"
        )
    existing = getattr(model, PATCH_ATTR, None) or getattr(
        getattr(model, "model", None), PATCH_ATTR, None
    )
    if existing is not None:
        raise ValueError(
            f"this model is already patched ({existing!r}); patch_llava patches a "
            "model once (call model.crosslmm_patch.remove() first to re-patch)"
        )
    family, inner = _family_of(model)
    if getattr(inner, PATCH_ATTR, None) is not None:
        raise ValueError(
            "this model's inner model is already patched; patch_llava patches a model once"
        )
    if not isinstance(dcal, bool):
        raise ValueError(f"dcal must be a bool, got {dcal!r}")
    unknown = sorted(set(dcal_kwargs) - _DCAL_PARAMS)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown}: patch_llava passes extra keyword "
            f"arguments to DualCrossAttention, which takes {sorted(_DCAL_PARAMS)}"
        )
    if "vision_size" in dcal_kwargs or "hidden_size" in dcal_kwargs:
        raise ValueError("hidden_size and vision_size come from the model; do not pass them")

    config = inner.config
    vision_config, text_config = config.vision_config, config.text_config
    image_size, patch_size = vision_config.image_size, vision_config.patch_size
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    grid = (hw[0] // ps[0], hw[1] // ps[1])
    if pooling is None:
        pooling = TokenPooling(grid, "adaptive", output_size=pooled_grid)
    elif not isinstance(pooling, TokenPooling):
        raise ValueError(
            f"pooling must be a crosslmm_ops.nn.TokenPooling, got {type(pooling).__name__}"
        )
    if tuple(pooling.grid) != grid:
        raise ValueError(
            f"pooling.grid is {pooling.grid}, but the vision tower makes a "
            f"{grid[0]}x{grid[1]} token grid ({image_size} px / patch {patch_size})"
        )
    if pooling.temporal_stride != 1:
        raise ValueError(
            "pooling.temporal_stride must be 1: every frame keeps its pooled tokens "
            "and its original tokens"
        )
    if family.bypass == "vision_resampler":
        pool = getattr(inner.vision_resampler, "pool", None)
        if isinstance(pool, nn.Conv2d):
            raise ValueError(
                "patch_llava: LLaVA-NeXT-Video with spatial_pool_mode='conv' (a learned "
                "resampler) is not supported; CrossLMM pools with token_pool"
            )

    lm = inner.language_model
    num_layers = len(getattr(lm, "layers", ()))
    if layers is None:
        indices = _default_layers(num_layers, every) if dcal else []
    else:
        indices = list(layers)
        if (
            any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
            or len(set(indices)) != len(indices)
            or not indices
        ):
            raise ValueError(f"layers must be distinct ints, got {layers!r}")
        if any(not -num_layers <= i < num_layers for i in indices):
            raise ValueError(f"layers must index the {num_layers} decoder layers, got {layers!r}")
        indices = sorted(i % num_layers for i in indices)
    check_decoder_layers(lm, indices if dcal else [], "patch_llava")

    patch = CrossLMMPatch(model, inner, family, pooling, indices, dcal, dcal_kwargs)
    modules: dict[int, nn.Module] = {}
    if dcal:
        projector = inner.multi_modal_projector
        if not isinstance(getattr(projector, "linear_1", None), nn.Linear):
            raise ValueError(
                f"patch_llava: the projector {type(projector).__name__} has no linear_1 "
                "to read the vision width from"
            )
        defaults = dict(
            num_heads=text_config.num_attention_heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None),
            head_dim=getattr(text_config, "head_dim", None),
            norm_eps=float(getattr(text_config, "rms_norm_eps", 1e-6)),
        )
        kwargs = {**defaults, **dcal_kwargs}
        # Build every DCAL before attaching any, so that a bad argument leaves the model as it was.
        for i in indices:
            ref = _parameter_of(lm.layers[i])
            if ref.device.type == "meta":
                raise ValueError(
                    f"patch_llava: decoder layer {i} has its weights on the meta device "
                    "(offloaded); patch before offloading"
                )
            module = DualCrossAttention(
                text_config.hidden_size, projector.linear_1.in_features, **kwargs
            )
            modules[i] = module.to(device=ref.device, dtype=ref.dtype)
    patch._install(modules)
    # What load_patched needs to patch a saved model the same way, saved with its config.
    inner.config.crosslmm_patch = patch.saved_record()
    # Plain attributes (not submodules): the marker for "already patched", and the handle.
    object.__setattr__(model, PATCH_ATTR, patch)
    if inner is not model:
        object.__setattr__(inner, PATCH_ATTR, patch)
    return model


# ----------------------------------------------------------------------------------------------
# The processor's placeholder count
# ----------------------------------------------------------------------------------------------


class _ProcessorOverride:
    """Base of the processor overrides: plain callables stored on the processor instance, never
    copied (``ProcessorMixin.to_dict`` deep-copies the instance's ``__dict__``)."""

    def __deepcopy__(self, memo):
        return self


class _VideoTokens(_ProcessorOverride):
    def __init__(self, processor, per_frame: int, extra: int):
        self.token, self.per_frame, self.extra = processor.video_token, per_frame, extra

    def __call__(self, video_inputs: dict | None = None, video_idx: int = 0, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.token * (frames * self.per_frame + self.extra)


class _ImageTokens(_ProcessorOverride):
    def __init__(self, processor, per_image: int):
        self.token, self.per_image = processor.image_token, per_image

    def __call__(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs) -> str:
        return self.token * self.per_image


class _ToDictWithCount(_ProcessorOverride):
    """``to_dict`` that adds the patched count, so that ``save_pretrained`` writes it into
    ``processor_config.json`` (a plain ``from_pretrained`` ignores the key;
    :func:`load_patched_processor` reads it)."""

    def __init__(self, original, per_frame: int):
        self.original, self.per_frame = original, per_frame

    def __call__(self):
        return {**self.original(), PROCESSOR_KEY: self.per_frame}


class _MultimodalCounts(_ProcessorOverride):
    """``_get_num_multimodal_tokens`` with the patched video (or LLaVA image) counts."""

    def __init__(self, original, modality: str, per_frame: int, extra: int):
        self.original, self.modality, self.per_frame, self.extra = (
            original,
            modality,
            per_frame,
            extra,
        )

    def __call__(self, image_sizes=None, video_sizes=None, **kwargs):
        if self.modality == "video":
            data = self.original(image_sizes=image_sizes, **kwargs)
            if video_sizes is not None:
                data.num_video_tokens = [
                    int(frames) * self.per_frame + self.extra for frames, *_ in video_sizes
                ]
            return data
        data = self.original(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.per_frame] * len(image_sizes)
        return data


def patch_llava_processor(
    processor, model: nn.Module | None = None, *, pooled_per_frame: int | None = None
):
    """Make a transformers processor write the placeholder counts of a patched model; in place,
    returns ``processor``.

    ``LlavaOnevisionProcessor``: ``frames * n + 1`` ``<video>`` tokens per video (the +1 is the
    newline token); ``LlavaNextVideoProcessor``: ``frames * n``; ``LlavaProcessor``: ``n``
    ``<image>`` tokens per image. ``n`` is ``model.crosslmm_patch.pooled_per_frame`` (give the
    patched ``model``) or ``pooled_per_frame``. Images of LLaVA-OneVision / LLaVA-NeXT-Video keep
    their counts (their path is not pooled).
    """
    import transformers

    families = {
        "llava_onevision": getattr(transformers, "LlavaOnevisionProcessor", None),
        "llava_next_video": getattr(transformers, "LlavaNextVideoProcessor", None),
        "llava": getattr(transformers, "LlavaProcessor", None),
    }
    family = next(
        (name for name, cls in families.items() if cls is not None and isinstance(processor, cls)),
        None,
    )
    if family is None:
        raise ValueError(
            f"patch_llava_processor supports LlavaOnevisionProcessor, "
            f"LlavaNextVideoProcessor and LlavaProcessor; got {type(processor).__name__}"
        )
    if processor.__dict__.get("crosslmm_pooled_per_frame") is not None:
        raise ValueError(
            "this processor is already patched (placeholders per frame: "
            f"{processor.crosslmm_pooled_per_frame})"
        )
    if (model is None) == (pooled_per_frame is None):
        raise ValueError("give exactly one of model (a patched model) and pooled_per_frame")
    if model is not None:
        patch = getattr(model, PATCH_ATTR, None)
        if patch is None:
            raise ValueError("model is not patched: call patch_llava(model) first")
        if patch.family != family:
            raise ValueError(
                f"processor {type(processor).__name__} does not match the patched "
                f"{patch.family} model"
            )
        n = patch.pooled_per_frame
    else:
        if (
            isinstance(pooled_per_frame, bool)
            or not isinstance(pooled_per_frame, int)
            or pooled_per_frame < 1
        ):
            raise ValueError(f"pooled_per_frame must be an int >= 1, got {pooled_per_frame!r}")
        n = pooled_per_frame
    spec = _FAMILIES[family]
    original_counts = processor._get_num_multimodal_tokens
    if spec.modality == "video":
        processor.replace_video_token = _VideoTokens(processor, n, spec.extra_tokens)
    else:
        processor.replace_image_token = _ImageTokens(processor, n)
    processor._get_num_multimodal_tokens = _MultimodalCounts(
        original_counts, spec.modality, n, spec.extra_tokens
    )
    processor.to_dict = _ToDictWithCount(processor.to_dict, n)
    processor.crosslmm_pooled_per_frame = n
    return processor


def load_patched_processor(path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a processor saved after :func:`patch_llava_processor`, with its patched placeholder
    count (``AutoProcessor.from_pretrained(path, **from_pretrained_kwargs)``, then patched with
    the count saved in ``processor_config.json``)."""
    import transformers

    path = os.fspath(path)
    config_file = os.path.join(path, "processor_config.json")
    count = None
    if os.path.isfile(config_file):
        with open(config_file) as f:
            count = json.load(f).get(PROCESSOR_KEY)
    if count is None:
        raise ValueError(
            f"load_patched_processor: {path} holds no `{PROCESSOR_KEY}` in "
            "processor_config.json: it was not saved from a patched processor"
        )
    processor = transformers.AutoProcessor.from_pretrained(path, **from_pretrained_kwargs)
    return patch_llava_processor(processor, pooled_per_frame=count)


# ----------------------------------------------------------------------------------------------
# Saving and loading a patched model
# ----------------------------------------------------------------------------------------------


def _jsonable(value):
    """``value`` with tuples as lists (a config's JSON form), checked to be JSON data."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"patch_llava: the argument value {value!r} cannot be saved with the model's "
        "config (JSON); pass plain numbers, strings, bools or lists"
    )


_DCAL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.dcal\.(.+)$")


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(
        f"load_patched: {path} holds no model.safetensors (or its index); save the "
        "patched model with save_pretrained (safetensors)"
    )


def _load_dcal_weights(patch: "CrossLMMPatch", path: str) -> None:
    """Copy the saved DCAL tensors into the patch's DCALs; every DCAL tensor must be found."""
    from safetensors import safe_open

    wanted = {
        (i, name): tensor
        for i, dcal in patch.dcals.items()
        for name, tensor in dcal.state_dict(keep_vars=True).items()
    }
    found = set()
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                match = _DCAL_KEY.search(key)
                if match is None:
                    continue
                slot = (int(match.group(1)), match.group(2))
                if slot not in wanted:
                    raise ValueError(
                        f"load_patched: the checkpoint holds {key}, which the saved "
                        f"patch (layers {list(patch.layers)}) has no place for"
                    )
                with torch.no_grad():
                    wanted[slot].copy_(f.get_tensor(key))
                found.add(slot)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(
            f"load_patched: the checkpoint lacks DCAL tensors "
            f"{[f'layers.{i}.dcal.{n}' for i, n in missing[:4]]}"
            f"{' ...' if len(missing) > 4 else ''}"
        )


def load_patched(path: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """Load a patched model saved with ``save_pretrained``, patched again as it was saved.

    ``path``: a local folder written by ``model.save_pretrained`` after :func:`patch_llava`. The
    model class comes from the saved config's ``architectures``; ``from_pretrained_kwargs``
    (``dtype``, ``device_map``, ``attn_implementation``, ...) go to its ``from_pretrained``. The
    layers, pooling and DCAL arguments come from the config key ``crosslmm_patch`` that
    :func:`patch_llava` wrote, and the DCAL weights and gates from the checkpoint."""
    import transformers

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"load_patched: {path!r} is not a folder written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("format") != 1:
        raise ValueError(
            f"load_patched: the config in {path} has no `{CONFIG_KEY}` record: it was "
            "not saved from a patched model (load it with from_pretrained and call "
            "patch_llava)"
        )
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(
            f"load_patched: the config in {path} names no transformers model class "
            f"(architectures={architectures})"
        )
    # The DCAL tensors are not the unpatched model's: load them below, without transformers
    # reporting them as unused.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(level)
    unexpected = [k for k in info.get("unexpected_keys", ()) if not _DCAL_KEY.search(k)]
    if unexpected or info.get("missing_keys"):
        warnings.warn(
            f"load_patched: loading {path} left missing keys "
            f"{sorted(info.get('missing_keys', ()))[:4]} and unexpected keys "
            f"{sorted(unexpected)[:4]}",
            stacklevel=2,
        )
    inner = model.model if getattr(model, "model", None) is not None else model
    delattr(inner.config, CONFIG_KEY)
    patch_llava(
        model,
        layers=record["layers"] or None,
        pooling=TokenPooling(**record["pooling"]),
        dcal=record["dcal"],
        **record["dcal_kwargs"],
    )
    if record["dcal"]:
        patch = getattr(model, PATCH_ATTR)
        _load_dcal_weights(patch, path)
    return model


def lora_target_modules(names: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> str:
    """A PEFT ``target_modules`` pattern for the modules called ``names`` *outside* the DCALs.

    The DCALs' own projections are also called ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``;
    a plain name list would put adapters on them too, and while their gates are at 0 those
    adapters get no gradient. Train the DCALs themselves (weights and gates) as full modules::

        LoraConfig(target_modules=lora_target_modules(["q_proj", "v_proj"]),
                   modules_to_save=["dcal"])
    """
    if (
        isinstance(names, str)
        or not names
        or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names)
    ):
        raise ValueError(f"names must be a non-empty list of module names, got {names!r}")
    return rf"(?!.*\.dcal\.).*\.({'|'.join(names)})"


# The name crosslmm_ops/models/__init__.py imports.
fix_processor_token_count = patch_llava_processor

__all__ = [
    "CrossLMMPatch",
    "fix_processor_token_count",
    "load_patched",
    "load_patched_processor",
    "lora_target_modules",
    "patch_llava",
    "patch_llava_processor",
]
