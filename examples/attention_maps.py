"""V2V attention maps: where a CrossLMM's pooled tokens look in the original tokens.

CrossLMM's claim of interpretable compression: each pooled visual token, inside the LLM, recovers
detail by attending to the unpooled tokens (V2V). This script runs a CrossLMM on a synthetic video
(a bright square moving across a smooth background), reads the queries and keys of one DCAL's
V2V branch exactly as the module computes them (the DCAL's inputs are captured by a hook; its own
``query_norm``/``q_proj`` and ``vision_norm``/``k_proj`` are applied to them), gets each chosen
pooled token's softmax probabilities over the original tokens with
:func:`crosslmm_ops.attention_weights` (averaged over heads unless ``--head`` is given), and draws
them per frame on the encoder's token grid as a PNG: one row per chosen pooled token, one column
per frame, the video's frames on top, the token's own window marked with a cross.

    python examples/attention_maps.py --out maps.png [--preset crosslmm-tiny] [--frames 4]
    python examples/attention_maps.py --out maps.png --checkpoint path/to/crosslmm  # trained

Without ``--checkpoint`` the weights are random (and say so in the figure's title): the maps show
the machinery, not what a trained model attends to.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import crosslmm_ops
from crosslmm_ops.demo import synthetic_video, video_prompt
from crosslmm_ops.models import CrossLMMForConditionalGeneration


class _Captured(Exception):
    """Raised by the hook to stop the forward once the chosen DCAL's inputs are in hand (the rest
    of the model is not needed)."""


@dataclasses.dataclass
class V2VMaps:
    layer: int  # the decoder layer whose DCAL was read
    tokens: list[int]  # the chosen pooled tokens (indices among the T * n pooled tokens)
    probs: torch.Tensor  # [len(tokens), Hq, T * N] float32: each head's probabilities
    q: torch.Tensor  # [T * n, Hq, d]: the V2V queries of every pooled token
    k: torch.Tensor  # [T * N, Hk, d]: the keys of every original token
    scope: str  # "global" (all frames) or "frame" (own frame only)
    frames: int
    grid: tuple[int, int]  # the encoder's token grid (h, w)
    pooled_grid: tuple[int, int]


def v2v_attention(
    model,
    video: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    layer: int | None = None,
    tokens: list[int] | None = None,
) -> V2VMaps:
    """The V2V probabilities of pooled ``tokens`` (default: all) at the DCAL of decoder layer
    ``layer`` (default: the first), for one video ``(1, T, 3, S, S)`` and its prompt."""
    dcals = model.dcals
    if not dcals:
        raise ValueError("the model has no DCAL layers")
    layer = min(dcals) if layer is None else layer
    if layer not in dcals:
        raise ValueError(f"layer must be one of the DCAL layers {sorted(dcals)}, got {layer}")
    dcal = dcals[layer]
    if dcal.v2v is None:
        raise ValueError(f"the DCAL of layer {layer} has no V2V branch")
    if video.shape[0] != 1:
        raise ValueError(
            f"one video at a time: video must be (1, T, 3, S, S), got {tuple(video.shape)}"
        )
    captured = {}

    def hook(_module, args, kwargs):
        captured["hidden"], captured["memory"] = args[0], args[1]
        captured["visual_mask"] = kwargs.get("visual_mask")
        raise _Captured

    handle = dcal.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, pixel_values_videos=video, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"the DCAL of layer {layer} did not run (no video in the prompt?)")
    hidden, memory, visual_mask = captured["hidden"], captured["memory"], captured["visual_mask"]

    branch = dcal.v2v
    # With share_kv the keys come from the DCAL's shared norm and projection, else the branch's.
    kv_owner = dcal if dcal.shares_kv else branch
    with torch.no_grad():
        rows = hidden[visual_mask]  # the pooled tokens, frame order
        x = branch.query_norm(rows) if branch.query_norm is not None else rows
        q = branch.q_proj(x).view(rows.shape[0], branch.num_heads, branch.head_dim)
        m = memory.tokens
        m = kv_owner.vision_norm(m) if kv_owner.vision_norm is not None else m
        k = kv_owner.k_proj(m).view(m.shape[0], branch.num_kv_heads, branch.head_dim)

    n, N, T = memory.pooled_per_frame, memory.tokens_per_frame, memory.num_frames
    chosen = list(range(q.shape[0])) if tokens is None else list(tokens)
    if any(not 0 <= t < q.shape[0] for t in chosen):
        raise ValueError(f"tokens must index the {q.shape[0]} pooled tokens, got {chosen}")
    if branch.scope == "global":
        # One sample: the batched layout, every pooled token over all T * N tokens.
        probs = crosslmm_ops.attention_weights(
            q.unsqueeze(0), k.unsqueeze(0), softmax_scale=branch.softmax_scale, query_index=chosen
        )[0]
    else:
        # Frame scope: pooled token i sees only frame i // n; attention_weights returns each row's
        # own segment, which goes back to its place among all T * N tokens.
        cu_q = torch.arange(0, (T + 1) * n, n, dtype=torch.int32, device=q.device)
        own = crosslmm_ops.attention_weights(
            q,
            k,
            softmax_scale=branch.softmax_scale,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=memory.frame_cu_seqlens,
            query_index=chosen,
        )
        probs = own.new_zeros(len(chosen), own.shape[1], T * N)
        for r, t in enumerate(chosen):
            f = t // n
            probs[r, :, f * N : (f + 1) * N] = own[r, :, :N]
    config = model.config
    return V2VMaps(
        layer,
        chosen,
        probs.float().cpu(),
        q,
        k,
        branch.scope,
        T,
        tuple(config.encoder_grid),
        tuple(config.pool_spec().output_size),
    )


def default_tokens(frames: int, n: int) -> list[int]:
    """The centre pooled token of the first, middle and last frame (distinct ones)."""
    centre = n // 2
    picks = [0, frames // 2, frames - 1]
    return sorted({f * n + centre for f in picks})


def draw(
    maps: V2VMaps,
    video: torch.Tensor,
    out: Path,
    *,
    head: int | None,
    random_weights: bool,
    label: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    T, (gh, gw), (ph, pw) = maps.frames, maps.grid, maps.pooled_grid
    n = ph * pw
    probs = maps.probs.mean(1) if head is None else maps.probs[:, head]  # [rows, T * N]
    rows = len(maps.tokens)
    fig, axes = plt.subplots(rows + 1, T, figsize=(2.0 * T + 0.6, 2.0 * (rows + 1)), squeeze=False)
    frames = video[0].float().cpu()
    for f in range(T):
        img = frames[f].permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        axes[0, f].imshow(img.numpy())
        axes[0, f].set_title(f"frame {f}", fontsize=9)
    for r, t in enumerate(maps.tokens):
        grid = probs[r].view(T, gh, gw)
        # One colour scale per row (the token's whole distribution): random weights give nearly
        # uniform probabilities, and a shared scale keeps frames comparable.
        vmin, vmax = grid.min().item(), grid.max().item()
        own_frame, j = divmod(t, n)
        for f in range(T):
            ax = axes[r + 1, f]
            im = ax.imshow(grid[f].numpy(), cmap="inferno", vmin=vmin, vmax=vmax)
            if f == own_frame:
                # The pooled token's window centre on the encoder grid (adaptive windows).
                a, b = divmod(j, pw)
                ax.plot((b + 0.5) * gw / pw - 0.5, (a + 0.5) * gh / ph - 0.5, "c+", ms=12, mew=2)
            if f == 0:
                ax.set_ylabel(f"pooled token {t}\n(frame {own_frame}, #{j})", fontsize=8)
        fig.colorbar(im, ax=axes[r + 1, :].tolist(), shrink=0.8, pad=0.01)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    heads = "mean over heads" if head is None else f"head {head}"
    weights = (
        "RANDOM WEIGHTS (untrained: pass --checkpoint for a trained model)"
        if random_weights
        else "trained weights"
    )
    fig.suptitle(
        f"V2V attention of pooled tokens over their frames' {gh}x{gw} token grids, "
        f"DCAL at layer {maps.layer} ({maps.scope} scope, {heads})\n{label}: {weights}",
        fontsize=9,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument(
        "--preset",
        default="crosslmm-tiny",
        help="model shapes with random weights (crosslmm-tiny, crosslmm-2b, ...)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a CrossLMM saved with save_pretrained (instead of --preset)",
    )
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument(
        "--layer", type=int, default=None, help="decoder layer (default: the first with a DCAL)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="*",
        default=None,
        help="pooled token indices (frame f's tokens are f*n .. f*n+n-1); default: "
        "the centre token of the first, middle and last frame",
    )
    parser.add_argument("--head", type=int, default=None, help="one head (default: their mean)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = CrossLMMForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype)
        label = f"checkpoint {args.checkpoint}"
    else:
        with torch.device(device):
            model = CrossLMMForConditionalGeneration.from_preset(args.preset)
        label = f"preset {args.preset}"
    model = model.to(device=device, dtype=dtype).eval()
    config = model.config
    video = synthetic_video(
        args.frames, config.vision_config.image_size, device=device, dtype=dtype, seed=args.seed
    )
    ids = video_prompt(config, args.frames, device=device, seed=args.seed)
    n = config.pooled_per_frame
    tokens = default_tokens(args.frames, n) if args.tokens is None else args.tokens
    maps = v2v_attention(model, video, ids, layer=args.layer, tokens=tokens)
    if args.head is not None and not 0 <= args.head < maps.probs.shape[1]:
        parser.error(f"--head must be in [0, {maps.probs.shape[1]})")
    draw(maps, video, args.out, head=args.head, random_weights=args.checkpoint is None, label=label)
    T, N = args.frames, config.tokens_per_frame
    for r, t in enumerate(maps.tokens):
        per_frame = maps.probs[r].mean(0).view(T, N).sum(1)
        print(
            f"pooled token {t} (frame {t // n}): attention mass per frame "
            + " ".join(f"{p:.3f}" for p in per_frame.tolist())
        )
    print(
        f"wrote {args.out} ({len(maps.tokens)} pooled tokens x {T} frames, DCAL at layer "
        f"{maps.layer}, {maps.scope} scope"
        + (", random weights)" if args.checkpoint is None else ")")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
