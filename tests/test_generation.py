"""Generation that stays correct, for the reference model and all three patched LLaVA families,
with the DCAL gates open (random non-zero gates: a DCAL that did not run changes the output).

* greedy and beam ``generate()`` with the cache equal ``generate(use_cache=False)``, which
  recomputes the whole sequence, pixels included, at every step (logits compared step by step);
* every DCAL runs once in the prefill and once per decode step, and changes its input there;
* a step that needs the memory and cannot find it raises, as does a forward in which a DCAL
  layer did not run;
* a patched model saved with ``save_pretrained`` comes back from ``load_patched`` with equal
  logits; a processor's placeholder count survives ``save_pretrained`` / ``load_patched_processor``.

CI runs this file against the oldest and the newest supported transformers release.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import test_models as ref  # noqa: E402
import test_patch_llava as llava  # noqa: E402

from crosslmm_ops.models import (  # noqa: E402
    CrossLMMCache,
    DCALSkippedError,
    cache_vision_memory,
    find_cache,
    load_patched,
    load_patched_processor,
    patch_llava_processor,
)
from crosslmm_ops.models.decoder import _LAYER_KWARG, cache_argument  # noqa: E402

CASES = ("reference",) + llava.FAMILIES
NEW_TOKENS = 4


def _case(case: str, items=(1, 0, 2)):
    """(model with random open gates, prompt inputs incl. the video, the DCALs {layer: module},
    generate() options)."""
    if case == "reference":
        model = ref._model(gates="random")
        batch = ref._batch(model.config, frames=(3, 1), T=3, pad="left")
        inputs = dict(input_ids=batch["input_ids"], **ref._video_kwargs(batch))
        return model, inputs, model.dcals, dict(do_sample=False)
    model, _ = llava._pair(case)
    llava._set_gates(model)
    inputs = llava._batch(case, items)
    return (
        model,
        inputs,
        model.crosslmm_patch.dcals,
        dict(do_sample=False, suppress_tokens=[llava.IMAGE, llava.VIDEO, llava.PAD]),
    )


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_equals_recomputing_every_step(case):
    model, inputs, _, opts = _case(case)
    kw = dict(opts, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **kw)
    recomputed = model.generate(**inputs, **kw, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert len(cached.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(cached.logits, recomputed.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    cache = find_cache(cached)
    assert isinstance(cache, CrossLMMCache)
    assert cache_vision_memory(cache) is not None


@pytest.mark.parametrize("case", CASES)
def test_beam_search_equals_recomputing_every_step(case):
    # One video per sample: transformers 5.17-5.18 expand a sample's several images per image,
    # which breaks unpatched models the same way (see test_patch_llava).
    model, inputs, _, opts = _case(case, items=(1, 1))
    kw = dict(
        opts,
        max_new_tokens=NEW_TOKENS,
        num_beams=2,
        num_return_sequences=2,
        return_dict_in_generate=True,
    )
    cached = model.generate(**inputs, **kw)
    recomputed = model.generate(**inputs, **kw, use_cache=False)
    rows = inputs["input_ids"].shape[0] * 2
    assert cached.sequences.shape[0] == rows
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert cache_vision_memory(find_cache(cached)).batch_size == rows


@pytest.mark.parametrize("case", ("reference", "llava_onevision"))
def test_sampling_with_several_sequences_per_prompt_equals_recomputing(case):
    """Sampling with num_return_sequences expands the batch before the prefill."""
    model, inputs, _, opts = _case(case)
    kw = dict(opts, do_sample=True, top_k=4, max_new_tokens=NEW_TOKENS, num_return_sequences=2)
    torch.manual_seed(0)
    cached = model.generate(**inputs, **kw)
    torch.manual_seed(0)
    recomputed = model.generate(**inputs, **kw, use_cache=False)
    assert cached.shape[0] == 2 * inputs["input_ids"].shape[0]
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("case", ("reference", "llava_onevision"))
def test_prompt_lookup_decoding_equals_greedy(case):
    """Assisted decoding (prompt lookup: several candidate tokens per forward, the cache cropped
    back on rejection) keeps the memory and gives greedy's tokens."""
    model, inputs, _, opts = _case(case, items=(1,))
    if case == "reference":  # one sample: assisted decoding takes batch size 1
        batch = ref._batch(model.config, frames=(2,), T=2)
        inputs = dict(input_ids=batch["input_ids"], **ref._video_kwargs(batch))
    kw = dict(opts, max_new_tokens=6)
    greedy = model.generate(**inputs, **kw)
    assisted = model.generate(**inputs, **kw, prompt_lookup_num_tokens=2)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("case", CASES)
def test_static_cache_generates_as_the_dynamic_one(case):
    """generate(cache_implementation="static"): the static cache carries the memory the same
    way (its class becomes a VisionMemoryCache) and the tokens and logits are the dynamic
    cache's."""
    from crosslmm_ops.models.decoder import VisionMemoryCache

    model, inputs, _, opts = _case(case)
    kw = dict(opts, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(**inputs, **kw)
    static = model.generate(**inputs, **kw, cache_implementation="static")
    cache = find_cache(static)
    assert isinstance(cache, VisionMemoryCache) and cache_vision_memory(cache) is not None
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_every_dcal_runs_in_every_decode_step(case):
    model, inputs, dcals, opts = _case(case)
    calls = []

    def record(index):
        def hook(module, args, output):
            calls.append((index, args[0].shape[1], not torch.equal(output, args[0])))

        return hook

    handles = [dcal.register_forward_hook(record(i)) for i, dcal in dcals.items()]
    try:
        out = model.generate(
            **inputs, **opts, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True
        )
    finally:
        for handle in handles:
            handle.remove()
    prompt = inputs["input_ids"].shape[1]
    layers = sorted(dcals)
    # The prefill, then one forward of one new position per decode step; each DCAL changes
    # what it is given (open gates, T2V at the new token).
    expected = [(i, prompt, True) for i in layers]
    expected += [(i, 1, True) for _ in range(NEW_TOKENS - 1) for i in layers]
    assert calls == expected
    assert out.sequences.shape[1] == prompt + NEW_TOKENS


def _prefill(model, inputs):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = find_cache(out)
    assert cache is not None
    step = dict(input_ids=torch.full((inputs["input_ids"].shape[0], 1), 5))
    mask = inputs.get("attention_mask")
    if mask is not None:
        step["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return cache, step


@pytest.mark.parametrize("case", CASES)
def test_a_decode_step_without_the_memory_raises(case):
    model, inputs, _, _ = _case(case)
    cache, step = _prefill(model, inputs)
    with torch.no_grad():
        model(**step, **cache_argument(cache))  # with its record: fine
        del cache.__dict__["vision_memory"]  # a cache that lost its record
        with pytest.raises(DCALSkippedError, match="holds no CrossLMM vision record"):
            model(**step, **cache_argument(cache))


@pytest.mark.parametrize("case", ("reference", "llava_onevision"))
def test_a_dcal_layer_that_did_not_run_raises(case):
    """A decoder that stopped handing its keyword arguments to a layer's attention (what a
    transformers release could change) is caught after the forward."""
    model, inputs, dcals, _ = _case(case)
    layer = find_layers(model)[max(dcals)]

    def drop(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop(_LAYER_KWARG, None)
        return args, kwargs

    handle = layer.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(DCALSkippedError, match=f"layers \\[{max(dcals)}\\]"):
            model(**inputs)
    finally:
        handle.remove()


def find_layers(model):
    inner = model.model
    return inner.language_model.layers


def test_text_only_prompt_then_decode_runs_no_dcal():
    model, inputs, dcals, _ = _case("llava_onevision", items=(0, 0, 0))
    inputs.pop("pixel_values_videos")
    calls = []
    handles = [d.register_forward_hook(lambda *a: calls.append(1)) for d in dcals.values()]
    try:
        cache, step = _prefill(model, inputs)
        with torch.no_grad():
            model(**step, **cache_argument(cache))
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and cache_vision_memory(cache) is None


# ----------------------------------------------------------------------------------------------
# Save and reload
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", llava.FAMILIES)
def test_save_and_load_patched_gives_equal_logits(family, tmp_path):
    model, inputs, _, _ = _case(family)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["crosslmm_patch"]["layers"] == list(llava.DCAL_LAYERS)
    loaded = load_patched(tmp_path).eval()
    patch = loaded.crosslmm_patch
    assert patch.layers == llava.DCAL_LAYERS and patch.family == family
    assert patch.pooled_per_frame == llava.POOLED
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert torch.equal(sd[key], sd2[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    # And it generates as the original does.
    opts = dict(
        do_sample=False, max_new_tokens=3, suppress_tokens=[llava.IMAGE, llava.VIDEO, llava.PAD]
    )
    assert torch.equal(loaded.generate(**inputs, **opts), model.generate(**inputs, **opts))


def test_load_patched_refuses_an_unpatched_checkpoint(tmp_path):
    model = llava._build("llava")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not saved from a patched model"):
        load_patched(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_patched(tmp_path / "missing")


def test_remove_forgets_the_saved_record():
    model, _, _, _ = _case("llava")
    assert "crosslmm_patch" in model.config.to_dict()
    model.crosslmm_patch.remove()
    assert "crosslmm_patch" not in model.config.to_dict()


def _tiny_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<unk>": 1, "<image>": 2, "<video>": 3, "a": 4, "b": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return fast


def test_processor_placeholder_count_survives_save_and_load(tmp_path):
    pytest.importorskip("PIL")  # CLIPImageProcessor's slow path
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_tiny_tokenizer(tmp_path),
        patch_size=4,
        vision_feature_select_strategy="full",
        image_token="<image>",
    )
    patch_llava_processor(processor, pooled_per_frame=6)
    processor.save_pretrained(tmp_path)
    loaded = load_patched_processor(tmp_path)
    assert loaded.crosslmm_pooled_per_frame == 6
    images = {"pixel_values": torch.zeros(1, 3, 28, 28)}
    assert loaded.replace_image_token(images, 0) == "<image>" * 6
    with pytest.raises(ValueError, match="not saved from a patched processor"):
        plain = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=_tiny_tokenizer(tmp_path),
            patch_size=4,
            image_token="<image>",
        )
        plain.save_pretrained(tmp_path / "plain")
        load_patched_processor(tmp_path / "plain")


# ----------------------------------------------------------------------------------------------
# Training with adapters (PEFT)
# ----------------------------------------------------------------------------------------------


def _training_batch(family):
    batch = llava._batch(family)
    batch["labels"] = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    return batch


def test_lora_on_every_q_v_proj_warns_that_the_dcal_adapters_get_no_gradient():
    peft = pytest.importorskip("peft")
    model, _ = llava._pair("llava_onevision")  # gates at 0, as after patching
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert any(".dcal." in name and "lora_" in name for name, _ in lora.named_parameters())
    lora.train()
    with pytest.warns(UserWarning, match="frozen at 0"):
        lora(**_training_batch("llava_onevision")).loss.backward()


def test_lora_outside_the_dcals_trains_the_dcals_and_their_gates():
    """The documented recipe: adapters on the LLM's own projections only, the DCALs (weights and
    gates) trained as full modules."""
    peft = pytest.importorskip("peft")
    from crosslmm_ops import lora_target_modules

    model, _ = llava._pair("llava_onevision")
    config = peft.LoraConfig(
        r=2, target_modules=lora_target_modules(["q_proj", "v_proj"]), modules_to_save=["dcal"]
    )
    lora = peft.get_peft_model(model, config)
    names = [name for name, _ in lora.named_parameters()]
    assert not any(".dcal." in n and "lora_" in n for n in names)
    assert any("self_attn.q_proj.lora_B" in n for n in names)
    lora.train()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no frozen-gate warning
        lora(**_training_batch("llava_onevision")).loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    gates = [n for n in grads if n.endswith("gate.alpha")]
    assert len(gates) == 2 * len(llava.DCAL_LAYERS)  # V2V and T2V of each DCAL
    for name in gates + [n for n in grads if "lora_B" in n]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("names", [[], "q_proj", ["q_proj", "v proj"], [3]])
def test_lora_target_modules_refuses_bad_names(names):
    from crosslmm_ops import lora_target_modules

    with pytest.raises(ValueError, match="names must be"):
        lora_target_modules(names)


def test_fused_path_with_an_adapter_on_the_dcal_says_what_to_do():
    peft = pytest.importorskip("peft")
    model, _ = llava._pair("llava_onevision")
    llava._set_gates(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"]))
    for dcal in model.crosslmm_patch.dcals.values():
        dcal.kv_path = "fused"
    with torch.no_grad(), pytest.raises(ValueError, match="merge_and_unload"):
        lora(**llava._batch("llava_onevision"))


# ----------------------------------------------------------------------------------------------
# On the GPU
# ----------------------------------------------------------------------------------------------


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
def test_generate_on_cuda_equals_recomputing_every_step(case):
    """The DCALs on the GPU back ends (float32 inputs: the Triton or CUDA attention): greedy
    generation with the cache equals recomputing the whole sequence at every step."""
    import crosslmm_ops

    model, inputs, _, opts = _case(case)
    kw = dict(opts, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, **kw)  # the same model on the CPU (torch back end)
    model, inputs = model.cuda(), _to(inputs, "cuda")
    with crosslmm_ops.record_backends() as log:
        cached = model.generate(**inputs, **kw)
    assert {b for op, b in log if op in ref.ATTENTION_OPS} <= {"cuda", "triton"}
    assert any(op in ref.ATTENTION_OPS for op, _ in log)
    recomputed = model.generate(**inputs, **kw, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, recomputed.logits)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"step {step}")
    assert torch.equal(cached.sequences.cpu(), expected.sequences)
    torch.testing.assert_close(cached.logits[0].cpu(), expected.logits[0], rtol=1e-3, atol=1e-3)
