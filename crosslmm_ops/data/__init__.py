"""``crosslmm_ops.data``: synthetic data for training and testing CrossLMMs without downloads.

* :class:`MarkerVideoTask` (:mod:`crosslmm_ops.data.synthetic`) - long videos of random texture
  in which one frame holds a small marker; the question (its colour, its cell, which frame)
  needs detail that pooling each frame to one token averages away. Frames are rendered directly
  as encoder tokens (``vision_features``), so no vision tower is needed.
"""

from crosslmm_ops.data.synthetic import (
    IGNORE_INDEX,
    QUESTIONS,
    MarkerBatch,
    MarkerTaskConfig,
    MarkerVideoTask,
    MarkerVocab,
)

__all__ = [
    "IGNORE_INDEX",
    "QUESTIONS",
    "MarkerBatch",
    "MarkerTaskConfig",
    "MarkerVideoTask",
    "MarkerVocab",
]
