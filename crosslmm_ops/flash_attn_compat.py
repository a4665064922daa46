"""Drop-in replacements for flash-attn 2's ``flash_attn_func`` and ``flash_attn_varlen_func``.

Same signatures, defaults, layouts and return values as ``flash_attn.flash_attn_interface``
(2.6+), running :func:`crosslmm_ops.cross_attention`, so code written for flash-attn switches with
an import. Only what cross-attention needs is supported: non-causal, no dropout, no sliding window,
no softcap, no ALiBi, no paged KV cache. Asking for any of those raises ``NotImplementedError``
rather than computing something else.
"""

from __future__ import annotations

from crosslmm_ops import planner
from crosslmm_ops.ops import cross_attention as attention
from crosslmm_ops.ops.cross_attention import cross_attention


def _unsupported(dropout_p, causal, window_size, softcap, alibi_slopes, block_table=None) -> None:
    asked = []
    if dropout_p != 0.0:
        asked.append(f"dropout_p={dropout_p}")
    if causal:
        asked.append("causal=True")
    if tuple(window_size) != (-1, -1):
        asked.append(f"window_size={tuple(window_size)}")
    if softcap != 0.0:
        asked.append(f"softcap={softcap}")
    if alibi_slopes is not None:
        asked.append("alibi_slopes")
    if block_table is not None:
        asked.append("block_table (paged KV cache)")
    if asked:
        raise NotImplementedError(
            f"crosslmm_ops' flash-attn shim computes non-causal attention without dropout, window, "
            f"softcap, ALiBi or paged KV; not supported: {', '.join(asked)}. Use flash-attn itself "
            "for these"
        )


def _seqlen(name: str, value) -> int:
    """flash-attn takes Python ints (or 0-d integer tensors) here: say which argument is wrong."""
    try:
        if isinstance(value, (bool, float, str, bytes)):
            raise TypeError
        return int(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}") from None


def _result(result, return_attn_probs: bool):
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None  # flash-attn's S_dmask: only ever filled for dropout, never here


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_func``: ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hk, D)`` -> ``out
    (B, Sq, Hq, D)``, or ``(out, softmax_lse (B, Hq, Sq), None)`` with ``return_attn_probs``."""
    kwargs = _func_arguments(
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )
    return _result(cross_attention(q, k, v, **kwargs), return_attn_probs)


def _func_arguments(
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_func's arguments after q, k, v as cross_attention's keyword arguments."""
    _unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    return dict(
        softmax_scale=softmax_scale,
        return_lse=bool(return_attn_probs),
        deterministic=bool(deterministic),
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn's ``flash_attn_varlen_func``: packed ``q (total_q, Hq, D)``, ``k, v (total_k,
    Hk, D)``, int32 ``cu_seqlens [B + 1]`` -> ``out (total_q, Hq, D)``, or ``(out, softmax_lse
    (Hq, total_q), None)`` with ``return_attn_probs``."""
    kwargs = _varlen_arguments(
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        block_table,
    )
    return _result(cross_attention(q, k, v, **kwargs), return_attn_probs)


def _varlen_arguments(
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash_attn_varlen_func's arguments after q, k, v as cross_attention's keyword arguments."""
    _unsupported(dropout_p, causal, window_size, softcap, alibi_slopes, block_table)
    return dict(
        softmax_scale=softmax_scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=_seqlen("max_seqlen_q", max_seqlen_q),
        max_seqlen_k=_seqlen("max_seqlen_k", max_seqlen_k),
        return_lse=bool(return_attn_probs),
        deterministic=bool(deterministic),
    )


# explain(flash_attn_func, ...) says how the cross_attention call it makes would run.
planner.register(
    "flash_attn_func",
    flash_attn_func,
    lambda q, k, v, *args, **kwargs: attention.plan(q, k, v, **_func_arguments(*args, **kwargs)),
)
planner.register(
    "flash_attn_varlen_func",
    flash_attn_varlen_func,
    lambda q, k, v, *args, **kwargs: attention.plan(q, k, v, **_varlen_arguments(*args, **kwargs)),
)
