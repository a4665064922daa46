"""What ``crosslmm-ops demo`` measures: a CrossLMM against a LLaVA-OneVision-shaped baseline on a
synthetic video (prefill, per-token decode, peak memory, visual tokens, the back ends that ran).
The efficiency study (``benchmarks/efficiency.py``, ``benchmarks/end_to_end.py``) runs the same
models and measurement at the paper's shapes.

The baseline is the same vision encoder, projector and LLM with LLaVA-OneVision's video pooling
(bilinear 27x27 -> 14x14 = 196 tokens per frame) and no DCAL; the CrossLMM pools to 3x3 = 9 tokens
per frame and adds a DCAL every 4 layers. Both share their weights, so the comparison isolates the
compression.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from typing import Any, Callable

import torch

from crosslmm_ops import _backend
from crosslmm_ops.models.decoder import cache_argument, find_cache

# LLaVA-OneVision's video pooling of SigLIP's 27x27 grid.
BASELINE_POOLING = dict(pool_mode="bilinear", pooled_grid=14)

# A CrossLMM small enough for a CPU demo in well under a minute, with the real 27x27 token grid
# (SigLIP /14 at 384 px), so the token counts are the paper's; widths and depths are shrunk.
DEMO_PRESET_OVERRIDES = dict(
    vision_config=dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=384,
        patch_size=14,
    ),
    text_config=dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    video_token_id=1023,
)


def variant_config(preset: str, variant: str, **overrides):
    """The config of ``variant`` for ``preset`` (``"crosslmm-2b"``, ``"crosslmm-7b"``,
    ``"demo"``): ``"baseline"`` (LLaVA-OneVision-shaped: 196 bilinear tokens per frame, no DCAL),
    ``"crosslmm"`` (9 tokens per frame, DCAL every 4 layers, V2V global) or ``"crosslmm-frame"``
    (V2V per frame)."""
    from crosslmm_ops.models import preset_config

    base = "crosslmm-tiny" if preset == "demo" else preset
    fields: dict[str, Any] = {}
    if preset == "demo":
        fields.update(
            {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_PRESET_OVERRIDES.items()}
        )
        fields["dcal_every"] = 4
    if variant == "baseline":
        fields.update(BASELINE_POOLING, dcal_layers=[])
    elif variant == "crosslmm-frame":
        fields["dcal_v2v_scope"] = "frame"
    elif variant != "crosslmm":
        raise ValueError(
            f"variant must be 'baseline', 'crosslmm' or 'crosslmm-frame', got {variant!r}"
        )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            fields[key].update(value)
        else:
            fields[key] = value
    return preset_config(base, **fields)


def build_models(
    preset: str,
    variants=("baseline", "crosslmm"),
    *,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
    **overrides,
) -> dict[str, torch.nn.Module]:
    """One model per variant, all sharing the first one's weights (vision tower, projector, LLM);
    DCAL weights exist only where a variant has DCALs. Random weights: nothing is downloaded."""
    from crosslmm_ops.models import CrossLMMForConditionalGeneration

    models: dict[str, torch.nn.Module] = {}
    shared = None
    for variant in variants:
        torch.manual_seed(seed)
        with torch.device(device):
            model = CrossLMMForConditionalGeneration(variant_config(preset, variant, **overrides))
        model = model.to(dtype).eval()
        if shared is None:
            shared = model.state_dict()
        else:
            own = model.state_dict()
            model.load_state_dict(
                {k: v for k, v in shared.items() if k in own and own[k].shape == v.shape},
                strict=False,
            )
        models[variant] = model
    return models


def synthetic_video(
    frames: int, image_size: int, *, device="cpu", dtype=torch.float32, seed: int = 0
) -> torch.Tensor:
    """``[1, T, 3, S, S]`` frames of a smooth random background with a bright square that moves
    across the frame: structured, never zeros, and different in every frame."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, 8, 8, generator=g)
    background = torch.nn.functional.interpolate(
        low, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    video = background.expand(frames, -1, -1, -1).clone()
    side = max(image_size // 8, 2)
    for t in range(frames):
        pos = int((image_size - side) * t / max(frames - 1, 1))
        video[t, :, pos : pos + side, pos : pos + side] = 2.0
    return video.unsqueeze(0).to(device=device, dtype=dtype)


def video_prompt(
    config, frames: int, *, text_before: int = 8, text_after: int = 24, device="cpu", seed: int = 0
) -> torch.Tensor:
    """``input_ids [1, L]``: BOS, some text, ``frames * pooled_per_frame`` video placeholders,
    a question's worth of text."""
    g = torch.Generator().manual_seed(seed)
    tc = config.text_config
    hi = min(config.video_token_id, tc.vocab_size)
    text = lambda n: torch.randint(3, hi, (n,), generator=g)  # noqa: E731
    ids = torch.cat(
        [
            torch.tensor([tc.bos_token_id if tc.bos_token_id is not None else 1]),
            text(text_before),
            torch.full((frames * config.pooled_per_frame,), config.video_token_id),
            text(text_after),
        ]
    )
    return ids.unsqueeze(0).to(device)


@dataclasses.dataclass
class Measurement:
    variant: str
    frames: int
    visual_tokens: int  # pooled visual tokens fed to the LLM
    sequence_length: int  # the whole prompt
    vision_ms: float  # the vision tower alone (frames -> encoder tokens)
    llm_prefill_ms: float  # prefill from the encoder tokens: pooling, projector, LLM, DCALs
    prefill_ms: float  # prefill from pixels: all of the above
    decode_ms_per_token: float
    peak_memory_bytes: int | None  # CUDA: weights + activation_memory_bytes
    activation_memory_bytes: int | None  # CUDA: the pixel prefill's peak beyond weights and input
    llm_activation_memory_bytes: int | None  # CUDA: the same for the prefill from encoder tokens
    # (the encoder tokens themselves are its input)
    cache_bytes: int  # the self-attention KV cache + the kept vision tokens after prefill
    generated: list[int]
    backends: dict[str, str]
    # The same greedy decode with the step captured in a CUDA graph (GraphDecoder), on a CUDA
    # device; None where it was not measured (the CPU).
    decode_ms_per_token_graph: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor reachable from a cache object (its layers' K/V and the vision
    memory)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.data_ptr() not in seen:
                seen.add(item.data_ptr())
                total += item.numel() * item.element_size()
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, (torch.nn.Module, type)):
            stack.extend(vars(item).values())
    return total


def measurement_plan(device: torch.device | str) -> tuple[int, int]:
    """``(repeats, warmup)`` that :func:`measure` takes by default on ``device``: the median of
    5 timed calls on a GPU and of 3 on the CPU, each after 1 untimed call (a first call pays for
    kernel selection, compilation and allocation, which are not the model's speed)."""
    return (5, 1) if torch.device(device).type == "cuda" else (3, 1)


def consistency_problems(
    results: list[Measurement], *, tower_tolerance: float = 0.15, part_tolerance: float = 0.05
) -> list[str]:
    """What makes a set of measurements of one run untrustworthy (empty: none found):

    * the vision towers of the variants are the same network on the same video, so their times
      must agree within ``tower_tolerance`` (a cold first call breaks this);
    * a prefill from pixels runs the tower and the prefill from its tokens, so it cannot be
      faster than the slower of the two (by more than ``part_tolerance`` of noise)."""
    problems = []
    towers = [m.vision_ms for m in results]
    if len(towers) > 1 and max(towers) > (1 + tower_tolerance) * min(towers):
        problems.append(
            "the same vision tower took "
            + ", ".join(f"{m.vision_ms:.1f} ms ({m.variant})" for m in results)
            + f": more than {tower_tolerance:.0%} apart"
        )
    for m in results:
        slowest = max(m.vision_ms, m.llm_prefill_ms)
        if m.prefill_ms < (1 - part_tolerance) * slowest:
            problems.append(
                f"{m.variant}: the prefill from pixels ({m.prefill_ms:.1f} ms) is "
                f"faster than one of its parts ({slowest:.1f} ms)"
            )
    return problems


@torch.no_grad()
def measure(
    model,
    variant: str,
    video: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    new_tokens: int = 8,
    repeats: int | None = None,
    warmup: int | None = None,
    graph: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> Measurement:
    """The vision tower alone, the prefill from its tokens (what the LLM side costs), the prefill
    from pixels (each the median of ``repeats`` timed calls after ``warmup`` untimed ones, with
    the peak CUDA memory the call needs beyond its weights and inputs), then greedy decode steps
    from that prefill's cache: one untimed, then ``new_tokens - 2`` timed (mean per token; NaN
    when none). Only the last position's logits are computed, as ``generate()`` does.

    With ``graph`` (default: on a CUDA device), the decode is measured a second time with the
    step captured in a CUDA graph (:func:`graph_decode_ms`: its own prefill into a static cache,
    the warm-up steps and the capture untimed, then the same number of timed tokens).

    Defaults: :func:`measurement_plan` of the device."""
    device = input_ids.device
    cuda = device.type == "cuda"
    frames = video.shape[1]
    default_repeats, default_warmup = measurement_plan(device)
    repeats = default_repeats if repeats is None else repeats
    warmup = default_warmup if warmup is None else warmup
    graph = cuda if graph is None else graph
    if not isinstance(graph, bool):
        raise ValueError(f"graph must be a bool or None, got {graph!r}")
    if graph and not cuda:
        raise ValueError(f"graph=True needs a CUDA device (a CUDA graph), got {device}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")

    def timed(fn):
        """Median time of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones, its last
        result, and its largest peak memory beyond what was allocated when it started (weights
        and inputs), i.e. what the call itself needs."""
        times, result, grown = [], None, None
        for i in range(warmup + repeats):
            result = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            if cuda:
                peak = torch.cuda.max_memory_allocated() - start
                grown = peak if grown is None else max(grown, peak)
            if progress:
                progress("prefill")
        return statistics.median(times), result, grown

    weights = torch.cuda.memory_allocated() if cuda else 0
    with _backend.record_backends() as ran:
        vision_ms, (features, _), _ = timed(lambda: model.get_video_features(video))
        features = features.reshape(1, frames, *features.shape[1:])
        llm_ms, _, llm_activations = timed(
            lambda: model(
                input_ids=input_ids, vision_features=features, use_cache=True, logits_to_keep=1
            )
        )
        features = None
        prefill_ms, out, activations = timed(
            lambda: model(
                input_ids=input_ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1
            )
        )
        cache = find_cache(out)
        cache_bytes = _tensor_bytes(cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        generated = [int(token)]
        # One untimed step first: the first decode call picks kernels for one-token shapes.
        step = model(input_ids=token, **cache_argument(cache), use_cache=True)
        token = step.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
        _sync(device)
        t0 = time.perf_counter()
        timed_steps = max(new_tokens - 2, 0)  # new_tokens in all: prefill's, the warm-up's, these
        for _ in range(timed_steps):
            step = model(input_ids=token, **cache_argument(cache), use_cache=True)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
            if progress:
                progress("decode")
        _sync(device)
        decode_ms = ((time.perf_counter() - t0) * 1e3 / timed_steps) if timed_steps else math.nan
        del step, cache  # the graph's decode brings its own cache
        graph_ms = None
        if graph:
            try:
                graph_ms = (
                    graph_decode_ms(model, input_ids, video, timed_steps)
                    if timed_steps
                    else math.nan
                )
            except torch.OutOfMemoryError:
                # The graph needs a second cache (static, prompt + new tokens): keep the eager
                # numbers and say the graph's did not fit.
                warnings.warn(
                    f"{variant}, {frames} frames: the CUDA graph decode ran out of memory",
                    stacklevel=2,
                )
                graph_ms = math.nan
    backends = {op: ", ".join(sorted({b for o, b in ran if o == op})) for op, _ in ran}
    peak = None if activations is None else weights + activations
    return Measurement(
        variant,
        frames,
        frames * model.config.pooled_per_frame,
        input_ids.shape[1],
        vision_ms,
        llm_ms,
        prefill_ms,
        decode_ms,
        peak,
        activations,
        llm_activations,
        cache_bytes,
        generated,
        backends,
        graph_ms,
    )


@torch.no_grad()
def graph_decode_ms(model, input_ids: torch.Tensor, video: torch.Tensor, steps: int) -> float:
    """Milliseconds per token of greedy decoding with the step captured in a CUDA graph
    (:class:`~crosslmm_ops.models.GraphDecoder`): prefill from pixels, the eager warm-up steps,
    the capture and its first replay untimed, then the mean over ``steps`` replays, with no host
    read in between (no end-of-sequence checks; the loop's cost is in the number)."""
    from crosslmm_ops.models import GraphDecoder
    from crosslmm_ops.models.graph_decode import WARMUP_STEPS

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    untimed = WARMUP_STEPS + 1
    # As the eager loop above: plain argmax, no end of sequence, no suppressed token.
    decoder = GraphDecoder(
        model,
        max_new_tokens=1 + untimed + steps,
        eos_token_id=None,
        suppress_tokens=None,
    )
    decoder.prefill(input_ids, pixel_values_videos=video)
    decoder.decode(steps=untimed, check_eos=False)
    if not decoder.captured:
        raise RuntimeError("the decode step was not captured after the warm-up")
    _sync(input_ids.device)
    t0 = time.perf_counter()
    decoder.decode(steps=steps, check_eos=False)
    _sync(input_ids.device)
    return (time.perf_counter() - t0) * 1e3 / steps
