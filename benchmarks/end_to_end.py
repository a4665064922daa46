"""From pixels to tokens, and training steps: CrossLMM against its LLaVA-OneVision-shaped baseline
on one GPU, written as ``benchmarks/results/end_to_end_<gpu>.json`` (issue 20's format).

    python benchmarks/end_to_end.py --preset crosslmm-2b --frames 256 1024 \\
        --train-frames 64 256

Inference rows (``mode="inference"``): the vision tower alone, the prefill from pixels, the peak
activation memory of that prefill (beyond weights and inputs), and the decode time per token from
its cache, eager (``decode_ms_per_token``) and with the step captured in a CUDA graph
(``decode_ms_per_token_graph``, on a GPU); medians after a warm-up, decode means over
``--new-tokens`` - 2 timed tokens (:func:`crosslmm_ops.demo.measure`), checked for consistency
(``demo.consistency_problems``). Training rows (``"train-stage1"`` / ``"train-stage2"``, with
and without activation checkpointing): one optimizer step (forward with the loss, backward, AdamW)
from pixels, its time, peak memory and frames per second. A row that runs out of GPU memory is
recorded with ``"oom": true``. Random weights, synthetic video. ``--vision-compile`` runs the
vision tower's chunks through ``torch.compile`` (rows marked ``"vision_compile": true``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosslmm_ops import demo  # noqa: E402

GIB = 2**30


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def inference_row(
    model, variant, preset, frames, device, dtype, repeats, warmup, new_tokens=34
) -> dict:
    row = dict(preset=preset, variant=variant, frames=frames, mode="inference")
    video = demo.synthetic_video(
        frames, model.config.vision_config.image_size, device=device, dtype=dtype
    )
    ids = demo.video_prompt(model.config, frames, device=device)
    try:
        m = demo.measure(
            model, variant, video, ids, new_tokens=new_tokens, repeats=repeats, warmup=warmup
        )
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        row["oom"] = True
        return row
    finally:
        del video
        _free(device)
    row.update(
        prefill_from_pixels_ms=round(m.prefill_ms, 2),
        vision_ms=round(m.vision_ms, 2),
        llm_prefill_ms=round(m.llm_prefill_ms, 2),
        decode_ms_per_token=round(m.decode_ms_per_token, 3),
        decode_ms_per_token_graph=None
        if m.decode_ms_per_token_graph is None
        else round(m.decode_ms_per_token_graph, 3),
        decode_tokens_timed=new_tokens - 2,
        sequence_length=m.sequence_length,
        oom=False,
    )
    if m.activation_memory_bytes is not None:
        row["peak_activation_gib"] = round(m.activation_memory_bytes / GIB, 3)
        row["peak_gib"] = round(m.peak_memory_bytes / GIB, 3)
    row["_measurement"] = m
    return row


def train_row(model, variant, preset, frames, stage, checkpointing, device, dtype, repeats) -> dict:
    row = dict(
        preset=preset,
        variant=variant,
        frames=frames,
        mode=f"train-stage{stage}",
        activation_checkpointing=checkpointing,
    )
    trainable = model.set_training_stage(stage)
    model.train()
    # (transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_*)
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    disable = getattr(
        model, "activation_checkpointing_disable", model.gradient_checkpointing_disable
    )
    enable() if checkpointing else disable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    video = demo.synthetic_video(
        frames, model.config.vision_config.image_size, device=device, dtype=dtype
    )
    ids = demo.video_prompt(model.config, frames, device=device)
    labels = ids.masked_fill(ids == model.config.video_token_id, -100)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values_videos=video, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()

    times = []
    try:
        step()  # warm-up: optimizer state, kernel selection
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        row["oom"] = True
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer = video = None
        model.eval()
        disable()
        _free(device)
    ms = statistics.median(times)
    row.update(
        step_ms=round(ms, 1),
        frames_per_second=round(frames / (ms / 1e3), 2),
        trainable_parameters=sum(
            p.numel() for n, p in model.named_parameters() if n in set(trainable)
        ),
        oom=False,
    )
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    return row


def environment(device) -> dict:
    import transformers
    import triton

    import crosslmm_ops

    return dict(
        gpu=torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        crosslmm_ops=crosslmm_ops.__version__,
        cuda=torch.version.cuda,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="crosslmm-2b")
    parser.add_argument(
        "--frames",
        type=int,
        nargs="*",
        default=[256, 1024],
        help="inference rows at these frame counts",
    )
    parser.add_argument(
        "--train-frames",
        type=int,
        nargs="*",
        default=[64, 256],
        help="training rows at these frame counts",
    )
    parser.add_argument("--variants", nargs="+", default=["baseline", "crosslmm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per number (default: demo.measure's)"
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=34,
        help="tokens per decode measurement (all but the first two timed), eager and graph",
    )
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument(
        "--vision-compile",
        action="store_true",
        help="run the vision tower's chunks through torch.compile (model.model.vision_compile); "
        "the rows say so with vision_compile: true",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.new_tokens < 3:
        parser.error("--new-tokens must be >= 3 (the first two are not timed)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    print(json.dumps(env), flush=True)
    rows, problems = [], []
    # What every row says of the run.
    marks = {"vision_compile": True} if args.vision_compile else {}
    for variant in args.variants:
        model = demo.build_models(args.preset, [variant], device=device, dtype=dtype)[variant]
        model.model.vision_compile = args.vision_compile
        for frames in args.frames:
            # Long videos: one timed call after the warm-up (a 1024-frame prefill takes seconds).
            repeats = args.repeats if args.repeats is not None else (1 if frames > 256 else None)
            row = inference_row(
                model, variant, args.preset, frames, device, dtype, repeats, None, args.new_tokens
            )
            row.update(marks)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "_measurement"}), flush=True)
        for frames in args.train_frames:
            for stage in (1, 2):
                for checkpointing in (False, True):
                    row = train_row(
                        model,
                        variant,
                        args.preset,
                        frames,
                        stage,
                        checkpointing,
                        device,
                        dtype,
                        args.train_repeats,
                    )
                    row.update(marks)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del model
        _free(device)
    for frames in args.frames:
        measured = [
            r["_measurement"]
            for r in rows
            if r.get("mode") == "inference" and r["frames"] == frames and "_measurement" in r
        ]
        for problem in demo.consistency_problems(measured):
            problems.append(f"{frames} frames: {problem}")
    for r in rows:
        r.pop("_measurement", None)
    for problem in problems:
        print(f"INCONSISTENT: {problem}", flush=True)
    gpu = "h100" if "H100" in env["gpu"] else "h200" if "H200" in env["gpu"] else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"end_to_end_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"env": env, "rows": rows, "inconsistent": problems}, indent=1) + "\n"
    )
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
