"""Train a CrossLMM on synthetic long videos over several processes (torchrun), with the video
sharded by frames and the model under DDP or FSDP2.

    torchrun --nproc-per-node 2 examples/train_distributed.py --device cpu --steps 3          # gloo
    torchrun --nproc-per-node 2 examples/train_distributed.py --device cuda --strategy fsdp2  # NCCL

Data: ``MarkerVideoTask`` (``marker_video.py`` beside this script: T frames of random texture
tokens, one marker token; the question asks its colour, cell or frame), given to the model as
encoder tokens (``vision_features``: the SigLIP tower does not run and is frozen).

Parallelism: the ranks form frame groups of ``--frame-group-size`` ranks (default: all of them
with ``--frame-shard on``, 1 with ``off``). The ranks of one frame group see the same batch: each
holds its share of the frames (:class:`crosslmm_ops.models.FrameShardedCrossLMM`: its own
frames' original tokens, the pooled tokens all-gathered, sharded DCAL attention) and runs the LLM
on the whole (short) sequence. Different frame groups draw different batches: that is the
data-parallel dimension. DDP or FSDP2 (``fully_shard`` per decoder layer and the root) average
the gradients over all ranks, which is exact with the frame sharding's ``gradients="mean"``
convention. Prints the loss of every step (rank 0; averaged over the frame groups).

On GPUs the script turns NVLink multicast off before NCCL starts (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import os
import time

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from marker_video import MarkerTaskConfig, MarkerVideoTask  # noqa: E402

from crosslmm_ops import distributed as cd  # noqa: E402
from crosslmm_ops.models import (  # noqa: E402
    CrossLMMForConditionalGeneration,
    FrameShardedCrossLMM,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--frame-shard", choices=("on", "off"), default="on")
    p.add_argument(
        "--frame-group-size",
        type=int,
        default=None,
        help="ranks per frame group (default: all ranks with --frame-shard on)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="samples per frame group and step")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--preset", default="crosslmm-tiny")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kv-path", choices=("auto", "fused", "materialized"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        losses = _train(args, device, rank, world)
        dist.barrier()  # no rank tears the groups down while another still uses them
        return losses
    finally:
        dist.destroy_process_group()


def _train(args, device, rank, world) -> list[float]:
    group_size = args.frame_group_size or (world if args.frame_shard == "on" else 1)
    if world % group_size:
        raise SystemExit(f"--frame-group-size {group_size} must divide the {world} ranks")
    if args.frame_shard == "off" and group_size != 1:
        raise SystemExit("--frame-shard off means frame groups of 1 rank")
    # Creating groups is collective: every rank creates every frame group, in the same order.
    groups = (
        [
            cd.frame_group(range(g * group_size, (g + 1) * group_size))
            for g in range(world // group_size)
        ]
        if args.frame_shard == "on"
        else None
    )
    data_index = rank // group_size  # which batch this rank's frame group draws

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dtype = DTYPES[args.dtype]
    with torch.device(device):
        model = CrossLMMForConditionalGeneration.from_preset(
            "crosslmm-tiny" if args.preset is None else args.preset, dtype=dtype
        )
    model.model.vision_tower.requires_grad_(False)  # the task gives encoder tokens
    for dcal in model.dcals.values():
        dcal.kv_path = args.kv_path
    config = model.config
    vc = config.vision_config
    grid = config.encoder_grid
    if grid[0] != grid[1]:
        raise SystemExit("the synthetic task needs a square encoder grid")
    task = MarkerVideoTask(
        MarkerTaskConfig(
            frames=args.frames,
            grid=grid[0],
            width=vc.hidden_size,
            colours=min(8, vc.hidden_size - 1),
        ),
        video_token_id=config.video_token_id,
    )

    if args.frame_shard == "on":
        module = FrameShardedCrossLMM(model, groups[data_index])
    else:
        module = model
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        train_module = module
    params = [p for p in train_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)

    if rank == 0:
        print(
            f"world {world}, frame groups of {group_size} rank(s), strategy {args.strategy}, "
            f"preset {args.preset}, {args.frames} frames x {task.config.tokens_per_frame} "
            f"tokens, batch {args.batch_size} per frame group, device {device.type}, "
            f"{args.dtype}",
            flush=True,
        )
    losses = []
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + step * 1_009 + data_index)
        batch = task.sample(args.batch_size, config.pooled_per_frame, gen).to(device, dtype)
        start = time.perf_counter()
        out = train_module(
            input_ids=batch.input_ids, vision_features=batch.vision_features, labels=batch.labels
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        # Every rank of a frame group has the same loss; average over the data-parallel groups.
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)
        loss = loss.item() / world
        losses.append(loss)
        if rank == 0:
            print(f"step {step} loss {loss:.4f} time {elapsed * 1e3:.1f} ms", flush=True)
    return losses


if __name__ == "__main__":
    main()
