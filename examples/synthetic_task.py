"""Does CrossLMM recover what pooling loses? Tiny CrossLMMs trained from scratch on a synthetic
long-video task (``MarkerVideoTask`` of marker_video.py, beside this script: T frames of random
texture, one token of one frame holds a marker; the question asks its colour, its cell or its
frame).

Five settings with the same budget (steps, data, widths), each frame pooled to one token:

* ``pooled``   - pooled tokens only (``dcal_layers=[]``);
* ``t2v``      - + T2V (``dcal_v2v=False``);
* ``v2v``      - + V2V (``dcal_t2v=False``);
* ``both``     - + V2V and T2V (the default CrossLMM);
* ``unpooled`` - every encoder token in the LLM (``pooled_grid`` = the encoder grid), no DCAL:
  the ceiling.

The frames are given to the model as encoder tokens (``vision_features``): no SigLIP tower runs.

Presets (task + recipe): ``colour`` (the main study: 4 frames, the colour question, 2000 steps),
``full`` (the same videos, three questions: colour, cell, frame; 4000 steps) and ``ci`` (the CI
test's: the first 800 steps of ``colour``). A study runs on the CPU, one thread per process,
seed-major, rewriting its JSON after every run (an interrupted study resumes); processes over
disjoint settings or seeds are merged afterwards::

    nice python examples/synthetic_task.py --preset colour --settings unpooled --seeds 0,1,2,3,4 \
        --out /tmp/colour_unpooled.json &
    nice python examples/synthetic_task.py --preset colour --settings both,v2v,t2v,pooled \
        --seeds 0,1,2,3,4 --out /tmp/colour_dcal.json &
    python examples/synthetic_task.py --merge /tmp/colour_*.json \
        --out benchmarks/results/synthetic_task.json --plot benchmarks/results/synthetic_task.png

The CI preset over several seeds (justifies the CI test's margin)::

    python examples/synthetic_task.py --preset ci --settings pooled,v2v \
        --seeds 0,1,2,3,4,5,6,7,8,9 --out benchmarks/results/synthetic_task_ci.json

Training on the GPU back ends: the same run (initial weights, batches) with the DCAL attention
(materialised and projection-fused K/V paths) and the token pooling on each back end, against the
torch back end; a float32 torch run measures the bf16 noise (200 steps by default)::

    python examples/synthetic_task.py --device cuda --dtype bfloat16 --backend cuda,triton \
        --compare-backends --out benchmarks/results/synthetic_task_backends_h100.json

``--plot-only`` redraws the plot from an existing JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable

import torch
from marker_video import QUESTIONS, MarkerBatch, MarkerTaskConfig, MarkerVideoTask

import crosslmm_ops
from crosslmm_ops import _backend
from crosslmm_ops.models import CrossLMMForConditionalGeneration, preset_config

SETTINGS = ("pooled", "t2v", "v2v", "both", "unpooled")
SETTING_LABELS = {
    "pooled": "pooled only",
    "t2v": "+T2V",
    "v2v": "+V2V",
    "both": "+V2V +T2V",
    "unpooled": "unpooled (ceiling)",
}
# The encoder's patch size in the tiny preset: the token grid is image_size // patch_size.
_PATCH = 4


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one model is trained and evaluated (the same for every setting of a study)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 0
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: off (clipping at 1.0 delayed the takeoff in trials)
    eval_size: int = 1536  # held-out videos (equal shares of the questions)
    eval_every: int = 250  # learning-curve points on the first curve_size held-out videos
    curve_size: int = 384
    eval_seed: int = 12345  # the held-out stream; training streams use 1000 + seed
    pooled_grid: int = 1  # pooled tokens per frame: pooled_grid ** 2
    # Widths of the model (the crosslmm-tiny preset's unless overridden): the DCAL's head dim
    # (None: the preset's 16; the CUDA attention kernel takes 64 or 128).
    dcal_head_dim: int | None = None
    dcal_num_heads: int | None = None
    # How the DCALs meet their keys and values (CrossLMMConfig.dcal_kv_path): "auto" lets the
    # model's cost model pick (on these shapes: the projection-fused path), "materialized" /
    # "fused" force one. Both compute the same function.
    kv_path: str = "auto"


PRESETS: dict[str, tuple[MarkerTaskConfig, Recipe]] = {
    # The main study: 4 frames of 6x6 tokens (144 encoder tokens), the colour question, at a
    # constant rate (its first 800 steps are the CI preset's run).
    "colour": (
        MarkerTaskConfig(frames=4, questions=("colour",), texture_scale=0.5),
        Recipe(
            steps=2000,
            batch_size=32,
            lr=2e-3,
            warmup=0,
            min_lr_ratio=1.0,
            grad_clip=0.0,
            eval_size=1024,
            eval_every=100,
            curve_size=256,
        ),
    ),
    # The main study's task at 8 frames (288 encoder tokens): a longer video, same recipe.
    "colour8": (
        MarkerTaskConfig(frames=8, questions=("colour",), texture_scale=0.5),
        Recipe(
            steps=2000,
            batch_size=32,
            lr=2e-3,
            warmup=0,
            min_lr_ratio=1.0,
            grad_clip=0.0,
            eval_size=1024,
            eval_every=100,
            curve_size=256,
        ),
    ),
    # The harder study: the same videos, all three questions. (At 8 frames
    # every setting, the unpooled ceiling included, was still at chance after 1500 steps: more
    # than this CPU can afford for the ceiling, whose LLM sees all 288 tokens.)
    "full": (MarkerTaskConfig(frames=4, questions=QUESTIONS, texture_scale=0.5), Recipe()),
    # The CI test: 4 frames, the colour question only, a few hundred steps at a constant rate
    # (a rate that decays inside a short run, or gradient clipping, delays the takeoff).
    "ci": (
        MarkerTaskConfig(frames=4, questions=("colour",), texture_scale=0.5),
        Recipe(
            steps=800,
            batch_size=32,
            lr=2e-3,
            warmup=0,
            min_lr_ratio=1.0,
            grad_clip=0.0,
            eval_size=512,
            eval_every=100,
            curve_size=256,
        ),
    ),
}


def setting_overrides(setting: str, task: MarkerTaskConfig, recipe: Recipe) -> dict[str, Any]:
    """The CrossLMMConfig fields of one setting (on top of the crosslmm-tiny preset)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    over: dict[str, Any] = dict(
        # The encoder grid and width are the task's (the tower itself is never run).
        vision_config=dict(
            image_size=task.grid * _PATCH, patch_size=_PATCH, hidden_size=task.width
        ),
        pool_mode="adaptive",
        pooled_grid=recipe.pooled_grid,
        dcal_kv_path=recipe.kv_path,
    )
    if recipe.dcal_head_dim is not None:
        over["dcal_head_dim"] = recipe.dcal_head_dim
    if recipe.dcal_num_heads is not None:
        over["dcal_num_heads"] = recipe.dcal_num_heads
    if setting == "pooled":
        over["dcal_layers"] = []
    elif setting == "t2v":
        over["dcal_v2v"] = False
    elif setting == "v2v":
        over["dcal_t2v"] = False
    elif setting == "unpooled":
        over.update(pooled_grid=task.grid, dcal_layers=[])
    return over


def build_model(
    setting: str,
    task: MarkerTaskConfig,
    recipe: Recipe,
    seed: int,
) -> CrossLMMForConditionalGeneration:
    torch.manual_seed(seed)
    config = preset_config("crosslmm-tiny", **setting_overrides(setting, task, recipe))
    return CrossLMMForConditionalGeneration(config)


def make_task(model_config, task: MarkerTaskConfig) -> MarkerVideoTask:
    text = model_config.text_config
    return MarkerVideoTask(
        task,
        video_token_id=model_config.video_token_id,
        pad_id=text.pad_token_id,
        bos_id=text.bos_token_id,
        first_free_id=max(text.pad_token_id, text.bos_token_id, text.eos_token_id) + 1,
    )


def trained_parameters(model) -> list[torch.nn.Parameter]:
    """Everything but the vision tower, which never runs (the frames come as encoder tokens)."""
    tower = {id(p) for p in model.model.vision_tower.parameters()}
    return [p for p in model.parameters() if id(p) not in tower]


def describe_setting(setting: str, task: MarkerTaskConfig, recipe: Recipe) -> dict[str, Any]:
    """What a setting feeds the LLM, without training anything."""
    model = build_model(setting, task, recipe, seed=0)
    cfg = model.config
    n = cfg.pooled_per_frame
    return {
        "label": SETTING_LABELS[setting],
        "config_overrides": {
            k: v
            for k, v in setting_overrides(setting, task, recipe).items()
            if k != "vision_config"
        },
        "pooled_tokens_per_frame": n,
        "visual_tokens_to_llm": task.frames * n,
        "llm_sequence_length": make_task(cfg, task).sequence_length(n),
        "dcal_layers": cfg.dcal_layer_indices if model.dcals else [],
        "dcal_memory_tokens": task.frames * task.tokens_per_frame if model.dcals else 0,
        "trained_parameters": sum(p.numel() for p in trained_parameters(model)),
    }


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def _lr_factor(step: int, recipe: Recipe) -> float:
    if recipe.warmup and step < recipe.warmup:
        return (step + 1) / recipe.warmup
    span = max(recipe.steps - recipe.warmup, 1)
    progress = min((step - recipe.warmup) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def set_backend(model, backend: str | None) -> None:
    """Run the DCALs' cross-attention and the token pooling on ``backend`` (None: auto)."""
    model.model.pooling.backend = backend
    for dcal in model.dcals.values():
        dcal.backend = backend


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model,
    batch: MarkerBatch,
    questions: tuple[str, ...],
    *,
    chunk: int = 256,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Accuracy (argmax of the LM head at the question's position over the whole vocabulary)
    overall and per question."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = []
    for start in range(0, len(batch), chunk):
        ids = batch.input_ids[start : start + chunk, :-1].to(device)  # up to the question
        feats = batch.vision_features[start : start + chunk].to(device)
        with _autocast(device, dtype):
            logits = model(
                input_ids=ids, vision_features=feats, logits_to_keep=1, use_cache=False
            ).logits[:, -1]
        correct.append((logits.argmax(-1).cpu() == batch.answer_ids[start : start + chunk]))
    model.train(was_training)
    hits = torch.cat(correct).float()
    out = {"all": hits.mean().item()}
    for i, q in enumerate(questions):
        sel = batch.question == i
        out[q] = hits[sel].mean().item() if bool(sel.any()) else float("nan")
    return out


def train_run(
    setting: str,
    seed: int,
    task_config: MarkerTaskConfig,
    recipe: Recipe,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    gate_init: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one model of ``setting`` from scratch with ``seed`` (initial weights and training
    stream) and evaluate it on the held-out videos. ``dtype`` other than float32 trains under
    ``torch.autocast`` (float32 master weights). ``backend``: the DCALs' and the pooling's back
    end (None: auto). ``gate_init``: start every DCAL gate's ``alpha`` there instead of the
    model's 0. Returns the accuracies, the loss per step, the learning curve, the step
    times, the gates, the ``op:back end`` pairs that ran, and the model."""
    device = torch.device(device)
    model = build_model(setting, task_config, recipe, seed).to(device)
    if gate_init is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gate.alpha"):
                    p.fill_(gate_init)
    set_backend(model, backend)
    model.train()
    cfg = model.config
    n = cfg.pooled_per_frame
    task = make_task(cfg, task_config)
    params = trained_parameters(model)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, recipe))
    train_gen = torch.Generator().manual_seed(1000 + seed)
    held_out = task.sample(recipe.eval_size, n, torch.Generator().manual_seed(recipe.eval_seed))
    curve_set = MarkerBatch(
        **{
            f.name: getattr(held_out, f.name)[: recipe.curve_size]
            for f in dataclasses.fields(held_out)
        }
    )
    losses: list[float] = []
    step_seconds: list[float] = []
    curve: list[dict[str, Any]] = []
    ran: set[tuple[str, str]] = set()
    for step in range(recipe.steps):
        batch = task.sample(recipe.batch_size, n, train_gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with _backend.record_backends() as record, _autocast(device, dtype):
            loss = model(
                input_ids=batch.input_ids,
                vision_features=batch.vision_features,
                labels=batch.labels,
                use_cache=False,
            ).loss
        opt.zero_grad(set_to_none=True)
        with _backend.record_backends() as record_bwd:
            loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        value = loss.item()  # synchronises
        step_seconds.append(time.perf_counter() - t0)
        ran.update(record)
        ran.update(record_bwd)
        if not math.isfinite(value):
            raise FloatingPointError(f"{setting} seed {seed}: loss {value} at step {step}")
        losses.append(value)
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            acc = evaluate(model, curve_set, task_config.questions, dtype=dtype)
            curve.append({"step": step + 1, **acc})
            if log is not None:
                window = losses[-recipe.eval_every :]
                log(
                    f"  {setting:>8} seed {seed} step {step + 1:>5}: loss "
                    f"{sum(window) / len(window):.3f}, held-out acc {acc['all']:.3f} "
                    f"({1e3 * statistics.median(step_seconds):.0f} ms/step)"
                )
    final = evaluate(model, held_out, task_config.questions, dtype=dtype)
    gates = {
        name.removeprefix("model.language_model."): round(torch.tanh(p).item(), 4)
        for name, p in model.named_parameters()
        if name.endswith("gate.alpha")
    }
    return {
        "setting": setting,
        "seed": seed,
        "accuracy": final,
        "loss_curve": losses,
        "eval_curve": curve,
        "median_step_seconds": statistics.median(step_seconds),
        "step_seconds": step_seconds,
        "total_seconds": sum(step_seconds),
        "tanh_gates": gates,
        "backends_ran": sorted(f"{op}:{b}" for op, b in ran if b is not None),
        "model": model,
    }


# ----------------------------------------------------------------------------------------------
# The study: settings x seeds, JSON, plot
# ----------------------------------------------------------------------------------------------


def _window_means(values: list[float], window: int) -> list[float]:
    return [
        round(sum(values[i : i + window]) / len(values[i : i + window]), 4)
        for i in range(0, len(values), window)
    ]


def _recipe_key(task: MarkerTaskConfig, recipe: Recipe) -> str:
    blob = json.dumps([dataclasses.asdict(task), dataclasses.asdict(recipe)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _environment(device: torch.device, threads: int) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "crosslmm_ops": crosslmm_ops.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "threads": threads,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional for the study
        env["triton"] = None
    return env


def summarise(runs: list[dict[str, Any]], questions: Iterable[str]) -> dict[str, Any]:
    """Per setting: mean, standard deviation (n - 1), min and max over seeds of each accuracy."""
    keys = ["all", *questions]
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        rs = [r for r in runs if r["setting"] == setting and r.get("accuracy")]
        if not rs:
            continue
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rs)}
        for key in keys:
            vals = [r["accuracy"][key] for r in rs]
            entry[key] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        entry["median_step_seconds"] = statistics.fmean(r["median_step_seconds"] for r in rs)
        out[setting] = entry
    return out


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_study(
    settings: list[str],
    seeds: list[int],
    task: MarkerTaskConfig,
    recipe: Recipe,
    out: str | None,
    *,
    preset: str,
    device="cpu",
    threads: int = 1,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every (setting, seed), seed-major; after each run the JSON is rewritten, so an
    interrupted study resumes where it stopped (runs of another recipe are not reused)."""
    device = torch.device(device)
    key = _recipe_key(task, recipe)
    data: dict[str, Any] = {}
    if resume and out and os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
        if data.get("recipe_key") != key:
            log(f"{out} holds runs of another recipe: starting over")
            data = {}
    probe = make_task(
        preset_config("crosslmm-tiny", **setting_overrides("pooled", task, recipe)), task
    )
    data.update(
        {
            "what": "crosslmm_ops synthetic long-video QA (examples/synthetic_task.py): accuracy "
            "of tiny CrossLMMs trained from scratch on held-out videos",
            "preset": preset,
            "recipe_key": key,
            "task": {
                **dataclasses.asdict(task),
                "tokens_per_frame": task.tokens_per_frame,
                "marker_snr": probe.pooled_snr(),
                "chance": {q: probe.chance(q) for q in task.questions},
            },
            "recipe": dataclasses.asdict(recipe),
            "environment": _environment(device, threads),
            "settings": {s: describe_setting(s, task, recipe) for s in settings},
        }
    )
    runs = data.setdefault("runs", [])
    done = {(r["setting"], r["seed"]) for r in runs}
    for seed in seeds:
        for setting in settings:
            if (setting, seed) in done:
                log(f"{setting} seed {seed}: already in {out}")
                continue
            log(f"{setting} seed {seed}: training {recipe.steps} steps")
            r = train_run(setting, seed, task, recipe, device=device, log=log)
            r.pop("model")
            window = max(1, recipe.steps // 250)
            r["loss_curve"] = _window_means(r["loss_curve"], window)
            r["loss_curve_window"] = window
            r.pop("step_seconds")
            runs.append(r)
            log(
                f"{setting} seed {seed}: held-out accuracy "
                + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items())
                + f" ({r['total_seconds']:.0f} s)"
            )
            data["summary"] = summarise(runs, task.questions)
            if out:
                _write_json(out, data)
    data["summary"] = summarise(runs, task.questions)
    if out:
        _write_json(out, data)
    return data


def plot_study(data: dict[str, Any], path: str) -> None:
    """Grouped bars: held-out accuracy per setting and question, mean over seeds, error bars the
    min..max over seeds, dots the single seeds, dashed lines at chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    questions = list(data["task"]["questions"])
    summary = data["summary"]
    settings = [s for s in SETTINGS if s in summary]
    groups = ["all", *questions] if len(questions) > 1 else questions
    width = 0.8 / len(groups)
    colours = ["#444444", "#d1495b", "#00798c", "#edae49", "#66a182"]
    fig, ax = plt.subplots(figsize=(1.9 * len(settings) + 2, 4.6))
    for gi, group in enumerate(groups):
        xs = [si + (gi - (len(groups) - 1) / 2) * width for si in range(len(settings))]
        means = [summary[s][group]["mean"] for s in settings]
        lo = [summary[s][group]["mean"] - summary[s][group]["min"] for s in settings]
        hi = [summary[s][group]["max"] - summary[s][group]["mean"] for s in settings]
        label = (
            "all questions"
            if group == "all"
            else f"{group} (chance {data['task']['chance'][group]:.0%})"
        )
        ax.bar(
            xs,
            means,
            width * 0.92,
            yerr=[lo, hi],
            capsize=3,
            label=label,
            color=colours[gi % len(colours)],
            alpha=0.85,
            error_kw=dict(lw=1),
        )
        for x, s in zip(xs, settings):
            vals = [
                r["accuracy"][group]
                for r in data["runs"]
                if r["setting"] == s and r.get("accuracy")
            ]
            ax.scatter([x] * len(vals), vals, s=8, color="black", zorder=3)
    for q in questions:
        ax.axhline(data["task"]["chance"][q], color="grey", lw=0.6, ls="--")
    desc = data["settings"]
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(
        [
            f"{SETTING_LABELS[s]}\n{desc[s]['visual_tokens_to_llm']} visual tokens"
            + (
                f"\n+ DCAL over {desc[s]['dcal_memory_tokens']}"
                if desc[s]["dcal_memory_tokens"]
                else ""
            )
            for s in settings
        ],
        fontsize=8,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    task, recipe = data["task"], data["recipe"]
    seeds = max(len(summary[s]["seeds"]) for s in settings)
    ax.set_title(
        f"Synthetic marker task: {task['frames']} frames of {task['grid']}x{task['grid']}"
        f" tokens, pooled to {recipe['pooled_grid'] ** 2} token/frame; "
        f"{recipe['steps']} steps x {recipe['batch_size']} videos\n{seeds} seeds per "
        "setting (bars: mean, whiskers: min..max, dots: seeds, dashed: chance)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(data: dict[str, Any]) -> str:
    """The study as a README table: per setting the tokens it feeds the LLM, its trained
    parameters, its CPU time per step, and each accuracy as mean ± std [min, max] over seeds."""
    questions = list(data["task"]["questions"])
    keys = ["all", *questions] if len(questions) > 1 else questions
    head = [
        "setting",
        "visual tokens to the LLM",
        "DCAL reads",
        "parameters",
        "ms/step (CPU)",
        "seeds",
    ] + [
        f"{k} accuracy" if k == "all" else f"{k} (chance {data['task']['chance'][k]:.3f})"
        for k in keys
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for setting in SETTINGS:
        if setting not in data["summary"]:
            continue
        d, sm = data["settings"][setting], data["summary"][setting]
        cells = [
            SETTING_LABELS[setting],
            str(d["visual_tokens_to_llm"]),
            f"{d['dcal_memory_tokens']} tokens" if d["dcal_memory_tokens"] else "-",
            f"{d['trained_parameters'] / 1e3:.0f}k",
            f"{1e3 * sm['median_step_seconds']:.0f}",
            str(len(sm["seeds"])),
        ]
        cells += [
            f"{sm[k]['mean']:.3f} ± {sm[k]['std']:.3f} [{sm[k]['min']:.2f}, {sm[k]['max']:.2f}]"
            for k in keys
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# The same run on each back end
# ----------------------------------------------------------------------------------------------


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _curve_distance(a: list[float], b: list[float], window: int) -> dict[str, float]:
    sa, sb = _moving_average(a, window), _moving_average(b, window)
    return {
        "max_abs": max(abs(x - y) for x, y in zip(a, b)),
        "mean_abs": statistics.fmean(abs(x - y) for x, y in zip(a, b)),
        f"max_abs_moving_average_{window}": max(abs(x - y) for x, y in zip(sa, sb)),
    }


def _expected_ops(setting: str, kv_path: str, backend: str) -> set[str]:
    """The ``op:back end`` pairs a training step must record on ``backend``."""
    ops = {f"token_pool:{backend}"}
    if setting in ("t2v", "v2v", "both"):
        ops.add(
            f"cross_attention:{backend}"
            if kv_path == "materialized"
            else f"projected_attention_core:{backend}"
        )
    return ops


def _allowed_elsewhere(pair: str, backend: str) -> bool:
    # The projection-fused core's backward runs on Triton after a CUDA forward where the
    # extension has no CUDA backward or CROSSLMM_PROJECTED_BWD_CUDA=0
    # (crosslmm_ops.planner.projected_backward_backend), and is recorded as such.
    return backend == "cuda" and pair == "projected_attention_core_backward:triton"


def compare_backends(
    backends: list[str],
    kv_paths: list[str],
    setting: str,
    seed: int,
    task: MarkerTaskConfig,
    recipe: Recipe,
    *,
    device: str,
    dtype: torch.dtype,
    out: str | None,
    gate_init: float | None = 0.5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the same run (initial weights, batches) with the DCAL attention and the pooling on
    each back end of ``backends`` and each K/V path of ``kv_paths``, in ``dtype`` (autocast),
    against the torch back end in ``dtype`` on the materialised path (the reference: the plain
    PyTorch attention), plus the same torch run in float32: the distance between the two torch
    runs is the low-precision noise the others are judged against. Every run is checked to have
    run its ops on the back end it names. Step times: medians over the steps after the first 10
    (warm-up, JIT compilation). ``gate_init``: the DCAL gates start open (0.5, not the model's 0),
    so that the DCAL kernels shape the loss from the first step rather than after the takeoff."""
    dev = torch.device(device)
    low = _dtype_name(dtype)
    plan = [
        ("torch-float32", "torch", torch.float32, "materialized"),
        (f"torch-{low}", "torch", dtype, "materialized"),
    ]
    if dtype == torch.float32:
        plan = plan[1:]
    plan += [(f"{b}-{low}-{p}", b, dtype, p) for b in backends if b != "torch" for p in kv_paths]
    plan += [
        (f"torch-{low}-{p}", "torch", dtype, p)
        for p in kv_paths
        if "torch" in backends and p != "materialized"
    ]
    results: dict[str, Any] = {}
    for name, backend, dt, path in plan:
        log(f"{name}: {recipe.steps} steps of {setting} on {dev}, kv_path={path}")
        run_recipe = dataclasses.replace(recipe, kv_path=path)
        r = train_run(
            setting,
            seed,
            task,
            run_recipe,
            device=dev,
            dtype=dt,
            backend=backend,
            gate_init=gate_init,
            log=log,
        )
        r.pop("model")
        steps = r.pop("step_seconds")
        timed = steps[10:] if len(steps) > 20 else steps
        ran = set(r["backends_ran"])
        missing = _expected_ops(setting, path, backend) - ran
        other = sorted(
            x for x in ran if x.rsplit(":", 1)[1] != backend and not _allowed_elsewhere(x, backend)
        )
        if missing or other:
            raise RuntimeError(
                f"{name}: expected the ops on {backend}; missing {sorted(missing)}, "
                f"elsewhere {other} (ran {sorted(ran)})"
            )
        results[name] = {
            "backend": backend,
            "dtype": _dtype_name(dt),
            "kv_path": path,
            "loss_curve": r["loss_curve"],
            "median_step_ms": 1e3 * statistics.median(timed),
            "mean_step_ms": 1e3 * statistics.fmean(timed),
            "final_accuracy": r["accuracy"],
            "backends_ran": r["backends_ran"],
            "tanh_gates": r["tanh_gates"],
        }
    window = 10
    reference_name = f"torch-{low}"
    reference = results[reference_name]["loss_curve"]
    comparison: dict[str, Any] = {}
    if "torch-float32" in results:
        comparison[f"noise: torch-float32 vs {reference_name}"] = _curve_distance(
            results["torch-float32"]["loss_curve"], reference, window
        )
    for name, r in results.items():
        if name not in (reference_name, "torch-float32"):
            comparison[f"{name} vs {reference_name}"] = _curve_distance(
                r["loss_curve"], reference, window
            )
    report = {
        "what": "the same training run (weights, batches) with the DCAL attention and the token "
        "pooling on each back end and K/V path; loss per step, median step time",
        "command": " ".join(sys.argv),
        "setting": setting,
        "seed": seed,
        "gate_init": gate_init,
        "task": dataclasses.asdict(task),
        "recipe": dataclasses.asdict(recipe),
        "environment": _environment(dev, torch.get_num_threads()),
        "runs": results,
        "comparison": comparison,
    }
    log("")
    log(f"{'run':<30} {'median ms/step':>15} {'loss, last 10 steps':>20} {'accuracy':>9}")
    for name, r in results.items():
        tail = r["loss_curve"][-10:]
        log(
            f"{name:<30} {r['median_step_ms']:>15.2f} {sum(tail) / len(tail):>20.4f} "
            f"{r['final_accuracy']['all']:>9.3f}"
        )
    for name, d in comparison.items():
        log(
            f"{name}: max |loss diff| {d['max_abs']:.4f} (mean {d['mean_abs']:.4f}); of the "
            f"{window}-step moving averages {d[f'max_abs_moving_average_{window}']:.4f}"
        )
    if out:
        _write_json(out, report)
        log(f"wrote {out}")
    return report


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def merge_results(paths: list[str], out: str) -> dict[str, Any]:
    """Merge study JSONs of the same recipe (e.g. written by parallel processes, one per subset
    of settings or seeds) into ``out``; a (setting, seed) run present twice is kept once."""
    merged: dict[str, Any] | None = None
    seen: set[tuple[str, int]] = set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "runs"}
            merged["runs"] = []
            merged["settings"] = {}
        elif data.get("recipe_key") != merged.get("recipe_key"):
            raise ValueError(f"{path} holds runs of another recipe than {paths[0]}")
        merged["settings"].update(data.get("settings", {}))
        for r in data.get("runs", []):
            if (r["setting"], r["seed"]) not in seen:
                seen.add((r["setting"], r["seed"]))
                merged["runs"].append(r)
    if merged is None:
        raise ValueError("nothing to merge")
    merged["settings"] = {s: merged["settings"][s] for s in SETTINGS if s in merged["settings"]}
    merged["runs"].sort(key=lambda r: (r["seed"], SETTINGS.index(r["setting"])))
    merged["summary"] = summarise(merged["runs"], merged["task"]["questions"])
    _write_json(out, merged)
    return merged


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def apply_overrides(
    task: MarkerTaskConfig, recipe: Recipe, items: list[str], error: Callable[[str], Any]
) -> tuple[MarkerTaskConfig, Recipe]:
    """``FIELD=VALUE`` strings applied to the task config or the recipe (by field name)."""
    task_fields = {f.name: f for f in dataclasses.fields(MarkerTaskConfig)}
    recipe_fields = {f.name: f for f in dataclasses.fields(Recipe)}
    task_changes: dict[str, Any] = {}
    recipe_changes: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or (name not in task_fields and name not in recipe_fields):
            error(
                f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                f"{sorted(task_fields) + sorted(recipe_fields)}"
            )
        target = task_changes if name in task_fields else recipe_changes
        current = getattr(task if name in task_fields else recipe, name)
        if name == "questions":
            value: Any = tuple(_csv(text))
        elif text.lower() == "none":
            value = None
        elif isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or name in ("dcal_head_dim", "dcal_num_heads"):
            value = int(text)
        else:
            value = float(text)
        target[name] = value
    return (
        dataclasses.replace(task, **task_changes) if task_changes else task,
        dataclasses.replace(recipe, **recipe_changes) if recipe_changes else recipe,
    )


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="task + recipe: 'full' (the study) or 'ci' (the CI test's)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        help=f"comma-separated, from {','.join(SETTINGS)} (default: all; with "
        "--compare-backends: both)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--eval-size", type=int, help="override the preset's held-out videos")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the preset's MarkerTaskConfig or Recipe "
        "(e.g. --set frames=4 --set lr=2e-3); repeatable",
    )
    parser.add_argument(
        "--dcal-head-dim",
        type=int,
        help="the DCALs' head dim (default: the preset's 16; 64 with "
        "--compare-backends, as the CUDA attention kernel needs 64 or 128)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="training precision: other than float32 trains under autocast",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="back end of the DCAL attention and the pooling (cuda, triton, "
        "torch; default auto); with --compare-backends a comma-separated "
        "list, each compared with torch (default cuda,triton)",
    )
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="train the same run on each back end and compare the loss curves",
    )
    parser.add_argument(
        "--kv-paths",
        default="materialized,fused",
        help="with --compare-backends: the DCAL K/V paths to run on each fast "
        "back end (default materialized,fused)",
    )
    parser.add_argument(
        "--gate-init",
        type=float,
        default=None,
        help="start the DCAL gates' alpha here (default: the model's 0; 0.5 with "
        "--compare-backends)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="results JSON (a study resumes from it)")
    parser.add_argument("--plot", default=None, help="PNG bar plot of the study")
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw --plot from --out (and print the study as a markdown table)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="merge these study JSONs (same recipe) into --out, then plot",
    )
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        data = merge_results(args.merge, args.out)
        print(markdown_table(data))
        print(f"wrote {args.out}")
        if args.plot:
            plot_study(data, args.plot)
            print(f"wrote {args.plot}")
        return data
    if args.plot_only:
        if not (args.out and args.plot):
            parser.error("--plot-only needs --out (the JSON) and --plot")
        with open(args.out) as f:
            data = json.load(f)
        plot_study(data, args.plot)
        print(markdown_table(data))
        print(f"wrote {args.plot}")
        return data

    task, recipe = PRESETS[args.preset]
    changes = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("eval_size", args.eval_size),
        )
        if v is not None
    }
    head_dim = args.dcal_head_dim
    if head_dim is None and args.compare_backends:
        head_dim = 64
    if head_dim is not None:
        changes["dcal_head_dim"] = head_dim
    if args.compare_backends and args.steps is None:
        changes.update(steps=200, eval_every=100, eval_size=512)
    if changes:
        recipe = dataclasses.replace(recipe, **changes)
    task, recipe = apply_overrides(task, recipe, args.set, parser.error)
    settings = (
        _csv(args.settings)
        if args.settings
        else (["both"] if args.compare_backends else list(SETTINGS))
    )
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        parser.error(f"unknown settings {bad}; choose from {SETTINGS}")
    seeds = [int(s) for s in _csv(args.seeds)]
    dtype = getattr(torch, args.dtype)

    if args.compare_backends:
        backends = _csv(args.backend) if args.backend else ["cuda", "triton"]
        return compare_backends(
            backends,
            _csv(args.kv_paths),
            settings[0],
            seeds[0],
            task,
            recipe,
            device=args.device,
            dtype=dtype,
            out=args.out,
            gate_init=0.5 if args.gate_init is None else args.gate_init,
        )

    if args.device != "cpu" or dtype != torch.float32 or args.backend:
        # Runs on another device, precision or back end: reported, not part of the CPU study.
        results = []
        for seed in seeds:
            for setting in settings:
                r = train_run(
                    setting,
                    seed,
                    task,
                    recipe,
                    device=args.device,
                    dtype=dtype,
                    backend=args.backend,
                    gate_init=args.gate_init,
                    log=print,
                )
                r.pop("model")
                r.pop("step_seconds")
                results.append(r)
                print(f"{setting} seed {seed}: {r['accuracy']}")
        data = {
            "runs": results,
            "summary": summarise(results, task.questions),
            "environment": _environment(torch.device(args.device), args.threads),
        }
        if args.out:
            _write_json(args.out, data)
        return data

    if args.gate_init is not None:
        parser.error(
            "--gate-init is for --compare-backends and single runs (--device, --dtype, "
            "--backend); the study keeps the model's gates"
        )
    data = run_study(
        settings,
        seeds,
        task,
        recipe,
        args.out,
        preset=args.preset,
        threads=args.threads,
        resume=not args.no_resume,
    )
    print(
        json.dumps(
            {
                s: {
                    k: [round(v["mean"], 3), round(v["std"], 3)]
                    for k, v in e.items()
                    if isinstance(v, dict)
                }
                for s, e in data["summary"].items()
            }
        )
    )
    if args.plot:
        plot_study(data, args.plot)
        print(f"wrote {args.plot}")
    return data


if __name__ == "__main__":
    main()
