"""``crosslmm_ops.models``: a reference CrossLMM built from transformers' parts.

* :class:`CrossLMMConfig`, :data:`PRESETS` / :func:`preset_config` (``crosslmm-2b``,
  ``crosslmm-7b``: the paper's shapes, random weights; ``crosslmm-tiny`` for tests);
* :class:`CrossLMMForConditionalGeneration` (+ :class:`CrossLMMModel`): SigLIP -> token pooling ->
  2-layer GELU projector -> Qwen2 with a DCAL after the self-attention of every K-th layer;
  training forward with ``labels``, ``generate()`` whose cache (:class:`CrossLMMCache`) keeps the
  original vision tokens once for every DCAL; ``save_pretrained`` / ``from_pretrained``
  (safetensors);
* :func:`set_training_stage`: the paper's two training stages;
* :func:`generate_with_cuda_graph` / :class:`GraphDecoder`: greedy decoding with the decode step
  captured in a CUDA graph (reference and patched models; ``generate(..., cuda_graph=True)`` on
  the reference model).
"""

from crosslmm_ops.models.configuration import PRESETS, CrossLMMConfig, preset_config
from crosslmm_ops.models.crosslmm import (
    CrossLMMForConditionalGeneration,
    CrossLMMModel,
    CrossLMMPreTrainedModel,
    CrossLMMTextModel,
    set_training_stage,
)
from crosslmm_ops.models.decoder import (
    CrossLMMCache,
    DCALSkippedError,
    cache_vision_memory,
    find_cache,
)
from crosslmm_ops.models.frame_sharded import FrameShardedCrossLMM
from crosslmm_ops.models.graph_decode import GraphDecoder, generate_with_cuda_graph
from crosslmm_ops.models.patching import (  # noqa: E402
    CrossLMMPatch,
    fix_processor_token_count,
    load_patched,
    load_patched_processor,
    lora_target_modules,
    patch_llava,
    patch_llava_processor,
)


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` load a saved CrossLMM
    once this package is imported."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    AutoConfig.register(CrossLMMConfig.model_type, CrossLMMConfig, exist_ok=True)
    AutoModel.register(CrossLMMConfig, CrossLMMModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        CrossLMMConfig, CrossLMMForConditionalGeneration, exist_ok=True
    )


_register_auto_classes()

__all__ = [
    "PRESETS",
    "CrossLMMCache",
    "CrossLMMConfig",
    "CrossLMMForConditionalGeneration",
    "CrossLMMModel",
    "CrossLMMPatch",
    "CrossLMMPreTrainedModel",
    "CrossLMMTextModel",
    "DCALSkippedError",
    "FrameShardedCrossLMM",
    "GraphDecoder",
    "cache_vision_memory",
    "find_cache",
    "fix_processor_token_count",
    "generate_with_cuda_graph",
    "load_patched",
    "load_patched_processor",
    "lora_target_modules",
    "patch_llava",
    "patch_llava_processor",
    "preset_config",
    "set_training_stage",
]
