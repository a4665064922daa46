"""crosslmm_ops.models: the reference CrossLMM (config, presets, forward, loss, generate with the
vision memory in the cache, save/load, stages, errors).

CPU tests use the ``crosslmm-tiny`` preset with random weights (no downloads). The forward is
checked against an independent composition written here in float64 (SigLIP's output pooled with
torch's own pooling, the projector, each Qwen2 layer's parts called one by one, and every DCAL
as a dense per-sample softmax), so the DCAL's placement after the self-attention, the placeholder
order and the memory layout are all tested, not just that the model runs. Tests marked ``cuda``
run the ``crosslmm-2b`` shapes and the tiny model on a GPU.
"""

from __future__ import annotations

import math

import attention_oracle as oracle
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

import crosslmm_ops
from crosslmm_ops.models import (
    PRESETS,
    CrossLMMCache,
    CrossLMMConfig,
    CrossLMMForConditionalGeneration,
    cache_vision_memory,
    find_cache,
    preset_config,
    set_training_stage,
)
from crosslmm_ops.models.decoder import cache_argument
from crosslmm_ops.testing import cu_seqlens, relative_error

HAS_CUDA = torch.cuda.is_available()
# The ops a DCAL's attention runs as (crosslmm_ops.record_backends): cross_attention on the
# materialised K/V path, projected_attention_core (the core of projected_cross_attention) on the
# fused one.
ATTENTION_OPS = ("cross_attention", "projected_attention_core")


def _attention_backends(log) -> list[str]:
    return [backend for op, backend in log if op in ATTENTION_OPS]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _model(dtype=torch.float32, gates=None, **overrides) -> CrossLMMForConditionalGeneration:
    """A tiny random CrossLMM in eval mode; ``gates``: a value for every gate's alpha (None: the
    init value 0) - non-zero gates make the DCALs change the output."""
    model = CrossLMMForConditionalGeneration.from_preset("crosslmm-tiny", **overrides)
    model = model.to(dtype).eval()
    if gates is not None:
        _set_gates(model, gates)
    return model


def _set_gates(model, value) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.alpha"):
                if value == "random":  # different per gate, never 0
                    p.copy_(0.3 + torch.rand(p.shape, generator=gen))
                else:
                    p.fill_(value)


def _batch(
    config: CrossLMMConfig,
    frames=(3, 1),
    text=(4, 5),
    T=None,
    pad="none",
    dtype=torch.float32,
    features=False,
    seed=0,
):
    """``input_ids`` with ``frames[b] * n`` placeholders after ``text[0]`` tokens and before
    ``text[1] + extra`` tokens (so every row has the same length), the frames (pixels or encoder
    features) padded to ``T`` with random values, ``video_frame_mask``, and ``attention_mask``
    (``pad="right"``: sample b gets ``b`` padding tokens at the end, ``"left"``: at the start)."""
    gen = torch.Generator().manual_seed(seed)
    n = config.pooled_per_frame
    T = max(frames) if T is None else T
    B = len(frames)
    longest = max(frames) * n
    L = text[0] + longest + text[1] + (B - 1 if pad != "none" else 0)
    ids = torch.full((B, L), config.text_config.pad_token_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    vocab_hi = config.video_token_id  # text tokens: [3, video_token_id)
    for b, t in enumerate(frames):
        npad = b if pad != "none" else 0
        row = torch.cat(
            [
                torch.randint(3, vocab_hi, (text[0],), generator=gen),
                torch.full((t * n,), config.video_token_id),
                torch.randint(3, vocab_hi, (L - npad - text[0] - t * n,), generator=gen),
            ]
        )
        if pad == "left":
            ids[b, npad:], attn[b, npad:] = row, 1
        else:
            ids[b, : L - npad], attn[b, : L - npad] = row, 1
    vc = config.vision_config
    if features:
        video = torch.randn(B, T, config.tokens_per_frame, vc.hidden_size, generator=gen)
    else:
        video = torch.randn(B, T, vc.num_channels, vc.image_size, vc.image_size, generator=gen)
    frame_mask = torch.arange(T).unsqueeze(0) < torch.tensor(frames).unsqueeze(1)
    return dict(
        input_ids=ids,
        attention_mask=attn if pad != "none" else None,
        video=video.to(dtype),
        video_frame_mask=frame_mask,
    )


def _video_kwargs(batch, features=False):
    key = "vision_features" if features else "pixel_values_videos"
    out = {key: batch["video"], "video_frame_mask": batch["video_frame_mask"]}
    if batch["attention_mask"] is not None:
        out["attention_mask"] = batch["attention_mask"]
    return out


# ----------------------------------------------------------------------------------------------
# An independent composition of the same math (float64)
# ----------------------------------------------------------------------------------------------


def _pool_reference(features: torch.Tensor, config: CrossLMMConfig) -> torch.Tensor:
    """torch's own pooling on the permuted grid: (t, N, D) -> (t, n, D)."""
    h, w = config.encoder_grid
    x = features.reshape(-1, h, w, features.shape[-1]).permute(0, 3, 1, 2)
    kw = config.pool_kwargs()
    if config.pool_mode == "adaptive":
        y = F.adaptive_avg_pool2d(x, kw["output_size"])
    elif config.pool_mode == "bilinear":
        size = kw["output_size"]
        size = (size, size) if isinstance(size, int) else size
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif config.pool_mode == "avg":
        y = F.avg_pool2d(x, kw["kernel_size"], kw["stride"])
    else:
        y = F.max_pool2d(x, kw["kernel_size"], kw["stride"])
    return y.flatten(2).transpose(1, 2)


def _project_reference(x: torch.Tensor, projector) -> torch.Tensor:
    h = F.linear(x, projector.linear_1.weight, projector.linear_1.bias)
    return F.linear(F.gelu(h), projector.linear_2.weight, projector.linear_2.bias)


def _branch_reference(
    branch, rows: torch.Tensor, key_sets: list[torch.Tensor], owner, gate
) -> torch.Tensor:
    """Attention (the tests' oracle, in the model's dtype), gated: ``rows`` split evenly over
    ``key_sets`` (one set for every row, or one per group of rows), each group against its own
    keys."""
    x = branch.query_norm(rows) if branch.query_norm is not None else rows
    q = branch.q_proj(x).view(len(key_sets), -1, branch.num_heads, branch.head_dim)
    outs = []
    for qg, X in zip(q, key_sets):
        xk = owner.vision_norm(X) if owner.vision_norm is not None else X
        k = owner.k_proj(xk).view(-1, branch.num_kv_heads, branch.head_dim)
        v = owner.v_proj(xk).view(-1, branch.num_kv_heads, branch.head_dim)
        segment = cu_seqlens([qg.shape[0]]), cu_seqlens([k.shape[0]])
        out, _ = oracle.attention(
            qg, k, v, *segment, softmax_scale=branch.head_dim**-0.5, dtype=qg.dtype
        )
        outs.append(out.flatten(1))
    return torch.tanh(gate.alpha) * branch.o_proj(torch.cat(outs))


def _dcal_reference(dcal, h, memories, visual, text) -> torch.Tensor:
    out = h.clone()
    for b, X in enumerate(memories):  # X: (t_b, N, Dv)
        if X.shape[0] == 0:
            continue
        if dcal.v2v is not None and visual[b].any():
            # global: every pooled token sees the whole video; frame: the i-th group of n pooled
            # tokens (frame i) sees frame i only
            keys = [X.flatten(0, 1)] if dcal.v2v_scope == "global" else list(X)
            owner = dcal if dcal.shares_kv else dcal.v2v
            gate = dcal.gate if dcal.shares_gate else dcal.v2v.gate
            out[b, visual[b]] += _branch_reference(dcal.v2v, h[b, visual[b]], keys, owner, gate)
        if dcal.t2v is not None and text[b].any():
            owner = dcal if dcal.shares_kv else dcal.t2v
            gate = dcal.gate if dcal.shares_gate else dcal.t2v.gate
            out[b, text[b]] += _branch_reference(
                dcal.t2v, h[b, text[b]], [X.flatten(0, 1)], owner, gate
            )
    return out


@torch.no_grad()
def _reference_logits(model, input_ids, pixels, frame_mask) -> torch.Tensor:
    """The CrossLMM forward composed from its parts, without the model's own forward code."""
    config, inner = model.config, model.model
    lm = inner.language_model
    B, L = input_ids.shape
    frames = frame_mask.sum(1).tolist()
    feats = []
    for b in range(B):
        out = inner.vision_tower(pixel_values=pixels[b, : frames[b]], output_hidden_states=True)
        if config.vision_feature_layer is None:
            feats.append(out.last_hidden_state)
        else:
            feats.append(out.hidden_states[config.vision_feature_layer])
    h = lm.embed_tokens(input_ids).clone()
    visual = input_ids == config.video_token_id
    for b in range(B):
        pooled = _project_reference(_pool_reference(feats[b], config), inner.multi_modal_projector)
        h[b, visual[b]] = pooled.reshape(-1, pooled.shape[-1])
    if config.dcal_keys == "projected":
        memories = [_project_reference(f, inner.multi_modal_projector) for f in feats]
    else:
        memories = feats
    text = ~visual
    if not config.dcal_t2v_enabled:
        text = torch.zeros_like(visual)
    position_embeddings = lm.rotary_emb(h, torch.arange(L).unsqueeze(0))
    causal = torch.full((L, L), float("-inf"), dtype=h.dtype).triu(1)[None, None]
    for layer in lm.layers:
        x = layer.input_layernorm(h)
        # Qwen2's own attention code, not the CrossLMM subclass's.
        a, _ = Qwen2Attention.forward(
            layer.self_attn, x, position_embeddings=position_embeddings, attention_mask=causal
        )
        h = h + a
        if getattr(layer, "dcal", None) is not None:
            h = _dcal_reference(layer.dcal, h, memories, visual, text)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))


VARIANTS = {
    "paper": {},
    "frame-scope": dict(dcal_v2v_scope="frame"),
    "projected-keys-shared": dict(dcal_keys="projected", dcal_share_kv=True, dcal_share_gate=True),
    "avg-windows-layernorm": dict(
        pool_mode="avg",
        pool_kernel_size=2,
        pool_stride=2,
        dcal_vision_norm="layernorm",
        dcal_query_norm=None,
    ),
    "bilinear-2x2-layer-1": dict(
        pool_mode="bilinear", pooled_grid=2, vision_feature_layer=-1, dcal_layers=[0, 2, 3]
    ),
    "v2v-only-t2v-off": dict(dcal_t2v=False),
    "stage1-t2v-disabled": dict(dcal_t2v_enabled=False),
    "fused-kv-path": dict(dcal_kv_path="fused", dcal_v2v_scope="frame"),
    "materialized-kv-path": dict(dcal_kv_path="materialized", dcal_share_kv=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_independent_composition(variant):
    model = _model(torch.float64, gates="random", **VARIANTS[variant])
    batch = _batch(model.config, frames=(3, 1, 2), T=4, dtype=torch.float64)
    out = model(
        input_ids=batch["input_ids"],
        pixel_values_videos=batch["video"],
        video_frame_mask=batch["video_frame_mask"],
    )
    ref = _reference_logits(model, batch["input_ids"], batch["video"], batch["video_frame_mask"])
    assert relative_error(out.logits, ref) < 1e-10
    # and the DCALs matter: the same model with its gates at 0 gives other logits
    _set_gates(model, 0.0)
    out0 = model(
        input_ids=batch["input_ids"],
        pixel_values_videos=batch["video"],
        video_frame_mask=batch["video_frame_mask"],
    )
    assert relative_error(out0.logits, ref) > 1e-4


# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


def test_presets_have_the_papers_shapes():
    c2, c7 = preset_config("crosslmm-2b"), preset_config("crosslmm-7b")
    for c in (c2, c7):
        v = c.vision_config
        assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (
            1152,
            27,
            384,
            14,
        )
        assert c.encoder_grid == (27, 27) and c.tokens_per_frame == 729
        assert c.pooled_per_frame == 9  # default 3x3
        assert c.dcal_every == 4 and c.dcal_layer_indices == [3, 7, 11, 15, 19, 23, 27]
        assert c.dcal_v2v_scope == "global" and c.dcal_keys == "encoder"
    t = c2.text_config
    assert (
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
    ) == (28, 1536, 12, 2, 8960)
    assert c2.dcal_kwargs()["head_dim"] == 128 and c2.tie_word_embeddings
    t = c7.text_config
    assert (
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
    ) == (28, 3584, 28, 4, 18944)
    assert c7.dcal_kwargs()["head_dim"] == 128 and not c7.tie_word_embeddings
    assert set(PRESETS) >= {"crosslmm-2b", "crosslmm-7b", "crosslmm-tiny"}
    # overrides: top-level fields and sub-config fields
    c = preset_config("crosslmm-2b", pooled_grid=4, text_config={"num_hidden_layers": 8})
    assert c.pooled_per_frame == 16 and c.dcal_layer_indices == [3, 7]
    assert preset_config("crosslmm-2b", pooled_grid=1).pooled_per_frame == 1
    assert preset_config("crosslmm-2b", pool_mode="avg", pool_kernel_size=3).pooled_per_frame == 81


def test_config_round_trips(tmp_path):
    c = preset_config(
        "crosslmm-tiny",
        dcal_layers=[0, 3],
        pooled_grid=[2, 3],
        dcal_keys="projected",
        dcal_share_kv=True,
    )
    c.save_pretrained(tmp_path)
    d = CrossLMMConfig.from_pretrained(tmp_path)
    for key in ("dcal_layers", "pooled_grid", "dcal_keys", "dcal_share_kv", "video_token_id"):
        assert getattr(d, key) == getattr(c, key)
    assert d.text_config.to_dict() == c.text_config.to_dict()
    assert d.vision_config.to_dict() == c.vision_config.to_dict()
    assert d.pooled_per_frame == 6 and d.dcal_layer_indices == [0, 3]


BAD_CONFIGS = [
    (dict(dcal_every=0), "dcal_every must be an int >= 1"),
    (dict(dcal_every=5), "puts no DCAL"),
    (dict(dcal_layers=[1, 4]), "dcal_layers must be distinct indices"),
    (dict(dcal_layers=[1, 1]), "dcal_layers must be distinct indices"),
    (dict(pooled_grid=7), "larger than the encoder grid"),
    (dict(pooled_grid=0), "does not fit the encoder grid"),
    (dict(pool_mode="median"), "pool_mode must be one of"),
    (dict(pool_mode="avg"), "needs pool_kernel_size"),
    (dict(pool_mode="avg", pool_kernel_size=7), "does not fit the encoder grid"),
    (dict(dcal_v2v=False, dcal_t2v=False), "at least one"),
    (dict(dcal_v2v_scope="video"), "dcal_v2v_scope must be one of"),
    (dict(dcal_keys="pooled"), "dcal_keys must be one of"),
    (dict(dcal_vision_norm="batchnorm"), "dcal_vision_norm must be one of"),
    (dict(video_token_id=96), "video_token_id must be a token id"),
    (dict(dcal_num_heads=4, dcal_num_kv_heads=3), "multiple of their key/value heads"),
    (dict(dcal_head_dim=0), "dcal_head_dim must be None or an int >= 1"),
    (dict(vision_feature_layer=5), "vision_feature_layer must be None or an index"),
    (dict(dcal_backend="cudnn"), "dcal_backend must be"),
    (dict(dcal_kv_path="dense"), "dcal_kv_path must be one of"),
    (dict(dcal_cache_kv=1), "dcal_cache_kv must be a bool"),
    (dict(dcal_t2v_enabled="yes"), "dcal_t2v_enabled must be a bool"),
    (dict(text_config={"model_type": "llama"}), "text_config must be a qwen2 config"),
]


@pytest.mark.parametrize(
    "overrides,message", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))]
)
def test_bad_configs_raise(overrides, message):
    name = "crosslmm-tiny"
    if "text_config" in overrides:  # a whole foreign sub-config, not a field update
        with pytest.raises(ValueError, match=message):
            CrossLMMConfig(**{**PRESETS[name], **overrides})
        return
    with pytest.raises(ValueError, match=message):
        preset_config(name, **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("crosslmm-13b")


# ----------------------------------------------------------------------------------------------
# Structure: names, gates, the gate-0 property
# ----------------------------------------------------------------------------------------------


def test_structure_and_state_dict_names():
    model = _model()
    sd = model.state_dict()
    assert sorted(model.dcals) == [1, 3]
    # The Qwen2 parameters keep their names; the DCALs sit beside them in their layer.
    for name in (
        "model.language_model.layers.1.self_attn.q_proj.weight",
        "model.language_model.layers.1.mlp.gate_proj.weight",
        "model.language_model.layers.1.dcal.v2v.q_proj.weight",
        "model.language_model.layers.3.dcal.t2v.k_proj.weight",
        "model.language_model.layers.3.dcal.t2v.gate.alpha",
        "model.multi_modal_projector.linear_1.weight",
        "lm_head.weight",
    ):
        assert name in sd, name
    # (SiglipVisionModel's own names: under vision_model.* in transformers 4.x, flat in 5.x)
    assert any(
        k.startswith("model.vision_tower.") and k.endswith("patch_embedding.weight") for k in sd
    )
    assert not any(".dcal." in k for k in sd if ".layers.0." in k or ".layers.2." in k)
    # Every gate starts at 0 (transformers' weight init must not touch it); projections are random.
    for name, p in model.named_parameters():
        if name.endswith("gate.alpha"):
            assert torch.equal(p, torch.zeros_like(p)), name
    assert model.dcals[1].v2v.q_proj.weight.std() > 0


def test_gate_zero_equals_pooled_only_model():
    """All gates 0: the logits equal, bit for bit, those of the same model without DCALs (same
    pooling) - what makes adding DCALs to a trained model safe."""
    model = _model()
    base = _model(dcal_layers=[])
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".dcal." in k for k in unexpected) and unexpected
    batch = _batch(model.config, frames=(3, 1, 0), T=3, pad="right")
    kw = _video_kwargs(batch)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], **kw).logits
        b = base(input_ids=batch["input_ids"], **kw).logits
    assert torch.equal(a, b)
    _set_gates(model, "random")
    with torch.no_grad():
        c = model(input_ids=batch["input_ids"], **kw).logits
    assert not torch.allclose(a, c)


def test_pooled_only_model_runs_without_dcal_layers():
    model = _model(dcal_layers=[])
    assert model.dcals == {}
    batch = _batch(model.config, frames=(2,))
    out = model(input_ids=batch["input_ids"], **_video_kwargs(batch))
    assert out.logits.shape[:2] == batch["input_ids"].shape


# ----------------------------------------------------------------------------------------------
# Batches: padding, different frame counts, samples without video
# ----------------------------------------------------------------------------------------------


def test_padding_and_different_frame_counts_match_single_samples():
    model = _model(gates="random")
    frames = (3, 1, 0)
    batch = _batch(model.config, frames=frames, T=4, pad="right")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        for b, t in enumerate(frames):
            keep = batch["attention_mask"][b].bool()
            ids = batch["input_ids"][b : b + 1, keep]
            if t:
                alone = model(
                    input_ids=ids, pixel_values_videos=batch["video"][b : b + 1, :t]
                ).logits
            else:  # no video at all: no memory, the DCALs do not run
                alone = model(input_ids=ids).logits
            assert relative_error(out[b, keep], alone[0]) < 1e-5, b


def test_a_batch_without_any_frames_is_text_only():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(0, 0), T=1)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], **_video_kwargs(batch))
        text = model(input_ids=batch["input_ids"])
    assert out.vision_memory is None
    assert torch.equal(out.logits, text.logits)


def test_hidden_states_and_tuple_outputs():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(2,))
    kw = _video_kwargs(batch)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_hidden_states=True, **kw)
        tup = model(input_ids=batch["input_ids"], return_dict=False, use_cache=False, **kw)
        last = model(input_ids=batch["input_ids"], logits_to_keep=1, **kw)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert torch.equal(tup[0], out.logits)
    assert torch.allclose(last.logits[:, 0], out.logits[:, -1], atol=1e-6)


def test_vision_features_equal_pixels():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(2, 1))
    with torch.no_grad():
        by_pixels = model(input_ids=batch["input_ids"], **_video_kwargs(batch))
        feats = model.model.vision_tower(
            pixel_values=batch["video"].flatten(0, 1)
        ).last_hidden_state
        feats = feats.unflatten(0, batch["video"].shape[:2])
        by_features = model(
            input_ids=batch["input_ids"],
            vision_features=feats,
            video_frame_mask=batch["video_frame_mask"],
        )
    assert torch.equal(by_pixels.logits, by_features.logits)
    memory = by_pixels.vision_memory
    assert memory.frames_per_sample == (2, 1) and memory.tokens.shape == (3 * 36, 32)
    assert memory.pooled_per_frame == 9


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _labels(batch, video_token_id):
    labels = batch["input_ids"].clone()
    labels[labels == video_token_id] = -100
    if batch["attention_mask"] is not None:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def test_loss_falls_and_gradients_reach_the_dcals():
    torch.manual_seed(0)
    model = _model().train()
    batch = _batch(model.config, frames=(2, 1), T=2, pad="right")
    labels = _labels(batch, model.config.video_token_id)
    kw = _video_kwargs(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(input_ids=batch["input_ids"], labels=labels, **kw).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # gates start at 0: only alpha gets a gradient through tanh'(0) = 1, the rest of each
            # branch gets exactly 0 until its gate opens
            for i, dcal in model.dcals.items():
                for branch in (dcal.v2v, dcal.t2v):
                    assert branch.gate.alpha.grad.abs().sum() > 0, i
                    assert branch.q_proj.weight.grad.abs().sum() == 0, i
        if step == 7:
            for i, dcal in model.dcals.items():
                for branch in (dcal.v2v, dcal.t2v):
                    assert branch.q_proj.weight.grad.abs().sum() > 0, i
                    assert branch.k_proj.weight.grad.abs().sum() > 0, i
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and losses[-1] < 0.7 * losses[0], losses
    assert all(dcal.v2v.gate.alpha.item() != 0 for dcal in model.dcals.values())


@pytest.mark.parametrize("kv_path", ["fused", "materialized"])
def test_gradient_checkpointing_gives_the_same_gradients(kv_path):
    """Activation checkpointing recomputes each layer in the backward: the DCALs' results, and
    the gradients reaching the vision tower and projector through the memory, must not change."""
    batch = _batch(preset_config("crosslmm-tiny"), frames=(2, 1), T=2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same weights twice
        model = _model(gates="random", dcal_kv_path=kv_path).train()
        if checkpointing:  # activation_checkpointing_enable since transformers 5.2x
            enable = (
                getattr(model, "activation_checkpointing_enable", None)
                or model.gradient_checkpointing_enable
            )
            enable()
        labels = _labels(batch, model.config.video_token_id)
        model(input_ids=batch["input_ids"], labels=labels, **_video_kwargs(batch)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    tower = next(
        k
        for k in grads[0]
        if k.startswith("model.vision_tower.") and k.endswith("encoder.layers.0.mlp.fc1.weight")
    )
    for name in (
        "model.multi_modal_projector.linear_1.weight",
        tower,
        "model.language_model.layers.1.dcal.t2v.k_proj.weight",
        "model.language_model.layers.3.dcal.v2v.gate.alpha",
    ):
        assert grads[0][name].abs().sum() > 0, name
    for name in grads[0]:  # (atol: some gradients are 0 in exact arithmetic, e.g. SigLIP's k bias)
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.parametrize("share_kv", [False, True])
def test_training_stages_freeze_what_they_should(share_kv):
    model = _model(gates="random", dcal_share_kv=share_kv)
    trainable = set(set_training_stage(model, 1))
    assert model.config.dcal_t2v_enabled is False
    for name, p in model.named_parameters():
        should = (
            ".multi_modal_projector." in name
            or ".dcal.v2v." in name
            or (
                share_kv and any(f".dcal.{m}." in name for m in ("k_proj", "v_proj", "vision_norm"))
            )
        )
        assert p.requires_grad == should, name
        assert (name in trainable) == should
    # T2V does not run in stage 1: its gate changes nothing and it gets no gradient
    batch = _batch(model.config, frames=(2, 1), T=2)
    labels = _labels(batch, model.config.video_token_id)
    model.train()
    loss = model(input_ids=batch["input_ids"], labels=labels, **_video_kwargs(batch)).loss
    loss.backward()
    for dcal in model.dcals.values():
        assert dcal.t2v.q_proj.weight.grad is None
        assert dcal.v2v.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        for dcal in model.dcals.values():
            dcal.t2v.gate.alpha.fill_(2.0)
        b = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
    assert torch.equal(a, b)

    trainable = set_training_stage(model, 2)
    assert model.config.dcal_t2v_enabled is True
    assert all(p.requires_grad for p in model.parameters())
    assert len(trainable) == len(list(model.parameters()))
    with torch.no_grad():
        c = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
    assert not torch.allclose(b, c)  # T2V runs again
    set_training_stage(model, 2, train_vision_tower=False)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        set_training_stage(model, 3)
    with pytest.raises(ValueError, match="CrossLMMForConditionalGeneration or CrossLMMModel"):
        set_training_stage(torch.nn.Linear(2, 2), 1)


# ----------------------------------------------------------------------------------------------
# Generation and the cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, dict(dcal_kv_path="fused"), dict(dcal_kv_path="materialized", dcal_cache_kv=True)],
    ids=["auto", "fused", "materialized-cached-kv"],
)
def test_decode_step_reads_the_memory_from_the_cache(options):
    """Prefill with the video, then two steps with text only: the same logits as a full forward
    of the longer sequence (T2V of the new tokens attends to the cached memory)."""
    model = _model(gates="random", **options)
    batch = _batch(model.config, frames=(2, 1), T=2)
    ids = batch["input_ids"]
    nxt = torch.randint(3, 90, (ids.shape[0], 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pre = model(input_ids=ids, use_cache=True, **_video_kwargs(batch))
        cache = find_cache(pre)
        assert isinstance(cache, CrossLMMCache)
        assert cache_vision_memory(cache) is pre.vision_memory is not None
        step = model(input_ids=nxt, **cache_argument(cache), use_cache=True)
        step2 = model(input_ids=nxt.flip(0), **cache_argument(cache), use_cache=True)
        full = model(input_ids=torch.cat([ids, nxt, nxt.flip(0)], 1), **_video_kwargs(batch))
    assert relative_error(step.logits[:, -1], full.logits[:, -2]) < 1e-5
    assert relative_error(step2.logits[:, -1], full.logits[:, -1]) < 1e-5
    assert cache_vision_memory(cache) is pre.vision_memory  # the same memory object throughout
    # without the memory the step would differ (T2V matters for the new token)
    cache2 = find_cache(model(input_ids=ids, use_cache=True, **_video_kwargs(batch)))
    cache2.vision_memory = None
    with torch.no_grad():
        blind = model(input_ids=nxt, **cache_argument(cache2), use_cache=True)
    assert relative_error(blind.logits[:, -1], full.logits[:, -2]) > 1e-4


@pytest.mark.parametrize("features", [False, True])
def test_generate_with_and_without_cache_agree(features):
    model = _model(gates="random")
    batch = _batch(model.config, frames=(3, 1), T=3, pad="left", features=features)
    kw = _video_kwargs(batch, features=features)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = model.generate(
            input_ids=batch["input_ids"],
            **kw,
            max_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
        )
        n_cached = len(calls)
        plain = model.generate(
            input_ids=batch["input_ids"], **kw, max_new_tokens=5, do_sample=False, use_cache=False
        )
    finally:
        hook.remove()
    assert torch.equal(cached.sequences, plain)
    assert cached.sequences.shape[1] == batch["input_ids"].shape[1] + 5
    # The video was encoded once (the prefill), and the cache kept its tokens once, beside the K/V.
    assert n_cached == (0 if features else 1)
    cache = find_cache(cached)
    assert isinstance(cache, CrossLMMCache)
    assert cache.vision_memory.frames_per_sample == (3, 1)
    assert cache.vision_memory.tokens.shape == (4 * model.config.tokens_per_frame, 32)
    # the placeholder token is never generated
    assert not (
        cached.sequences[:, batch["input_ids"].shape[1] :] == model.config.video_token_id
    ).any()


def test_beam_search_reorders_the_memory_with_the_cache():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(2, 1), T=2)
    kw = _video_kwargs(batch)
    out = model.generate(
        input_ids=batch["input_ids"],
        **kw,
        max_new_tokens=4,
        num_beams=2,
        do_sample=False,
        return_dict_in_generate=True,
    )
    memory = find_cache(out).vision_memory
    assert memory.frames_per_sample == (2, 2, 1, 1)  # each sample's beams share its video
    plain = model.generate(
        input_ids=batch["input_ids"],
        **kw,
        max_new_tokens=4,
        num_beams=2,
        do_sample=False,
        use_cache=False,
    )
    assert torch.equal(out.sequences, plain)


def test_cache_select_and_repeat():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(2, 1), T=2)
    with torch.no_grad():
        cache = find_cache(
            model(input_ids=batch["input_ids"], use_cache=True, **_video_kwargs(batch))
        )
    cache.batch_repeat_interleave(2)
    assert cache.vision_memory.frames_per_sample == (2, 2, 1, 1)
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.vision_memory.frames_per_sample == (1, 2)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.vision_memory.frames_per_sample == (2, 2)
    cache.reset()
    assert cache.vision_memory is None


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    from transformers import AutoModelForImageTextToText

    model = _model(
        gates="random", dcal_v2v_scope="frame", text_config={"tie_word_embeddings": tied}
    )
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    batch = _batch(model.config, frames=(2, 1), T=2)
    loaded = CrossLMMForConditionalGeneration.from_pretrained(tmp_path).eval()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(auto) is CrossLMMForConditionalGeneration
    assert loaded.config.dcal_v2v_scope == "frame"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        b = loaded(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        c = auto(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_loading_a_checkpoint_without_dcals_starts_their_gates_at_zero(tmp_path):
    """A pooled-only checkpoint loaded into a model with DCALs: the new gates start at 0 (not at
    whatever memory the loader materialised), so the model computes what the checkpoint did."""
    base = _model(dcal_layers=[])
    base.save_pretrained(tmp_path)
    model = CrossLMMForConditionalGeneration.from_pretrained(tmp_path, dcal_layers=[1, 3]).eval()
    for name, p in model.named_parameters():
        if name.endswith("gate.alpha"):
            assert torch.equal(p, torch.zeros_like(p)), name
    assert model.dcals[1].v2v.q_proj.weight.abs().sum() > 0
    batch = _batch(model.config, frames=(2,))
    with torch.no_grad():
        a = base(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        b = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _bad_inputs():
    config = preset_config("crosslmm-tiny")
    batch = _batch(config, frames=(2, 1), T=2)
    ids, pix, fm = batch["input_ids"], batch["video"], batch["video_frame_mask"]
    feats = torch.randn(2, 2, 36, 32)
    no_video = ids.clone()
    return [
        (
            "placeholders",
            dict(input_ids=ids, pixel_values_videos=pix),
            "frame count does not match the placeholders",
        ),
        (
            "placeholders-mask",
            dict(input_ids=ids, pixel_values_videos=pix, video_frame_mask=torch.ones_like(fm)),
            "frame count does not match the placeholders",
        ),
        (
            "grid",
            dict(input_ids=ids, vision_features=torch.randn(2, 2, 25, 32), video_frame_mask=fm),
            "encoder grid 6x6",
        ),
        (
            "width",
            dict(input_ids=ids, vision_features=torch.randn(2, 2, 36, 31), video_frame_mask=fm),
            "width 31",
        ),
        (
            "pixel-dtype",
            dict(
                input_ids=ids, pixel_values_videos=(pix * 50).to(torch.uint8), video_frame_mask=fm
            ),
            "must be a floating tensor",
        ),
        (
            "feature-dtype",
            dict(input_ids=ids, vision_features=feats.long(), video_frame_mask=fm),
            "must be a floating tensor",
        ),
        (
            "ids-dtype",
            dict(input_ids=ids.float(), pixel_values_videos=pix, video_frame_mask=fm),
            "input_ids must be an integer tensor",
        ),
        (
            "mask-dtype",
            dict(input_ids=ids, pixel_values_videos=pix, video_frame_mask=fm.float()),
            "video_frame_mask must be a bool tensor",
        ),
        (
            "mask-shape",
            dict(input_ids=ids, pixel_values_videos=pix, video_frame_mask=fm[:, :1]),
            "video_frame_mask must have shape",
        ),
        (
            "mask-prefix",
            dict(
                input_ids=ids,
                pixel_values_videos=pix,
                video_frame_mask=torch.tensor([[True, True], [False, True]]),
            ),
            "prefix of each row",
        ),
        (
            "pixel-size",
            dict(
                input_ids=ids, pixel_values_videos=torch.randn(2, 2, 3, 20, 20), video_frame_mask=fm
            ),
            "frames of shape",
        ),
        (
            "pixel-rank",
            dict(input_ids=ids, pixel_values_videos=torch.randn(2, 3, 24, 24)),
            "must have shape",
        ),
        (
            "batch",
            dict(input_ids=ids, pixel_values_videos=pix[:1], video_frame_mask=fm[:1]),
            "must match input_ids' batch",
        ),
        (
            "both",
            dict(
                input_ids=ids, pixel_values_videos=pix, vision_features=feats, video_frame_mask=fm
            ),
            "exactly one of pixel_values_videos and vision_features",
        ),
        ("no-video", dict(input_ids=no_video), "no pixel_values_videos or vision_features"),
        ("mask-alone", dict(input_ids=ids, video_frame_mask=fm), "without pixel_values_videos"),
        (
            "embeds",
            dict(
                inputs_embeds=torch.randn(2, ids.shape[1], 64),
                pixel_values_videos=pix,
                video_frame_mask=fm,
            ),
            "a video needs input_ids",
        ),
        (
            "ids-and-embeds",
            dict(input_ids=ids, inputs_embeds=torch.randn(2, ids.shape[1], 64)),
            "exactly one of input_ids and inputs_embeds",
        ),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize(
    "kwargs,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_raise(kwargs, message):
    model = _model()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_second_video_in_a_cached_conversation_raises():
    model = _model()
    batch = _batch(model.config, frames=(1,))
    with torch.no_grad():
        cache = find_cache(
            model(input_ids=batch["input_ids"], use_cache=True, **_video_kwargs(batch))
        )
        with pytest.raises(ValueError, match="only come with the first forward of a cache"):
            model(input_ids=batch["input_ids"], **cache_argument(cache), **_video_kwargs(batch))


def test_memory_dtype_follows_the_model():
    """Features in float32 fed to a bfloat16 model are cast once: the memory the DCALs read has
    the hidden states' dtype."""
    model = _model(torch.bfloat16, gates="random")
    batch = _batch(model.config, frames=(2,), features=True)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], vision_features=batch["video"])
    assert out.vision_memory.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()


# ----------------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------------


def test_dcals_report_their_back_end():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(2,))
    with crosslmm_ops.record_backends() as log, torch.no_grad():
        model(input_ids=batch["input_ids"], **_video_kwargs(batch))
    # 2 DCALs x (V2V + T2V) on CPU: the torch back end
    assert _attention_backends(log) == ["torch"] * 4
    assert ("token_pool", "torch") in log


def test_dcals_on_the_triton_interpreter():
    from crosslmm_ops import _backend

    if not _backend.triton_runnable(torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is not usable here")
    model = _model(gates="random")
    ref_batch = _batch(model.config, frames=(1,), text=(2, 2))
    with torch.no_grad():
        ref = model(input_ids=ref_batch["input_ids"], **_video_kwargs(ref_batch)).logits
        for dcal in model.dcals.values():
            dcal.backend = "triton"
        with crosslmm_ops.record_backends() as log:
            out = model(input_ids=ref_batch["input_ids"], **_video_kwargs(ref_batch)).logits
    assert _attention_backends(log) == ["triton"] * 4
    assert relative_error(out, ref) < 1e-4


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("kv_path", ["materialized", "auto"])
def test_crosslmm_2b_bf16_forward_and_generate_64_frames_on_cuda(kv_path):
    """The paper's 2B shapes (random weights, bf16), 64 frames of precomputed SigLIP features
    (729 x 1152 each), the DCALs on the CUDA back end: forward, a decode step against the full
    forward, and generate() of a few tokens with the memory in the cache."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CrossLMMForConditionalGeneration.from_preset(
            "crosslmm-2b", dtype=torch.bfloat16, dcal_backend="cuda", dcal_kv_path=kv_path
        ).eval()
    _set_gates(model, "random")
    config = model.config
    T, n = 64, config.pooled_per_frame
    gen = torch.Generator(device="cuda").manual_seed(0)
    feats = torch.randn(1, T, 729, 1152, device="cuda", dtype=torch.bfloat16, generator=gen)
    text = torch.randint(100, 150000, (1, 24), device="cuda", generator=gen)
    ids = torch.cat(
        [text[:, :12], torch.full((1, T * n), config.video_token_id, device="cuda"), text[:, 12:]],
        1,
    )
    with torch.no_grad(), crosslmm_ops.record_backends() as log:
        pre = model(input_ids=ids, vision_features=feats, use_cache=True)
        nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, **cache_argument(find_cache(pre)), use_cache=True)
        full = model(input_ids=torch.cat([ids, nxt], 1), vision_features=feats)
    assert torch.isfinite(pre.logits.float()).all()
    assert pre.vision_memory.tokens.shape == (T * 729, 1152)
    assert set(_attention_backends(log)) == {"cuda"}
    # A sanity bound only: in bf16 the cached step and the full forward differ by rounding of
    # the same order as the DCALs' effect on random weights (on the CPU, 8 layers of these shapes:
    # 1.2e-2 step vs full, 1.8e-2 bf16 vs fp32); the exact cache semantics are tested in fp32 on
    # the CPU (test_decode_step_reads_the_memory_from_the_cache).
    assert relative_error(step.logits[:, -1].float(), full.logits[:, -1].float()) < 5e-2
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            vision_features=feats,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (1, ids.shape[1] + 4)
    assert find_cache(out).vision_memory.tokens.shape == (T * 729, 1152)


@pytest.mark.cuda
def test_tiny_bf16_on_cuda_matches_fp32_on_cpu():
    model = _model(gates="random")
    batch = _batch(model.config, frames=(3, 1), T=3, pad="right")
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], **_video_kwargs(batch)).logits
        gpu = model.to("cuda", torch.bfloat16)
        kw = {k: v.cuda() for k, v in _video_kwargs(batch).items()}
        kw["pixel_values_videos"] = kw["pixel_values_videos"].to(torch.bfloat16)
        with crosslmm_ops.record_backends() as log:
            out = gpu(input_ids=batch["input_ids"].cuda(), **kw).logits
    assert set(_attention_backends(log)) <= {"cuda", "triton"}
    keep = batch["attention_mask"].bool()
    assert relative_error(out.float().cpu()[keep], ref[keep]) < 3e-2


def _assert_same_tower_gradients(model, batch, kw, attribute, settings):
    """The vision tower's gradients with ``model.model.<attribute>`` set to each of the two
    ``settings`` in turn: non-zero, and equal."""
    grads = []
    for value in settings:
        setattr(model.model, attribute, value)
        model.zero_grad()
        model(input_ids=batch["input_ids"], **kw).logits.square().mean().backward()
        grads.append(model.model.vision_tower.get_input_embeddings().weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _recording_backend(graphs: list):
    """A torch.compile back end that records each graph it is given and runs it as traced: proof
    that the compiled path ran, without a C++ toolchain."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _calls_fused_mlp(graphs) -> bool:
    return any("linear_gelu_tanh" in str(node.target) for gm in graphs for node in gm.graph.nodes)


def test_linear_gelu_tanh_is_the_composition_with_gradients():
    """The fused fc1 + GELU op: ``gelu(x W^T + b, tanh)`` and its gradients, in float64, on a
    non-contiguous input of odd sizes."""
    from crosslmm_ops.models.vision import linear_gelu_tanh

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 5, 14, dtype=torch.float64, generator=gen)
    x = wide[..., ::2].requires_grad_()  # (3, 5, 7), not contiguous
    w = torch.randn(11, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True)
    out = linear_gelu_tanh(x, w, b)
    want = F.gelu(F.linear(x, w, b), approximate="tanh")
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(linear_gelu_tanh, (x, w, b))
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, w, b), grad)
    expected = torch.autograd.grad(want, (x, w, b), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    torch.library.opcheck(torch.ops.crosslmm.linear_gelu_tanh.default, (x, w, b))


def test_fuse_gelu_epilogues_keeps_the_tower():
    """Fusing the tower's MLPs: every layer's MLP, once (idempotent); the same output, parameters
    and state_dict; an MLP whose activation is not GELU-tanh is left alone; a deep copy of the
    fused tower computes with its own weights."""
    import copy

    from transformers.activations import ACT2FN

    from crosslmm_ops.models.vision import fuse_gelu_epilogues

    tower = _model().model.vision_tower
    layers = tower.config.num_hidden_layers
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size)
    keys = list(tower.state_dict())
    with torch.no_grad():
        before = tower(pixel_values=pixels).last_hidden_state
        assert fuse_gelu_epilogues(tower) == layers
        assert fuse_gelu_epilogues(tower) == layers  # already fused: counted, not wrapped again
        after = tower(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert list(tower.state_dict()) == keys
        twin = copy.deepcopy(tower)
        for module in twin.modules():
            if hasattr(module, "fc1"):
                module.fc1.weight.mul_(2)
        assert not torch.allclose(twin(pixel_values=pixels).last_hidden_state, after)
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, after)
        # An fc1 hooked (or wrapped) after fusing is called as it is, not bypassed.
        mlp = next(m for m in tower.modules() if hasattr(m, "fc1"))

        def halve(module, args, out):
            return out * 0.5

        handle = mlp.fc1.register_forward_hook(halve)
        hooked = tower(pixel_values=pixels).last_hidden_state
        handle.remove()
        unfused = _model().model.vision_tower
        unfused.load_state_dict(tower.state_dict())
        next(m for m in unfused.modules() if hasattr(m, "fc1")).fc1.register_forward_hook(halve)
        torch.testing.assert_close(hooked, unfused(pixel_values=pixels).last_hidden_state)
        assert not torch.allclose(hooked, after)
        other = _model().model.vision_tower
        for module in other.modules():
            if hasattr(module, "activation_fn"):
                module.activation_fn = ACT2FN["gelu"]  # exact GELU: no tanh epilogue for it
        assert fuse_gelu_epilogues(other) == 0


@pytest.mark.cuda
def test_linear_gelu_tanh_on_cuda_is_the_tanh_gelu():
    """On CUDA the op is cuBLASLt's GELU epilogue: in float32 it matches the tanh GELU (and is
    told apart from the exact one), in bf16 it is within bf16 rounding of float64."""
    from crosslmm_ops.models.vision import linear_gelu_tanh

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 37, 96, device="cuda", generator=gen)[:, 1:]  # odd, non-contiguous rows
    w = torch.randn(200, 96, device="cuda", generator=gen) / 8
    b = torch.randn(200, device="cuda", generator=gen)
    pre = F.linear(x.double(), w.double(), b.double())
    tanh_gelu, exact_gelu = F.gelu(pre, approximate="tanh"), F.gelu(pre)
    out = linear_gelu_tanh(x, w, b).double()
    assert (out - tanh_gelu).abs().max() < 1e-4 < (out - exact_gelu).abs().max()
    low = linear_gelu_tanh(x.bfloat16(), w.bfloat16(), b.bfloat16()).double()
    ref = F.gelu(
        F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double()),
        approximate="tanh",
    )
    assert relative_error(low, ref) < 1e-2


def test_vision_tower_compiled_gives_the_same_model():
    """``vision_compile``: every chunk through torch.compile (here a back end that records its
    graphs), with a last chunk shorter than the others: the eager logits and gradients; the
    compiled tower is built once and reused; a copy of the model starts without it."""
    import copy
    import pickle

    model = _model(gates="random")
    batch = _batch(model.config, frames=(3, 2), T=3)
    kw = _video_kwargs(batch)
    graphs = []
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(input_ids=batch["input_ids"], **kw).logits
            model.model.vision_chunk_frames = 2  # 5 frames: chunks of 2, 2 and 1
            model.model.vision_compile = {"backend": _recording_backend(graphs)}
            compiled = model(input_ids=batch["input_ids"], **kw).logits
            built = model.model._compiled_tower_cache().compiled
            assert graphs and built is not None
            assert _calls_fused_mlp(graphs)  # the GELU went into fc1's epilogue
            again = model(input_ids=batch["input_ids"], **kw).logits
            assert model.model._compiled_tower_cache().compiled is built
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
        _assert_same_tower_gradients(
            model, batch, kw, "vision_compile", (False, model.model.vision_compile)
        )
        assert copy.deepcopy(model).model._compiled_tower_cache().compiled is None
        cache = model.model._compiled_tower_cache()
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            assert pickle.loads(pickle.dumps(cache, protocol=protocol)).compiled is None
        model.model.vision_compile = "max-autotune"
        with pytest.raises(ValueError, match="vision_compile must be"):
            model(input_ids=batch["input_ids"], **kw)
    finally:
        torch._dynamo.reset()


def test_vision_tower_compiled_trains_through_aot_autograd():
    """Training with ``vision_compile`` goes through AOTAutograd (here its ``aot_eager`` back end,
    which needs no compiler), which traces the fused MLP op's backward formula: the tower's
    gradients equal the eager ones."""
    model = _model(gates="random")
    batch = _batch(model.config, frames=(3, 2), T=3)
    kw = _video_kwargs(batch)
    torch._dynamo.reset()
    try:
        _assert_same_tower_gradients(
            model, batch, kw, "vision_compile", (False, {"backend": "aot_eager"})
        )
        mlps = [m for m in model.model.vision_tower.modules() if "forward" in m.__dict__]
        assert len(mlps) == model.config.vision_config.num_hidden_layers  # the fused path ran
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
def test_vision_tower_compiled_on_cuda_matches_eager():
    """``vision_compile=True`` (inductor) on the GPU, bf16: the eager model's logits."""
    model = _model(gates="random").to("cuda", torch.bfloat16)
    batch = _batch(model.config, frames=(3, 2), T=3)
    kw = {k: v.cuda() for k, v in _video_kwargs(batch).items()}
    kw["pixel_values_videos"] = kw["pixel_values_videos"].to(torch.bfloat16)
    ids = batch["input_ids"].cuda()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(input_ids=ids, **kw).logits.float()
            model.model.vision_chunk_frames = 2
            model.model.vision_compile = True
            compiled = model(input_ids=ids, **kw).logits.float()
        assert model.model._compiled_tower_cache().compiled is not None
        assert relative_error(compiled, eager) < 2e-2
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("chunk", [1, 2])
def test_vision_tower_in_chunks_gives_the_same_model(chunk):
    """Frames through the vision tower ``chunk`` at a time: the same tokens, logits and
    gradients as all frames at once."""
    model = _model(gates="random", vision_feature_layer=-2)
    batch = _batch(model.config, frames=(3, 2), T=3)
    kw = _video_kwargs(batch)
    with torch.no_grad():
        whole = model(input_ids=batch["input_ids"], **kw).logits
        model.model.vision_chunk_frames = chunk
        chunked = model(input_ids=batch["input_ids"], **kw).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    _assert_same_tower_gradients(model, batch, kw, "vision_chunk_frames", (None, chunk))
    model.model.vision_chunk_frames = 0
    with pytest.raises(ValueError, match="vision_chunk_frames must be"):
        model(input_ids=batch["input_ids"], **kw)
