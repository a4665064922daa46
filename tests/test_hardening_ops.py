"""Hardening of the public ops, round two (issue #16, items 1, 3, 5 and 6):

* every tensor argument of every public op, handed as a strided (non-contiguous) view holding the
  right values, gives what the contiguous call gives, on the torch back end and on Triton (the
  CPU interpreter here), and the Triton launchers refuse a strided ``cu_seqlens`` (their kernels
  index its storage without strides);
* bfloat16 under the Triton interpreter, which computes it wrong, is refused with an error that
  names the dtype, the interpreter and what to do;
* ``attention_weights``' ``block_size`` and ``query_index`` and ``normalize_tokens``' ``eps`` are
  checked (an empty ``query_index`` is valid: no queries);
* on the meta device every op returns meta outputs of the shapes and dtypes of a real call.
"""

from __future__ import annotations

import pytest
import torch

from crosslmm_ops import (
    _backend,
    attention_weights,
    cross_attention,
    flash_attn_func,
    flash_attn_varlen_func,
    merge_attention_states,
    normalize_tokens,
    projected_cross_attention,
    record_backends,
    token_pool,
)
from crosslmm_ops.testing import cu_seqlens, env_value, fast_backends, poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = _backend.triton_runnable(torch.device(DEVICE))[0]
KERNEL_BACKENDS = ["torch"] + (["triton"] if TRITON else [])


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view of a buffer twice as large: every stride doubled, a storage offset
    of one element, and the elements between set to garbage (NaN, or 0 for integers: in bounds as
    an index, so a kernel that ignores the strides computes wrong values instead of crashing)."""
    fill = float("nan") if t.dtype.is_floating_point else 0
    buf = torch.full((*t.shape, 2), fill, dtype=t.dtype, device=t.device)
    view = buf[..., 1]
    view.copy_(t.detach())
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _cu(*lengths):
    return cu_seqlens(lengths, DEVICE)


# ----------------------------------------------------------------------------------------------
# Item 1: strided views of every tensor argument
# ----------------------------------------------------------------------------------------------
# (name, back ends it takes, call(backend, **tensors) -> tuple of outputs, tensors). The back end
# None marks ops without one (plain torch ops).


def _attention_batched():
    return dict(
        q=_randn(2, 3, 4, 8),
        k=_randn(2, 5, 2, 8),
        v=_randn(2, 5, 2, 8),
        gate=_randn(4),
        residual=_randn(2, 3, 4, 8),
    )


def _attention_packed():
    return dict(
        q=_randn(6, 4, 8),
        k=_randn(9, 2, 8),
        v=_randn(9, 2, 8),
        cu_seqlens_q=_cu(2, 0, 4),
        cu_seqlens_k=_cu(5, 3, 1),
        gate=_randn(4),
        residual=_randn(6, 4, 8),
    )


def _projected(packed: bool):
    common = dict(
        w_k=_randn(16, 12),
        w_v=_randn(16, 12),
        b_k=_randn(16),
        b_v=_randn(16),
        norm_weight=_randn(12),
        norm_bias=_randn(12),
    )
    if packed:
        return dict(
            q=_randn(6, 4, 8),
            x=_randn(9, 12),
            cu_seqlens_q=_cu(2, 0, 4),
            cu_seqlens_k=_cu(5, 3, 1),
            **common,
        )
    return dict(q=_randn(2, 3, 4, 8), x=_randn(2, 5, 12), **common)


def _call_projected(path):
    def call(backend, **t):
        return projected_cross_attention(
            **t, norm="layernorm", path=path, return_lse=True, backend=backend
        )

    return call


def _weights(packed: bool):
    if packed:
        t = _attention_packed()
        t = dict(q=t["q"], k=t["k"], cu_seqlens_q=t["cu_seqlens_q"], cu_seqlens_k=t["cu_seqlens_k"])
        t["lse"] = cross_attention(
            t["q"],
            t["k"],
            t["k"],
            cu_seqlens_q=t["cu_seqlens_q"],
            cu_seqlens_k=t["cu_seqlens_k"],
            return_lse=True,
            backend="torch",
        )[1]
    else:
        t = dict(q=_randn(2, 3, 4, 8), k=_randn(2, 5, 2, 8))
        t["lse"] = cross_attention(t["q"], t["k"], t["k"], return_lse=True, backend="torch")[1]
    t["query_index"] = torch.tensor([2, 0, 1])
    return t


STRIDED_CASES = [
    (
        "cross_attention batched",
        KERNEL_BACKENDS,
        lambda backend, **t: cross_attention(**t, return_lse=True, backend=backend),
        _attention_batched,
    ),
    (
        "cross_attention packed",
        KERNEL_BACKENDS,
        lambda backend, **t: cross_attention(**t, return_lse=True, num_splits=2, backend=backend),
        _attention_packed,
    ),
    (
        "merge_attention_states",
        [None],
        lambda backend, **t: merge_attention_states(t["outs"], t["lses"]),
        lambda: dict(outs=_randn(3, 6, 4, 8), lses=_randn(3, 4, 6)),
    ),
    (
        "merge_attention_states lists",
        [None],
        lambda backend, **t: merge_attention_states([t["o0"], t["o1"]], [t["l0"], t["l1"]]),
        lambda: dict(o0=_randn(6, 4, 8), o1=_randn(6, 4, 8), l0=_randn(4, 6), l1=_randn(4, 6)),
    ),
    (
        "attention_weights batched",
        [None],
        lambda backend, **t: attention_weights(**t),
        lambda: _weights(False),
    ),
    (
        "attention_weights packed",
        [None],
        lambda backend, **t: attention_weights(**t),
        lambda: _weights(True),
    ),
    (
        "projected_cross_attention fused batched",
        KERNEL_BACKENDS,
        _call_projected("fused"),
        lambda: _projected(False),
    ),
    (
        "projected_cross_attention fused packed",
        KERNEL_BACKENDS,
        _call_projected("fused"),
        lambda: _projected(True),
    ),
    (
        "projected_cross_attention materialized batched",
        KERNEL_BACKENDS,
        _call_projected("materialized"),
        lambda: _projected(False),
    ),
    (
        "projected_cross_attention materialized packed",
        KERNEL_BACKENDS,
        _call_projected("materialized"),
        lambda: _projected(True),
    ),
    (
        "normalize_tokens",
        [None],
        lambda backend, **t: normalize_tokens(t["x"], "rmsnorm"),
        lambda: dict(x=_randn(2, 5, 12)),
    ),
    (
        "flash_attn_func",
        KERNEL_BACKENDS,
        lambda backend, **t: flash_attn_func(**t, return_attn_probs=True),
        lambda: dict(q=_randn(2, 3, 4, 8), k=_randn(2, 5, 2, 8), v=_randn(2, 5, 2, 8)),
    ),
    (
        "flash_attn_varlen_func",
        KERNEL_BACKENDS,
        lambda backend, **t: flash_attn_varlen_func(
            **t, max_seqlen_q=4, max_seqlen_k=5, return_attn_probs=True
        ),
        lambda: {k: v for k, v in _attention_packed().items() if k not in ("gate", "residual")},
    ),
    (
        "token_pool",
        KERNEL_BACKENDS,
        lambda backend, **t: token_pool(t["x"], (4, 4), "avg", kernel_size=2, backend=backend),
        lambda: dict(x=_randn(2, 3, 16, 8)),
    ),
]


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [o for o in outputs if isinstance(o, torch.Tensor)]


def _run(call, backend, tensors, with_grads=True):
    """The outputs of one call and the gradients of every floating input, the gradient of the
    outputs handed in as a strided view too (the backward's ``dout``). Unwritten output elements
    are NaN (poisoned); every op that ran must have run on ``backend``."""
    leaves = [
        t.requires_grad_()
        for k, t in tensors.items()
        if with_grads and t.dtype.is_floating_point and k != "lse"
    ]
    with env_value(_backend.ENV_VAR, backend), poison_outputs(), record_backends() as ran:
        outs = _flat(call(backend, **tensors))
        diff = [o for o in outs if o.requires_grad]
        grads = []
        if diff:
            torch.manual_seed(1)
            dout = [_strided(torch.randn_like(o)) for o in diff]
            grads = torch.autograd.grad(diff, leaves, dout, allow_unused=True)
    assert backend is None or {b for _, b in ran} == {backend}, ran
    return [o.detach() for o in outs], grads


STRIDED_RUNS = [
    (name, backend, call, make)
    for name, backends, call, make in STRIDED_CASES
    for backend in backends
]


@pytest.mark.parametrize(
    "name,backend_name,call,make",
    STRIDED_RUNS,
    ids=[f"{r[0]}-{r[1] or 'plain'}" for r in STRIDED_RUNS],
)
def test_strided_views_of_every_tensor_argument(name, backend_name, call, make):
    torch.manual_seed(0)
    tensors = make()
    expected, expected_grads = _run(call, backend_name, {k: t.clone() for k, t in tensors.items()})
    strided = {k: _strided(t) for k, t in tensors.items()}
    for k, t in strided.items():
        assert torch.equal(t.nan_to_num(), tensors[k].nan_to_num()), k
    actual, actual_grads = _run(call, backend_name, strided)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert len(actual_grads) == len(expected_grads)
    for a, e in zip(actual_grads, expected_grads):
        if e is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


CUDA_STRIDED_CASES = [
    (
        "cross_attention packed",
        lambda backend, **t: cross_attention(**t, return_lse=True, backend=backend),
        lambda: {
            k: v.half() if v.is_floating_point() and k != "gate" else v
            for k, v in dict(
                q=_randn(6, 4, 64),
                k=_randn(9, 2, 64),
                v=_randn(9, 2, 64),
                cu_seqlens_q=_cu(2, 0, 4),
                cu_seqlens_k=_cu(5, 3, 1),
                gate=_randn(4),
                residual=_randn(6, 4, 64),
            ).items()
        },
    ),
    (
        "projected_cross_attention fused packed",
        lambda backend, **t: projected_cross_attention(**t, path="fused", backend=backend),
        lambda: dict(
            q=_randn(6, 4, 16).half(),
            x=_randn(9, 64).half(),
            w_k=_randn(32, 64),
            w_v=_randn(32, 64),
            cu_seqlens_q=_cu(2, 0, 4),
            cu_seqlens_k=_cu(5, 3, 1),
        ),
    ),
]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name,call,make", CUDA_STRIDED_CASES, ids=[c[0] for c in CUDA_STRIDED_CASES]
)
def test_strided_views_on_the_cuda_back_end(name, call, make):
    """The CUDA binding checks contiguity: the op hands it contiguous cu_seqlens (a strided view
    is copied, not refused) and channels it can read."""
    if "cuda" not in fast_backends(DEVICE):
        pytest.skip("the CUDA extension cannot run here")
    torch.manual_seed(0)
    tensors = make()
    expected, _ = _run(call, "cuda", {k: t.clone() for k, t in tensors.items()}, with_grads=False)
    actual, _ = _run(call, "cuda", {k: _strided(t) for k, t in tensors.items()}, with_grads=False)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3, equal_nan=True)


def test_triton_launchers_refuse_strided_index_tensors():
    """Callers below the ops (the launchers' own contract): a strided cu_seqlens is an error that
    names it, never a kernel reading other memory."""
    if not TRITON:
        pytest.skip("needs the Triton back end")
    from crosslmm_ops.triton import cross_attention as kernels

    t = _attention_packed()
    q, k, v = t["q"], t["k"], t["v"]
    out, lse = torch.empty_like(q), torch.empty(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be contiguous"):
        kernels.attention_forward(
            q, k, v, out, lse, t["cu_seqlens_q"], _strided(t["cu_seqlens_k"]), 4, 5, 0.3, 1
        )


# ----------------------------------------------------------------------------------------------
# Item 3: bfloat16 under the Triton interpreter
# ----------------------------------------------------------------------------------------------

INTERPRETED = TRITON and _backend.triton_interpreted() and DEVICE == "cpu"
BF16_MESSAGE = (
    r"Triton interpreter \(TRITON_INTERPRET=1\) cannot compute bfloat16.*float16 or "
    r"float32.*torch back end"
)

BF16_CALLS = [
    (
        "cross_attention",
        lambda: cross_attention(
            _randn(1, 3, 2, 16, dtype=torch.bfloat16),
            _randn(1, 5, 2, 16, dtype=torch.bfloat16),
            _randn(1, 5, 2, 16, dtype=torch.bfloat16),
            backend="triton",
        ),
    ),
    (
        "cross_attention packed",
        lambda: cross_attention(
            _randn(5, 2, 16, dtype=torch.bfloat16),
            _randn(7, 2, 16, dtype=torch.bfloat16),
            _randn(7, 2, 16, dtype=torch.bfloat16),
            cu_seqlens_q=_cu(2, 3),
            cu_seqlens_k=_cu(3, 4),
            backend="triton",
        ),
    ),
    (
        "projected_cross_attention fused",
        lambda: projected_cross_attention(
            _randn(1, 3, 4, 8, dtype=torch.bfloat16),
            _randn(1, 5, 16, dtype=torch.bfloat16),
            _randn(16, 16),
            _randn(16, 16),
            path="fused",
            backend="triton",
        ),
    ),
    (
        "projected_cross_attention materialized",
        lambda: projected_cross_attention(
            _randn(1, 3, 4, 8, dtype=torch.bfloat16),
            _randn(1, 5, 16, dtype=torch.bfloat16),
            _randn(16, 16),
            _randn(16, 16),
            path="materialized",
            backend="triton",
        ),
    ),
    (
        "flash_attn_func",
        lambda: _with_backend(
            "triton",
            flash_attn_func,
            _randn(1, 3, 2, 16, dtype=torch.bfloat16),
            _randn(1, 5, 2, 16, dtype=torch.bfloat16),
            _randn(1, 5, 2, 16, dtype=torch.bfloat16),
        ),
    ),
]


def _with_backend(backend, fn, *args, **kwargs):
    with env_value(_backend.ENV_VAR, backend):
        return fn(*args, **kwargs)


@pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name,call", BF16_CALLS, ids=[c[0] for c in BF16_CALLS])
def test_bf16_under_the_triton_interpreter_is_refused(name, call):
    with pytest.raises(RuntimeError, match=BF16_MESSAGE):
        call()


@pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_bf16_is_refused_by_every_triton_launcher():
    """The launchers check too, for callers below the ops."""
    from crosslmm_ops.triton import cross_attention as attention
    from crosslmm_ops.triton import projected_attention as projected

    bf = torch.bfloat16
    q, kv = _randn(5, 2, 16, dtype=bf), _randn(7, 2, 16, dtype=bf)
    cu_q, cu_k = _cu(2, 3), _cu(3, 4)
    lse = torch.empty(2, 5)
    with pytest.raises(RuntimeError, match=BF16_MESSAGE):
        attention.attention_forward(q, kv, kv, torch.empty_like(q), lse, cu_q, cu_k, 3, 4, 0.25, 1)
    with pytest.raises(RuntimeError, match=BF16_MESSAGE):
        attention.attention_backward(
            q,
            q,
            kv,
            kv,
            q,
            lse,
            torch.empty_like(q),
            torch.empty_like(kv),
            torch.empty_like(kv),
            cu_q,
            cu_k,
            3,
            4,
            0.25,
            False,
        )
    qg, x = _randn(1, 5, 2, 16, dtype=bf), _randn(7, 16, dtype=bf)
    with pytest.raises(RuntimeError, match=BF16_MESSAGE):
        projected.projected_attention_core_forward(
            qg, x, torch.empty_like(qg), lse, cu_q, cu_k, 3, 4, 0.25, 1
        )
    with pytest.raises(RuntimeError, match=BF16_MESSAGE):
        projected.projected_attention_core_backward(
            qg, qg, x, qg, lse, torch.empty_like(qg), torch.empty_like(x), cu_q, cu_k, 3, 4, 0.25, 1
        )


@pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_float16_still_runs_under_the_interpreter():
    q, k = _randn(1, 3, 2, 16, dtype=torch.float16), _randn(1, 5, 2, 16, dtype=torch.float16)
    out = cross_attention(q, k, k, backend="triton")
    ref = cross_attention(q, k, k, backend="torch")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not TRITON, reason="needs the Triton back end")
def test_projected_fused_core_under_autocast():
    """Under autocast q~ (a GEMM) comes back in the lower dtype while x stays float32: the core
    gets both in q~'s dtype (a kernel's dot takes one dtype), and the result stays close to the
    float32 one."""
    low = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the interpreter's bf16 is refused
    q, x, w = _randn(2, 5, 4, 32), _randn(2, 40, 32), _randn(64, 32) / 6
    with torch.autocast(DEVICE, dtype=low):
        out = projected_cross_attention(q, x, w, w, path="fused", backend="triton")
    assert out.dtype == low
    expected = projected_cross_attention(q, x, w, w, path="fused", backend="torch")
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Item 5: attention_weights' and normalize_tokens' arguments
# ----------------------------------------------------------------------------------------------

AQ, AK = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8)


@pytest.mark.parametrize("block_size", [0, -5, 1.5, True, "64", None])
def test_attention_weights_block_size_is_checked(block_size):
    with pytest.raises(
        ValueError,
        match=r"block_size must be an int >= 1 \(keys per block\), "
        rf"got {block_size!r}",
    ):
        attention_weights(AQ, AK, query_index=[0], block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 2, 5, 4096])
def test_attention_weights_any_block_size_gives_the_same_probabilities(block_size):
    probs = attention_weights(AQ, AK, query_index=[2, 0], block_size=block_size)
    full = attention_weights(AQ, AK, query_index=[2, 0])
    torch.testing.assert_close(probs, full)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4))


@pytest.mark.parametrize("empty", [[], (), torch.empty(0, dtype=torch.long)])
def test_attention_weights_empty_query_index(empty):
    assert attention_weights(AQ, AK, query_index=empty).shape == (2, 0, 4, 5)
    q, k = torch.randn(6, 4, 8), torch.randn(9, 2, 8)
    packed = attention_weights(
        q, k, cu_seqlens_q=cu_seqlens([2, 4]), cu_seqlens_k=cu_seqlens([5, 4]), query_index=empty
    )
    assert packed.shape == (0, 4, 0) and packed.dtype == torch.float32


@pytest.mark.parametrize("index", [[0.5], [True], torch.tensor([], dtype=torch.float32)])
def test_attention_weights_query_index_must_hold_integers(index):
    with pytest.raises(ValueError, match="query_index must hold integers"):
        attention_weights(AQ, AK, query_index=index)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), -1e-12, True, "1e-5", None])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", None])
def test_normalize_tokens_eps_is_checked(eps, norm):
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got"):
        normalize_tokens(torch.randn(2, 5, 12), norm, eps=eps)


@pytest.mark.parametrize("eps", [0, 0.0, 1e-6, 1])
def test_normalize_tokens_valid_eps(eps):
    x = torch.randn(2, 5, 12)
    out = normalize_tokens(x, "layernorm", eps=eps)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (12,), eps=eps))


# ----------------------------------------------------------------------------------------------
# Item 6: meta tensors
# ----------------------------------------------------------------------------------------------


def _meta(tensors: dict) -> dict:
    return {k: t.to("meta") for k, t in tensors.items()}


def _cpu(make):
    torch.manual_seed(0)
    return {k: t.cpu() for k, t in make().items()}


META_CASES = [
    (
        "cross_attention batched",
        lambda backend, **t: cross_attention(**t, return_lse=True, backend=backend),
        lambda: _cpu(_attention_batched),
    ),
    (
        "cross_attention batched plain",
        lambda backend, **t: cross_attention(t["q"], t["k"], t["v"], backend=backend),
        lambda: _cpu(_attention_batched),
    ),
    (
        "cross_attention packed",
        lambda backend, **t: cross_attention(**t, return_lse=True, backend=backend),
        lambda: _cpu(_attention_packed),
    ),
    (
        "cross_attention packed max_seqlen",
        lambda backend, **t: cross_attention(**t, max_seqlen_q=4, max_seqlen_k=5, backend=backend),
        lambda: _cpu(_attention_packed),
    ),
    (
        "merge_attention_states",
        lambda backend, **t: merge_attention_states(**t),
        lambda: dict(outs=torch.randn(3, 6, 4, 8), lses=torch.randn(3, 4, 6)),
    ),
    (
        "attention_weights batched",
        lambda backend, **t: attention_weights(**t, query_index=[2, 0]),
        lambda: dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 5, 2, 8)),
    ),
    (
        "attention_weights batched lse",
        lambda backend, **t: attention_weights(**t, query_index=[1]),
        lambda: dict(
            q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 5, 2, 8), lse=torch.randn(2, 4, 3)
        ),
    ),
    (
        "projected fused batched",
        lambda backend, **t: _call_projected("fused")(backend, **t),
        lambda: _cpu(lambda: _projected(False)),
    ),
    (
        "projected fused packed",
        lambda backend, **t: _call_projected("fused")(backend, **t),
        lambda: _cpu(lambda: _projected(True)),
    ),
    (
        "projected materialized batched",
        lambda backend, **t: _call_projected("materialized")(backend, **t),
        lambda: _cpu(lambda: _projected(False)),
    ),
    (
        "projected materialized packed",
        lambda backend, **t: _call_projected("materialized")(backend, **t),
        lambda: _cpu(lambda: _projected(True)),
    ),
    (
        "projected auto",
        lambda backend, **t: projected_cross_attention(**t, backend=backend),
        lambda: {
            k: v
            for k, v in _cpu(lambda: _projected(False)).items()
            if k in ("q", "x", "w_k", "w_v")
        },
    ),
    (
        "normalize_tokens",
        lambda backend, **t: normalize_tokens(t["x"]),
        lambda: dict(x=torch.randn(2, 5, 12)),
    ),
    (
        "flash_attn_func",
        lambda backend, **t: flash_attn_func(**t, return_attn_probs=True),
        lambda: dict(
            q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8)
        ),
    ),
    (
        "flash_attn_varlen_func",
        lambda backend, **t: flash_attn_varlen_func(
            **t, max_seqlen_q=4, max_seqlen_k=5, return_attn_probs=True
        ),
        lambda: {k: v for k, v in _cpu(_attention_packed).items() if k not in ("gate", "residual")},
    ),
]


@pytest.mark.parametrize("backend", [None, "torch", "triton", "cuda"])
@pytest.mark.parametrize("name,call,make", META_CASES, ids=[c[0] for c in META_CASES])
def test_meta_tensors_give_meta_outputs_of_the_right_shape(name, call, make, backend):
    """Meta tensors compute no values: any back end asked for gives the shapes and dtypes of a
    real call (the fake kernels'), as torch's own ops do."""
    tensors = make()
    expected = _flat(call("torch", **tensors))
    with env_value(_backend.ENV_VAR, backend):
        actual = _flat(call(backend, **_meta(tensors)))
    assert [(tuple(a.shape), a.dtype, a.device.type) for a in actual] == [
        (tuple(e.shape), e.dtype, "meta") for e in expected
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_meta_outputs_keep_the_dtypes(dtype):
    q, k = (torch.empty(s, dtype=dtype, device="meta") for s in ((2, 3, 4, 8), (2, 5, 2, 8)))
    out, lse = cross_attention(q, k, k, return_lse=True)
    assert out.dtype == dtype and lse.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    w = torch.empty(16, 12, dtype=dtype, device="meta")
    x = torch.empty(2, 5, 12, dtype=dtype, device="meta")
    for path in ("fused", "materialized"):
        out = projected_cross_attention(q, x, w, w, path=path)
        assert out.shape == q.shape and out.dtype == dtype and out.is_meta


def test_meta_backward():
    """Autograd on meta tensors: gradients are meta tensors of the inputs' shapes."""
    q, k, v = (
        torch.empty(s, device="meta", requires_grad=True)
        for s in ((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8))
    )
    out, lse = cross_attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad((out.sum() + lse.sum()), (q, k, v))
    assert [(g.shape, g.is_meta) for g in grads] == [(t.shape, True) for t in (q, k, v)]
    x = torch.empty(2, 5, 12, device="meta", requires_grad=True)
    w = torch.empty(16, 12, device="meta", requires_grad=True)
    out = projected_cross_attention(q, x, w, w, path="fused")
    grads = torch.autograd.grad(out.sum(), (q, x, w))
    assert [(g.shape, g.is_meta) for g in grads] == [(t.shape, True) for t in (q, x, w)]


def test_meta_packed_attention_weights_is_refused():
    """The packed layout's output width depends on cu_seqlens' values, which meta tensors lack."""
    t = _meta(_cpu(_attention_packed))
    with pytest.raises(NotImplementedError, match="depends on cu_seqlens' values"):
        attention_weights(
            t["q"],
            t["k"],
            cu_seqlens_q=t["cu_seqlens_q"],
            cu_seqlens_k=t["cu_seqlens_k"],
            query_index=[0],
        )


@pytest.mark.parametrize("path", ["fused", "materialized"])
def test_fake_tensors_of_the_packed_layout(path):
    """Fake tensors (FakeTensorMode outside torch.compile) have no cu_seqlens values either: the
    packed layout gives the real call's shapes, as on the meta device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    attn, proj = _cpu(_attention_packed), _cpu(lambda: _projected(True))
    expected = [
        _flat(cross_attention(**attn, return_lse=True, backend="torch")),
        _flat(_call_projected(path)("torch", **proj)),
    ]
    with FakeTensorMode() as mode:
        fake = lambda t: {k: mode.from_tensor(v) for k, v in t.items()}  # noqa: E731
        actual = [
            _flat(cross_attention(**fake(attn), return_lse=True, backend="torch")),
            _flat(_call_projected(path)("torch", **fake(proj))),
        ]
        shapes = [[(tuple(a.shape), a.dtype) for a in outs] for outs in actual]
    assert shapes == [[(tuple(e.shape), e.dtype) for e in outs] for outs in expected]
