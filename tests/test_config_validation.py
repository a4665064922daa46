"""CrossLMMConfig refuses sizes of 0 or below (and non-positive epsilons) with a ValueError that
names the field and what it expects, at construction, instead of a ZeroDivisionError or a torch
shape error when the model is built."""

import math

import pytest
from transformers import Qwen2Config

from crosslmm_ops.models import CrossLMMConfig
from crosslmm_ops.models.configuration import PRESETS, preset_config

VISION_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
)
TEXT_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
)


def _tiny(**overrides):
    return preset_config("crosslmm-tiny", **overrides)


@pytest.mark.parametrize("value", [0, -3])
@pytest.mark.parametrize("field", VISION_SIZES)
def test_vision_sizes_must_be_positive(field, value):
    with pytest.raises(
        ValueError, match=rf"vision_config\.{field} must be an int >= 1, got {value}"
    ):
        _tiny(vision_config={field: value})


@pytest.mark.parametrize("value", [0, -3])
@pytest.mark.parametrize("field", TEXT_SIZES)
def test_text_sizes_must_be_positive(field, value):
    # num_hidden_layers < 0 is refused by transformers' own layer-type check first; the message
    # must still say which sub-config and which field.
    with pytest.raises(
        ValueError,
        match=rf"(?s)text_config(\.{field} must be an int >= 1, got {value}"
        rf"|: .*{field})",
    ):
        _tiny(text_config={field: value})


def test_sub_config_objects_are_checked_too():
    text = Qwen2Config(**{**PRESETS["crosslmm-tiny"]["text_config"], "num_key_value_heads": 2})
    text.num_key_value_heads = 0
    with pytest.raises(ValueError, match=r"text_config\.num_key_value_heads must be an int >= 1"):
        _tiny(text_config=text)


@pytest.mark.parametrize("field", ["pooled_grid", "pool_kernel_size", "pool_stride"])
@pytest.mark.parametrize("value", [0, -1, [0, 3], [3, -2]])
def test_pooling_sizes_must_be_positive(field, value):
    kw = {field: value}
    if field != "pooled_grid":
        kw = {"pool_mode": "avg", "pool_kernel_size": 3, **kw}
    with pytest.raises(ValueError, match=rf"{field} must be >= 1, got .*does not fit the encoder"):
        _tiny(**kw)


@pytest.mark.parametrize("value", [0.0, -1e-6, math.nan, math.inf])
@pytest.mark.parametrize(
    "field", ["dcal_norm_eps", "vision_config.layer_norm_eps", "text_config.rms_norm_eps"]
)
def test_norm_eps_must_be_finite_and_positive(field, value):
    if "." in field:
        sub, name = field.split(".")
        kw = {sub: {name: value}}
    else:
        kw = {field: value}
    with pytest.raises(ValueError, match=rf"{field} must be a finite number > 0"):
        _tiny(**kw)


@pytest.mark.parametrize(
    "field", ["dcal_every", "dcal_num_heads", "dcal_num_kv_heads", "dcal_head_dim"]
)
@pytest.mark.parametrize("value", [0, -2])
def test_dcal_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .*int >= 1, got {value}"):
        _tiny(**{field: value})


def test_head_groupings_are_checked():
    with pytest.raises(
        ValueError,
        match=r"vision_config\.hidden_size \(32\) must be a multiple of "
        r"vision_config\.num_attention_heads \(3\)",
    ):
        _tiny(vision_config={"num_attention_heads": 3})
    with pytest.raises(
        ValueError,
        match=r"text_config\.num_attention_heads \(4\) must be a "
        r"multiple of text_config\.num_key_value_heads \(3\)",
    ):
        _tiny(text_config={"num_key_value_heads": 3})


def test_valid_presets_still_load_and_round_trip():
    for name in PRESETS:
        config = preset_config(name)
        again = CrossLMMConfig.from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict()


def test_a_loaded_config_is_validated(tmp_path):
    config = _tiny()
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"patch_size": 4', '"patch_size": 0'))
    with pytest.raises(ValueError, match=r"vision_config\.patch_size must be an int >= 1, got 0"):
        CrossLMMConfig.from_pretrained(tmp_path)
