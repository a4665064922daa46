"""``crosslmm_ops.nn``: the drop-in CrossLMM modules.

* :class:`VisionMemory` - the original (unpooled) vision tokens, packed over the batch, that every
  DCAL layer attends to;
* :class:`TokenPooling` - per-frame pooling of the vision tokens before the projector
  (:func:`crosslmm_ops.token_pool`);
* :class:`DualCrossAttention` - one dual cross-attention layer (V2V + T2V, gated);
  :class:`V2VCrossAttention`, :class:`T2VCrossAttention` - its branches; :class:`CrossAttention` -
  the generic gated cross-attention block they build on; :class:`TanhGate` - the gate.

Projections are plain ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), gates hold a
parameter ``alpha`` initialised to 0, and the attention runs through
:func:`crosslmm_ops.cross_attention` on whichever back end ``backend`` picks.
"""

from crosslmm_ops.nn.attention import (
    CrossAttention,
    T2VCrossAttention,
    TanhGate,
    V2VCrossAttention,
)
from crosslmm_ops.nn.dcal import DualCrossAttention
from crosslmm_ops.nn.memory import VisionMemory
from crosslmm_ops.nn.pooling import TokenPooling

__all__ = [
    "CrossAttention",
    "DualCrossAttention",
    "T2VCrossAttention",
    "TanhGate",
    "TokenPooling",
    "V2VCrossAttention",
    "VisionMemory",
]
