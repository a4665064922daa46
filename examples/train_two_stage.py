"""CrossLMM's two-stage training recipe on a toy task: a tiny random CrossLMM learns to answer each
video of a fixed batch with its own target token.

* stage 1: only the projector and the V2V branch of every DCAL train (vision tower, LLM and T2V
  frozen; T2V does not run);
* stage 2: everything trains, T2V on.

    python examples/train_two_stage.py [--steps 20] [--frames 3] [--batch 4] [--device cpu]

The script prints which parameters train in each stage and the loss, which falls in both. The
same calls train a real model: ``model.set_training_stage(1)``, an optimiser over the parameters
that require grad, ``model(input_ids=..., pixel_values_videos=..., labels=...).loss``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from crosslmm_ops.models import CrossLMMForConditionalGeneration


def toy_batch(config, batch: int, frames: int, text: int, device, seed: int):
    """Random encoder features ``(B, T, N, Dv)`` (the vision tower's output: the LLM-side recipe
    is what is trained here), prompts with the video's placeholders, and one target token per
    sample at the end: the only label, so the loss is "name this video's token"."""
    g = torch.Generator().manual_seed(seed)
    tc, n = config.text_config, config.pooled_per_frame
    features = torch.randn(
        batch, frames, config.tokens_per_frame, config.vision_config.hidden_size, generator=g
    )
    hi = config.video_token_id  # text tokens: [3, video_token_id)
    targets = torch.randint(3, hi, (batch,), generator=g)
    ids = torch.cat(
        [
            torch.full((batch, 1), tc.bos_token_id),
            torch.full((batch, frames * n), config.video_token_id),
            torch.randint(3, hi, (batch, text), generator=g),
            targets.unsqueeze(1),
        ],
        dim=1,
    )
    labels = torch.full_like(ids, -100)
    labels[:, -1] = targets
    return dict(
        input_ids=ids.to(device), vision_features=features.to(device), labels=labels.to(device)
    )


def group_of(name: str) -> str:
    """A readable group for a parameter name."""
    if ".dcal." in name:
        branch = name.split(".dcal.")[1].split(".")[0]
        return f"DCAL {branch}" if branch in ("v2v", "t2v") else "DCAL shared"
    for key, label in (
        ("vision_tower", "vision tower"),
        ("multi_modal_projector", "projector"),
        ("lm_head", "LM head"),
        ("language_model", "LLM"),
    ):
        if key in name:
            return label
    return "other"


def describe(model) -> str:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        counts[group_of(name)][0 if p.requires_grad else 1] += p.numel()
    return ", ".join(
        f"{g}: {'trains' if t and not f else 'frozen' if f and not t else 'partly'} ({t + f:,})"
        for g, (t, f) in counts.items()
    )


def gate_value(dcal, branch: str) -> str:
    """``tanh(alpha)`` of a DCAL branch's gate (its own, or the DCAL's shared one)."""
    module = getattr(dcal, branch)
    if module is None:
        return "-"
    gate = module.gate if module.gate is not None else dcal.gate
    return f"{torch.tanh(gate.alpha).item():+.3f}"


def run_stage(model, stage: int, batch: dict, steps: int, lr: float) -> list[float]:
    trainable = model.set_training_stage(stage)
    print(
        f"stage {stage}: {len(trainable)} trainable tensors, "
        f"T2V {'on' if model.config.dcal_t2v_enabled else 'off'}"
    )
    print(f"  {describe(model)}")
    params = [p for p in model.parameters() if p.requires_grad]
    # A fresh optimiser per stage: the paper's stages are separate runs.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0 or step == steps - 1 or (step + 1) % max(steps // 4, 1) == 0:
            print(f"  step {step + 1:>3}: loss {losses[-1]:.4f}")
    # (A V2V gate of the last decoder layer stays at 0: the pooled positions' states after the
    # last layer reach no later position, so the loss, read at the end, cannot depend on it.)
    gates = ["/".join(gate_value(d, b) for b in ("v2v", "t2v")) for d in model.dcals.values()]
    print(
        f"  stage {stage} loss {losses[0]:.4f} -> {losses[-1]:.4f}; gates tanh(alpha) "
        f"V2V/T2V per DCAL: {', '.join(gates)}"
    )
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default="crosslmm-tiny",
        help="model shapes (random weights); only crosslmm-tiny fits a CPU",
    )
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per stage")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=6, help="text tokens between video and target")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = CrossLMMForConditionalGeneration.from_preset(args.preset)
    config = model.config
    batch = toy_batch(config, args.batch, args.frames, args.text, device, args.seed)
    print(
        f"{args.preset} (random init) on {device}: DCALs after layers {list(model.dcals)}; "
        f"{args.batch} videos of {args.frames} frames x {config.tokens_per_frame} tokens, "
        f"{config.pooled_per_frame} pooled per frame; {args.steps} steps per stage"
    )
    first = run_stage(model, 1, batch, args.steps, args.lr)
    second = run_stage(model, 2, batch, args.steps, args.lr)
    print(
        f"loss: {first[0]:.4f} (start) -> {first[-1]:.4f} (after stage 1) -> "
        f"{second[-1]:.4f} (after stage 2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
