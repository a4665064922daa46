"""crosslmm-ops: CUDA and Triton kernels for CrossLMM video-token compression (arXiv 2505.17020).

Ops (each on the ``cuda``, ``triton`` and ``torch`` back ends, differentiable, registered as
``torch.library`` custom ops under ``crosslmm::``):

* :func:`token_pool` - per-frame pooling of token-major ``[..., T, N, D]`` vision tokens.
* :func:`cross_attention` - non-causal attention with flash-attn's layouts (batched or varlen
  segments), GQA, the LSE, split-KV and DCAL's gated residual; :func:`merge_attention_states`,
  :func:`attention_weights`, and flash-attn drop-ins :func:`flash_attn_func`,
  :func:`flash_attn_varlen_func`.
* :func:`projected_cross_attention` - the same result as projecting vision tokens into K/V and
  calling :func:`cross_attention`, computed over the raw tokens without materialising K or V
  when a cost model says it is cheaper (frame-local V2V, decoding); :func:`normalize_tokens`.

Modules (:mod:`crosslmm_ops.nn`, plain ``nn.Linear`` weights): :class:`DualCrossAttention` (one
DCAL: V2V and T2V behind tanh gates initialised to 0), :class:`V2VCrossAttention`,
:class:`T2VCrossAttention`, :class:`CrossAttention`, :class:`TokenPooling`, :class:`VisionMemory`
(the original vision tokens every DCAL attends to). The reference model and ``patch_llava`` live
in :mod:`crosslmm_ops.models`.

How a call runs (back end, projected path, CUDA kernel) is decided by :mod:`crosslmm_ops.planner`:
:func:`explain` says what a call would run and why, :func:`last_backend` / :func:`last_path` /
:func:`last_kernel` / :func:`record_backends` what ran.
"""

__version__ = "0.1.0"

from crosslmm_ops.flash_attn_compat import (  # noqa: E402
    flash_attn_func,
    flash_attn_varlen_func,
)
from crosslmm_ops.nn import (  # noqa: E402
    CrossAttention,
    DualCrossAttention,
    T2VCrossAttention,
    TanhGate,
    TokenPooling,
    V2VCrossAttention,
    VisionMemory,
)
from crosslmm_ops.ops.cross_attention import (  # noqa: E402
    attention_weights,
    cross_attention,
    cross_attention_reference,
    merge_attention_states,
)
from crosslmm_ops.ops.projected_attention import (  # noqa: E402
    normalize_tokens,
    projected_cross_attention,
    projected_cross_attention_reference,
)
from crosslmm_ops.ops.token_pool import (  # noqa: E402
    PoolSpec,
    pooled_grid,
    token_pool,
    token_pool_reference,
)
from crosslmm_ops.planner import (  # noqa: E402
    BACKENDS,
    Plan,
    explain,
    last_backend,
    last_kernel,
    last_path,
    record_backends,
)

# The reference model and patch_llava need transformers: imported on first use, so that
# `import crosslmm_ops` stays light.
_MODEL_EXPORTS = (
    "CrossLMMConfig",
    "CrossLMMForConditionalGeneration",
    "load_patched",
    "load_patched_processor",
    "lora_target_modules",
    "patch_llava",
    "patch_llava_processor",
)


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from crosslmm_ops import models

        return getattr(models, name)
    if name == "distributed":  # frame-sharded attention and training (torch.distributed)
        import importlib

        return importlib.import_module("crosslmm_ops.distributed")
    raise AttributeError(f"module 'crosslmm_ops' has no attribute {name!r}")


__all__ = [
    *_MODEL_EXPORTS,
    "BACKENDS",
    "CrossAttention",
    "DualCrossAttention",
    "T2VCrossAttention",
    "TanhGate",
    "TokenPooling",
    "V2VCrossAttention",
    "VisionMemory",
    "Plan",
    "PoolSpec",
    "attention_weights",
    "cross_attention",
    "cross_attention_reference",
    "explain",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "last_backend",
    "last_kernel",
    "last_path",
    "merge_attention_states",
    "normalize_tokens",
    "projected_cross_attention",
    "projected_cross_attention_reference",
    "pooled_grid",
    "record_backends",
    "token_pool",
    "token_pool_reference",
]
