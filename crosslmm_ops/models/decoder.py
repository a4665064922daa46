"""DCALs inside a transformers decoder, and the vision memory carried through generation.

The one mechanism that both the reference model (:mod:`crosslmm_ops.models.crosslmm`) and
:func:`~crosslmm_ops.models.patch_llava` use. It relies on transformers' public interfaces only:
module hooks, the decoder layer's pre-norm structure (``self_attn``, residual add,
``post_attention_layernorm``, ``mlp``), the :class:`~transformers.cache_utils.Cache` type and its
reordering methods. The cache is found among a call's arguments and a model output's fields *by
its type*, never by a keyword name, so a release that renames the cache argument (transformers
5.24 renamed ``past_key_values`` to ``cache``) changes nothing here.

**Where a DCAL sits.** :class:`DCALDecoder` adds a :class:`~crosslmm_ops.nn.DualCrossAttention`
as ``dcal`` to chosen decoder layers and hooks the layer, without replacing any module: a pre-hook
on ``post_attention_layernorm`` runs ``h' = dcal(h)`` on its input ``h = residual + attn`` and
feeds ``h'`` to the norm, and a hook on ``mlp`` adds ``h' - h`` to the MLP's output, so the layer
returns ``h' + mlp(norm(h'))``: the DCAL's output is the residual stream. With every gate at 0 the
DCAL returns ``h`` itself and the layer computes exactly what the plain layer computes.

**What reaches the DCALs.** The model side (the reference model's forward, the patch's hooks)
calls the language model with the keyword ``crosslmm_vision`` (:class:`ForwardVision`: the new
vision memory, or None to read the cache's, and the query masks). The language model's pre-hook
replaces it with one per-forward :class:`_LayerInputs`, which transformers' decoders hand to every
layer and on to its ``self_attn`` with their other keyword arguments; a pre-hook on each
``self_attn`` takes it out again before the attention sees it. Because it travels as an argument,
gradient checkpointing replays it with the layer.

**The memory through generation.** A forward that brings vision stores the memory on its cache
(:func:`attach_vision_memory`: the cache's class becomes a subclass that reorders the memory with
the K/V on beam search and batch selection); decode steps, which carry no pixels, read it back.
Nothing is skipped silently: a decode step whose cache holds no memory record, a cache that the
hooks could not find, or a forward after which a DCAL layer did not run raises
:class:`DCALSkippedError`.

**Static decode steps.** Inside :func:`static_decode_step` a forward is one decode step of a
loop that a CUDA graph may capture (:mod:`crosslmm_ops.models.graph_decode`): nothing on its
path reads a tensor back to the host or takes a shape from tensor values. The hooks then skip the
checks that need the cache's length (the caller checked once, before the loop), and the DCALs
run in their static-shape form (every position queries T2V; the text mask selects, on the
device, which positions keep the update; see :class:`~crosslmm_ops.nn.DualCrossAttention`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from crosslmm_ops.nn import VisionMemory

#: The keyword argument with which the model side hands the language model its vision.
VISION_KWARG = "crosslmm_vision"
# The keyword argument that carries the per-forward inputs from the language model down to each
# layer's self_attn (whose pre-hook removes it before the attention sees it).
_LAYER_KWARG = "crosslmm_dcal_inputs"


class DCALSkippedError(RuntimeError):
    """A forward that needed the vision memory could not find it, or a DCAL layer did not run."""


# ----------------------------------------------------------------------------------------------
# Static decode steps
# ----------------------------------------------------------------------------------------------

# A context variable, not a module flag: it follows the thread (and task) that entered it, which
# is the one a CUDA graph capture runs in.
_STATIC_DECODE = contextvars.ContextVar("crosslmm_static_decode", default=False)


@contextlib.contextmanager
def static_decode_step():
    """Forwards inside are decode steps of a static-shape loop (one new token per sample, a
    cache that already holds the prompt and its vision record): no host reads, no shapes from
    tensor values, so a CUDA graph can capture them. The one place that says so; the model side
    asks :func:`in_static_decode_step`."""
    token = _STATIC_DECODE.set(True)
    try:
        yield
    finally:
        _STATIC_DECODE.reset(token)


def in_static_decode_step() -> bool:
    """Whether the current forward runs inside :func:`static_decode_step`."""
    return _STATIC_DECODE.get()


# ----------------------------------------------------------------------------------------------
# The cache: found by type, carrying the memory
# ----------------------------------------------------------------------------------------------


def find_cache(*objects) -> Cache | None:
    """The first :class:`~transformers.cache_utils.Cache` among ``objects`` or their values
    (mappings such as keyword arguments and model outputs, tuples and lists), or None."""
    for obj in objects:
        if isinstance(obj, Cache):
            return obj
        if isinstance(obj, Mapping):
            values = obj.values()
        elif isinstance(obj, (tuple, list)):
            values = obj
        else:
            continue
        for value in values:
            if isinstance(value, Cache):
                return value
    return None


@functools.cache
def _cache_keyword() -> str:
    # The installed release's decoders name it; read once (decode loops pass a cache per token).
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    parameters = inspect.signature(Qwen2Model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@functools.cache
def decoders_take_cache_position() -> bool:
    """Whether the installed transformers' decoders take ``cache_position`` (releases before
    5.25 do; they then compute it from the cache's length, a host read, when it is not given)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    return "cache_position" in inspect.signature(Qwen2Model.forward).parameters


def cache_argument(cache: Cache | None) -> dict:
    """``{name: cache}`` to pass a cache to a model call, under the name the installed
    transformers' decoders take it by (``cache`` from 5.24, ``past_key_values`` before)."""
    return {_cache_keyword(): cache}


def past_length(cache: Cache | None) -> int:
    """Tokens the cache already holds (0 for None)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


class VisionMemoryCache:
    """Mixin of the caches that carry a vision memory: ``vision_memory`` (the
    :class:`~crosslmm_ops.nn.VisionMemory` of the cached prompt, None for a prompt without
    vision) follows the K/V through beam reordering, batch expansion and selection, and is
    dropped by ``reset``."""

    vision_memory: VisionMemory | None = None

    def reset(self) -> None:
        super().reset()
        self.__dict__.pop("vision_memory", None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_memory(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.vision_memory is not None:
            self._select_memory(
                torch.arange(self.vision_memory.batch_size).repeat_interleave(repeats)
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_memory(indices)

    def _select_memory(self, indices) -> None:
        if self.vision_memory is not None:
            self.vision_memory = self.vision_memory.select(indices)


class CrossLMMCache(VisionMemoryCache, DynamicCache):
    """transformers' ``DynamicCache`` (the self-attention K/V of every layer) plus
    ``vision_memory``, the original vision tokens, kept once for every DCAL layer and decode
    step. ``generate()`` of a CrossLMM (reference or patched) hands one back; any other cache
    class passed to a forward becomes its own ``VisionMemoryCache`` subclass the same way."""


_MEMORY_CACHE_CLASSES: dict[type, type] = {DynamicCache: CrossLMMCache}


def _memory_cache_class(cls: type) -> type:
    if issubclass(cls, VisionMemoryCache):
        return cls
    sub = _MEMORY_CACHE_CLASSES.get(cls)
    if sub is None:
        sub = type(
            f"{cls.__name__}WithVisionMemory",
            (VisionMemoryCache, cls),
            {"__module__": __name__, "__qualname__": f"{cls.__name__}WithVisionMemory"},
        )
        _MEMORY_CACHE_CLASSES[cls] = sub
    return sub


def attach_vision_memory(cache: Cache, memory: VisionMemory | None) -> None:
    """Record ``memory`` (None: the prompt had no vision) on ``cache``; its class becomes the
    matching :class:`VisionMemoryCache` subclass, so reordering moves the memory with the K/V."""
    if not isinstance(cache, VisionMemoryCache):
        try:
            cache.__class__ = _memory_cache_class(type(cache))
        except TypeError as exc:  # a cache class with __slots__ or a C layout
            raise TypeError(
                f"a {type(cache).__name__} cannot carry the vision memory ({exc}); "
                "use transformers' DynamicCache or StaticCache"
            ) from exc
    cache.vision_memory = memory


def has_vision_record(cache: Cache | None) -> bool:
    """Whether a CrossLMM forward recorded the vision memory (possibly None) on ``cache``."""
    return cache is not None and "vision_memory" in cache.__dict__


def cache_vision_memory(cache: Cache | None) -> VisionMemory | None:
    """The vision memory a cache holds (None when it holds none)."""
    return cache.__dict__.get("vision_memory") if cache is not None else None


# ----------------------------------------------------------------------------------------------
# What one forward hands the DCALs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ForwardVision:
    """What the model side hands the language model for one forward (keyword
    :data:`VISION_KWARG`).

    * ``memory``: the vision memory this forward brings (a prefill with video), or None: the
      forward brings none and the DCALs read the cache's (a decode step), if any;
    * ``visual_mask (B, L)``: the pooled visual positions (V2V queries), None for none;
    * ``text_mask (B, L)``: the T2V queries (None: every position that is not visual).
    """

    memory: VisionMemory | None
    visual_mask: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def __deepcopy__(self, memo):  # runtime data travelling with the call; never copied
        return self


class _LayerInputs:
    """The per-forward inputs of every DCAL layer, converted once per (device, dtype): layers on
    several devices under accelerate each get their copy. Under gradient checkpointing every
    layer gets its own shallow copy of the memory: what the memory memoises for the layers
    (normalised tokens, plans) must not be found ready-made by a layer's recompute, which would
    then save fewer tensors than its forward did (torch's CheckpointError)."""

    def __init__(
        self,
        memory: VisionMemory,
        visual_mask,
        text_mask,
        per_layer_memory: bool,
        static: bool = False,
    ):
        self.memory, self.visual_mask, self.text_mask = memory, visual_mask, text_mask
        self.per_layer_memory = per_layer_memory
        # A static decode step: the DCALs take their static-shape form.
        self.static = static
        self.ran: set[int] = set()
        self._converted: dict = {}

    def on(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._converted:
            self._converted[key] = (
                self.memory.to(device=device, dtype=dtype),
                None if self.visual_mask is None else self.visual_mask.to(device),
                None if self.text_mask is None else self.text_mask.to(device),
            )
        memory, visual, text = self._converted[key]
        if self.per_layer_memory:
            memory = dataclasses.replace(memory)
        return memory, visual, text

    def __deepcopy__(self, memo):
        return self


# ----------------------------------------------------------------------------------------------
# The decoder hooks
# ----------------------------------------------------------------------------------------------


class _LayerHooks:
    """The hooks of one decoder layer. The DCAL is looked up on the layer at every call, so
    wrapping it later (FSDP, PEFT's modules_to_save) is seen."""

    def __init__(self, layer: nn.Module, index: int, has_dcal: bool):
        self.layer, self.index, self.has_dcal = layer, index, has_dcal
        self.inputs: _LayerInputs | None = None
        self.delta: torch.Tensor | None = None

    def attn_pre(self, module, args, kwargs):
        # Every layer takes the inputs out of its attention's keyword arguments. Runs again when
        # gradient checkpointing replays the layer, with the same inputs.
        if _LAYER_KWARG not in kwargs:
            self.inputs = None
            return None
        kwargs = dict(kwargs)
        inputs = kwargs.pop(_LAYER_KWARG)
        self.inputs = inputs if self.has_dcal else None
        return args, kwargs

    def norm_pre(self, module, args):
        inputs, self.inputs = self.inputs, None
        self.delta = None
        if inputs is None:
            return None
        h = args[0]
        memory, visual_mask, text_mask = inputs.on(h.device, h.dtype)
        # The keyword only when it is on: a DCAL wrapped by other code keeps its usual call.
        static = {"static_shapes": True} if inputs.static else {}
        out = self.layer.dcal(h, memory, visual_mask=visual_mask, text_mask=text_mask, **static)
        inputs.ran.add(self.index)
        if out is h:  # no query this call (e.g. decoding with T2V off)
            return None
        self.delta = out - h
        return (out,) + tuple(args[1:])

    def mlp_post(self, module, args, output):
        delta, self.delta = self.delta, None
        if delta is None:
            return None
        return output + delta


@dataclasses.dataclass(eq=False)
class _Forward:
    """One forward of the language model, between its pre- and post-hook."""

    vision: ForwardVision | None
    cache: Cache | None
    positions: int
    inputs: _LayerInputs | None = None


def check_decoder_layers(language_model: nn.Module, indices: Sequence[int], who: str) -> None:
    """Raise ``ValueError`` unless the layers ``indices`` of ``language_model`` are pre-norm
    Llama/Qwen2-style decoder layers a DCAL can be inserted into."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{who}: the language model {type(language_model).__name__} has no "
            "`layers` ModuleList of decoder layers"
        )
    for i in indices:
        layer = layers[i]
        missing = [
            a
            for a in ("self_attn", "post_attention_layernorm", "mlp")
            if not isinstance(getattr(layer, a, None), nn.Module)
        ]
        sandwich = [
            a
            for a in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
            if hasattr(layer, a)
        ]
        if missing or sandwich:
            raise ValueError(
                f"{who}: decoder layer {type(layer).__name__} is not a pre-norm "
                "Llama/Qwen2-style layer (self_attn, residual add, post_attention_layernorm, mlp)"
                + (f"; it lacks {missing}" if missing else "")
                + (f"; it has {sandwich}" if sandwich else "")
            )
        if "dcal" in layer._modules or (hasattr(layer, "dcal") and layer.dcal is not None):
            raise ValueError(f"{who}: decoder layer {i} already has an attribute `dcal`")


class DCALDecoder:
    """The DCALs of one transformers decoder (``language_model``, e.g. a ``Qwen2Model`` or a
    ``LlamaModel``): inserts ``dcals[i]`` as ``language_model.layers[i].dcal`` and installs the
    hooks described in the module docstring. :meth:`remove` undoes both."""

    def __init__(
        self,
        language_model: nn.Module,
        dcals: Mapping[int, nn.Module],
        *,
        who: str = "crosslmm_ops",
    ):
        check_decoder_layers(language_model, list(dcals), who)
        self.language_model = language_model
        self.layer_indices = tuple(sorted(dcals))
        self._handles: list = []
        self._forwards: list[_Forward] = []
        self._warned_frozen_gates = False
        layers = language_model.layers
        for i, module in dcals.items():
            layers[i].dcal = module
        self._handles.append(
            language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True)
        )
        self._handles.append(
            language_model.register_forward_hook(self._lm_post, with_kwargs=True, always_call=True)
        )
        for index, layer in enumerate(layers):
            hooks = _LayerHooks(layer, index, index in dcals)
            self._handles.append(
                layer.self_attn.register_forward_pre_hook(hooks.attn_pre, with_kwargs=True)
            )
            if index in dcals:
                self._handles.append(
                    layer.post_attention_layernorm.register_forward_pre_hook(hooks.norm_pre)
                )
                self._handles.append(layer.mlp.register_forward_hook(hooks.mlp_post))

    @property
    def dcals(self) -> dict[int, nn.Module]:
        """``{layer index: the layer's DCAL}``."""
        layers = self.language_model.layers
        return {i: layers[i].dcal for i in self.layer_indices}

    def remove(self) -> None:
        """Remove the hooks and the DCAL modules."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        layers = self.language_model.layers
        for i in self.layer_indices:
            if "dcal" in layers[i]._modules:
                del layers[i].dcal
        self.layer_indices = ()

    # -- the language model's hooks ------------------------------------------------------------

    def _lm_pre(self, module, args, kwargs):
        vision = kwargs.get(VISION_KWARG)
        if VISION_KWARG in kwargs:
            kwargs = dict(kwargs)
            del kwargs[VISION_KWARG]
        cache = find_cache(args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple((embeds if embeds is not None else ids).shape[:2])
        forward = _Forward(vision, cache, shape[1])
        self._forwards.append(forward)
        if vision is None:  # the language model called on its own: no vision, no DCAL
            return args, kwargs
        if not isinstance(vision, ForwardVision):
            raise TypeError(f"{VISION_KWARG} must be a ForwardVision, got {type(vision).__name__}")
        static = in_static_decode_step()
        if static:
            memory = self._static_step_memory(vision, cache)
        else:
            past = past_length(cache)  # a host read: not in a static step
            memory = vision.memory
            if memory is not None and past > 0:
                raise ValueError(
                    "a video can only come with the first forward of a cache (the "
                    "prefill): the cache keeps one memory per sample"
                )
            if memory is None and past > 0:
                if not has_vision_record(cache):
                    raise DCALSkippedError(
                        f"this forward continues a cache ({type(cache).__name__}, {past} tokens) "
                        "that holds no CrossLMM vision record: it was not filled by a forward of "
                        "this model, or was copied or converted in a way that dropped the "
                        "record. The DCALs cannot run without the prompt's vision memory; give "
                        "the video again with a fresh cache"
                    )
                memory = cache_vision_memory(cache)
        if memory is None or not self.layer_indices:
            return args, kwargs
        if memory.batch_size != shape[0]:
            raise ValueError(
                f"the vision memory holds {memory.batch_size} samples, this forward "
                f"has {shape[0]} (a cache's batch changes only through its "
                "reorder/select methods)"
            )
        self._warn_frozen_gates(module)
        checkpointing = (
            bool(getattr(module, "gradient_checkpointing", False))
            and module.training
            and torch.is_grad_enabled()
        )
        forward.inputs = _LayerInputs(
            memory, vision.visual_mask, vision.text_mask, checkpointing, static
        )
        kwargs[_LAYER_KWARG] = forward.inputs
        return args, kwargs

    def _static_step_memory(self, vision: ForwardVision, cache: Cache | None):
        """The memory a static decode step's DCALs read: the cache's, found without reading the
        cache's length (a device tensor in a static cache)."""
        if vision.memory is not None or vision.visual_mask is not None:
            raise ValueError(
                "a static decode step brings no video and no visual positions: the video comes "
                "with the prefill, outside static_decode_step()"
            )
        if not self.layer_indices:
            return None
        if cache is None or not has_vision_record(cache):
            raise DCALSkippedError(
                "a static decode step needs a cache that a prefill of this model filled, with "
                f"its CrossLMM vision record; got {type(cache).__name__}"
                + ("" if cache is None else " without a record")
            )
        return cache_vision_memory(cache)

    def _lm_post(self, module, args, kwargs, output):
        if not self._forwards:
            return None
        forward = self._forwards.pop()
        if forward.vision is None or output is None:  # no vision, or the forward raised
            return None
        inputs = forward.inputs
        if inputs is not None and inputs.ran != set(self.layer_indices):
            missing = sorted(set(self.layer_indices) - inputs.ran)
            raise DCALSkippedError(
                f"the DCALs of decoder layers {missing} did not run in this forward: "
                f"{type(module).__name__} did not hand its keyword arguments on to the layers' "
                "self-attention, which this transformers release may have changed"
            )
        cache = find_cache(output)
        if (
            forward.cache is None
            and cache is not None
            and not in_static_decode_step()  # a host read; a static step's caller checked
            and past_length(cache) > forward.positions
        ):
            raise DCALSkippedError(
                f"this forward continued a {type(cache).__name__} that was not found among the "
                "language model's arguments, so its vision memory could not be read"
            )
        if cache is None:
            cache = forward.cache
        # The decode steps carry no pixels: they read the prefill's memory (None for a prompt
        # without vision) from the cache. A cache without a record here was started by this
        # forward (a continued one without a record raised in the pre-hook).
        if cache is not None and (
            forward.vision.memory is not None or not has_vision_record(cache)
        ):
            attach_vision_memory(cache, forward.vision.memory)
        return None

    def _warn_frozen_gates(self, module: nn.Module) -> None:
        """Adapters or weights of a DCAL that train behind a gate frozen at 0 get no gradient
        (e.g. a LoRA config whose target names also match the DCAL's projections): say so once."""
        if self._warned_frozen_gates or not (module.training and torch.is_grad_enabled()):
            return
        self._warned_frozen_gates = True
        stuck = []
        for i, dcal in self.dcals.items():
            for name, p in dcal.named_parameters():
                if not name.endswith("gate.alpha") or p.requires_grad or bool(p.detach().any()):
                    continue
                branch = name[: -len("gate.alpha")]
                trainable = [
                    n
                    for n, q in dcal.named_parameters()
                    if q.requires_grad and n.startswith(branch)
                ]
                if trainable:
                    stuck.append(f"layer {i}: {trainable[0]}")
        if stuck:
            warnings.warn(
                "DCAL parameters train behind a gate that is frozen at 0, so they get no gradient ("
                + "; ".join(stuck[:4])
                + (" ..." if len(stuck) > 4 else "")
                + "). Train the "
                "gates too (requires_grad on every `gate.alpha`), or keep adapters off the DCALs "
                "(crosslmm_ops.models.lora_target_modules)",
                stacklevel=3,
            )


__all__ = [
    "VISION_KWARG",
    "CrossLMMCache",
    "DCALDecoder",
    "DCALSkippedError",
    "ForwardVision",
    "VisionMemoryCache",
    "attach_vision_memory",
    "cache_argument",
    "cache_vision_memory",
    "check_decoder_layers",
    "decoders_take_cache_position",
    "find_cache",
    "has_vision_record",
    "in_static_decode_step",
    "past_length",
    "static_decode_step",
]
