"""Frame-sharded CrossLMM from 1 to N GPUs (torchrun, NCCL): exactness against one GPU, and the
time of the DCAL attention, of a long-video prefill and of a training step.

    torchrun --nproc-per-node 2 benchmarks/distributed_scaling.py \\
        --out benchmarks/results/distributed_scaling_h200x2.json
    # smoke test of the code path on CPU (gloo), tiny sizes:
    torchrun --nproc-per-node 2 benchmarks/distributed_scaling.py --device cpu \\
        --preset crosslmm-tiny --frames 8 --text 16 --iters 1 --warmup 0 --out /tmp/scaling.json

Every rank first runs each case alone on its whole problem (the 1-GPU baseline: no collective,
the GPUs side by side), then the frame-sharded version over all ranks; times are medians over
``--iters`` after ``--warmup``, the slowest rank's, and the JSON holds both and their ratio.

* ``exactness``: sharded against one GPU on the same data: V2V-global attention forward and
  backward at the full size (in ``--dtype``; relative errors, to be read against that dtype's
  rounding) and at 32 frames in float32; the model's prefill logits and a training step's loss;
* ``attention``: one DCAL's V2V-global (``T * 9`` queries) and T2V (``--text`` queries) attention
  over the ``T * 729`` original tokens (crosslmm-2b: 12 query heads of 128, 2 KV heads), forward
  and forward + backward;
* ``prefill``: the model's forward at ``--frames`` frames, batch 1, from encoder tokens
  (``vision_features``: the LLM side and the DCALs) and, with ``--pixels``, from pixels (SigLIP on
  each rank's frames only), with the peak memory;
* ``train_step``: forward + backward + an SGD step from encoder tokens (vision tower frozen),
  one GPU against DDP with frame sharding.

Sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 before
NCCL starts (NVLink multicast stays off).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import distributed as cd  # noqa: E402
from crosslmm_ops.models import FrameShardedCrossLMM  # noqa: E402
from crosslmm_ops.testing import relative_error  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", default="crosslmm-2b")
    p.add_argument("--frames", type=int, default=512)
    p.add_argument("--text", type=int, default=128, help="text tokens (T2V queries)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="default bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--pixels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the prefill from pixels (SigLIP on each rank's frames)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: exactness, attention, prefill, train_step",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, args, device, *, collective: bool) -> dict:
    """Median ms over ``args.iters`` calls after ``args.warmup``; the slowest rank's. A
    ``collective`` case starts every call on all ranks together (a barrier in between)."""
    for _ in range(args.warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(args.iters):
        if collective:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    # (on the device: NCCL reduces device tensors only)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    dist.barrier()
    return {"ms": med.item(), "ms_this_rank": times}


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30])
    peak = peak.to(device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def _ratio(one: dict, many: dict) -> float:
    return one["ms"] / many["ms"] if many["ms"] > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


def _attention_inputs(
    frames, queries, heads, kv_heads, head_dim, tokens_per_frame, dtype, device, seed
):
    gen = torch.Generator(device=device).manual_seed(seed)
    lk = frames * tokens_per_frame
    q = torch.randn(1, queries, heads, head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, lk, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(1, lk, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    dout = torch.randn(q.shape, generator=gen, device=device, dtype=dtype)
    return q, k, v, dout


def _local_keys(frames, tokens_per_frame, rank, world):
    shares = [frames * (r + 1) // world - frames * r // world for r in range(world)]
    start = sum(shares[:rank])
    return slice(start * tokens_per_frame, (start + shares[rank]) * tokens_per_frame)


def _attention_exactness(frames, shape, dtype, device, rank, world) -> dict:
    heads, kv_heads, d, N, n = shape
    q, k, v, dout = _attention_inputs(frames, frames * n, heads, kv_heads, d, N, dtype, device, 1)
    mine = _local_keys(frames, N, rank, world)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = crosslmm_ops.cross_attention(*leaves)
    out.backward(dout)
    sq = q.clone().requires_grad_()
    sk, sv = (t[:, mine].clone().requires_grad_() for t in (k, v))
    sout = cd.sharded_cross_attention(sq, sk, sv)
    sout.backward(dout)
    errs = {
        "out": relative_error(sout, out),
        "dq": relative_error(sq.grad, leaves[0].grad),
        "dk": relative_error(sk.grad, leaves[1].grad[:, mine]),
        "dv": relative_error(sv.grad, leaves[2].grad[:, mine]),
    }
    worst = torch.tensor([errs[key] for key in sorted(errs)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {
        "frames": frames,
        "dtype": str(dtype).replace("torch.", ""),
        "backend": crosslmm_ops.last_backend("sharded_cross_attention"),
        "relative_error_vs_one_gpu": dict(zip(sorted(errs), worst.tolist())),
    }


def part_attention(args, shape, dtype, device, rank, world) -> list[dict]:
    heads, kv_heads, d, N, n = shape
    T = args.frames
    mine = _local_keys(T, N, rank, world)
    rows = []
    for name, queries in (("v2v_global", T * n), ("t2v", args.text)):
        q, k, v, dout = _attention_inputs(T, queries, heads, kv_heads, d, N, dtype, device, 2)
        kl, vl = k[:, mine].contiguous(), v[:, mine].contiguous()
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, kl, vl))

        def one_fwd():
            with torch.no_grad():
                crosslmm_ops.cross_attention(q, k, v)

        def many_fwd():
            with torch.no_grad():
                cd.sharded_cross_attention(q, kl, vl)

        def one_step():
            crosslmm_ops.cross_attention(qg, kg, vg).backward(dout)

        def many_step():
            cd.sharded_cross_attention(qs, ks, vs).backward(dout)

        pairs = queries * T * N
        flops = 4 * pairs * heads * d
        for kind, one, many, f in (
            ("forward", one_fwd, many_fwd, flops),
            ("forward+backward", one_step, many_step, 3.5 * flops),
        ):
            t1 = _timed(one, args, device, collective=False)
            tn = _timed(many, args, device, collective=True)
            rows.append(
                {
                    "case": name,
                    "kind": kind,
                    "queries": queries,
                    "keys": T * N,
                    "one_gpu": t1,
                    "sharded": tn,
                    "speedup": _ratio(t1, tn),
                    "tflops_one_gpu": f / t1["ms"] / 1e9,
                    "tflops_sharded_total": f / tn["ms"] / 1e9,
                }
            )
        q = k = v = kl = vl = qg = kg = vg = qs = ks = vs = None
    return rows


def _model(args, dtype, device):
    from crosslmm_ops.models import CrossLMMForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = CrossLMMForConditionalGeneration.from_preset(args.preset, dtype=dtype)
    with torch.no_grad():  # open the gates: an untrained DCAL adds nothing
        for dcal in model.dcals.values():
            for branch in (dcal.v2v, dcal.t2v):
                if branch is not None and branch.gate is not None:
                    branch.gate.alpha.fill_(0.5)
    return model


def _prompt(config, frames, text, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    n = config.pooled_per_frame
    ids = (
        [1]
        + [config.video_token_id] * (frames * n)
        + torch.randint(
            3, min(config.video_token_id, config.text_config.vocab_size), (text,), generator=gen
        ).tolist()
    )
    ids = torch.tensor([ids], device=device)
    labels = ids.clone()
    labels[ids == config.video_token_id] = -100
    return ids, labels


def _features(config, frames, dtype, device, seed=4):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(
        1,
        frames,
        config.tokens_per_frame,
        config.vision_config.hidden_size,
        generator=gen,
        device=device,
        dtype=dtype,
    )


def _pixels(config, frames, dtype, device, seed=5):
    vc = config.vision_config
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(
        1,
        frames,
        vc.num_channels,
        vc.image_size,
        vc.image_size,
        generator=gen,
        device=device,
        dtype=dtype,
    )


def part_prefill(args, dtype, device, rank, world, result) -> list[dict]:
    model = _model(args, dtype, device).eval()
    config = model.config
    wrapped = FrameShardedCrossLMM(model, cd.frame_group())
    ids, _ = _prompt(config, args.frames, args.text, device)
    rows = []
    sources = [("vision_features", _features(config, args.frames, dtype, device))]
    if args.pixels:
        sources.append(("pixel_values_videos", _pixels(config, args.frames, dtype, device)))
    for key, video in sources:
        shard = wrapped.frame_shard([args.frames])
        local = shard.local(video[0]).contiguous()  # each rank is handed only its frames

        def one():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1, **{key: video})

        def many():
            with torch.no_grad():
                return wrapped(
                    input_ids=ids, frames_per_sample=[args.frames], logits_to_keep=1, **{key: local}
                )

        _peak_reset(device)
        t1 = _timed(one, args, device, collective=False)
        m1 = _peak_gib(device)
        _peak_reset(device)
        tn = _timed(many, args, device, collective=True)
        mn = _peak_gib(device)
        err = relative_error(many().logits.float(), one().logits.float())
        rows.append(
            {
                "input": key,
                "frames": args.frames,
                "one_gpu": t1,
                "sharded": tn,
                "speedup": _ratio(t1, tn),
                "peak_gib_one_gpu": m1,
                "peak_gib_sharded": mn,
                "last_logits_relative_error": err,
            }
        )
        result.setdefault("exactness", {})[f"prefill_{key}_logits_relative_error"] = err
    model = wrapped = None
    return rows


def part_train_step(args, dtype, device, rank, world, result) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(args, dtype, device).train()
    model.model.vision_tower.requires_grad_(False)
    config = model.config
    ids, labels = _prompt(config, args.frames, args.text, device)
    video = _features(config, args.frames, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)

    def one():
        out = model(input_ids=ids, vision_features=video, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _peak_reset(device)
    t1 = _timed(one, args, device, collective=False)
    m1 = _peak_gib(device)
    ddp = DDP(
        FrameShardedCrossLMM(model, cd.frame_group()),
        device_ids=[device.index] if device.type == "cuda" else None,
    )
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-6)
    shard = ddp.module.frame_shard([args.frames])
    local = shard.local(video[0]).contiguous()
    # The one-GPU steps above moved the weights: compare against a fresh one-GPU loss.
    with torch.no_grad():
        loss_one = (
            model(input_ids=ids, vision_features=video, labels=labels, use_cache=False)
            .loss.float()
            .item()
        )
        loss_sharded = (
            ddp(
                input_ids=ids, vision_features=local, frames_per_sample=[args.frames], labels=labels
            )
            .loss.float()
            .item()
        )
    result.setdefault("exactness", {})["train_loss"] = {
        "one_gpu": loss_one,
        "sharded": loss_sharded,
        "relative_difference": abs(loss_sharded - loss_one) / max(abs(loss_one), 1e-30),
    }

    def many():
        out = ddp(
            input_ids=ids, vision_features=local, frames_per_sample=[args.frames], labels=labels
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _peak_reset(device)
    tn = _timed(many, args, device, collective=True)
    mn = _peak_gib(device)
    ddp = model = None
    return {
        "frames": args.frames,
        "one_gpu": t1,
        "sharded_ddp": tn,
        "speedup": _ratio(t1, tn),
        "peak_gib_one_gpu": m1,
        "peak_gib_sharded": mn,
    }


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    skip = {s for s in args.skip.split(",") if s}
    try:
        from crosslmm_ops.models.configuration import preset_config

        config = preset_config(args.preset)
        tc = config.text_config
        dk = config.dcal_kwargs()
        shape = (
            dk["num_heads"],
            dk["num_kv_heads"],
            dk["head_dim"],
            config.tokens_per_frame,
            config.pooled_per_frame,
        )
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        result = {
            "gpu": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "world_size": world,
            "torch": torch.__version__,
            "triton": triton_version,
            "nccl": _nccl_version() if cuda else None,
            "backend": dist.get_backend(),
            "preset": args.preset,
            "frames": args.frames,
            "original_tokens": args.frames * config.tokens_per_frame,
            "text": args.text,
            "dtype": str(dtype).replace("torch.", ""),
            "iters": args.iters,
            "warmup": args.warmup,
            "env": {
                k: os.environ.get(k)
                for k in (
                    "NCCL_NVLS_ENABLE",
                    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                    "NVSHMEM_DISABLE_NVLS",
                )
            },
            "shapes": {
                "heads": shape[0],
                "kv_heads": shape[1],
                "head_dim": shape[2],
                "tokens_per_frame": shape[3],
                "pooled_per_frame": shape[4],
                "hidden": tc.hidden_size,
                "layers": tc.num_hidden_layers,
                "dcal_layers": list(config.dcal_layer_indices),
            },
        }
        if "exactness" not in skip:
            result.setdefault("exactness", {})["attention_full_size"] = _attention_exactness(
                args.frames, shape, dtype, device, rank, world
            )
            result["exactness"]["attention_fp32_32_frames"] = _attention_exactness(
                min(32, args.frames), shape, torch.float32, device, rank, world
            )
        if "attention" not in skip:
            result["attention"] = part_attention(args, shape, dtype, device, rank, world)
        if "prefill" not in skip:
            result["prefill"] = part_prefill(args, dtype, device, rank, world, result)
        if "train_step" not in skip:
            result["train_step"] = part_train_step(args, dtype, device, rank, world, result)
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
            _print_summary(result)
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _print_summary(result: dict) -> None:
    print(
        f"{result['gpu']} x{result['world_size']}, torch {result['torch']}, "
        f"{result['preset']}, {result['frames']} frames ({result['original_tokens']} original "
        f"tokens), {result['dtype']}"
    )
    for key, value in result.get("exactness", {}).items():
        print(f"exactness {key}: {value}")
    for row in result.get("attention", []):
        print(
            f"attention {row['case']:10s} {row['kind']:16s} 1 GPU {row['one_gpu']['ms']:8.3f} ms"
            f"  sharded {row['sharded']['ms']:8.3f} ms  speedup {row['speedup']:.2f}x"
        )
    for row in result.get("prefill", []):
        print(
            f"prefill from {row['input']:20s} 1 GPU {row['one_gpu']['ms']:9.1f} ms  sharded "
            f"{row['sharded']['ms']:9.1f} ms  speedup {row['speedup']:.2f}x  peak "
            f"{row['peak_gib_one_gpu']} -> {row['peak_gib_sharded']} GiB"
        )
    row = result.get("train_step")
    if row:
        print(
            f"train step 1 GPU {row['one_gpu']['ms']:.1f} ms  sharded DDP "
            f"{row['sharded_ddp']['ms']:.1f} ms  speedup {row['speedup']:.2f}x  peak "
            f"{row['peak_gib_one_gpu']} -> {row['peak_gib_sharded']} GiB"
        )


if __name__ == "__main__":
    main()
