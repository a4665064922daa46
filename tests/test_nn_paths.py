"""crosslmm_ops.nn on its two attention paths (``kv_path``): the projection-fused path
(:func:`crosslmm_ops.projected_cross_attention` over the normalised tokens) against the
materialised one (K/V projected, :func:`crosslmm_ops.cross_attention`), the choice ``auto`` makes,
the normalised tokens shared by every layer (and kept across decode steps) through
``VisionMemory.normalized_tokens`` - under autograd too: training steps, gradient checkpointing,
no_grad / inference_mode entries - and where the fused path must not be taken (LoRA-like
projections, hooks, a core without a fast back end).

tests/test_nn.py runs the modules' reference tests on both paths; these tests compare the paths
with each other in float64 (torch back end), where they must agree to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import crosslmm_ops
from crosslmm_ops import _backend
from crosslmm_ops.nn import (
    CrossAttention,
    DualCrossAttention,
    T2VCrossAttention,
    V2VCrossAttention,
    VisionMemory,
)
from crosslmm_ops.nn import attention as nn_attention
from crosslmm_ops.nn import memory as nn_memory
from crosslmm_ops.ops import projected_attention as pa
from crosslmm_ops.ops.projected_attention import CostModel, ProjectedLayout, choose_path, last_path

HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM = 36, 20, 4, 2, 10
N, POOLED = 6, 2
TIGHT = dict(atol=1e-10, rtol=1e-10)
TIGHT_GRAD = dict(atol=1e-9, rtol=1e-9)


@pytest.fixture(autouse=True)
def _no_path_env(monkeypatch):
    monkeypatch.delenv(pa.PATH_ENV_VAR, raising=False)


def randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(-1, 1)
            elif "norm" in name:
                p.copy_(
                    (1 + 0.2 * torch.randn_like(p))
                    if name.endswith("weight")
                    else 0.2 * torch.randn_like(p)
                )
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.2)
    return module


def make_batch(frames, L, *, dtype=torch.float64, tokens=N, vision=VISION, hidden=HIDDEN):
    feats = [torch.randn(t, tokens, vision, dtype=dtype) for t in frames]
    h = torch.randn(len(frames), L, hidden, dtype=dtype)
    visual = torch.zeros(len(frames), L, dtype=torch.bool)
    for b, t in enumerate(frames):
        visual[b, 1 : 1 + t * POOLED] = True
    return feats, h, visual


def twins(cls, *args, **kwargs):
    """The same randomised module twice (float64, torch back end): one per path."""
    fused = randomize(cls(*args, **kwargs, kv_path="fused", backend="torch").double())
    materialized = cls(*args, **kwargs, kv_path="materialized", backend="torch").double()
    materialized.load_state_dict(fused.state_dict())
    return fused, materialized


def run(module, h, feats, *masks, grad=None):
    """Forward (and backward with ``grad``) from fresh leaves: (out, grads by name)."""
    h = h.detach().clone().requires_grad_()
    feats = [f.detach().clone().requires_grad_() for f in feats]
    module.zero_grad(set_to_none=True)
    out = module(h, VisionMemory.from_list(feats, POOLED), *masks)
    grads = {}
    if grad is not None:
        out.backward(grad)
        grads = {n: p.grad for n, p in module.named_parameters()}
        grads["h"] = h.grad
        grads.update({f"feats{i}": f.grad for i, f in enumerate(feats)})
    return out, grads


def assert_same(fused, materialized, h, feats, *masks):
    grad = torch.randn_like(h)
    out_f, g_f = run(fused, h, feats, *masks, grad=grad)
    assert last_path() == "fused"
    out_m, g_m = run(materialized, h, feats, *masks, grad=grad)
    assert last_path() == "materialized"
    torch.testing.assert_close(out_f, out_m, **TIGHT)
    assert g_f.keys() == g_m.keys()
    for name in g_f:
        a, e = g_f[name], g_m[name]
        if e is None or a is None:  # e.g. the features of a sample without frames
            assert (a is None or not a.any()) and (e is None or not e.any()), name
            continue
        torch.testing.assert_close(a, e, **TIGHT_GRAD, msg=name)


# ----------------------------------------------------------------------------------------------
# The fused path equals the materialised one (float64, torch back end)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_norm", ["rmsnorm", "layernorm", None])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_decode_shaped_call(vision_norm, kv_heads):
    """One text query per sample against all of its frames (a decode step; frames 3, 0, 2), with
    biases: forward and every gradient equal on both paths."""
    fused, materialized = twins(
        T2VCrossAttention,
        HIDDEN,
        VISION,
        HEADS,
        kv_heads,
        HEAD_DIM,
        vision_norm=vision_norm,
        bias=True,
    )
    feats, _, _ = make_batch([3, 0, 2], 1)
    h = torch.randn(3, 1, HIDDEN, dtype=torch.float64)
    assert_same(fused, materialized, h, feats)


@pytest.mark.parametrize("scope", ["global", "frame"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(share_kv=True, bias=True),
        dict(vision_norm="layernorm", bias=True, num_kv_heads=1),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain",
)
def test_dcal_paths_agree(scope, kw):
    kw = dict(kw)
    kv_heads = kw.pop("num_kv_heads", KV_HEADS)
    fused, materialized = twins(
        DualCrossAttention, HIDDEN, VISION, HEADS, kv_heads, HEAD_DIM, v2v_scope=scope, **kw
    )
    feats, h, visual = make_batch([2, 1, 3], 9)
    assert_same(fused, materialized, h, feats, visual)


@pytest.mark.parametrize("vision_norm", ["rmsnorm", "layernorm", None])
def test_materialised_keys_projected_in_chunks_without_autograd(monkeypatch, vision_norm):
    """Without autograd the tokens are normalised and projected a chunk of rows at a time (the
    normalised copy of all of them is never made): the DCAL's output is the same as with one
    projection of all rows, gates open, chunks that do not divide the rows."""
    _, materialized = twins(
        DualCrossAttention,
        HIDDEN,
        VISION,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        vision_norm=vision_norm,
        bias=True,
    )
    feats, h, visual = make_batch([2, 1, 3], 9)
    with torch.no_grad():
        whole = materialized(h, VisionMemory.from_list(feats, POOLED), visual)
        assert not torch.equal(whole, h)  # the gates are open: the DCAL changed something
        calls = []
        real = nn_attention._project_in_chunks
        monkeypatch.setattr(nn_attention, "_PROJECTION_CHUNK_ROWS", 7)  # 36 rows: 5 full + 1
        monkeypatch.setattr(
            nn_attention, "_project_in_chunks", lambda *a: calls.append(1) or real(*a)
        )
        chunked = materialized(h, VisionMemory.from_list(feats, POOLED), visual)
    assert calls, "the chunked projection did not run"
    torch.testing.assert_close(chunked, whole, **TIGHT)


def test_rmsnorm_without_eps_and_without_affine():
    """Norms built by hand: nn.RMSNorm(eps=None) (the dtype's epsilon) and a LayerNorm without
    weight and bias."""
    for norm in (nn.RMSNorm(VISION), nn.LayerNorm(VISION, elementwise_affine=False)):
        fused, materialized = twins(CrossAttention, HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM)
        for module in (fused, materialized):
            module.vision_norm = randomize(norm.double())
        feats, h, _ = make_batch([2, 1], 4)
        assert_same(fused, materialized, h, feats)


# ----------------------------------------------------------------------------------------------
# kv_path and the choice "auto" makes
# ----------------------------------------------------------------------------------------------


def _layout(module: CrossAttention, lens_q, lens_k) -> ProjectedLayout:
    return ProjectedLayout(
        False,
        len(lens_q),
        module.num_heads,
        module.num_kv_heads,
        module.head_dim,
        module.vision_size,
        sum(lens_q),
        sum(lens_k),
        max(lens_q),
        max(lens_k),
        lens_q=tuple(lens_q),
        lens_k=tuple(lens_k),
    )


@pytest.mark.parametrize("kv_heads", [2, 12])
def test_auto_at_crosslmm_2b_head_shapes(kv_heads):
    """CrossLMM-2B's attention shapes (12 query heads of 128, SigLIP's 729 tokens of width 1152;
    a narrow hidden size keeps the test small: the cost model does not read it), 2 frames:
    a decode step goes fused; a 128-token text prefill goes materialised; frame-local V2V
    follows the cost model (close at 2 KV heads, see CostModel)."""
    hidden, vision, heads, head_dim, tokens, pooled = 48, 1152, 12, 128, 729, 9
    t2v = T2VCrossAttention(hidden, vision, heads, kv_heads, head_dim)
    v2v = V2VCrossAttention(hidden, vision, heads, kv_heads, head_dim, scope="frame")
    feats = [torch.randn(2, tokens, vision)]
    memory = VisionMemory.from_list(feats, pooled)
    t2v(torch.randn(1, 1, hidden), memory)
    assert last_path() == "fused"
    t2v(torch.randn(1, 128, hidden), memory)
    assert last_path() == "materialized"
    h = torch.randn(1, 2 * pooled, hidden)
    v2v(h, memory, torch.ones(1, 2 * pooled, dtype=torch.bool))
    expected = choose_path(_layout(v2v, [pooled] * 2, [tokens] * 2), torch.float32)
    assert last_path() == expected
    if kv_heads == 12:
        assert expected == "fused"


def test_auto_follows_cost_model_and_overrides(monkeypatch):
    t2v = randomize(T2VCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM))
    feats, h, _ = make_batch([2, 1], 5, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    monkeypatch.setattr(pa, "COST_MODEL", CostModel(fused_tflops=1e-9, bandwidth_tbs=1e9))
    t2v(h, memory)
    assert last_path() == "materialized"
    monkeypatch.setattr(
        pa, "COST_MODEL", CostModel(matmul_tflops=1e-9, attention_tflops=1e-9, bandwidth_tbs=1e9)
    )
    t2v(h, memory)
    assert last_path() == "fused"
    monkeypatch.setenv(pa.PATH_ENV_VAR, "materialized")  # the environment overrides auto ...
    t2v(h, memory)
    assert last_path() == "materialized"
    t2v.kv_path = "fused"  # ... and kv_path overrides the environment
    t2v(h, memory)
    assert last_path() == "fused"
    monkeypatch.setenv(pa.PATH_ENV_VAR, "sideways")
    t2v.kv_path = "auto"
    with pytest.raises(ValueError, match=pa.PATH_ENV_VAR):
        t2v(h, memory)


def test_kv_path_option():
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS, kv_path="fused")
    assert dcal.kv_path == dcal.v2v.kv_path == dcal.t2v.kv_path == "fused"
    assert "kv_path='fused'" in repr(dcal)
    dcal.kv_path = "materialized"
    assert dcal.v2v.kv_path == dcal.t2v.kv_path == "materialized"
    assert "kv_path" not in repr(DualCrossAttention(HIDDEN, VISION, HEADS))
    for bad in ("sideways", None, "Fused"):
        with pytest.raises(ValueError, match="kv_path must be one of"):
            DualCrossAttention(HIDDEN, VISION, HEADS, kv_path=bad)
        with pytest.raises(ValueError, match="kv_path must be one of"):
            dcal.t2v.kv_path = bad


class LoraLinear(nn.Linear):
    """A stand-in for an adapter: its output is not ``x @ weight.T + bias``."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.a.T @ self.b.T


def test_fused_path_is_not_taken_where_it_would_skip_something(monkeypatch):
    """k_proj wrapped by an adapter, or a hook on the vision norm: auto stays materialised (the
    adapter's effect is in the output), "fused" raises and says why."""
    monkeypatch.setattr(pa, "COST_MODEL", CostModel(matmul_tflops=1e-9, attention_tflops=1e-9))
    feats, h, _ = make_batch([2, 1], 3)
    memory = VisionMemory.from_list(feats, POOLED)
    module = randomize(T2VCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM).double())
    plain = module(h, memory)
    assert last_path() == "fused"
    module.k_proj = LoraLinear(module.k_proj).double()
    adapted = module(h, memory)
    assert last_path() == "materialized"
    assert (adapted - plain).abs().max() > 1e-6, "the adapter must act"
    module.kv_path = "fused"
    with pytest.raises(ValueError, match="k_proj is a LoraLinear"):
        module(h, memory)
    other = randomize(T2VCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM).double())
    other.vision_norm.register_forward_hook(lambda m, args, out: out * 2)
    other(h, memory)
    assert last_path() == "materialized"
    other.kv_path = "fused"
    with pytest.raises(ValueError, match="vision_norm has forward hooks"):
        other(h, memory)


@pytest.mark.skipif(
    not _backend.triton_runnable(torch.device("cpu"))[0], reason="needs TRITON_INTERPRET=1"
)
def test_auto_stays_materialised_where_the_core_cannot_run(monkeypatch):
    """A token width above the fused core's limit (2048) on backend="triton": auto takes the
    materialised path (whose attention can run) instead of failing; "fused" fails loudly."""
    monkeypatch.setattr(pa, "COST_MODEL", CostModel(matmul_tflops=1e-9, attention_tflops=1e-9))
    wide = 2056
    module = randomize(T2VCrossAttention(HIDDEN, wide, HEADS, KV_HEADS, HEAD_DIM, backend="triton"))
    feats, h, _ = make_batch([1], 2, dtype=torch.float32, tokens=2, vision=wide)
    memory = VisionMemory.from_list(feats, POOLED)
    with crosslmm_ops.record_backends() as log:
        module(h, memory)
    assert last_path() == "materialized" and ("cross_attention", "triton") in log
    module.kv_path = "fused"
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        module(h, memory)


def test_backend_passes_through_the_fused_path():
    module = T2VCrossAttention(
        HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path="fused", backend="torch"
    )
    feats, h, _ = make_batch([1, 2], 3, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    with crosslmm_ops.record_backends() as log:
        module(h, memory)
    assert log == [("projected_attention_core", "torch"), ("projected_cross_attention", "torch")]
    module.backend = "cuda"
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        module(h, memory)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_fused_under_autocast():
    """bf16 memory, float32 hidden states and weights, CPU autocast: the fused path gives what
    the materialised one gives, to bf16 rounding."""
    dcal = randomize(
        DualCrossAttention(
            HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, bias=True, vision_norm="layernorm"
        )
    )
    feats, h, visual = make_batch([2, 1], 7, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED).to(torch.bfloat16)
    outs = []
    for kv_path in ("fused", "materialized"):
        dcal.kv_path = kv_path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(dcal(h, memory, visual))
        assert last_path() == kv_path and outs[-1].dtype == h.dtype
    torch.testing.assert_close(outs[0], outs[1], atol=0.05, rtol=0.05)
    assert all(key[2] == torch.bfloat16 for key in memory._normalized)


# ----------------------------------------------------------------------------------------------
# The normalised tokens: once per memory, for every layer and decode step
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def count_normalize(monkeypatch):
    calls = []
    original = nn_memory.normalize_tokens

    def counting(x, norm, eps):
        calls.append((norm, eps))
        return original(x, norm, eps)

    monkeypatch.setattr(nn_memory, "normalize_tokens", counting)
    return calls


@pytest.fixture
def count_projections(monkeypatch):
    calls = []
    original = nn_attention._project_kv

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(nn_attention, "_project_kv", counting)
    return calls


def test_decode_steps_share_the_normalised_tokens(count_normalize, count_projections):
    """A prefill and three decode steps through four DCALs (fused): the tokens are normalised
    once for all of them, K/V never projected; the outputs equal the materialised path's."""
    layers = [
        randomize(
            DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path="fused").double()
        )
        for _ in range(4)
    ]
    feats, h, visual = make_batch([2, 1], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    steps = [(h, visual)] + [
        (torch.randn(2, 1, HIDDEN, dtype=torch.float64), None) for _ in range(3)
    ]
    with torch.no_grad():
        fused = []
        for x, mask in steps:
            for layer in layers:
                x = layer(x, memory, mask)
            fused.append(x)
        assert count_normalize == [("rmsnorm", 1e-6)] and not count_projections
        for layer in layers:
            layer.kv_path = "materialized"
        for (x, mask), expected in zip(steps, fused):
            for layer in layers:
                x = layer(x, memory, mask)
            torch.testing.assert_close(x, expected, **TIGHT)


def test_normalised_tokens_follow_the_tokens(count_normalize):
    """One entry per (norm, eps, dtype); recomputed when the tokens change in place or are
    replaced; a new memory (select, to) starts its own."""
    feats, h, visual = make_batch([2, 1], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    rms = randomize(DualCrossAttention(HIDDEN, VISION, HEADS, kv_path="fused").double())
    ln = randomize(
        DualCrossAttention(
            HIDDEN, VISION, HEADS, kv_path="fused", vision_norm="layernorm", norm_eps=1e-5
        ).double()
    )
    with torch.no_grad():
        for layer in (rms, ln, rms, ln):
            layer(h, memory, visual)
        assert count_normalize == [("rmsnorm", 1e-6), ("layernorm", 1e-5)]
        before = rms(h, memory, visual)
        memory.tokens.mul_(2.0)  # in place: the version counter moves
        after = rms(h, memory, visual)
        fresh = VisionMemory.from_list([f * 2 for f in feats], POOLED)
        torch.testing.assert_close(after, rms(h, fresh, visual), **TIGHT)
        assert not torch.allclose(before, after)
        memory.tokens = memory.tokens.clone()  # replaced: another tensor
        rms(h, memory, visual)
        assert len(count_normalize) == 5  # + the fresh memory's, + the replaced tokens'
        picked = memory.select([1, 0])
        assert not picked._normalized
    assert memory.normalized_tokens(None, 0.0) is memory.tokens


def test_training_steps_reuse_a_memory(count_normalize):
    """Tokens that require grad, two DCALs, the same memory for two training steps: within a
    forward the layers share one normalisation (its graph), the backward drops it, the next
    forward builds its own (not "backward through the graph a second time"), and every gradient
    equals the materialised path's."""
    layers = [
        randomize(
            DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path="fused").double()
        )
        for _ in range(2)
    ]
    feats, h, visual = make_batch([2, 1], 7)
    source = torch.cat([f.reshape(-1, VISION) for f in feats]).requires_grad_()
    g = torch.randn_like(h)

    def step(memory):
        x = h
        for layer in layers:
            x = layer(x, memory, visual)
        x.backward(g)
        grads = [source.grad] + [p.grad for layer in layers for p in layer.parameters()]
        for t in [source, *(p for la in layers for p in la.parameters())]:
            t.grad = None
        return x.detach(), grads

    memory = VisionMemory._from_packed(source, [2, 1], N, POOLED)
    first = step(memory)
    # once in the forward, for both layers, and once in the backward (which recomputes it)
    assert len(count_normalize) == 2 and not memory._normalized, "dropped by the backward"
    second = step(memory)
    assert len(count_normalize) == 4
    for layer in layers:
        layer.kv_path = "materialized"
    expected = step(memory)
    for got in (first, second):
        torch.testing.assert_close(got[0], expected[0], **TIGHT)
        for a, e in zip(got[1], expected[1]):
            torch.testing.assert_close(a, e, **TIGHT_GRAD)


def test_entries_without_a_graph_are_not_used_for_gradients():
    """A no_grad (or inference_mode) forward first: its normalised tokens have no graph (or are
    inference tensors); a later forward with gradients computes its own, so the gradient reaches
    the tokens and autograd can save what it needs."""
    layer = randomize(
        T2VCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path="fused").double()
    )
    feats, h, _ = make_batch([2, 1], 3)
    for mode in (torch.no_grad, torch.inference_mode):
        leaves = [f.clone().requires_grad_() for f in feats]
        memory = VisionMemory.from_list(leaves, POOLED)
        with mode():
            layer(h, memory)
        out = layer(h, memory)
        out.sum().backward()
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in leaves)
        # tokens without grad: an inference-mode entry must still not be saved for backward
        memory = VisionMemory.from_list([f.detach() for f in feats], POOLED)
        with mode():
            layer(h, memory)
        layer.zero_grad()
        layer(h.clone().requires_grad_(), memory).sum().backward()
        assert layer.k_proj.weight.grad is not None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    """DCALs under torch.utils.checkpoint (as transformers' gradient checkpointing runs decoder
    layers): the recomputation meets the shared normalised tokens; every gradient equals the
    plain run's."""
    layers = [
        randomize(
            DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path="fused").double()
        )
        for _ in range(2)
    ]
    feats, h, visual = make_batch([2, 1], 7)
    g = torch.randn_like(h)
    results = []
    for checkpointed in (False, True):
        leaves = [f.clone().requires_grad_() for f in feats]
        memory = VisionMemory.from_list(leaves, POOLED)
        x = h.clone().requires_grad_()
        y = x
        for layer in layers:
            if checkpointed:
                y = checkpoint(layer, y, memory, visual, use_reentrant=use_reentrant)
            else:
                y = layer(y, memory, visual)
        y.backward(g)
        grads = (
            [x.grad] + [f.grad for f in leaves] + [p.grad for la in layers for p in la.parameters()]
        )
        for la in layers:
            la.zero_grad(set_to_none=True)
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, **TIGHT)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, **TIGHT_GRAD)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_decode_step_on_cuda_at_crosslmm_2b_shapes():
    """A decode step of a DCAL with CrossLMM-2B's shapes (hidden 1536, 12 heads of 128, 2 KV
    heads; 64 frames of 729 SigLIP tokens of width 1152) in bf16: auto takes the fused path on a
    kernel (CUDA, or Triton where the extension lacks the fused kernel), never projects the
    video, and agrees with the materialised path to bf16 rounding."""
    torch.manual_seed(0)
    hidden, vision, heads, kv_heads, head_dim, frames, tokens, pooled = (
        1536,
        1152,
        12,
        2,
        128,
        64,
        729,
        9,
    )
    dcal = randomize(DualCrossAttention(hidden, vision, heads, kv_heads, head_dim))
    with torch.no_grad():
        dcal.t2v.gate.alpha.fill_(0.5)  # a gate well away from 0: the branch's result shows
    dcal = dcal.to("cuda", torch.bfloat16)
    feats = torch.randn(frames, tokens, vision, device="cuda", dtype=torch.bfloat16)
    memory = VisionMemory.from_list([feats], pooled)
    h = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), crosslmm_ops.record_backends() as log:
        fused = dcal(h, memory)
    assert last_path() == "fused"
    assert dict(log)["projected_cross_attention"] in ("cuda", "triton")
    assert list(memory._normalized) == [("rmsnorm", 1e-6, torch.bfloat16)] and not memory._kv
    dcal.kv_path = "materialized"
    with torch.no_grad():
        materialized = dcal(h, memory)
    # relative to the branch's contribution, which bf16 rounds at ~1e-2 on either path
    contribution = (materialized.float() - h.float()).norm()
    assert (fused.float() - materialized.float()).norm() <= 5e-2 * contribution
