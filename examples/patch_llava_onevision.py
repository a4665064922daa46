"""Patch a LLaVA-OneVision model into a CrossLMM and generate: a tiny random model built from
transformers' own config classes (nothing is downloaded), patched in place with
``crosslmm_ops.patch_llava``, fed a synthetic video with the placeholder count the patched model
expects, and decoded greedily.

    python examples/patch_llava_onevision.py [--frames 4] [--grid 7] [--every 2] [--device cpu]

With a real checkpoint the same three calls apply: ``LlavaOnevisionForConditionalGeneration
.from_pretrained(...)``, ``patch_llava(model)`` and ``patch_llava_processor(processor, model)``
(the processor then writes the new placeholder count itself).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from crosslmm_ops.demo import synthetic_video
from crosslmm_ops.models import load_patched, patch_llava

VOCAB = 128
VIDEO_TOKEN, IMAGE_TOKEN, PAD, BOS = VOCAB - 1, VOCAB - 2, 0, 1


def tiny_llava_onevision(grid: int, hidden: int, layers: int, seed: int):
    """A random LlavaOnevisionForConditionalGeneration: SigLIP with a ``grid x grid`` token grid
    (patch 4), a Qwen2 decoder of ``layers`` layers. Video features come from the tower's last
    layer, all tokens ("full"), as LLaVA-OneVision's checkpoints take them."""
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=4 * grid,
        patch_size=4,
        vision_use_head=False,
    )
    text = transformers.Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=BOS,
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[4 * grid, 4 * grid]],
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    # transformers' init (std 0.02) leaves a tiny model's logits nearly flat, so greedy decoding
    # would repeat one token; O(1) weights make the generated ids depend on the input.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def video_tokens_of(model, video: torch.Tensor) -> int:
    """How many placeholder tokens the (unpatched or patched) model's video features fill."""
    config = model.config
    with torch.no_grad():
        out = model.model.get_video_features(
            pixel_values_videos=video,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return features.shape[1] if features.dim() == 3 else features.shape[0]


def prompt(placeholders: int, device, seed: int) -> torch.Tensor:
    """BOS, a few text tokens, the video's placeholders, a question's worth of text."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, IMAGE_TOKEN, (n,), generator=g).tolist()  # noqa: E731
    ids = [BOS] + text(5) + [VIDEO_TOKEN] * placeholders + text(8)
    return torch.tensor([ids], device=device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--grid", type=int, default=7, help="encoder token grid side (patch 4 px)")
    parser.add_argument("--pooled-grid", type=int, default=3, help="pooled grid side (3: 9 tokens)")
    parser.add_argument("--hidden", type=int, default=64, help="text model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--every", type=int, default=2, help="a DCAL after every K-th layer")
    parser.add_argument(
        "--gate-init",
        type=float,
        default=0.5,
        help="start value of the DCAL gates' alpha (the paper: 0, the identity; "
        "non-zero here so the random DCALs change the output)",
    )
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = tiny_llava_onevision(args.grid, args.hidden, args.layers, args.seed)
    model = model.to(device=device, dtype=dtype)
    video = synthetic_video(args.frames, 4 * args.grid, device=device, dtype=dtype, seed=args.seed)
    print(
        f"LLaVA-OneVision (tiny, random weights) on {device} {dtype}: {args.layers} decoder "
        f"layers, {args.grid}x{args.grid} encoder tokens per frame, {args.frames} frames"
    )
    gen = dict(
        do_sample=False,
        max_new_tokens=args.new_tokens,
        suppress_tokens=[VIDEO_TOKEN, IMAGE_TOKEN, PAD],
    )

    before = video_tokens_of(model, video)
    ids = prompt(before, device, args.seed)
    with torch.no_grad():
        base_out = model.generate(input_ids=ids, pixel_values_videos=video, **gen)
    print(
        f"before patching: {before} visual tokens ({args.frames} frames x "
        f"{(before - 1) // args.frames} bilinear-pooled + 1 newline), prompt {ids.shape[1]} "
        f"tokens; generated ids: {base_out[0, ids.shape[1] :].tolist()}"
    )

    patch_llava(model, every=args.every, pooled_grid=args.pooled_grid, gate_init=args.gate_init)
    patch = model.crosslmm_patch
    after = patch.placeholders_per_item(args.frames)
    ids = prompt(after, device, args.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values_videos=video, **gen)
    new = out[0, ids.shape[1] :].tolist()
    print(f"patched: {patch!r}")
    print(
        f"after patching: {after} visual tokens ({args.frames} frames x "
        f"{patch.pooled_per_frame} pooled + {after - args.frames * patch.pooled_per_frame} "
        f"newline), {100 * (1 - after / before):.1f}% fewer; DCALs after layers "
        f"{list(patch.layers)} attend to all {args.frames * patch.tokens_per_frame} original "
        f"tokens; prompt {ids.shape[1]} tokens"
    )
    print(f"generated {len(new)} token ids: {new}")
    print("(random weights: the ids show the pipeline runs end to end, not an answer)")

    # Save and reload: the patch is recorded in config.json, the DCAL weights in the checkpoint.
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = load_patched(folder, dtype=dtype).to(device).eval()
        with torch.no_grad():
            again = reloaded.generate(input_ids=ids, pixel_values_videos=video, **gen)
    same = torch.equal(again, out)
    print(
        f"saved and reloaded with load_patched: {reloaded.crosslmm_patch!r}; generates the same "
        f"ids: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
