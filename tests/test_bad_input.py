"""Bad input across the whole public API (issue #9): every public function and module of
``crosslmm_ops`` (``__all__``, ``crosslmm_ops.nn``, ``patch_llava``) rejects wrong shapes, dtypes,
devices, layouts, inconsistent ``cu_seqlens``, head counts that do not divide and grids that do not
match ``N`` with a ``ValueError`` or ``TypeError`` whose message names the argument and says what
was expected.

The per-op tables stay next to their ops (tests/test_cross_attention.py,
test_projected_attention.py, test_token_pool.py, test_nn.py, test_patch_llava.py); this file
holds the rows they lack, one cross-cutting table of the issue's categories for every entry point,
and an audit that each public
name is covered somewhere (a new public name without a bad-input row fails here). On the CPU a
``meta`` tensor stands in for "another device".
"""

from __future__ import annotations

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import (
    PoolSpec,
    attention_weights,
    cross_attention,
    cross_attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
    merge_attention_states,
    normalize_tokens,
    pooled_grid,
    projected_cross_attention,
    projected_cross_attention_reference,
    token_pool,
    token_pool_reference,
)
from crosslmm_ops.nn import (
    CrossAttention,
    DualCrossAttention,
    T2VCrossAttention,
    TanhGate,
    TokenPooling,
    V2VCrossAttention,
    VisionMemory,
)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(*shape, device=device).to(dtype)
        if device != "meta"
        else torch.empty(*shape, dtype=dtype, device="meta")
    )


def _cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _mem(frames=(1, 1), n=6, dv=20, dtype=torch.float32):
    return VisionMemory.from_list([_t(t, n, dv, dtype=dtype) for t in frames], 2)


def _mask(L=8, counts=(2, 2), B=2):
    m = torch.zeros(B, L, dtype=torch.bool)
    for b, c in enumerate(counts):
        m[b, :c] = True
    return m


Q, K = _t(1, 2, 4, 8), _t(1, 3, 2, 8)
PQ, PX, PW = _t(1, 2, 4, 8), _t(1, 5, 12), _t(16, 12)

# (public name, category, call, exception, message pattern: the argument and what was expected)
CASES = [
    # --- cross_attention: one row per category (the full table is in test_cross_attention.py)
    (
        "cross_attention",
        "shape",
        lambda: cross_attention(_t(2, 4, 8), K, K),
        ValueError,
        r"q must have shape \(B, S, H, D\)",
    ),
    (
        "cross_attention",
        "dtype",
        lambda: cross_attention(Q, K.half(), K),
        ValueError,
        "k must have q's dtype",
    ),
    (
        "cross_attention",
        "device",
        lambda: cross_attention(Q, K, _t(1, 3, 2, 8, device="meta")),
        ValueError,
        "v must be on q's device",
    ),
    (
        "cross_attention",
        "layout",
        lambda: cross_attention(_t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=_cu(2, 3)),
        ValueError,
        "cu_seqlens_q and cu_seqlens_k must be given together",
    ),
    (
        "cross_attention",
        "cu_seqlens",
        lambda: cross_attention(
            _t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), cu_seqlens_q=_cu(2, 3), cu_seqlens_k=_cu(1, 1, 3)
        ),
        ValueError,
        "cu_seqlens_q and cu_seqlens_k must have the same length",
    ),
    (
        "cross_attention",
        "heads",
        lambda: cross_attention(_t(1, 2, 3, 8), K, K),
        ValueError,
        r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
    ),
    # --- cross_attention_reference validates like the op
    (
        "cross_attention_reference",
        "heads",
        lambda: cross_attention_reference(_t(1, 2, 3, 8), K, K),
        ValueError,
        r"query heads \(3\)",
    ),
    (
        "cross_attention_reference",
        "dtype",
        lambda: cross_attention_reference(Q, K.half(), K),
        ValueError,
        "k must have q's dtype",
    ),
    (
        "cross_attention_reference",
        "device",
        lambda: cross_attention_reference(Q, K, _t(1, 3, 2, 8, device="meta")),
        ValueError,
        "v must be on q's device",
    ),
    # --- flash-attn shims: the op's checks, and their own integer arguments
    (
        "flash_attn_func",
        "shape",
        lambda: flash_attn_func(_t(2, 4, 8), K, K),
        ValueError,
        r"q must have shape \(B, S, H, D\)",
    ),
    (
        "flash_attn_func",
        "device",
        lambda: flash_attn_func(Q, _t(1, 3, 2, 8, device="meta"), K),
        ValueError,
        "k must be on q's device",
    ),
    (
        "flash_attn_func",
        "heads",
        lambda: flash_attn_func(_t(1, 2, 3, 8), K, K),
        ValueError,
        r"query heads \(3\)",
    ),
    (
        "flash_attn_varlen_func",
        "cu_seqlens",
        lambda: flash_attn_varlen_func(
            _t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), _cu(2, 4), _cu(2, 3), 4, 3
        ),
        ValueError,
        "cu_seqlens_q must end at the number of packed tokens 5",
    ),
    (
        "flash_attn_varlen_func",
        "dtype",
        lambda: flash_attn_varlen_func(
            _t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), _cu(2, 3).long(), _cu(2, 3), 3, 3
        ),
        ValueError,
        "cu_seqlens_q must be an int32",
    ),
    (
        "flash_attn_varlen_func",
        "value",
        lambda: flash_attn_varlen_func(
            _t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), _cu(2, 3), _cu(2, 3), "3", 3
        ),
        ValueError,
        "max_seqlen_q must be an int",
    ),
    (
        "flash_attn_varlen_func",
        "value",
        lambda: flash_attn_varlen_func(
            _t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), _cu(2, 3), _cu(2, 3), 3, 1.5
        ),
        ValueError,
        "max_seqlen_k must be an int",
    ),
    # --- merge_attention_states
    (
        "merge_attention_states",
        "shape",
        lambda: merge_attention_states(_t(2, 3, 2, 8), _t(2, 3, 2)),
        ValueError,
        r"outs must be \[S, ..., total_q, H, D\] and lses \[S, ..., H, total_q\]",
    ),
    (
        "merge_attention_states",
        "shape",
        lambda: merge_attention_states([_t(3, 2, 8), _t(4, 2, 8)], [_t(2, 3), _t(2, 4)]),
        ValueError,
        r"outs\[1\] is \(4, 2, 8\)",
    ),
    (
        "merge_attention_states",
        "type",
        lambda: merge_attention_states(5, 6),
        TypeError,
        "outs must be a tensor or a non-empty list of tensors",
    ),
    (
        "merge_attention_states",
        "dtype",
        lambda: merge_attention_states(torch.ones(2, 3, 2, 8, dtype=torch.int32), _t(2, 2, 3)),
        ValueError,
        "outs and lses must be floating",
    ),
    (
        "merge_attention_states",
        "device",
        lambda: merge_attention_states(_t(2, 3, 2, 8), _t(2, 2, 3, device="meta")),
        ValueError,
        "lses must be on outs' device",
    ),
    # --- attention_weights
    (
        "attention_weights",
        "device",
        lambda: attention_weights(Q, _t(1, 3, 2, 8, device="meta"), query_index=[0]),
        ValueError,
        "k must be on q's device",
    ),
    (
        "attention_weights",
        "device",
        lambda: attention_weights(Q, K, query_index=[0], lse=_t(1, 4, 2, device="meta")),
        ValueError,
        "lse must be on q's device",
    ),
    (
        "attention_weights",
        "shape",
        lambda: attention_weights(Q, K, query_index=[0], lse=_t(4, 2)),
        ValueError,
        r"lse must have shape \(1, 4, 2\)",
    ),
    (
        "attention_weights",
        "dtype",
        lambda: attention_weights(Q, K, query_index=[0.5]),
        ValueError,
        "query_index must hold integers",
    ),
    (
        "attention_weights",
        "heads",
        lambda: attention_weights(_t(1, 2, 3, 8), K, query_index=[0]),
        ValueError,
        r"query heads \(3\)",
    ),
    (
        "attention_weights",
        "value",
        lambda: attention_weights(Q, K, query_index=[0], block_size=0),
        ValueError,
        r"block_size must be an int >= 1 \(keys per block\), got 0",
    ),
    (
        "attention_weights",
        "value",
        lambda: attention_weights(Q, K, query_index=[0], block_size=-5),
        ValueError,
        r"block_size must be an int >= 1 \(keys per block\), got -5",
    ),
    # --- projected_cross_attention (full table in test_projected_attention.py) and its reference
    (
        "projected_cross_attention",
        "heads",
        lambda: projected_cross_attention(PQ, PX, _t(24, 12), _t(24, 12)),
        ValueError,
        r"query heads \(4\) must be a multiple",
    ),
    (
        "projected_cross_attention",
        "device",
        lambda: projected_cross_attention(PQ, PX, PW, _t(16, 12, device="meta")),
        ValueError,
        "w_v must be on q's device",
    ),
    (
        "projected_cross_attention",
        "cu_seqlens",
        lambda: projected_cross_attention(
            _t(5, 4, 8), _t(6, 12), PW, PW, cu_seqlens_q=_cu(2, 3), cu_seqlens_k=_cu(2, 3)
        ),
        ValueError,
        "cu_seqlens_k must end at the number of packed tokens 6",
    ),
    (
        "projected_cross_attention_reference",
        "heads",
        lambda: projected_cross_attention_reference(PQ, PX, _t(24, 12), _t(24, 12)),
        ValueError,
        r"query heads \(4\)",
    ),
    (
        "projected_cross_attention_reference",
        "shape",
        lambda: projected_cross_attention_reference(PQ, PX, _t(16, 11), PW),
        ValueError,
        r"w_k must have shape \(Hk \* d, Dv\)",
    ),
    (
        "projected_cross_attention_reference",
        "dtype",
        lambda: projected_cross_attention_reference(PQ, PX.double(), PW, PW),
        ValueError,
        "x must have q's dtype",
    ),
    (
        "normalize_tokens",
        "type",
        lambda: normalize_tokens([1.0]),
        TypeError,
        "x must be a torch.Tensor",
    ),
    (
        "normalize_tokens",
        "dtype",
        lambda: normalize_tokens(torch.ones(2, 3, dtype=torch.int64)),
        ValueError,
        "x must be a floating tensor",
    ),
    (
        "normalize_tokens",
        "value",
        lambda: normalize_tokens(_t(2, 3), eps=-1.0),
        ValueError,
        r"eps must be a finite number >= 0, got -1.0",
    ),
    (
        "normalize_tokens",
        "value",
        lambda: normalize_tokens(_t(2, 3), eps=float("nan")),
        ValueError,
        r"eps must be a finite number >= 0, got nan",
    ),
    # --- token_pool: the grid must match N (full table in test_token_pool.py)
    (
        "token_pool",
        "grid",
        lambda: token_pool(_t(1, 2, 50, 8), (7, 7), "avg", kernel_size=3),
        ValueError,
        r"x has N=50 tokens per frame .* grid \(7, 7\) needs N = 7\*7 = 49",
    ),
    (
        "token_pool",
        "dtype",
        lambda: token_pool(torch.ones(1, 2, 49, 8, dtype=torch.int64), 7, "avg", kernel_size=3),
        ValueError,
        "x must be a floating",
    ),
    (
        "token_pool",
        "shape",
        lambda: token_pool(_t(49, 8), 7, "avg", kernel_size=3),
        ValueError,
        r"x must have shape \[..., T, N, D\]",
    ),
    (
        "token_pool_reference",
        "type",
        lambda: token_pool_reference(_t(1, 1, 49, 8), "avg"),
        TypeError,
        "spec must be a PoolSpec",
    ),
    (
        "pooled_grid",
        "grid",
        lambda: pooled_grid((7, 0), "avg", kernel_size=1),
        ValueError,
        r"grid must be >= 1",
    ),
    (
        "pooled_grid",
        "value",
        lambda: pooled_grid(7, "avg", kernel_size=9),
        ValueError,
        "kernel_size .* is larger than the padded grid",
    ),
    (
        "PoolSpec",
        "value",
        lambda: PoolSpec.make((7, 7), "avg", kernel_size=3, stride=-1),
        ValueError,
        "stride must be >= 1",
    ),
    # --- modules (construction and call tables in test_nn.py): the branches' own calls
    (
        "V2VCrossAttention",
        "shape",
        lambda: V2VCrossAttention(36, 20, 4)(_t(2, 8, 37), _mem(), _mask()),
        ValueError,
        "hidden_states has hidden size 37",
    ),
    (
        "V2VCrossAttention",
        "heads",
        lambda: V2VCrossAttention(36, 20, 4, 3),
        ValueError,
        "num_heads .* must be a multiple of num_kv_heads",
    ),
    (
        "T2VCrossAttention",
        "shape",
        lambda: T2VCrossAttention(36, 20, 4)(_t(2, 8, 36), _mem(), _mask(L=7)),
        ValueError,
        r"mask must be a bool tensor of shape \(B, L\) = \(2, 8\)",
    ),
    (
        "T2VCrossAttention",
        "device",
        lambda: T2VCrossAttention(36, 20, 4)(_t(2, 8, 36), _mem(), _mask().to("meta")),
        ValueError,
        "mask is on meta",
    ),
    (
        "CrossAttention",
        "type",
        lambda: CrossAttention(36, 20, 4)(_t(2, 8, 36), _t(2, 6, 20)),
        ValueError,
        "memory must be a crosslmm_ops.nn.VisionMemory",
    ),
    (
        "CrossAttention",
        "dtype",
        lambda: CrossAttention(36, 20, 4)(_t(2, 8, 36), _mem(dtype=torch.float64)),
        ValueError,
        "memory.tokens are torch.float64",
    ),
    (
        "CrossAttention",
        "shape",
        lambda: CrossAttention(36, 20, 4)(_t(2, 8, 36), _mem(dv=21)),
        ValueError,
        "memory.tokens have width 21",
    ),
    (
        "DualCrossAttention",
        "device",
        lambda: DualCrossAttention(36, 20, 4)(_t(2, 8, 36), _mem(), _mask().to("meta")),
        ValueError,
        "visual_mask is on meta",
    ),
    (
        "DualCrossAttention",
        "heads",
        lambda: DualCrossAttention(36, 20, 4, num_kv_heads=0),
        ValueError,
        "num_kv_heads must be an int >= 1",
    ),
    (
        "DualCrossAttention",
        "value",
        lambda: DualCrossAttention(36, 20, 4, kv_path="x"),
        ValueError,
        "kv_path must be one of",
    ),
    (
        "DualCrossAttention",
        "value",
        lambda: DualCrossAttention(36, 20, 4, backend="flash")(_t(2, 8, 36), _mem(), _mask()),
        ValueError,
        "backend must be one of",
    ),
    (
        "TokenPooling",
        "grid",
        lambda: TokenPooling((7, 7), "avg", kernel_size=3)(_t(1, 1, 50, 8)),
        ValueError,
        "x has N=50 tokens per frame",
    ),
    (
        "TanhGate",
        "value",
        lambda: TanhGate(float("inf")),
        ValueError,
        "init_value must be a finite number",
    ),
    (
        "VisionMemory",
        "type",
        lambda: VisionMemory.from_features([1], 2),
        ValueError,
        r"features must have shape \(B, T, N, Dv\)",
    ),
    (
        "VisionMemory",
        "dtype",
        lambda: VisionMemory.from_features(torch.ones(1, 2, 6, 4, dtype=torch.int64), 2),
        ValueError,
        "VisionMemory.tokens must be a floating tensor",
    ),
    (
        "VisionMemory",
        "value",
        lambda: VisionMemory.from_list([_t(1, 6, 4)], 0),
        ValueError,
        "pooled_per_frame must be an int >= 1",
    ),
]

# Public names whose bad-input rows live in another file (checked there), or that take nothing
# a user can get wrong.
ELSEWHERE = {
    "patch_llava": "tests/test_patch_llava.py (every, layers, unknown arguments, pooling.grid)",
    "patch_llava_processor": "tests/test_patch_llava.py (not patched, does not match, ...)",
    "load_patched": "tests/test_generation.py (not a folder, not saved from a patched model)",
    "load_patched_processor": "tests/test_generation.py (not saved from a patched processor)",
    "lora_target_modules": "tests/test_generation.py (names: empty, a string, not names)",
    "CrossLMMConfig": "tests/test_models.py (configuration errors)",
    "CrossLMMForConditionalGeneration": "tests/test_models.py (its config's errors)",
    "explain": "tests/test_planner.py (an op it does not know, the op's own argument errors)",
}
NOTHING_TO_CHECK = {
    "BACKENDS": "a constant",
    "last_backend": "a lookup by op name; an unknown name returns None",
    "last_kernel": "a lookup by op name; an unknown name returns None",
    "last_path": "a lookup by op name; an unknown name returns None",
    "Plan": "a record of explain's answer, built by the ops",
    "record_backends": "a context manager without arguments",
}


@pytest.mark.parametrize(
    "name,category,call,exc,match", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_names_the_argument(name, category, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_every_public_name_has_bad_input_rows():
    public = set(crosslmm_ops.__all__) | set(crosslmm_ops.nn.__all__)
    covered = {c[0] for c in CASES} | set(ELSEWHERE) | set(NOTHING_TO_CHECK)
    assert public - covered == set(), f"public names without a bad-input row: {public - covered}"
    assert covered - public == set(), f"rows for names that are not public: {covered - public}"


def test_the_issue_categories_are_covered():
    """The issue's list: shapes, dtypes, devices, layouts, inconsistent cu_seqlens, heads that do
    not divide, grids that do not match N."""
    categories = {c[1] for c in CASES}
    for needed in ("shape", "dtype", "device", "layout", "cu_seqlens", "heads", "grid"):
        assert needed in categories, needed
