"""CrossLMMConfig and the presets (``crosslmm-2b``, ``crosslmm-7b``, ``crosslmm-tiny``).

A CrossLMM is a SigLIP vision tower, token pooling, a 2-layer GELU MLP projector and a Qwen2
decoder with a dual cross-attention layer (DCAL) after the self-attention of every K-th layer
(arXiv 2505.17020, DESIGN.md). The config holds the two sub-configs (transformers'
``SiglipVisionConfig`` and ``Qwen2Config``) and every CrossLMM choice as a flat field, so it
round-trips through ``config.json`` like any transformers config.

The config is written to work on transformers 5.17 .. 5.x: sub-configs are declared with the
``sub_configs`` mapping and converted from dicts here (5.23 also has ``sub_configs_defaults``,
which 5.17 lacks).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PreTrainedConfig, Qwen2Config, SiglipVisionConfig

from crosslmm_ops.ops.projected_attention import PATHS as KV_PATHS
from crosslmm_ops.ops.token_pool import MODES as POOL_MODES
from crosslmm_ops.ops.token_pool import PoolSpec

DCAL_KEYS = ("encoder", "projected")
V2V_SCOPES = ("global", "frame")
NORMS = ("rmsnorm", "layernorm", None)
# Text models whose decoder layers the DCAL wrapper is written for (crosslmm.py).
SUPPORTED_TEXT_MODELS = ("qwen2",)
SUPPORTED_VISION_MODELS = ("siglip_vision_model",)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Sub-config sizes that divide or shape tensors: a value of 0 or below would surface later as a
# ZeroDivisionError or a torch shape error that names no field, so the config refuses it.
_POSITIVE_INTS = {
    "vision_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
    ),
    "text_config": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "head_dim",
    ),
}
# Norm epsilons: 0 lets an all-zero row divide by zero, below 0 or NaN gives NaN.
_POSITIVE_FLOATS = {"vision_config": ("layer_norm_eps",), "text_config": ("rms_norm_eps",)}


def _is_positive_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _int_or_pair(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if _is_int(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        return list(value)  # a list, so that config.json round-trips to the same value
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


class CrossLMMConfig(PreTrainedConfig):
    r"""Configuration of :class:`~crosslmm_ops.models.CrossLMMForConditionalGeneration`.

    Sub-configs:

    * ``vision_config`` - a ``SiglipVisionConfig`` (dict accepted); its ``image_size //
      patch_size`` is the encoder's token grid (27x27 = 729 tokens for SigLIP so400m/14@384).
    * ``text_config`` - a ``Qwen2Config`` (dict accepted).

    Video input:

    * ``video_token_id`` - the placeholder token: each frame puts ``pooled_per_frame`` of them in
      ``input_ids`` (frame after frame), where the pooled, projected tokens go.
    * ``vision_feature_layer`` - None (default): the vision tower's ``last_hidden_state`` (after its
      final LayerNorm); an int ``i``: ``hidden_states[i]`` of the tower (LLaVA-OneVision takes -1,
      the last encoder layer before that LayerNorm).

    Pooling before the projector (:class:`crosslmm_ops.nn.TokenPooling`):

    * ``pool_mode`` - ``"adaptive"`` (default), ``"bilinear"``, ``"avg"`` or ``"max"``;
    * ``pooled_grid`` - the pooled grid of ``adaptive``/``bilinear`` (an int for a square grid or
      ``[h, w]``): 1, 3 (default: 3x3 = 9 tokens per frame), 4 (16 per frame) ...;
    * ``pool_kernel_size`` / ``pool_stride`` - the windows of ``avg``/``max`` (``pooled_grid`` is
      then ignored): ``pool_mode="avg", pool_kernel_size=3`` is 3x3 windows with stride 3, 81
      tokens per frame on a 27x27 grid.

    Projector: ``projector_hidden_act`` (``"gelu"``), ``projector_bias``.

    DCALs (:class:`crosslmm_ops.nn.DualCrossAttention`):

    * ``dcal_every`` - K: a DCAL after the self-attention of layers K-1, 2K-1, ... (0-based; the
      paper's K = 4); ``dcal_layers`` - an explicit list of layer indices instead (``[]``: no
      DCAL, the pooled-only baseline);
    * ``dcal_v2v`` / ``dcal_t2v`` - which branches exist; ``dcal_t2v_enabled`` - whether the T2V
      branch runs (training stage 1 turns it off, stage 2 on; see :func:`set_training_stage`);
    * ``dcal_v2v_scope`` - ``"global"`` (paper) or ``"frame"``;
    * ``dcal_share_kv``, ``dcal_share_gate``, ``dcal_vision_norm``, ``dcal_query_norm``,
      ``dcal_bias``, ``dcal_norm_eps``;
    * ``dcal_num_heads`` / ``dcal_num_kv_heads`` / ``dcal_head_dim`` - None: the text model's;
    * ``dcal_keys`` - ``"encoder"`` (default, paper): keys and values are projected from the raw
      encoder tokens (width ``vision_config.hidden_size``); ``"projected"``: from the tokens after
      the MLP projector (width ``text_config.hidden_size``; the projector then also runs on every
      unpooled token);
    * ``dcal_kv_path`` - how each DCAL meets its keys and values: ``"auto"`` (a cost model picks
      per call), ``"materialized"`` (K/V projected, then :func:`crosslmm_ops.cross_attention`) or
      ``"fused"`` (:func:`crosslmm_ops.projected_cross_attention`: the projections folded into the
      queries and output; no K/V formed);
    * ``dcal_cache_kv`` - on the materialised path, keep each DCAL layer's K/V (computed without
      gradients) in the memory and reuse them at every decode step: faster decoding for
      ``2 * Hk * d`` values per token per layer (the memory alone keeps ``Dv``);
    * ``dcal_backend`` - the :func:`crosslmm_ops.cross_attention` back end (None = auto).
    """

    model_type = "crosslmm"
    attribute_map = {"video_token_index": "video_token_id"}
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": Qwen2Config}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    video_token_id: int = 151647
    vision_feature_layer: int | None = None
    pool_mode: str = "adaptive"
    pooled_grid: int | list[int] = 3
    pool_kernel_size: int | list[int] | None = None
    pool_stride: int | list[int] | None = None
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    dcal_every: int = 4
    dcal_layers: list[int] | None = None
    dcal_v2v: bool = True
    dcal_t2v: bool = True
    dcal_t2v_enabled: bool = True
    dcal_v2v_scope: str = "global"
    dcal_share_kv: bool = False
    dcal_share_gate: bool = False
    dcal_vision_norm: str | None = "rmsnorm"
    dcal_query_norm: str | None = "rmsnorm"
    dcal_bias: bool = False
    dcal_norm_eps: float = 1e-6
    dcal_num_heads: int | None = None
    dcal_num_kv_heads: int | None = None
    dcal_head_dim: int | None = None
    dcal_keys: str = "encoder"
    dcal_kv_path: str = "auto"
    dcal_cache_kv: bool = False
    dcal_backend: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.vision_config = _sub_config(
            "vision_config", self.vision_config, SiglipVisionConfig, SUPPORTED_VISION_MODELS
        )
        self.text_config = _sub_config(
            "text_config", self.text_config, Qwen2Config, SUPPORTED_TEXT_MODELS
        )
        # As LlavaConfig: the text config says whether lm_head shares the embedding (Qwen2.5-1.5B
        # does, 7B does not); transformers reads it from the top-level config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        super().__post_init__(**kwargs)
        self.validate_crosslmm()

    # ------------------------------------------------------------------------------------------
    # Derived values
    # ------------------------------------------------------------------------------------------

    @property
    def encoder_grid(self) -> tuple[int, int]:
        """The vision encoder's token grid per frame, ``(image_size // patch_size,) * 2`` (a strided
        convolution makes the patches: 384 // 14 = 27)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    @property
    def tokens_per_frame(self) -> int:
        """``N``: encoder tokens per frame (729 for SigLIP so400m/14@384)."""
        h, w = self.encoder_grid
        return h * w

    def pool_kwargs(self) -> dict[str, Any]:
        """The :class:`crosslmm_ops.nn.TokenPooling` arguments this config describes."""
        kwargs: dict[str, Any] = {"grid": self.encoder_grid, "mode": self.pool_mode}
        if self.pool_mode in ("avg", "max"):
            kwargs["kernel_size"] = _pair_or_int(self.pool_kernel_size)
            kwargs["stride"] = _pair_or_int(self.pool_stride)
        else:
            kwargs["output_size"] = _pair_or_int(self.pooled_grid)
        return kwargs

    def pool_spec(self) -> PoolSpec:
        kw = self.pool_kwargs()
        return PoolSpec.make(kw.pop("grid"), kw.pop("mode"), **kw)

    @property
    def pooled_per_frame(self) -> int:
        """``n``: pooled tokens (placeholders in ``input_ids``) per frame."""
        return self.pool_spec().tokens_out

    @property
    def dcal_layer_indices(self) -> list[int]:
        """The (0-based) decoder layers followed by a DCAL, ascending."""
        if self.dcal_layers is not None:
            return sorted(self.dcal_layers)
        K = self.dcal_every
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % K == 0]

    @property
    def dcal_vision_size(self) -> int:
        """The width of the tokens the DCALs' keys and values are projected from."""
        if self.dcal_keys == "projected":
            return self.text_config.hidden_size
        return self.vision_config.hidden_size

    def dcal_kwargs(self) -> dict[str, Any]:
        """The :class:`crosslmm_ops.nn.DualCrossAttention` arguments of every DCAL."""
        text = self.text_config
        heads = self.dcal_num_heads if self.dcal_num_heads is not None else text.num_attention_heads
        if self.dcal_num_kv_heads is not None:
            kv_heads = self.dcal_num_kv_heads
        elif self.dcal_num_heads is None:
            kv_heads = getattr(text, "num_key_value_heads", None) or heads
        else:
            kv_heads = heads
        head_dim = self.dcal_head_dim
        if head_dim is None:
            head_dim = (
                getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            )
        return dict(
            hidden_size=text.hidden_size,
            vision_size=self.dcal_vision_size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            v2v=self.dcal_v2v,
            t2v=self.dcal_t2v,
            v2v_scope=self.dcal_v2v_scope,
            share_kv=self.dcal_share_kv,
            share_gate=self.dcal_share_gate,
            vision_norm=self.dcal_vision_norm,
            query_norm=self.dcal_query_norm,
            bias=self.dcal_bias,
            norm_eps=self.dcal_norm_eps,
            kv_path=self.dcal_kv_path,
            backend=self.dcal_backend,
        )

    # ------------------------------------------------------------------------------------------
    # Validation (a ValueError naming the field; runs on construction and on loading)
    # ------------------------------------------------------------------------------------------

    def validate_crosslmm(self) -> None:
        vision, text = self.vision_config, self.text_config
        # Sizes first: everything below divides by them (the encoder grid, the heads).
        for sub_name, fields in _POSITIVE_INTS.items():
            sub = getattr(self, sub_name)
            for field in fields:
                value = getattr(sub, field, None)
                if value is None and field == "head_dim":
                    continue  # None: hidden_size // num_attention_heads
                if not _is_int(value) or value < 1:
                    raise ValueError(f"{sub_name}.{field} must be an int >= 1, got {value!r}")
        for sub_name, fields in _POSITIVE_FLOATS.items():
            sub = getattr(self, sub_name)
            for field in fields:
                value = getattr(sub, field, None)
                if value is not None and not _is_positive_number(value):
                    raise ValueError(
                        f"{sub_name}.{field} must be a finite number > 0, got {value!r}"
                    )
        if not _is_positive_number(self.dcal_norm_eps):
            raise ValueError(
                f"dcal_norm_eps must be a finite number > 0, got {self.dcal_norm_eps!r}"
            )
        # SigLIP's attention splits hidden_size into heads; Qwen2's GQA groups query heads.
        if vision.hidden_size % vision.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({vision.hidden_size}) must be a "
                f"multiple of vision_config.num_attention_heads "
                f"({vision.num_attention_heads})"
            )
        if text.num_attention_heads % text.num_key_value_heads:
            raise ValueError(
                f"text_config.num_attention_heads ({text.num_attention_heads}) must "
                f"be a multiple of text_config.num_key_value_heads "
                f"({text.num_key_value_heads})"
            )
        # SigLIP's patch embedding is a strided convolution: the grid is floor(image / patch)
        # (384 px / 14 px = 27).
        if vision.image_size < vision.patch_size:
            raise ValueError(
                f"vision_config.image_size ({vision.image_size}) is smaller than "
                f"vision_config.patch_size ({vision.patch_size})"
            )
        if not _is_int(self.video_token_id) or not 0 <= self.video_token_id < text.vocab_size:
            raise ValueError(
                f"video_token_id must be a token id in [0, text_config.vocab_size = "
                f"{text.vocab_size}), got {self.video_token_id!r}"
            )
        if self.vision_feature_layer is not None:
            layers = vision.num_hidden_layers
            if (
                not _is_int(self.vision_feature_layer)
                or not -(layers + 1) <= self.vision_feature_layer <= layers
            ):
                raise ValueError(
                    f"vision_feature_layer must be None or an index into the "
                    f"{layers + 1} hidden states of the vision tower, got "
                    f"{self.vision_feature_layer!r}"
                )
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {self.pool_mode!r}")
        self.pooled_grid = _int_or_pair("pooled_grid", self.pooled_grid)
        self.pool_kernel_size = _int_or_pair(
            "pool_kernel_size", self.pool_kernel_size, allow_none=True
        )
        self.pool_stride = _int_or_pair("pool_stride", self.pool_stride, allow_none=True)
        if self.pool_mode in ("avg", "max") and self.pool_kernel_size is None:
            raise ValueError(
                f"pool_mode={self.pool_mode!r} needs pool_kernel_size (e.g. 3 for the "
                "paper's 3x3 windows)"
            )
        grid = self.encoder_grid
        for name in ("pooled_grid", "pool_kernel_size", "pool_stride"):
            value = getattr(self, name)
            if value is not None and min(value if isinstance(value, list) else [value]) < 1:
                raise ValueError(
                    f"{name} must be >= 1, got {value!r}: the pooling does not fit "
                    f"the encoder grid {list(grid)}"
                )
        try:
            spec = self.pool_spec()
        except ValueError as exc:
            raise ValueError(
                f"the pooling does not fit the encoder grid {self.encoder_grid}: {exc}"
            ) from exc
        if spec.output_size[0] > grid[0] or spec.output_size[1] > grid[1]:
            raise ValueError(
                f"pooled_grid {list(spec.output_size)} is larger than the encoder "
                f"grid {list(grid)}: pooling must reduce the tokens"
            )
        for name in (
            "dcal_v2v",
            "dcal_t2v",
            "dcal_t2v_enabled",
            "dcal_share_kv",
            "dcal_share_gate",
            "dcal_bias",
            "dcal_cache_kv",
            "projector_bias",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (self.dcal_v2v or self.dcal_t2v):
            raise ValueError(
                "dcal_v2v and dcal_t2v are both False: a DCAL needs at least one "
                "branch (use dcal_layers=[] for a model without DCALs)"
            )
        if not _is_int(self.dcal_every) or self.dcal_every < 1:
            raise ValueError(f"dcal_every must be an int >= 1, got {self.dcal_every!r}")
        L = text.num_hidden_layers
        if self.dcal_layers is not None:
            if not isinstance(self.dcal_layers, (list, tuple)) or not all(
                _is_int(i) for i in self.dcal_layers
            ):
                raise ValueError(
                    f"dcal_layers must be a list of layer indices, got {self.dcal_layers!r}"
                )
            self.dcal_layers = list(self.dcal_layers)
            bad = [i for i in self.dcal_layers if not 0 <= i < L]
            if bad or len(set(self.dcal_layers)) != len(self.dcal_layers):
                raise ValueError(
                    f"dcal_layers must be distinct indices in [0, {L}) "
                    f"(text_config.num_hidden_layers), got {self.dcal_layers}"
                )
        elif self.dcal_every > L:
            raise ValueError(
                f"dcal_every={self.dcal_every} puts no DCAL in a {L}-layer decoder; "
                "use dcal_layers=[] for a model without DCALs"
            )
        if self.dcal_v2v_scope not in V2V_SCOPES:
            raise ValueError(
                f"dcal_v2v_scope must be one of {V2V_SCOPES}, got {self.dcal_v2v_scope!r}"
            )
        for name in ("dcal_vision_norm", "dcal_query_norm"):
            if getattr(self, name) not in NORMS:
                raise ValueError(f"{name} must be one of {NORMS}, got {getattr(self, name)!r}")
        if self.dcal_kv_path not in KV_PATHS:
            raise ValueError(f"dcal_kv_path must be one of {KV_PATHS}, got {self.dcal_kv_path!r}")
        if self.dcal_keys not in DCAL_KEYS:
            raise ValueError(f"dcal_keys must be one of {DCAL_KEYS}, got {self.dcal_keys!r}")
        for name in ("dcal_num_heads", "dcal_num_kv_heads", "dcal_head_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        kw = self.dcal_kwargs()
        if kw["num_heads"] % kw["num_kv_heads"] != 0:
            raise ValueError(
                f"the DCALs' query heads ({kw['num_heads']}) must be a multiple of "
                f"their key/value heads ({kw['num_kv_heads']})"
            )
        if self.dcal_backend is not None and self.dcal_backend not in (
            "auto",
            "cuda",
            "triton",
            "torch",
        ):
            raise ValueError(
                f"dcal_backend must be None, 'auto', 'cuda', 'triton' or 'torch', got "
                f"{self.dcal_backend!r}"
            )

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CrossLMMConfig":
        """The config of preset ``name`` (:data:`PRESETS`), top-level fields overridden by
        ``overrides``; ``vision_config`` / ``text_config`` given as dicts update the preset's."""
        return preset_config(name, **overrides)


def _pair_or_int(value):
    return tuple(value) if isinstance(value, list) else value


def _sub_config(name: str, value, default_cls, supported: tuple[str, ...]) -> PreTrainedConfig:
    """``value`` (a config, a dict with or without ``model_type``, or None) as a config object."""
    from transformers import AutoConfig

    if value is None:
        return default_cls()
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_cls.model_type)
        if model_type not in supported:
            raise ValueError(
                f"{name} must be a {' or '.join(supported)} config, got model_type {model_type!r}"
            )
        try:
            return AutoConfig.for_model(model_type, **value)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub's validation errors are not
            # ValueErrors, and transformers' checks do not say which sub-config they ran on.
            raise ValueError(f"{name}: {exc}") from exc
    if not isinstance(value, PreTrainedConfig):
        raise ValueError(f"{name} must be a config or a dict, got {type(value).__name__}")
    if value.model_type not in supported:
        raise ValueError(
            f"{name} must be a {' or '.join(supported)} config, got model_type {value.model_type!r}"
        )
    return value


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

# SigLIP so400m/14@384 (google/siglip-so400m-patch14-384): 27x27 = 729 tokens of 1152, 27 layers.
# The attention-pooling head is not used by a CrossLMM, so it is not built.
_SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=False,
)

# Qwen2.5-1.5B: 28 layers, hidden 1536, 12 heads of 128, 2 KV heads, intermediate 8960, tied
# embeddings. Qwen2.5-7B: hidden 3584, 28 heads, 4 KV heads, intermediate 18944.
_QWEN25_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)
_QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's 2B: SigLIP so400m + Qwen2.5-1.5B. 151647 is <|video_pad|>-style id space of
    # LLaVA-OneVision-Qwen2 (any id below the vocab size works for random weights).
    "crosslmm-2b": dict(
        vision_config=_SIGLIP_SO400M, text_config=_QWEN25_1_5B, video_token_id=151647
    ),
    "crosslmm-7b": dict(
        vision_config=_SIGLIP_SO400M, text_config=_QWEN25_7B, video_token_id=151647
    ),
    # For tests: a 6x6 token grid (24 px frames, 4 px patches) pooled to 3x3, a 4-layer decoder
    # with GQA (4 query heads, 2 KV heads of 16) and a DCAL after layers 1 and 3.
    "crosslmm-tiny": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=24,
            patch_size=4,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        text_config=dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        video_token_id=95,
        dcal_every=2,
    ),
}


def preset_config(name: str, **overrides) -> CrossLMMConfig:
    """The :class:`CrossLMMConfig` of a preset: ``"crosslmm-2b"``, ``"crosslmm-7b"`` (the paper's
    shapes, for random-initialised benchmarks: no weights are downloaded) or ``"crosslmm-tiny"``
    (tests). ``overrides`` replace top-level fields; a dict ``vision_config`` / ``text_config``
    updates the preset's sub-config field by field."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    fields = copy.deepcopy(PRESETS[name])
    for key in ("vision_config", "text_config"):
        if isinstance(overrides.get(key), dict):
            fields[key].update(overrides.pop(key))
    fields.update(overrides)
    return CrossLMMConfig(**fields)
