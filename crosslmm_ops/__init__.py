"""crosslmm-ops: CUDA and Triton kernels for CrossLMM video-token compression (arXiv 2505.17020).

Ops (each on the ``cuda``, ``triton`` and ``torch`` back ends, differentiable, registered as
``torch.library`` custom ops under ``crosslmm::``):

* :func:`token_pool` - per-frame pooling of token-major ``[..., T, N, D]`` vision tokens.
"""

__version__ = "0.1.0"

from crosslmm_ops._backend import (  # noqa: E402
    BACKENDS,
    last_backend,
    record_backends,
)
from crosslmm_ops.ops.token_pool import (  # noqa: E402
    PoolSpec,
    pooled_grid,
    token_pool,
    token_pool_reference,
)

__all__ = [
    "BACKENDS",
    "PoolSpec",
    "last_backend",
    "pooled_grid",
    "record_backends",
    "token_pool",
    "token_pool_reference",
]
