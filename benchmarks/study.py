"""The efficiency study's own pieces, shared by ``efficiency.py`` and ``end_to_end.py`` beside it:
the analytical FLOP model of a prefill (checked against ``torch.utils.flop_counter``). The models,
the synthetic video, the measurement and its consistency checks are the demo's
(:mod:`crosslmm_ops.demo`), so the study and ``crosslmm-ops demo`` measure and check the same
thing.
"""

from __future__ import annotations

import torch

from crosslmm_ops.demo import build_models, synthetic_video, video_prompt


def prefill_flops(config, frames: int, sequence_length: int, *, causal: bool = True) -> dict:
    """Analytical FLOPs of one prefill (batch 1) by part: ``vision`` (the tower), ``projector``,
    ``llm`` (decoder layers and the last position's LM head) and ``dcal`` (projections and
    attention of every DCAL), 2 FLOPs per multiply-add. ``causal=False`` counts the LLM's causal
    attention in full, as ``torch.utils.flop_counter`` does."""
    vc, tc = config.vision_config, config.text_config
    N, Dv, Iv = config.tokens_per_frame, vc.hidden_size, vc.intermediate_size
    patch = 2 * N * vc.num_channels * vc.patch_size**2 * Dv
    vision_layer = 8 * N * Dv * Dv + 4 * N * Dv * Iv + 4 * N * N * Dv
    vision = frames * (patch + vc.num_hidden_layers * vision_layer)

    P = frames * config.pooled_per_frame  # pooled visual tokens in the sequence
    H, L = tc.hidden_size, sequence_length
    projector = 2 * P * Dv * H + 2 * P * H * H

    hq, hk = tc.num_attention_heads, tc.num_key_value_heads
    d = getattr(tc, "head_dim", None) or H // hq
    linear = 2 * L * H * (2 * hq * d + 2 * hk * d) + 2 * L * 3 * H * tc.intermediate_size
    attention = 4 * L * L * hq * d * (0.5 if causal else 1.0)
    llm = tc.num_hidden_layers * (linear + attention) + 2 * H * tc.vocab_size

    kw = config.dcal_kwargs()
    dq, dh, dkv = kw["head_dim"], kw["num_heads"], kw["num_kv_heads"]
    keys = frames * N
    Dk = config.dcal_vision_size
    text = L - P

    def branch(queries: int, attended_pairs: int) -> float:
        return (
            2 * queries * H * dh * dq * 2  # q_proj and o_proj
            + 2 * keys * Dk * dkv * dq * 2  # k_proj and v_proj over every vision token
            + 4 * attended_pairs * dh * dq
        )  # QKᵀ and PV

    per_dcal = 0.0
    if config.dcal_v2v:
        pairs = P * (N if config.dcal_v2v_scope == "frame" else keys)
        per_dcal += branch(P, pairs)
    if config.dcal_t2v and config.dcal_t2v_enabled:
        per_dcal += branch(text, text * keys)
    if config.dcal_share_kv and config.dcal_v2v and config.dcal_t2v and config.dcal_t2v_enabled:
        per_dcal -= 2 * keys * Dk * dkv * dq * 2  # one K/V projection serves both branches
    dcal = len(config.dcal_layer_indices) * per_dcal
    return dict(
        vision=vision,
        projector=projector,
        llm=llm,
        dcal=dcal,
        total=vision + projector + llm + dcal,
    )


def flop_check(
    preset: str, variant: str, *, device="cpu", dtype=torch.float32, frames: int = 4
) -> dict:
    """:func:`prefill_flops` of a prefill from encoder tokens against the count of
    ``torch.utils.flop_counter.FlopCounterMode`` (which counts causal attention in full, so the
    analytical side does too). The LLM's attention runs eagerly here because the counter does not
    see every SDPA kernel (the CPU flash kernel, for one)."""
    from torch.utils.flop_counter import FlopCounterMode

    # The analytical model counts the materialised K/V path (the counter cannot see inside the
    # projection-fused core either), so the DCALs are pinned to it here.
    model = build_models(
        preset, [variant], device=device, dtype=dtype, dcal_kv_path="materialized"
    )[variant]
    model.set_attn_implementation("eager")
    video = synthetic_video(
        frames, model.config.vision_config.image_size, device=device, dtype=dtype
    )
    ids = video_prompt(model.config, frames, device=device)
    with torch.no_grad():
        features, _ = model.get_video_features(video)
        features = features.reshape(1, frames, *features.shape[1:])
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, vision_features=features, logits_to_keep=1)
    parts = prefill_flops(model.config, frames, ids.shape[1], causal=False)
    analytic = parts["total"] - parts["vision"]
    counted = counter.get_total_flops()
    return dict(
        preset=preset,
        variant=variant,
        frames=frames,
        analytic=analytic,
        counted=counted,
        ratio=analytic / counted if counted else float("nan"),
    )
