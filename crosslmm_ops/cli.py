"""The ``crosslmm-ops`` command.

crosslmm-ops demo   a CrossLMM against a LLaVA-OneVision-shaped baseline on a synthetic video:
                    visual tokens, prefill and decode time, memory, back ends, generated tokens
crosslmm-ops info   versions, the extension's build, the GPU, and which back ends each op can use
crosslmm-ops pool   pools a synthetic SigLIP-shaped video with every available back end
crosslmm-ops bench  runs the kernel benchmarks (GPU; from a checkout) and plots ours vs peers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import crosslmm_ops
from crosslmm_ops import _backend, environment, planner

# The ops and what limits their fast back ends beyond what is installed.
OPS = {
    "token_pool": "fp16, bf16, fp32 on cuda/triton; fp64 on torch",
    "cross_attention": "cuda: fp16/bf16, head dim 64/128; triton: fp16/bf16/fp32, head dim <= 256; "
    "torch: any",
    "projected_attention_core": "the core of projected_cross_attention; cuda: fp16/bf16, Dv a "
    "multiple of 8 up to 2048, forward and backward; triton: fp16/bf16/fp32; torch: any",
}


def info(_args=None) -> int:
    ext = _backend.extension()
    lines = [
        f"crosslmm-ops   {crosslmm_ops.__version__}",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(
            f"triton         {triton.__version__}"
            + ("  [TRITON_INTERPRET=1: CPU interpreter]" if _backend.triton_interpreted() else "")
        )
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        lines.append(f"triton         not usable ({exc.__class__.__name__}: {exc})")
    if ext is not None:
        lines.append(
            f"extension      built: crosslmm_ops._C {ext.version()}, CUDA runtime "
            f"{ext.cuda_version() // 1000}.{ext.cuda_version() % 1000 // 10}, "
            f"archs sm_{', sm_'.join(_backend.extension_archs())}"
        )
    else:
        lines.append(f"extension      not built ({_backend.extension_import_error()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"GPU {i}          {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB"
            )
        device = torch.device("cuda")
    else:
        lines.append(
            "GPU            none (ops run on the torch back end; triton only under "
            "TRITON_INTERPRET=1)"
        )
        device = torch.device("cpu")
    overrides = environment.overrides()
    lines.append(
        "environment    "
        + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "no CROSSLMM_* overrides set")
    )
    lines.append(f"back ends on {device.type}:")
    for op, limits in OPS.items():
        usable = []
        for name, check in (("cuda", _backend.cuda_runnable), ("triton", _backend.triton_runnable)):
            ok, why = check(device)
            usable.append(name if ok else f"{name} (no: {why})")
        usable.append("torch")
        auto = planner.resolve(op, "auto", device)
        lines.append(f"  {op:<12} auto -> {auto}; " + "; ".join(usable) + f"  [{limits}]")
    # What the planner chooses for CrossLMM-2B-shaped calls on this device, and why
    # (crosslmm_ops.explain does the same for any call).
    lines.append(f"example calls on {device.type} (crosslmm_ops.explain):")
    for label, op, args, kwargs in _example_calls(device):
        plan = planner.explain(op, *args, print_plan=False, **kwargs)
        lines.append(f"  {label}")
        lines += [f"    {line}" for line in str(plan).splitlines()[1:]]
    print("\n".join(lines))
    return 0


def _example_calls(device: torch.device):
    """(label, op, args, kwargs) of small CrossLMM-2B-shaped calls (12 query heads of 128, 2 KV
    heads, SigLIP width 1152) for ``info`` to explain."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    frames, queries = 4, 9
    cu = lambda n: torch.arange(frames + 1, dtype=torch.int32, device=device) * n  # noqa: E731
    w = new(2 * 128, 1152)
    return [
        (
            "token_pool, 27x27 -> 3x3",
            "token_pool",
            (new(1, frames, 729, 1152),),
            dict(kernel_size=9),
        ),
        (
            "cross_attention, T2V prefill (128 queries, 4 x 729 keys)",
            "cross_attention",
            (new(1, 128, 12, 128), new(1, frames * 729, 2, 128), new(1, frames * 729, 2, 128)),
            {},
        ),
        (
            "projected_cross_attention, frame-local V2V (9 queries per frame)",
            "projected_cross_attention",
            (new(frames * queries, 12, 128), new(frames * 729, 1152), w, w),
            dict(cu_seqlens_q=cu(queries), cu_seqlens_k=cu(729)),
        ),
        (
            "projected_cross_attention, T2V decode (1 query)",
            "projected_cross_attention",
            (new(1, 1, 12, 128), new(1, frames * 729, 1152), w, w),
            {},
        ),
    ]


def pool(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    frames, grid, dim = args.frames, 27, 1152
    x = torch.randn(1, frames, grid * grid, dim, device=device, dtype=dtype)
    print(
        f"video features: {tuple(x.shape)} ({frames} frames of {grid}x{grid} SigLIP tokens, "
        f"D={dim}, {x.dtype}, {device})"
    )
    settings = [
        ("avg 3x3 stride 3 (81 tokens/frame)", dict(mode="avg", kernel_size=3)),
        ("avg 9x9 stride 9 (CrossLMM: 9 tokens/frame)", dict(mode="avg", kernel_size=9)),
        ("adaptive to 4x4 (16 tokens/frame)", dict(mode="adaptive", output_size=4)),
        ("bilinear to 14x14 (LLaVA-OneVision)", dict(mode="bilinear", output_size=14)),
        ("mean (1 token/frame)", dict(mode="adaptive", output_size=1)),
    ]
    backends = ["torch"] + [
        b
        for b, check in (("cuda", _backend.cuda_runnable), ("triton", _backend.triton_runnable))
        if check(device)[0] and not (device.type == "cpu" and b == "triton")
    ]
    for label, kw in settings:
        results = []
        ref = None
        for backend in backends:
            out = crosslmm_ops.token_pool(x, grid, backend=backend, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                out = crosslmm_ops.token_pool(x, grid, backend=backend, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.repeat * 1e3
            ref = out.float() if ref is None else ref
            err = (out.float() - ref).norm().item() / max(ref.norm().item(), 1e-30)
            results.append(
                f"{crosslmm_ops.last_backend('token_pool')} {ms:.3f} ms"
                + (f" (rel. diff {err:.1e})" if backend != "torch" else "")
            )
        print(f"  {label:<45} -> {tuple(out.shape)}: " + ", ".join(results))
    return 0


def _size(n_bytes) -> str:
    if n_bytes is None:
        return "n/a (CPU)"
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def demo(args) -> int:
    from crosslmm_ops.demo import (
        build_models,
        consistency_problems,
        measure,
        measurement_plan,
        synthetic_video,
        video_prompt,
    )

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        tqdm = None
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    variants = ["baseline", "crosslmm"] + (["crosslmm-frame"] if args.frame_scope else [])
    print(
        f"Building {args.preset} models ({', '.join(variants)}; random weights, shared between "
        f"them) on {device} in {dtype} ..."
    )
    models = build_models(args.preset, variants, device=device, dtype=dtype, seed=args.seed)
    config = models["crosslmm"].config
    vc = config.vision_config
    video = synthetic_video(args.frames, vc.image_size, device=device, dtype=dtype, seed=args.seed)
    print(
        f"Synthetic video: {args.frames} frames of {vc.image_size}x{vc.image_size} px -> "
        f"{config.tokens_per_frame} encoder tokens per frame "
        f"({args.frames * config.tokens_per_frame} in all), width {vc.hidden_size}"
    )
    repeats, warmup = measurement_plan(device)
    repeats = repeats if args.repeats is None else args.repeats
    # Progress: each of the three prefill measurements' calls, then the timed decode steps.
    steps_per_model = (warmup + repeats) * 3 + max(args.new_tokens - 2, 0)
    bar = (
        tqdm(
            total=steps_per_model * len(variants),
            desc="measuring",
            unit="step",
            disable=tqdm is None or args.quiet,
        )
        if tqdm
        else None
    )
    results = []
    for variant in variants:
        model = models[variant]
        ids = video_prompt(model.config, args.frames, device=device, seed=args.seed)
        if bar is not None:
            bar.set_postfix_str(variant)
        results.append(
            measure(
                model,
                variant,
                video,
                ids,
                new_tokens=args.new_tokens,
                repeats=repeats,
                warmup=warmup,
                progress=(lambda _stage: bar.update(1)) if bar else None,
            )
        )
    if bar is not None:
        bar.close()
    base = results[0]
    rows = [
        (
            "visual tokens into the LLM",
            lambda m: f"{m.visual_tokens} ({m.visual_tokens // m.frames}/frame)",
        ),
        (
            "reduction vs baseline",
            lambda m: f"{100 * (1 - m.visual_tokens / base.visual_tokens):.1f}%",
        ),
        ("prompt length", lambda m: str(m.sequence_length)),
        ("vision tower", lambda m: f"{m.vision_ms:.1f} ms"),
        (
            "prefill from encoder tokens",
            lambda m: f"{m.llm_prefill_ms:.1f} ms ({base.llm_prefill_ms / m.llm_prefill_ms:.2f}x)",
        ),
        (
            "prefill from pixels",
            lambda m: f"{m.prefill_ms:.1f} ms ({base.prefill_ms / m.prefill_ms:.2f}x)",
        ),
        ("decode per token", lambda m: f"{m.decode_ms_per_token:.2f} ms"),
        (
            "decode per token, CUDA graph",
            lambda m: (
                "n/a (CPU)"
                if m.decode_ms_per_token_graph is None
                else f"{m.decode_ms_per_token_graph:.2f} ms"
            ),
        ),
        ("peak prefill memory (total)", lambda m: _size(m.peak_memory_bytes)),
        ("  of which activations", lambda m: _size(m.activation_memory_bytes)),
        ("cache after prefill (KV + vision)", lambda m: _size(m.cache_bytes)),
        ("back ends", lambda m: "; ".join(f"{op}: {b}" for op, b in m.backends.items()) or "-"),
        ("generated token ids", lambda m: " ".join(map(str, m.generated))),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{width}}  " + "  |  ".join(m.variant for m in results))
    for label, fmt in rows:
        print(f"{label:<{width}}  " + "  |  ".join(fmt(m) for m in results))
    print(
        f"\n(Times: the median of {repeats} timed runs after {warmup} untimed. Random weights: "
        "the generated ids show the pipeline runs end to end, not an answer. Timings on this "
        "device only; see README for GPU numbers.)"
    )
    problems = consistency_problems(results)
    if not problems:
        return 0
    fail = (args.on_inconsistent or ("fail" if device.type == "cuda" else "warn")) == "fail"
    print(
        "\nThese measurements are not consistent, so the times above cannot be trusted:",
        file=sys.stderr,
    )
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    print(
        "  (run again, with more --repeats, on an idle machine"
        + ("; exit status 3)" if fail else "; a warning on the CPU, --on-inconsistent fail)"),
        file=sys.stderr,
    )
    return 3 if fail else 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------

BENCH_SUITES = ("token_pool", "cross_attention", "projected_attention")
# Our back ends in the benchmarks' rows (benchmarks/conftest.py OURS); every other row is a peer.
BENCH_OURS = ("cuda", "triton")


def benchmarks_dir() -> Path | None:
    """The repository's ``benchmarks/`` beside the package (an editable install or a checkout on
    ``PYTHONPATH``); None where the package was installed without it (a wheel)."""
    path = Path(crosslmm_ops.__file__).resolve().parent.parent / "benchmarks"
    return path if (path / "conftest.py").is_file() else None


def plot_bench(summary_json: Path, png: Path) -> int:
    """A bar chart of one suite's summary JSON (``benchmarks/conftest.py`` writes it): median ms
    per case (log scale), one bar per back end, ours (cuda, triton) in warm colours and the peers
    in greys/blues. Returns the number of cases drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = json.loads(summary_json.read_text())
    rows = [
        r
        for r in data.get("results", [])
        if isinstance(r.get("ms"), (int, float)) and math.isfinite(r["ms"]) and r["ms"] > 0
    ]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    backends = [b for b in BENCH_OURS if b in backends] + [
        b for b in backends if b not in BENCH_OURS
    ]
    ms = {(r["group"], r["backend"]): r["ms"] for r in rows}
    ours_colours = {"cuda": "#d62728", "triton": "#ff7f0e"}
    peer_cmap = plt.get_cmap("tab20c")
    width = 0.8 / max(len(backends), 1)
    bars = len(groups) * max(len(backends), 2)
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.3 * bars)), 4.8))
    peer_i = 0
    for i, backend in enumerate(backends):
        xs = [g for g, group in enumerate(groups) if (group, backend) in ms]
        ys = [ms[(groups[g], backend)] for g in xs]
        if backend in ours_colours:
            colour = ours_colours[backend]
        else:
            colour = peer_cmap(peer_i % 20)
            peer_i += 1
        ax.bar(
            [x - 0.4 + (i + 0.5) * width for x in xs],
            ys,
            width,
            color=colour,
            label=backend + (" (ours)" if backend in BENCH_OURS else ""),
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (lower is faster)")
    env = data.get("environment", {})
    suite = rows[0]["suite"] if rows else summary_json.stem
    ax.set_title(
        f"{suite}: ours vs peers on {env.get('gpu', 'unknown GPU')} (torch "
        f"{env.get('torch', '?')}, triton {env.get('triton', '?')})",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return len(groups)


def bench(args) -> int:
    if not torch.cuda.is_available():
        print(
            "crosslmm-ops bench: the kernel benchmarks need a CUDA GPU, and this machine has "
            "none (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 1
    root = benchmarks_dir()
    if root is None:
        print(
            f"crosslmm-ops bench: no benchmarks/ folder beside the package "
            f"({Path(crosslmm_ops.__file__).resolve().parent.parent}); the benchmarks ship "
            "with the repository, not the wheel: install from a checkout (pip install -e .) "
            "and run it there",
            file=sys.stderr,
        )
        return 2
    suites = args.only or list(BENCH_SUITES)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CROSSLMM_BENCH_DIR=str(out))
    failed = []
    for suite in suites:
        script = root / f"bench_{suite}.py"
        if not script.is_file():
            print(f"crosslmm-ops bench: {script} is missing", file=sys.stderr)
            failed.append(suite)
            continue
        summary = out / f"{suite}.json"
        summary.unlink(missing_ok=True)  # a stale summary must not pass for this run's
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(script),
            "--benchmark-only",
            f"--benchmark-json={out / f'{suite}_pytest_benchmark.json'}",
            "-q",
            "-p",
            "no:cacheprovider",
            *shlex.split(args.pytest_args or ""),
        ]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        # From the repository root, so that pyproject.toml's pytest settings (bench_* files and
        # functions are tests) apply.
        rc = subprocess.run(cmd, cwd=root.parent, env=env).returncode
        if rc != 0 or not summary.is_file():
            print(
                f"crosslmm-ops bench: {suite}: pytest exited with {rc}"
                + ("" if summary.is_file() else f" and wrote no {summary.name}"),
                file=sys.stderr,
            )
            failed.append(suite)
            if not summary.is_file():
                continue
        png = out / f"{suite}.png"
        cases = plot_bench(summary, png)
        print(f"{suite}: {cases} cases -> {summary} and {png}")
    if failed:
        print(f"crosslmm-ops bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error (argparse: one line, exit status 2) at parse time,
# not a traceback from deep inside a model.
# ----------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:<i>``, where this machine can run it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:<index>, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} needs a CUDA GPU and torch sees none on this machine; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    return str(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosslmm-ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"crosslmm-ops {crosslmm_ops.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="CrossLMM vs a LLaVA-OneVision-shaped baseline on a synthetic video"
    )
    d.add_argument(
        "--preset",
        default="demo",
        choices=["demo", "crosslmm-2b", "crosslmm-7b"],
        help="model shapes (random weights); 'demo' is small enough for a CPU",
    )
    d.add_argument("--frames", type=_int_at_least(1), default=16)
    d.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    d.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    # The measurement always takes the prefill's token and one untimed decode step
    # (demo.measure), so fewer than 2 new tokens cannot be honoured.
    d.add_argument(
        "--new-tokens",
        type=_int_at_least(2, " (the prefill's token and one untimed decode step)"),
        default=8,
        help="tokens generated greedily (>= 2; the decode time is the mean of all but "
        "the first two)",
    )
    d.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=None,
        help="timed runs of each prefill measurement after 1 untimed, the median reported "
        "(default: 5 on a GPU, 3 on the CPU)",
    )
    d.add_argument(
        "--on-inconsistent",
        choices=["fail", "warn"],
        default=None,
        help="when the measurements contradict each other (the same vision tower timed more "
        "than 15%% apart, a prefill from pixels faster than one of its parts): exit with "
        "status 3 (default on a GPU) or only warn (default on the CPU)",
    )
    d.add_argument("--frame-scope", action="store_true", help="also run V2V per frame")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=demo)
    sub.add_parser("info", help="versions, build, GPU and back ends").set_defaults(func=info)
    p = sub.add_parser("pool", help="pool a synthetic video with every available back end")
    p.add_argument("--frames", type=_int_at_least(1), default=32)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="bfloat16" if torch.cuda.is_available() else "float32",
        choices=["float32", "float16", "bfloat16"],
    )
    p.add_argument("--repeat", type=_int_at_least(1), default=3)
    p.set_defaults(func=pool)
    b = sub.add_parser("bench", help="run the kernel benchmarks (GPU) and plot ours vs peers")
    b.add_argument(
        "--only",
        action="append",
        choices=BENCH_SUITES,
        help="one suite (repeat for several; default: all)",
    )
    b.add_argument(
        "--out",
        default="bench-results",
        help="folder for <op>.json (summary), <op>_pytest_benchmark.json and <op>.png",
    )
    b.add_argument(
        "--pytest-args",
        default="",
        help="extra pytest arguments, e.g. \"-k 'T=32'\" for a quick run",
    )
    b.set_defaults(func=bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", "") is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
