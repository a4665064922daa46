"""The efficiency study (issue #6; the paper's Figure 4 and Table 6): CrossLMM against a
LLaVA-OneVision-shaped baseline on the GPU, at 32..256 frames, for the crosslmm-2b and crosslmm-7b
shapes (random weights).

    python benchmarks/efficiency.py --presets crosslmm-2b crosslmm-7b --frames 32 64 128 256

For every (preset, frames, variant): the vision tower alone, the prefill from encoder tokens (the
LLM side: pooling, projector, decoder, DCALs) and from pixels, peak memory (total and activations),
the decode latency per token from the prefill's cache, and analytical FLOPs by part (checked
against ``torch.utils.flop_counter`` on a short video first). Variants: ``baseline`` (196 bilinear
tokens per frame, no DCAL), ``crosslmm`` (9 tokens per frame, DCAL every 4 layers, V2V global),
``crosslmm-frame`` (V2V per frame). Writes ``efficiency_<gpu>.json`` and PNG plots to ``--out``.
The variants' measurements at each preset and length are checked against each other
(``demo.consistency_problems``): what they find is printed as ``INCONSISTENT``, kept under
``inconsistent`` in the JSON, and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import study  # noqa: E402  (benchmarks/study.py, beside this script)

from crosslmm_ops import demo  # noqa: E402

# The paper's own reductions at 256 frames (CrossLMM vs its LLaVA-OV baseline).
PAPER_256 = {"memory_reduction": 0.875, "flops_reduction": 0.677, "prefill_speedup": 2.0}


def flop_check(preset: str, variant: str, device, dtype, frames: int = 4) -> dict:
    """``study.flop_check`` on a short video."""
    return study.flop_check(preset, variant, device=device, dtype=dtype, frames=frames)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = dict(
        gpu=gpu,
        torch=torch.__version__,
        dtype=args.dtype,
        paper_256=PAPER_256,
        flop_checks=[],
        runs=[],
    )
    for preset in args.presets:
        for variant in args.variants:
            check = flop_check(preset, variant, device, dtype)
            result["flop_checks"].append(check)
            print(
                f"[flops] {preset} {variant}: analytic/counted = {check['ratio']:.4f}", flush=True
            )
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    measured = {}  # (preset, frames) -> the variants' measurements, checked against each other
    for preset in args.presets:
        for variant in args.variants:
            model = demo.build_models(preset, [variant], device=device, dtype=dtype)[variant]
            for frames in args.frames:
                video = demo.synthetic_video(
                    frames, model.config.vision_config.image_size, device=device, dtype=dtype
                )
                ids = demo.video_prompt(model.config, frames, device=device)
                try:
                    m = demo.measure(
                        model, variant, video, ids, new_tokens=args.new_tokens, repeats=args.repeats
                    )
                    measured.setdefault((preset, frames), []).append(m)
                except torch.cuda.OutOfMemoryError as error:
                    print(f"[oom] {preset} {variant} T={frames}: {str(error)[:120]}", flush=True)
                    result["runs"].append(
                        dict(preset=preset, variant=variant, frames=frames, oom=True)
                    )
                    continue
                finally:
                    del video
                    gc.collect()
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                row = dict(
                    preset=preset,
                    **m.as_dict(),
                    flops=study.prefill_flops(model.config, frames, m.sequence_length),
                )
                result["runs"].append(row)
                print(
                    f"[run] {preset} {variant:<14} T={frames:<4} tokens={m.visual_tokens:<6} "
                    f"vision {m.vision_ms:8.1f} ms  llm-prefill {m.llm_prefill_ms:8.1f} ms  "
                    f"prefill {m.prefill_ms:8.1f} ms  decode {m.decode_ms_per_token:6.2f} ms/tok  "
                    f"act {_gib(m.activation_memory_bytes)}  llm-act "
                    f"{_gib(m.llm_activation_memory_bytes)}  {m.backends}",
                    flush=True,
                )
            del model
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    result["inconsistent"] = [
        f"{preset} {frames} frames: {problem}"
        for (preset, frames), ms in measured.items()
        for problem in demo.consistency_problems(ms)
    ]
    return result


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def summarise(result: dict) -> str:
    """A markdown table: each CrossLMM variant against the baseline at the same preset and
    length."""
    runs = [r for r in result["runs"] if not r.get("oom")]
    base = {(r["preset"], r["frames"]): r for r in runs if r["variant"] == "baseline"}
    lines = [
        "| preset | frames | variant | visual tokens | prefill from pixels | speedup | "
        "LLM-side prefill | speedup | vision tower | activation memory (LLM side) | "
        "reduction | FLOPs (w/o vision) | reduction | decode ms/token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        b = base.get((r["preset"], r["frames"]))
        if b is None:
            continue
        fl = r["flops"]["total"] - r["flops"]["vision"]
        bfl = b["flops"]["total"] - b["flops"]["vision"]
        act, bact = r["llm_activation_memory_bytes"], b["llm_activation_memory_bytes"]
        lines.append(
            f"| {r['preset']} | {r['frames']} | {r['variant']} | {r['visual_tokens']} | "
            f"{r['prefill_ms']:.1f} ms | {b['prefill_ms'] / r['prefill_ms']:.2f}x | "
            f"{r['llm_prefill_ms']:.1f} ms | {b['llm_prefill_ms'] / r['llm_prefill_ms']:.2f}x | "
            f"{r['vision_ms']:.1f} ms | {_gib(act)} | "
            f"{'' if act is None else f'{100 * (1 - act / bact):.1f}%'} | {fl / 1e12:.1f} T | "
            f"{100 * (1 - fl / bfl):.1f}% | {r['decode_ms_per_token']:.2f} |"
        )
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    runs = [r for r in result["runs"] if not r.get("oom")]
    paths = []
    for preset in sorted({r["preset"] for r in runs}):
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        metrics = [
            ("prefill_ms", "prefill from pixels (ms)"),
            ("llm_prefill_ms", "LLM-side prefill (ms)"),
            ("llm_activation_memory_bytes", "LLM-side activation memory (GiB)"),
            ("decode_ms_per_token", "decode (ms/token)"),
        ]
        for ax, (key, label) in zip(axes, metrics):
            for variant in sorted({r["variant"] for r in runs}):
                pts = sorted(
                    (r["frames"], r[key])
                    for r in runs
                    if r["preset"] == preset and r["variant"] == variant and r[key] is not None
                )
                if not pts:
                    continue
                xs, ys = zip(*pts)
                if key.endswith("bytes"):
                    ys = [y / 2**30 for y in ys]
                ax.plot(xs, ys, marker="o", label=variant)
            ax.set_xlabel("frames")
            ax.set_title(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{preset} on {result['gpu']} ({result['dtype']})")
        fig.tight_layout()
        path = out / f"efficiency_{preset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["crosslmm-2b", "crosslmm-7b"])
    parser.add_argument("--frames", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--variants", nargs="+", default=["baseline", "crosslmm", "crosslmm-frame"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per number, the median kept (default: demo.measurement_plan's)",
    )
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("CROSSLMM_BENCH_DIR", "benchmarks/results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    table = summarise(result)
    result["table"] = table
    gpu = result["gpu"].replace(" ", "_").lower()
    path = out / f"efficiency_{gpu[:40]}.json"
    path.write_text(json.dumps(result, indent=1))
    print("\n" + table + f"\n\nresults written to {path}")
    for p in plot(result, out):
        print(f"plot written to {p}")
    for problem in result["inconsistent"]:
        print(f"INCONSISTENT: {problem}", flush=True)
    return 1 if result["inconsistent"] else 0


if __name__ == "__main__":
    sys.exit(main())
