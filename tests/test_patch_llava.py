"""patch_llava / patch_llava_processor on tiny random transformers models (CPU, no downloads).

Each family is built from transformers' own config classes with a 7x7 token grid (28 px / patch 4;
odd, so the adaptive 3x3 pooling has overlapping windows) and a 4-layer text model; ``every=2``
puts DCALs after layers 1 and 3. Prompts are written with the patched placeholder counts.

The independent reference (:func:`_reference_logits`) recomputes a patched forward from the
model's own pieces and plain torch (vision tower, ``F.adaptive_avg_pool2d``, projector, the decoder
layers called one by one with the DCAL applied by hand after the attention's residual add), in
float64, so it checks where the patch pools, what it remembers, which positions query V2V / T2V,
and where in the layer the DCAL sits.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from crosslmm_ops.models.decoder import cache_argument, find_cache  # noqa: E402
from crosslmm_ops.models.patching import CrossLMMPatch, patch_llava, patch_llava_processor  # noqa: E402
from crosslmm_ops.nn import TokenPooling  # noqa: E402

VOCAB = 96
VIDEO = VOCAB - 1
IMAGE = VOCAB - 2
PAD = 0
FRAMES = 3
GRID = 7  # 28 px / patch 4
POOLED = 9  # pooled_grid=3
EVERY = 2
DCAL_LAYERS = (1, 3)


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------


def _siglip():
    return transformers.SiglipVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=4,
        vision_use_head=False,
    )


def _clip():
    return transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=4,
        projection_dim=16,
    )


def _text(kind: str):
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    return cls(
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=PAD,
    )


def _build(family: str):
    if family == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=_siglip(),
            text_config=_text("qwen2"),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[28, 28]],
        )
        cls = transformers.LlavaOnevisionForConditionalGeneration
    elif family == "llava_next_video":
        config = transformers.LlavaNextVideoConfig(
            vision_config=_clip(),
            text_config=_text("llama"),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=[[28, 28]],
        )
        cls = transformers.LlavaNextVideoForConditionalGeneration
    else:
        config = transformers.LlavaConfig(
            vision_config=_clip(), text_config=_text("llama"), image_token_index=IMAGE
        )
        cls = transformers.LlavaForConditionalGeneration
    config.text_config._attn_implementation = "sdpa"
    model = cls(config).eval()
    # transformers' init leaves tiny models with near-zero logits; make the weights O(1) so that
    # every comparison below compares something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


FAMILIES = ("llava_onevision", "llava_next_video", "llava")
EXTRA = {"llava_onevision": 1, "llava_next_video": 0, "llava": 0}  # OV's newline per video


def _is_video(family: str) -> bool:
    return family != "llava"


def _set_gates(model, value=None, branch=None, seed=1):
    """Set every DCAL gate (of ``branch`` only: "v2v"/"t2v") to ``value`` or random O(1) values."""
    g = torch.Generator().manual_seed(seed)
    for dcal in model.crosslmm_patch.dcals.values():
        for name, p in dcal.named_parameters():
            if name.endswith("alpha") and (branch is None or name.startswith(branch)):
                with torch.no_grad():
                    p.copy_(
                        torch.full_like(p, value)
                        if value is not None
                        else torch.rand(p.shape, generator=g) + 0.5
                    )


def _batch(family: str, items_per_sample=(1, 0, 2), pad: bool = True, seed: int = 0):
    """A prompt batch for the patched model: sample ``b`` holds ``items_per_sample[b]`` videos (or
    LLaVA images), each as its patched placeholder run, between random text; rows of different
    lengths are left-padded (``pad=True``) or filled up with text (``pad=False``)."""
    g = torch.Generator().manual_seed(seed)
    video = _is_video(family)
    token = VIDEO if video else IMAGE
    per_item = (FRAMES if video else 1) * POOLED + EXTRA[family]
    rows = []
    for b, items in enumerate(items_per_sample):
        row = torch.randint(1, VOCAB - 3, (3 + b,), generator=g).tolist()
        for _ in range(items):
            row += [token] * per_item + torch.randint(1, VOCAB - 3, (2,), generator=g).tolist()
        row += torch.randint(1, VOCAB - 3, (4,), generator=g).tolist()
        rows.append(row)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        if pad:
            ids[b, length - len(row) :] = torch.tensor(row)
            mask[b, length - len(row) :] = 1
        else:
            fill = torch.randint(1, VOCAB - 3, (length - len(row),), generator=g).tolist()
            ids[b] = torch.tensor(row + fill)
            mask[b] = 1
    total = sum(items_per_sample)
    if video:
        pixels = {"pixel_values_videos": torch.randn(total, FRAMES, 3, 28, 28, generator=g)}
    else:
        pixels = {"pixel_values": torch.randn(total, 3, 28, 28, generator=g)}
    return dict(input_ids=ids, attention_mask=mask, **pixels)


def _pair(family: str):
    """(patched model, the same weights patched with dcal=False)."""
    torch.manual_seed(0)
    base = _build(family)
    patched = copy.deepcopy(base)
    patch_llava(patched, every=EVERY, pooled_grid=3)
    patch_llava(base, every=EVERY, pooled_grid=3, dcal=False)
    return patched, base


GEN = dict(
    do_sample=False,
    max_new_tokens=4,
    suppress_tokens=[IMAGE, VIDEO, PAD],
    output_logits=True,
    return_dict_in_generate=True,
)


# ----------------------------------------------------------------------------------------------
# The independent reference
# ----------------------------------------------------------------------------------------------


def _reference_logits(model, input_ids, pixels, items_per_sample, family):
    """The CrossLMM forward of ``model`` (patched) recomputed by hand, with no padding."""
    from crosslmm_ops.nn import VisionMemory

    inner = model.model
    config = inner.config
    video = _is_video(family)
    frames = FRAMES if video else 1
    flat = pixels.flatten(0, 1) if video else pixels
    hidden = inner.vision_tower(flat, output_hidden_states=True).hidden_states
    x = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        x = x[:, 1:]
    dv = x.shape[-1]
    grid = x.transpose(1, 2).reshape(-1, dv, GRID, GRID)
    pooled = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (items*T, 9, Dv)
    projected = inner.multi_modal_projector(pooled).reshape(
        -1, frames * POOLED, config.text_config.hidden_size
    )
    features = []
    for item in projected:
        features.append(item)
        if family == "llava_onevision":
            features.append(inner.image_newline[None].to(item.dtype))
    token = VIDEO if video else IMAGE
    placeholders = input_ids == token
    embeds = inner.get_input_embeddings()(input_ids).clone()
    embeds[placeholders] = torch.cat(features)

    raw = x.reshape(-1, frames, GRID * GRID, dv)
    per_sample, start = [], 0
    for count in items_per_sample:
        per_sample.append(raw[start : start + count].flatten(0, 1))
        start += count
    memory = VisionMemory.from_list(per_sample, POOLED)
    visual = placeholders.clone()
    if family == "llava_onevision":  # each video's last placeholder is its newline token
        for b in range(input_ids.shape[0]):
            pos = placeholders[b].nonzero().flatten()
            for end in range(frames * POOLED, len(pos), frames * POOLED + 1):
                visual[b, pos[end]] = False
    others = (input_ids == IMAGE) | (input_ids == VIDEO)
    text = ~others

    lm = inner.language_model
    h = embeds
    positions = torch.arange(h.shape[1]).unsqueeze(0)
    rotary = lm.rotary_emb(h, positions)
    for i, layer in enumerate(lm.layers):
        residual = h
        attn, _ = layer.self_attn(
            layer.input_layernorm(h),
            position_embeddings=rotary,
            attention_mask=None,
            position_ids=positions,
        )
        h = residual + attn
        if i in DCAL_LAYERS:
            h = layer.dcal(h, memory, visual_mask=visual, text_mask=text)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_reference(family):
    patched, _ = _pair(family)
    patched.double()
    _set_gates(patched)
    items = (2, 1) if _is_video(family) else (2, 1)
    batch = _batch(family, items, pad=False)
    pixel_key = "pixel_values_videos" if _is_video(family) else "pixel_values"
    batch[pixel_key] = batch[pixel_key].double()
    with torch.no_grad():
        out = patched(input_ids=batch["input_ids"], **{pixel_key: batch[pixel_key]}).logits
        ref = _reference_logits(patched, batch["input_ids"], batch[pixel_key], items, family)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # The DCALs moved the logits (the comparison is not vacuous).
    _set_gates(patched, 0.0)
    with torch.no_grad():
        plain = patched(input_ids=batch["input_ids"], **{pixel_key: batch[pixel_key]}).logits
    assert (plain - ref).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Forward, generate, gate-0, DCALs invoked
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_zero_is_exactly_pooling_only(family):
    patched, base = _pair(family)
    batch = _batch(family)
    with torch.no_grad():
        out, ref = patched(**batch).logits, base(**batch).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)
    g_out, g_ref = patched.generate(**batch, **GEN), base.generate(**batch, **GEN)
    assert torch.equal(g_out.sequences, g_ref.sequences)
    for a, b in zip(g_out.logits, g_ref.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_dcals_invoked_and_trained(family):
    patched, base = _pair(family)
    batch = _batch(family)
    with torch.no_grad():
        ref = base(**batch).logits
    real = batch["attention_mask"].bool()
    for branch in ("v2v", "t2v"):
        _set_gates(patched, 0.0)
        _set_gates(patched, 0.8, branch=branch)
        with torch.no_grad():
            out = patched(**batch).logits
        assert (out - ref)[real].abs().max() > 1e-3, f"{branch} gates changed nothing"

    _set_gates(patched)
    patched.train()
    out = patched(**batch, labels=batch["input_ids"].masked_fill(~real, -100))
    out.loss.backward()
    for index, dcal in patched.crosslmm_patch.dcals.items():
        for name, p in dcal.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"layer {index} {name}"
            assert p.grad.abs().max() > 0, f"no gradient reached layer {index} {name}"
    # The memory keeps the vision tower in the graph: its last layer gets gradients through the
    # DCALs' keys and values (LLaVA's default takes features from layer -2, so its last layer
    # gets none at all, with or without DCALs: check the first layer there).
    tower = patched.model.vision_tower
    first_layer = next(p for n, p in tower.named_parameters() if "layers.0." in n)
    assert first_layer.grad is not None and first_layer.grad.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_and_without_cache_agree(family):
    patched, _ = _pair(family)
    _set_gates(patched)
    batch = _batch(family)
    calls = []
    handle = patched.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = patched.generate(**batch, **GEN)
    finally:
        handle.remove()
    # One vision encode per generate() (before or in the prefill), reused by the decode steps.
    assert len(calls) == 1
    uncached = patched.generate(**batch, **GEN, use_cache=False)
    assert cached.sequences.shape == (3, batch["input_ids"].shape[1] + GEN["max_new_tokens"])
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The first generated token's logits are the forward's last-position logits.
    with torch.no_grad():
        forward = patched(**batch).logits[:, -1]
    torch.testing.assert_close(cached.logits[0], forward, rtol=1e-4, atol=1e-4)


# transformers versions whose generate() encodes the vision before the prefill (mm_encoder_outputs)
ENCODES_BEFORE_PREFILL = (
    "mm_encoder_outputs"
    in inspect.signature(transformers.LlavaForConditionalGeneration.forward).parameters
)
TRANSFORMERS_VERSION = tuple(
    int("".join(c for c in part if c.isdigit()) or 0)
    for part in transformers.__version__.split(".")[:2]
)


@pytest.mark.parametrize("family", ["llava_onevision", "llava"])
def test_beam_search_with_and_without_cache_agree(family):
    # Beams expand the batch after the vision was encoded (mm_encoder_outputs): the memory must
    # follow each sample to its beams. transformers 5.17 and 5.18 expand the pixels / encoded
    # features of a sample with several images per image ([A, A, B, B] instead of [A, B, A, B]),
    # which breaks unpatched models the same way: one item per sample there.
    patched, _ = _pair(family)
    _set_gates(patched)
    batch = _batch(family, (1, 2) if TRANSFORMERS_VERSION >= (5, 23) else (1, 1))
    opts = dict(GEN, num_beams=2, num_return_sequences=2, output_logits=False)
    cached = patched.generate(**batch, **opts)
    uncached = patched.generate(**batch, **opts, use_cache=False)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, uncached.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_kept_on_the_cache(family):
    patched, _ = _pair(family)
    batch = _batch(family)
    out = patched(**batch, use_cache=True)
    memory = CrossLMMPatch.memory(find_cache(out))
    assert memory is not None
    frames = FRAMES if _is_video(family) else 1
    assert memory.frames_per_sample == (frames, 0, 2 * frames)
    assert memory.tokens_per_frame == GRID * GRID and memory.pooled_per_frame == POOLED
    # A decode step with only the cache sees the same memory.
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    step = patched(
        input_ids=torch.full((3, 1), 5), **cache_argument(find_cache(out)), attention_mask=mask
    )
    assert CrossLMMPatch.memory(find_cache(step)) is memory


def test_inputs_embeds_instead_of_input_ids():
    # Without input_ids the placeholders are found by their embedding, as the model itself does.
    family = "llava_onevision"
    patched, _ = _pair(family)
    _set_gates(patched)
    batch = _batch(family)
    ids = batch.pop("input_ids")
    with torch.no_grad():
        embeds = patched.get_input_embeddings()(ids)
        expected = patched(input_ids=ids, **batch).logits
        got = patched(inputs_embeds=embeds, **batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_replays_the_dcals():
    family = "llava_onevision"
    patched, _ = _pair(family)
    _set_gates(patched)
    other = copy.deepcopy(patched)
    batch = _batch(family)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    enable = (
        getattr(other, "activation_checkpointing_enable", None)
        or other.gradient_checkpointing_enable
    )
    enable()
    grads = []
    for model in (patched, other):
        model.train()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".dcal." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# What the patch leaves alone
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_kept(family):
    torch.manual_seed(0)
    model = _build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_llava(model, every=EVERY)
    after = model.state_dict()
    assert set(before) <= set(after)
    added = set(after) - set(before)
    assert added and all(".dcal." in k for k in added)
    assert {k.split(".dcal.")[0] for k in added} == {
        f"model.language_model.layers.{i}" for i in DCAL_LAYERS
    }
    for k, v in before.items():
        assert torch.equal(after[k], v)
    # A patched model loads a patched checkpoint (DCAL weights included).
    _set_gates(model)
    twin = _build(family)
    patch_llava(twin, every=EVERY)
    twin.load_state_dict(model.state_dict())
    batch = _batch(family)
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, model(**batch).logits)

    pooling_only = _build(family)
    keys = set(pooling_only.state_dict())
    patch_llava(pooling_only, dcal=False)
    assert set(pooling_only.state_dict()) == keys


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model(family):
    torch.manual_seed(0)
    original = _build(family)
    model = copy.deepcopy(original)
    patch_llava(model, every=EVERY)
    _set_gates(model)
    model.crosslmm_patch.remove()
    assert not hasattr(model, "crosslmm_patch") and not hasattr(model.model, "crosslmm_patch")
    assert set(model.state_dict()) == set(original.state_dict())
    # Original placeholder counts again (OV: ceil(7/2)^2 = 16 per frame + 1; NV: 3x3 after its
    # 2x2 average; LLaVA: 49 per image).
    video = _is_video(family)
    per_item = {"llava_onevision": FRAMES * 16 + 1, "llava_next_video": FRAMES * 9, "llava": 49}[
        family
    ]
    ids = torch.randint(1, VOCAB - 3, (2, per_item + 6))
    ids[:, 3 : 3 + per_item] = VIDEO if video else IMAGE
    pixels = (
        {"pixel_values_videos": torch.randn(2, FRAMES, 3, 28, 28)}
        if video
        else {"pixel_values": torch.randn(2, 3, 28, 28)}
    )
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, **pixels).logits, original(input_ids=ids, **pixels).logits
        )
    patch_llava(model, every=EVERY)  # and it can be patched again


def test_onevision_images_keep_their_path():
    """LLaVA-OneVision images are not pooled and give no memory: an image-only prompt gives the
    unpatched model's logits even with open gates."""
    torch.manual_seed(0)
    original = _build("llava_onevision")
    model = copy.deepcopy(original)
    patch_llava(model, every=EVERY)
    _set_gates(model)
    pixel_values = torch.randn(2, 2, 3, 28, 28)  # base crop + one anyres crop per image
    image_sizes = torch.tensor([[28, 28], [28, 28]])
    with torch.no_grad():
        feats = original.model.get_image_features(
            pixel_values, image_sizes, return_dict=True
        ).pooler_output
    per_image = feats[0].shape[0]
    ids = torch.randint(1, VOCAB - 3, (2, per_image + 7))
    ids[:, 2 : 2 + per_image] = IMAGE
    kwargs = dict(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes)
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, original(**kwargs).logits)


# ----------------------------------------------------------------------------------------------
# Options and errors
# ----------------------------------------------------------------------------------------------


def test_options():
    torch.manual_seed(0)
    model = _build("llava_next_video")
    patch_llava(
        model,
        layers=[0, -1],
        pooling=TokenPooling((GRID, GRID), "avg", kernel_size=2),
        v2v_scope="frame",
        share_kv=True,
        t2v=True,
    )
    patch = model.crosslmm_patch
    assert patch.layers == (0, 3) and patch.pooled_per_frame == 9
    assert patch.placeholders_per_item(4) == 36
    dcal = model.model.language_model.layers[3].dcal
    assert dcal.v2v_scope == "frame" and dcal.shares_kv
    assert dcal.vision_size == 24 and dcal.num_kv_heads == 2
    _set_gates(model)
    batch = _batch("llava_next_video")
    out = model.generate(**batch, **GEN)
    assert torch.isfinite(torch.stack(out.logits)[..., 1:IMAGE]).all()


def test_errors():
    torch.manual_seed(0)
    model = _build("llava")
    patch_llava(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_llava(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_llava(model.model)

    text_only = transformers.Qwen2ForCausalLM(_text("qwen2"))
    with pytest.raises(ValueError, match="supports .*got Qwen2ForCausalLM"):
        patch_llava(text_only)
    next_images = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(
            vision_config=_clip(),
            text_config=_text("llama"),
            image_token_index=IMAGE,
            image_grid_pinpoints=[[28, 28]],
        )
    )
    with pytest.raises(ValueError, match="got LlavaNextForConditionalGeneration"):
        patch_llava(next_images)

    fresh = lambda: _build("llava_onevision")  # noqa: E731
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        patch_llava(fresh(), every=0)
    with pytest.raises(ValueError, match="larger than the language model's 4 layers"):
        patch_llava(fresh(), every=5)
    with pytest.raises(ValueError, match="layers must index"):
        patch_llava(fresh(), layers=[4])
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['heads'\]"):
        patch_llava(fresh(), heads=2)
    with pytest.raises(ValueError, match="pooling.grid"):
        patch_llava(fresh(), pooling=TokenPooling((27, 27), "adaptive", output_size=3))
    with pytest.raises(ValueError, match="temporal_stride"):
        patch_llava(
            fresh(),
            pooling=TokenPooling((GRID, GRID), "adaptive", output_size=3, temporal_stride=2),
        )
    with pytest.raises(ValueError, match="pooled_grid|output_size"):
        patch_llava(fresh(), pooled_grid=0)
    nv = transformers.LlavaNextVideoForConditionalGeneration(
        transformers.LlavaNextVideoConfig(
            vision_config=_clip(), text_config=_text("llama"), spatial_pool_mode="conv"
        )
    )
    with pytest.raises(ValueError, match="conv"):
        patch_llava(nv)

    # A prompt written with the unpatched count says what to do.
    model = _build("llava_onevision")
    patch_llava(model)
    batch = _batch("llava_onevision", (1,))
    ids = batch["input_ids"]
    longer = torch.cat([ids[:, :4], torch.full((1, 5), VIDEO), ids[:, 4:]], 1)
    with pytest.raises(ValueError, match="patch_llava_processor"):
        model(input_ids=longer, pixel_values_videos=batch["pixel_values_videos"])


# ----------------------------------------------------------------------------------------------
# The processor's placeholder count
# ----------------------------------------------------------------------------------------------


def _processor(cls_name: str, **attrs):
    """A processor instance with just the attributes its token counting reads (the image and video
    processors need torchvision, which the CPU CI does not install)."""
    processor = object.__new__(getattr(transformers, cls_name))
    processor.__dict__.update(attrs)
    return processor


def test_processor_counts():
    videos = {"pixel_values_videos": torch.zeros(2, 5, 3, 28, 28)}

    ov = _processor(
        "LlavaOnevisionProcessor",
        video_token="<video>",
        image_token="<image>",
        num_image_tokens=GRID * GRID,
        vision_feature_select_strategy="full",
    )
    assert ov.replace_video_token(videos, 1) == "<video>" * (5 * 16 + 1)  # unpatched: 4x4 + 1
    model = _build("llava_onevision")
    patch_llava(model, pooled_grid=3)
    assert patch_llava_processor(ov, model) is ov
    assert ov.replace_video_token(videos, 1) == "<video>" * (5 * 9 + 1)
    counts = ov._get_num_multimodal_tokens(video_sizes=[(5, 28, 28), (2, 28, 28)])
    assert counts.num_video_tokens == [46, 19]
    copy.deepcopy(ov.__dict__)  # ProcessorMixin.to_dict deep-copies it
    with pytest.raises(ValueError, match="already patched"):
        patch_llava_processor(ov, model)

    # (The unpatched LLaVA-NeXT-Video / LLaVA counts read image sizes through PIL.)
    nv = _processor(
        "LlavaNextVideoProcessor",
        video_token="<video>",
        image_token="<image>",
        patch_size=4,
        vision_feature_select_strategy="default",
    )
    patch_llava_processor(nv, pooled_per_frame=4)
    assert (
        nv.replace_video_token({"pixel_values_videos": [torch.zeros(5, 3, 28, 28)]}, 0)
        == "<video>" * 20
    )
    assert nv._get_num_multimodal_tokens(video_sizes=[(3, 28, 28)]).num_video_tokens == [12]

    lv = _processor(
        "LlavaProcessor",
        image_token="<image>",
        patch_size=4,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    images = {"pixel_values": torch.zeros(1, 3, 28, 28)}
    llava = _build("llava")
    patch_llava(llava, pooled_grid=(2, 3))
    patch_llava_processor(lv, llava)
    assert lv.replace_image_token(images, 0) == "<image>" * 6
    assert llava.crosslmm_patch.placeholders_per_item() == 6

    with pytest.raises(ValueError, match="does not match"):
        patch_llava_processor(_processor("LlavaProcessor", image_token="<image>"), model)
    with pytest.raises(ValueError, match="not patched"):
        patch_llava_processor(_processor("LlavaProcessor", image_token="<image>"), _build("llava"))
    with pytest.raises(ValueError, match="exactly one"):
        patch_llava_processor(_processor("LlavaProcessor", image_token="<image>"))
    with pytest.raises(ValueError, match="supports"):
        patch_llava_processor(object())


@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate_device_hooks(family, tmp_path):
    """accelerate's hooks replace ``module.forward``; the patch (torch hooks) keeps working
    through them. The DCAL layers are offloaded to disk as ``device_map="auto"`` does it (one hook
    per decoder layer, weights on the meta device between calls)."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _build(family)
    # The projection-fused path reads k_proj/v_proj.weight without calling those modules, which
    # accelerate's per-module offload hooks need to load them; the materialised path calls them.
    patch_llava(model, every=EVERY, kv_path="materialized")
    _set_gates(model)
    batch = _batch(family)
    with torch.no_grad():
        expected = model(**batch).logits
    generated = model.generate(**batch, **GEN).sequences
    inner = model.model
    device_map = {
        f"model.{name}": "cpu" for name, _ in inner.named_children() if name != "language_model"
    }
    device_map.update({f"model.{name}": "cpu" for name, _ in inner.named_parameters(recurse=False)})
    device_map.update(
        {
            f"model.language_model.{name}": "cpu"
            for name, _ in inner.language_model.named_children()
            if name != "layers"
        }
    )
    device_map.update(
        {
            f"model.language_model.layers.{i}": "disk" if i in DCAL_LAYERS else "cpu"
            for i in range(len(inner.language_model.layers))
        }
    )
    device_map["lm_head"] = "cpu"
    accelerate.dispatch_model(
        model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path)
    )
    assert inner.language_model.layers[1].dcal.v2v.q_proj.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
    assert torch.equal(model.generate(**batch, **GEN).sequences, generated)


@pytest.mark.cuda
def test_patched_model_on_gpu_bf16():
    """The patched model on the GPU in bf16 (the CUDA / Triton kernels behind TokenPooling and the
    DCALs): gate 0 is still exactly the pooling-only model, and generate() agrees with forward."""
    torch.manual_seed(0)
    vision = _siglip()
    vision.hidden_size, vision.intermediate_size = 64, 128
    text = transformers.Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=PAD,
    )  # head_dim 64, as the kernels want
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[28, 28]],
    )
    base = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    base = base.to(device="cuda", dtype=torch.bfloat16)
    patched = copy.deepcopy(base)
    patch_llava(patched, every=EVERY)
    patch_llava(base, every=EVERY, dcal=False)
    batch = {k: v.cuda() for k, v in _batch("llava_onevision").items()}
    batch["pixel_values_videos"] = batch["pixel_values_videos"].bfloat16()
    with torch.no_grad():
        assert torch.equal(patched(**batch).logits, base(**batch).logits)
        _set_gates(patched)
        forward = patched(**batch).logits[:, -1].float()
    assert torch.isfinite(forward).all()
    out = patched.generate(**batch, **GEN)
    torch.testing.assert_close(out.logits[0].float(), forward, rtol=3e-2, atol=3e-2)


def test_vision_tower_compiled_gives_the_same_logits():
    """``crosslmm_patch.vision_compile``: the tower's chunks through torch.compile (a back end
    that records its graphs, so the compiled path provably ran): the eager logits, the compiled
    forward built once; a bad value is named."""
    family = "llava_onevision"
    patched, _ = _pair(family)
    _set_gates(patched)
    batch = _batch(family)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    patch = patched.crosslmm_patch
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = patched(**batch).logits
            patch.vision_chunk_frames = 2
            patch.vision_compile = {"backend": backend}
            compiled = patched(**batch).logits
            cache = patched.model.vision_tower.forward._compiled  # the patch's chunked forward
            built = cache.compiled
            again = patched(**batch).logits
        assert graphs and built is not None
        assert any("linear_gelu_tanh" in str(n.target) for g in graphs for n in g.graph.nodes)
        assert cache.compiled is built  # the second call reused the compiled forward
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
        patch.vision_compile = 1
        with pytest.raises(ValueError, match="vision_compile must be"):
            patched(**batch)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_in_chunks_gives_the_same_logits(family):
    patched, _ = _pair(family)
    _set_gates(patched)
    batch = _batch(family)
    calls = []
    layer = patched.model.vision_tower
    first = next(m for name, m in layer.named_modules() if name.endswith("layers.0"))
    handle = first.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        with torch.no_grad():
            whole = patched(**batch).logits
            patched.crosslmm_patch.vision_chunk_frames = 2
            chunked = patched(**batch).logits
    finally:
        handle.remove()
    frames = sum(3 if _is_video(family) else 1 for _ in range(3))  # 3 items of FRAMES frames
    frames = 3 * (FRAMES if _is_video(family) else 1)
    assert calls[0] == frames and max(calls[1:]) == 2 and sum(calls[1:]) == frames
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    patched.crosslmm_patch.vision_chunk_frames = 0
    with pytest.raises(ValueError, match="vision_chunk_frames must be"):
        patched(**batch)
