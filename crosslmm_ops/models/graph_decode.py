"""Greedy decoding whose decode step is captured once in a CUDA graph and replayed per token.

Eager decoding of a CrossLMM is bound by the host: a 2B model's decode step launches a few
thousand kernels from Python, so the GPU waits on the interpreter (about 58 ms a token on an H100
at 256 frames, mostly host time). A CUDA graph launches the whole step at once. What a graph
needs, and how this module provides it:

* **Static shapes and addresses.** The prompt is prefilled eagerly, as ``generate()``'s first
  forward, into a transformers ``StaticCache`` sized prompt + ``max_new_tokens``; the decode
  step then reads its inputs from buffers that never move: the token ids ``(B, 1)``, the
  position ids ``(B, 1)``, an attention mask of the cache's full length (the prompt's padding,
  then ones: the causal mask hides the slots not written yet), and ``cache_position`` on
  transformers releases whose decoders take it. The vision memory is the one the prefill
  recorded on the cache (a fixed size for the whole generation).
* **No host reads in the step.** The step runs inside
  :func:`~crosslmm_ops.models.decoder.static_decode_step`: the DCAL hooks skip the checks that
  read the cache's length (checked once here, before the loop) and the DCALs take their
  static-shape form (no V2V in a decode step; every position queries T2V and the text mask
  selects on the device which keep the update). What the DCALs derive from the memory (segment
  offsets, normalised tokens) is built by the first eager steps and memoised on the memory, so
  the capture finds it ready; the ops skip their value checks while a graph captures.
* **The next token on the device.** Logits -> float32 -> the suppressed tokens set to ``-inf``
  -> argmax -> padding for the samples that finished -> the token buffer and the output, all
  inside the graph. The host reads the device only to check every ``eos_check_every`` tokens
  whether every sample has finished; the output is then cut where greedy ``generate()`` stops.

The first :data:`WARMUP_STEPS` decode steps run eagerly on a side stream (as torch's CUDA graph
documentation asks: kernels selected, workspaces and plans built), then one step is captured and
replayed for every further token. ``capture=False`` runs the same static step eagerly for every
token, on any device: what the CPU tests compare against ``generate()``.

One graph per :class:`GraphDecoder`, i.e. per prompt batch: the graph holds the addresses of that
prompt's cache and vision memory. Greedy decoding only (no sampling, beams or logits processors
other than ``suppress_tokens`` / ``begin_suppress_tokens``), a 2-D ``input_ids`` prompt padded on
the left; anything else is refused with a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, StaticCache

from crosslmm_ops.models.decoder import (
    cache_argument,
    decoders_take_cache_position,
    static_decode_step,
)

#: Eager decode steps before the capture (kernels chosen, plans and workspaces built).
WARMUP_STEPS = 2

# Generation options that change which token greedy decoding picks after the first one, with the
# values that leave it unchanged (None: unset; a release resolves it to its default).
_NEUTRAL = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "remove_invalid_values": (None, False),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "prompt_lookup_num_tokens": (None,),
    "prefill_chunk_size": (None,),
    "token_healing": (None, False),
    "use_mtp": (None, False),
    "speculation_type": (None,),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "return_dict_in_generate": (None, False),
    "use_cache": (None, True),
    "cache_implementation": (None,),
}
# generate() arguments that are not GenerationConfig fields and change what it does.
_UNSUPPORTED_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "inputs_embeds",
    "past_key_values",
    "cache",
    "cuda_graph",
)


def _is_neutral(value, neutral: tuple) -> bool:
    return any(value is n if n is None else value == n for n in neutral)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _takes_cache_position(model: nn.Module) -> bool:
    """A forward that names ``cache_position``, or passes its keyword arguments on to a decoder
    of a transformers release that takes it (the reference model)."""
    parameters = inspect.signature(model.forward).parameters.values()
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return _accepts(model, "cache_position") or (passes_on and decoders_take_cache_position())


class GraphDecoder:
    """Greedy decoding of one prompt batch with a static-shape decode step (see the module
    docstring)::

        decoder = GraphDecoder(model, max_new_tokens=64)      # generation options as generate()'s
        decoder.prefill(input_ids, attention_mask=..., pixel_values_videos=...)
        decoder.decode()                                      # to max_new_tokens or EOS
        sequences = decoder.sequences()                       # what greedy generate() returns

    * ``model``: a transformers generation model (the reference CrossLMM, a ``patch_llava``-ed
      LLaVA model, or any decoder-only LM whose forward takes the cache, ``attention_mask`` and
      ``position_ids``), on a CUDA device when ``capture=True``;
    * ``capture``: capture the step in a CUDA graph after :data:`WARMUP_STEPS` eager steps
      (False: every step eager, on any device; the same tokens);
    * ``eos_check_every``: tokens between the host's checks whether every sample finished;
    * ``generation_config`` / ``**generation_kwargs``: as for ``generate()`` (the model's
      ``generation_config`` updated with the keywords); greedy only.

    :meth:`decode` can be called in pieces (``steps=``; ``check_eos=False`` skips the host's EOS
    checks, for timing); :attr:`produced` counts the new tokens so far, the prefill's included;
    ``last_scores (B, V)`` are the float32 scores the last step chose from (suppressed tokens at
    ``-inf``; a buffer the graph overwrites at every replay: clone it to keep it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_new_tokens: int | None = None,
        capture: bool = True,
        eos_check_every: int = 16,
        generation_config: GenerationConfig | None = None,
        **generation_kwargs,
    ):
        if not (
            isinstance(model, nn.Module)
            and callable(getattr(model, "generate", None))
            and isinstance(getattr(model, "generation_config", None), GenerationConfig)
        ):
            raise ValueError(
                f"model must be a transformers model with generate() and a generation_config, "
                f"got {type(model).__name__}"
            )
        if not isinstance(capture, bool):
            raise ValueError(f"capture must be a bool, got {capture!r}")
        if isinstance(eos_check_every, bool) or not isinstance(eos_check_every, int):
            raise ValueError(f"eos_check_every must be an int >= 1, got {eos_check_every!r}")
        if eos_check_every < 1:
            raise ValueError(f"eos_check_every must be an int >= 1, got {eos_check_every!r}")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise ValueError(
                "generation_config must be a transformers GenerationConfig, got "
                f"{type(generation_config).__name__}"
            )
        config = copy.deepcopy(
            generation_config if generation_config is not None else model.generation_config
        )
        for name in _UNSUPPORTED_ARGUMENTS:
            if name in generation_kwargs:
                raise ValueError(_unsupported(name))
        unknown = config.update(**generation_kwargs)
        if unknown:
            raise ValueError(
                f"unknown generation arguments {sorted(unknown)} (model inputs go to prefill())"
            )
        for name, neutral in _NEUTRAL.items():
            if not _is_neutral(getattr(config, name, None), neutral):
                raise ValueError(_unsupported(name, getattr(config, name)))
        if max_new_tokens is None:
            max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            raise ValueError(
                "max_new_tokens is required: the static cache is sized prompt + max_new_tokens"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        device = next(model.parameters()).device
        if capture and (device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(
                f"capture=True (cuda_graph=True) needs the model on a CUDA device, it is on "
                f"{device}; capture=False runs the same static decode step without a graph"
            )
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.capture = capture
        self.eos_check_every = eos_check_every
        self.generation_config = config
        self._eos = _token_ids(config.eos_token_id)
        pad = config.pad_token_id
        if pad is None and self._eos:
            pad = self._eos[0]  # what generate() does (with a warning)
        self._pad = pad
        self._suppress = sorted(set(_token_ids(config.suppress_tokens)))
        self._cache: Cache | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0
        self.produced = 0
        self.last_scores: torch.Tensor | None = None
        self._finished = False

    # -- the prefill ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, **model_inputs) -> torch.Tensor:
        """Prefill ``input_ids (B, L)`` with the other inputs of ``generate()`` (attention mask,
        pixels, features, ...) into a fresh ``StaticCache``, eagerly, as ``generate()``'s first
        forward; returns the first new token ``(B,)``. Once per decoder."""
        if self._cache is not None:
            raise RuntimeError("GraphDecoder.prefill() runs once: build a decoder per prompt batch")
        for name in _UNSUPPORTED_ARGUMENTS:
            if name in model_inputs:
                raise ValueError(_unsupported(name))
        if any(isinstance(v, Cache) for v in model_inputs.values()):
            raise ValueError(_unsupported("cache"))
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
            or input_ids.shape[1] == 0
        ):
            raise ValueError(
                "input_ids must be an integer tensor of shape (B, L) with L >= 1, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                f"{tuple(getattr(input_ids, 'shape', ()))}"
            )
        model = self.model
        device = input_ids.device
        if self.capture and device.type != "cuda":
            raise ValueError(
                f"capture=True needs input_ids on the model's CUDA device, got {device}"
            )
        B, L = input_ids.shape
        mask = model_inputs.pop("attention_mask", None)
        if mask is None:
            mask = self._inferred_mask(input_ids)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
            raise ValueError(
                f"attention_mask must be a (B, L) = {(B, L)} tensor, got "
                f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}"
            )
        mask = mask.to(device=device, dtype=torch.long)
        if not bool(mask[:, -1].all()):  # one host read, before any step
            raise ValueError(
                "attention_mask: a row ends in padding; pad prompts on the left (as greedy "
                "generate() of a decoder-only model needs)"
            )
        n = self.max_new_tokens
        cache = StaticCache(config=model.config, max_cache_len=L + n)
        # The prefill generate() runs: positions from the mask (padding's are never read), the
        # cache, only the last position's logits.
        kwargs = dict(input_ids=input_ids, attention_mask=mask, use_cache=True, return_dict=True)
        if _accepts(model, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if _takes_cache_position(model):
            kwargs["cache_position"] = torch.arange(L, device=device)
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        logits = model(**kwargs, **model_inputs, **cache_argument(cache)).logits
        scores = logits[:, -1, :].to(torch.float32)
        # generate()'s processors of the first token: suppress_tokens and begin_suppress_tokens.
        first_suppressed = self._suppress + _token_ids(self.generation_config.begin_suppress_tokens)
        first_suppressed = [i for i in first_suppressed if i < scores.shape[-1]]
        if first_suppressed:
            index = torch.tensor(first_suppressed, dtype=torch.long, device=scores.device)
            scores = scores.index_fill(1, index, float("-inf"))
        self.last_scores = scores
        first = scores.argmax(-1)
        self._cache = cache
        self._input_ids = input_ids
        self._tokens = torch.full(
            (B, n), 0 if self._pad is None else self._pad, dtype=torch.long, device=device
        )
        self._tokens[:, 0] = first
        self.produced = 1
        # The static inputs of the step (their addresses are what the graph reads).
        self._ids = first.reshape(B, 1).clone()
        self._mask = torch.cat([mask, mask.new_ones(B, n)], 1)
        # generate()'s positions: the count of real tokens before the new one.
        self._positions = mask.sum(1, keepdim=True) if _accepts(model, "position_ids") else None
        self._cache_position = (
            torch.full((1,), L, dtype=torch.long, device=device)
            if _takes_cache_position(model)
            else None
        )
        self._index = torch.ones(1, dtype=torch.long, device=device)
        self._eos_ids = torch.tensor(self._eos, dtype=torch.long, device=device)
        self._unfinished = ~self._is_eos(first)
        self._suppress_mask = None  # built by the first step, from the logits' width
        self._finished = n == 1 or (bool(self._eos) and not bool(self._unfinished.any()))
        return first

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        # A comparison with each id, not torch.isin (which may sort): a few element-wise kernels.
        return (tokens.unsqueeze(-1) == self._eos_ids).any(-1)

    def _inferred_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask ``generate()`` infers without one: padding where ``input_ids`` hold the pad
        token, when that token is not also an end of sequence."""
        pad = self.generation_config.pad_token_id
        ones = torch.ones_like(input_ids, dtype=torch.long)
        if pad is None or pad in self._eos or not bool((input_ids == pad).any()):
            return ones
        return (input_ids != pad).long()

    # -- the step -------------------------------------------------------------------------------

    def _step(self) -> None:
        """One static-shape decode step: reads the static inputs, writes the next token into
        them and into the output. No host read (what a CUDA graph captures)."""
        kwargs = dict(
            input_ids=self._ids, attention_mask=self._mask, use_cache=True, return_dict=True
        )
        if self._positions is not None:
            kwargs["position_ids"] = self._positions
        if self._cache_position is not None:
            kwargs["cache_position"] = self._cache_position
        with static_decode_step():
            logits = self.model(**kwargs, **cache_argument(self._cache)).logits
        # As generate(): float32 scores, suppressed tokens at -inf, the first maximum.
        scores = logits[:, -1, :].to(torch.float32)
        if self._suppress:
            if self._suppress_mask is None:
                self._suppress_mask = torch.zeros(
                    scores.shape[-1], dtype=torch.bool, device=scores.device
                )
                ids = [i for i in self._suppress if i < scores.shape[-1]]
                self._suppress_mask[ids] = True
            scores = scores.masked_fill(self._suppress_mask, float("-inf"))
        self.last_scores = scores
        token = scores.argmax(-1)
        if self._eos:
            token = torch.where(self._unfinished, token, self._pad)
            self._unfinished.logical_and_(~self._is_eos(token))
        token = token.unsqueeze(1)
        self._ids.copy_(token)
        self._tokens.index_copy_(1, self._index, token)
        self._index.add_(1)
        if self._positions is not None:
            self._positions.add_(1)
        if self._cache_position is not None:
            self._cache_position.add_(1)

    def _run_step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            return
        if not self.capture:
            self._step()
            return
        device = self._ids.device
        if self._eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self._eager_steps += 1
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except RuntimeError as exc:
            raise RuntimeError(
                f"capturing the decode step in a CUDA graph failed ({exc}). Something on the "
                "step's path reads the device from the host or synchronises, which a graph "
                "cannot hold (e.g. an op on the torch back end, which reads its cu_seqlens: "
                "the graph needs the cuda or triton back end); capture=False runs the same "
                "step without a graph"
            ) from exc
        self._graph = graph
        graph.replay()  # the capture recorded this step without running it

    @property
    def captured(self) -> bool:
        """Whether the step has been captured (it is, from the step after the warm-up)."""
        return self._graph is not None

    @torch.no_grad()
    def decode(self, steps: int | None = None, *, check_eos: bool = True) -> int:
        """Run up to ``steps`` more decode steps (None: until ``max_new_tokens``, or until every
        sample has finished, checked every ``eos_check_every`` tokens); returns
        :attr:`produced`. ``check_eos=False``: no host read at all (a timed loop)."""
        if self._cache is None:
            raise RuntimeError("GraphDecoder.decode() needs prefill() first")
        remaining = self.max_new_tokens - self.produced
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"steps must be an int >= 0 or None, got {steps!r}")
            remaining = min(remaining, steps)
        check = check_eos and bool(self._eos)
        for _ in range(remaining):
            if self._finished:
                break
            self._run_step()
            self.produced += 1
            if self.produced == self.max_new_tokens:
                self._finished = True
            elif check and self.produced % self.eos_check_every == 0:
                self._finished = not bool(self._unfinished.any())
        return self.produced

    def sequences(self) -> torch.LongTensor:
        """The prompt and the new tokens, ``(B, L + k)``, cut where greedy ``generate()`` stops:
        after the token with which the last unfinished sample reached its end of sequence."""
        if self._cache is None:
            raise RuntimeError("GraphDecoder.sequences() needs prefill() first")
        new = self._tokens[:, : self.produced]
        if self._eos:
            hit = self._is_eos(new)
            if bool(hit.any(1).all()):
                stop = int(hit.to(torch.uint8).argmax(1).max()) + 1
                new = new[:, :stop]
        return torch.cat([self._input_ids, new], 1)


def _unsupported(name: str, value=None) -> str:
    if name in ("past_key_values", "cache"):
        return (
            f"{name}: the CUDA graph decode builds its own StaticCache (prompt + max_new_tokens); "
            "pass no cache"
        )
    shown = "" if value is None else f"={value!r}"
    return (
        f"{name}{shown} is not supported by the CUDA graph decode (greedy decoding of one "
        "prompt batch, suppress_tokens the only logits processor after the first token); use "
        "generate() without cuda_graph for it"
    )


@torch.no_grad()
def generate_with_cuda_graph(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    capture: bool = True,
    eos_check_every: int = 16,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> torch.LongTensor:
    """Greedy ``generate()`` whose decode step is captured once in a CUDA graph and replayed for
    every token: the same sequences ``model.generate(input_ids, do_sample=False, ...)`` returns,
    as a ``LongTensor (B, L + k)``.

    ``kwargs`` are ``generate()``'s: model inputs (``attention_mask``, ``pixel_values_videos``,
    ``vision_features``, ``video_frame_mask``, a LLaVA model's ``pixel_values`` ...) and
    generation options (``eos_token_id``, ``pad_token_id``, ``suppress_tokens``, ...). Works for
    the reference model (also as ``model.generate(..., cuda_graph=True)``), ``patch_llava``-ed
    models and plain transformers decoder-only models (a baseline without DCALs).
    ``capture=False`` runs the same static step without a graph (any device). See
    :class:`GraphDecoder` and the module docstring for what is supported."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        raise ValueError("input_ids is required (the CUDA graph decode starts from token ids)")
    for name in _UNSUPPORTED_ARGUMENTS:
        if name in kwargs:
            raise ValueError(_unsupported(name))
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(
            "generation_config must be a transformers GenerationConfig, got "
            f"{type(generation_config).__name__}"
        )
    config = copy.deepcopy(
        generation_config
        if generation_config is not None
        else getattr(model, "generation_config", None) or GenerationConfig()
    )
    model_inputs = config.update(**kwargs)  # what is not a generation option goes to the model
    decoder = GraphDecoder(
        model,
        max_new_tokens=max_new_tokens,
        capture=capture,
        eos_check_every=eos_check_every,
        generation_config=config,
    )
    decoder.prefill(input_ids, **model_inputs)
    decoder.decode()
    return decoder.sequences()


__all__ = ["WARMUP_STEPS", "GraphDecoder", "generate_with_cuda_graph"]
