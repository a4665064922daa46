"""Triton kernels: the fallback back end, imported lazily (only when the triton back end runs).

One module per op family (``token_pool``, ``cross_attention``, ``projected_attention``: kernels
and launchers with the same signatures as the ``crosslmm_ops._C`` functions); what they share
(segment lookup, dot precision, key splits, launch checks) lives in :mod:`.common`.
"""
