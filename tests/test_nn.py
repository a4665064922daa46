"""crosslmm_ops.nn: the modules against a plain-PyTorch composition of the same math written out
here (per sample, in float64; the attention is tests/attention_oracle.py's), forward and backward;
the identity of an untrained DCAL; GQA; global and frame scope; batches with different numbers of
frames (0 too), text lengths and padding; shared gates and K/V; state_dict layout; transformers'
weight initialisation; VisionMemory and TokenPooling; bad input; the Triton back end (CPU
interpreter) and, marked ``cuda``, the CUDA back end in bf16. The reference tests run both
attention paths (``kv_path``: materialised K/V, and projection-fused); tests/test_nn_paths.py tests
the choice between them and the shared normalised tokens.
"""

from __future__ import annotations

import math
import tempfile

import attention_oracle as oracle
import pytest
import torch
from torch import nn

import crosslmm_ops
from crosslmm_ops import _backend, token_pool
from crosslmm_ops.nn import (
    CrossAttention,
    DualCrossAttention,
    T2VCrossAttention,
    TanhGate,
    TokenPooling,
    V2VCrossAttention,
    VisionMemory,
)
from crosslmm_ops.ops.projected_attention import last_path
from crosslmm_ops.testing import cu_seqlens, non_contiguous, poison_outputs


def triton_cpu() -> bool:
    return _backend.triton_runnable(torch.device("cpu"))[0]


needs_interpreter = pytest.mark.skipif(not triton_cpu(), reason="needs TRITON_INTERPRET=1")

# Small, deliberately uneven shapes: hidden 36 with explicit head_dim 10 (not 36 / 4), GQA 4 -> 2,
# vision width 20, N = 6 tokens per frame (a 2x3 grid), n = 2 pooled tokens per frame.
HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM = 36, 20, 4, 2, 10
N, POOLED = 6, 2


# ----------------------------------------------------------------------------------------------
# The reference: the same math, written out per sample in float64
# ----------------------------------------------------------------------------------------------


def ref_norm(kind, x, weight, bias, eps):
    if kind is None:
        return x
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_linear(x, params, name):
    y = x @ params[f"{name}.weight"].T
    if f"{name}.bias" in params:
        y = y + params[f"{name}.bias"]
    return y


class Ref:
    """Parameters of a module as float64 leaves, looked up by name: a branch's own first, then
    the DCAL's (what a DCAL shares lives on the DCAL)."""

    def __init__(self, module: nn.Module):
        self.params = {
            n: p.detach().double().requires_grad_(True) for n, p in module.named_parameters()
        }

    def sub(self, prefix: str) -> dict:
        own = {n[len(prefix) :]: p for n, p in self.params.items() if n.startswith(prefix)}
        shared = {
            n: p
            for n, p in self.params.items()
            if "." in n and n.split(".")[0] in ("vision_norm", "k_proj", "v_proj", "gate")
        }
        return {**shared, **own}


def ref_branch(
    p: dict,
    h,
    feats,
    positions,
    *,
    scope,
    heads,
    kv_heads,
    head_dim,
    query_norm,
    vision_norm,
    eps,
    pooled,
):
    """Updates (B, L, hidden) of one branch: for each sample, its query rows ``positions[b]``
    attend (the oracle, float64) to its original tokens (all of them, or their own frame's)."""
    B, L, _ = h.shape
    delta = torch.zeros_like(h)
    for b in range(B):
        rows = positions[b]
        if not rows:
            continue
        x = feats[b].reshape(-1, feats[b].shape[-1])  # (T_b * N, Dv)
        hq = h[b, rows]
        q = ref_linear(
            ref_norm(query_norm, hq, p.get("query_norm.weight"), p.get("query_norm.bias"), eps),
            p,
            "q_proj",
        )
        q = q.view(len(rows), heads, head_dim)
        if x.shape[0] == 0:  # no frames: nothing to attend to, the rows pass through
            continue
        xv = ref_norm(vision_norm, x, p.get("vision_norm.weight"), p.get("vision_norm.bias"), eps)
        k = ref_linear(xv, p, "k_proj").view(-1, kv_heads, head_dim)
        v = ref_linear(xv, p, "v_proj").view(-1, kv_heads, head_dim)
        if scope == "frame":  # the i-th group of `pooled` rows (frame i) sees frame i's tokens
            frames, tokens = feats[b].shape[:2]
            assert len(rows) <= frames * pooled, "a query row past the last frame"
            lens_q = [max(0, min(pooled, len(rows) - f * pooled)) for f in range(frames)]
            lens = lens_q, [tokens] * frames
        else:
            lens = [len(rows)], [x.shape[0]]
        attn, _ = oracle.attention(
            q, k, v, cu_seqlens(lens[0]), cu_seqlens(lens[1]), softmax_scale=head_dim**-0.5
        )
        attn = attn.reshape(len(rows), -1)
        out = ref_linear(attn, p, "o_proj")
        if "gate.alpha" in p:
            out = torch.tanh(p["gate.alpha"]) * out
        delta = delta.index_put((torch.full((len(rows),), b), torch.tensor(rows)), out)
    return delta


def positions_of(mask):
    return [row.nonzero().reshape(-1).tolist() for row in mask]


def ref_dcal(ref: Ref, dcal: DualCrossAttention, h, feats, visual_mask, text_mask, *, cfg):
    out = h
    if text_mask is None:
        text_mask = ~visual_mask if visual_mask is not None else torch.ones(h.shape[:2], dtype=bool)
    for name, branch, mask in (("v2v", dcal.v2v, visual_mask), ("t2v", dcal.t2v, text_mask)):
        if branch is None or mask is None:
            continue
        # ref.sub: the branch's own parameters, else the DCAL's shared K/V and gate.
        out = out + ref_branch(
            ref.sub(name + "."), h, feats, positions_of(mask), scope=branch.scope, **cfg
        )
    return out


def randomize(module: nn.Module, gates=True):
    """Random, non-trivial values everywhere (norm weights near 1, gates in (-1, 1))."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("alpha"):
                if gates:
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


def make_batch(frames, L, *, dtype=torch.float64, tokens=N, vision=VISION, gap=1):
    """Features per sample, hidden states (B, L, HIDDEN) and a visual mask with each sample's
    T_b * POOLED visual positions starting at ``gap`` (text before and after)."""
    feats = [torch.randn(t, tokens, vision, dtype=dtype) for t in frames]
    h = torch.randn(len(frames), L, HIDDEN, dtype=dtype)
    visual = torch.zeros(len(frames), L, dtype=torch.bool)
    for b, t in enumerate(frames):
        visual[b, gap : gap + t * POOLED] = True
    return feats, h, visual


CFG = dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, eps=1e-6, pooled=POOLED)


def dcal_cfg(**kw):
    base = dict(query_norm="rmsnorm", vision_norm="rmsnorm")
    base.update({k: kw[k] for k in ("query_norm", "vision_norm") if k in kw})
    return {**CFG, **base}


def check_grads(module, ref, out, ref_out, inputs, ref_inputs, atol):
    g = torch.randn_like(ref_out)
    out.backward(g.to(out.dtype))
    ref_out.backward(g)
    for name, p in module.named_parameters():
        expected = ref.params[name].grad
        actual = p.grad
        if expected is None:
            assert actual is None or not actual.any(), name
            continue
        assert actual is not None, f"no gradient reached {name}"
        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=atol, msg=name)
    for t, r in zip(inputs, ref_inputs):
        expected = r.grad if r.grad is not None else torch.zeros_like(r)  # e.g. a sample's 0 frames
        torch.testing.assert_close(t.grad.double(), expected, atol=atol, rtol=atol)


# ----------------------------------------------------------------------------------------------
# DCAL and its branches against the reference
# ----------------------------------------------------------------------------------------------

DCAL_CASES = [
    dict(),  # the paper's reading: V2V global + T2V, separate gates and K/V, RMSNorm
    dict(v2v_scope="frame"),
    dict(share_kv=True),
    dict(share_gate=True, v2v_scope="frame"),
    dict(share_kv=True, share_gate=True, bias=True),
    dict(bias=True, vision_norm="layernorm", query_norm=None),
    dict(vision_norm=None, query_norm="layernorm", num_kv_heads=1),
    dict(t2v=False),
    dict(v2v=False, bias=True),
]


def case_id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "paper"


KV_PATHS = ["materialized", "fused"]


@pytest.mark.parametrize("kv_path", KV_PATHS)
@pytest.mark.parametrize("kw", DCAL_CASES, ids=case_id)
def test_dcal_matches_reference(kw, kv_path):
    """float64 end to end (torch back end), on both attention paths: forward and every gradient
    (hidden states, original tokens, all parameters) against the dense reference. Frames 2, 0, 3
    (a sample without video, whose text passes through), padding after the text (neither visual
    nor text)."""
    kw = dict(kw)
    kv_heads = kw.pop("num_kv_heads", KV_HEADS)
    dcal = DualCrossAttention(
        HIDDEN, VISION, HEADS, kv_heads, HEAD_DIM, **kw, kv_path=kv_path, backend="torch"
    )
    randomize(dcal.double())
    frames, L = [2, 0, 3], 11
    feats, h, visual = make_batch(frames, L)
    text = ~visual
    text[0, 9:] = False  # padding of sample 0
    text[2, :1] = False  # left padding of sample 2
    memory = VisionMemory.from_list([f.requires_grad_() for f in feats], POOLED)
    h.requires_grad_()
    ref = Ref(dcal)
    ref_feats = [f.detach().clone().requires_grad_() for f in feats]
    ref_h = h.detach().clone().requires_grad_()
    out = dcal(h, memory, visual, text)
    assert last_path() == kv_path
    cfg = dcal_cfg(**kw)
    cfg["kv_heads"] = kv_heads
    expected = ref_dcal(ref, dcal, ref_h, ref_feats, visual, text, cfg=cfg)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    pad = ~(visual | text)
    assert torch.equal(out[pad], h[pad]), "padding positions must pass through"
    if dcal.t2v is not None:
        assert torch.equal(out[1], h[1]), "a sample without frames must pass through"
    check_grads(dcal, ref, out, expected, [h, *feats], [ref_h, *ref_feats], atol=1e-9)


@pytest.mark.parametrize("kv_path", KV_PATHS)
@pytest.mark.parametrize("scope", ["global", "frame"])
def test_v2v_module_matches_reference(scope, kv_path):
    v2v = V2VCrossAttention(
        HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, scope=scope, bias=True, kv_path=kv_path
    )
    randomize(v2v.double())
    feats, h, visual = make_batch([3, 1], 9)
    memory = VisionMemory.from_list(feats, POOLED)
    h.requires_grad_()
    ref, ref_h = Ref(v2v), h.detach().clone().requires_grad_()
    out = v2v(h, memory, visual)
    expected = ref_h + ref_branch(
        ref.sub(""),
        ref_h,
        feats,
        positions_of(visual),
        scope=scope,
        query_norm="rmsnorm",
        vision_norm="rmsnorm",
        **CFG,
    )
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    check_grads(v2v, ref, out, expected, [h], [ref_h], atol=1e-9)


def test_frame_and_global_scope_differ():
    """The two scopes are different functions (with several frames), each the reference's."""
    feats, h, visual = make_batch([3], 8)
    memory = VisionMemory.from_list(feats, POOLED)
    a = randomize(V2VCrossAttention(HIDDEN, VISION, HEADS, scope="global").double())
    b = V2VCrossAttention(HIDDEN, VISION, HEADS, scope="frame").double()
    b.load_state_dict(a.state_dict())
    ya, yb = a(h, memory, visual), b(h, memory, visual)
    assert (ya - yb)[visual].abs().max() > 1e-3
    # One frame per sample: both scopes see the same keys.
    feats1, h1, visual1 = make_batch([1, 1], 5)
    m1 = VisionMemory.from_list(feats1, POOLED)
    torch.testing.assert_close(a(h1, m1, visual1), b(h1, m1, visual1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scope", ["global", "frame"])
def test_sample_with_frames_but_no_visual_positions(scope):
    """A batch mixing a prefill (sample 0: all its pooled tokens) and a sample whose frames are
    in memory but whose visual positions are not in this call (sample 1, as while decoding)."""
    dcal = randomize(
        DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, v2v_scope=scope).double()
    )
    feats, h, visual = make_batch([2, 3, 1], 9)
    visual[1] = False
    memory = VisionMemory.from_list(feats, POOLED)
    expected = ref_dcal(Ref(dcal), dcal, h, feats, visual, None, cfg=dcal_cfg())
    torch.testing.assert_close(dcal(h, memory, visual), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kv_path", KV_PATHS)
def test_t2v_and_generic_modules(kv_path):
    """T2V with a mask and without one (every position queries), and the generic block with GQA
    and no norms, against the reference."""
    feats, h, _ = make_batch([2, 3], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    text = torch.rand(2, 7) < 0.6
    t2v = randomize(
        T2VCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path=kv_path).double()
    )
    for mask in (text, None):
        rows = positions_of(text) if mask is not None else [list(range(7))] * 2
        expected = h + ref_branch(
            Ref(t2v).sub(""),
            h,
            feats,
            rows,
            scope="global",
            query_norm="rmsnorm",
            vision_norm="rmsnorm",
            **CFG,
        )
        torch.testing.assert_close(t2v(h, memory, mask), expected, atol=1e-10, rtol=1e-10)
    gen = randomize(
        CrossAttention(
            HIDDEN, VISION, 6, 3, 7, query_norm=None, vision_norm=None, bias=True, kv_path=kv_path
        ).double()
    )
    cfg = dict(CFG, heads=6, kv_heads=3, head_dim=7)
    expected = h + ref_branch(
        Ref(gen).sub(""),
        h,
        feats,
        [list(range(7))] * 2,
        scope="global",
        query_norm=None,
        vision_norm=None,
        **cfg,
    )
    torch.testing.assert_close(gen(h, memory), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kv_path", KV_PATHS)
def test_float32_module_close_to_float64_reference(kv_path):
    """The default float32 module against the float64 reference (the precision users train in
    on the CPU): forward and gradients within float32 rounding."""
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, kv_path=kv_path))
    feats, h, visual = make_batch([2, 3], 9, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    h.requires_grad_()
    ref = Ref(dcal)
    ref_h = h.detach().double().requires_grad_()
    out = dcal(h, memory, visual)
    expected = ref_dcal(ref, dcal, ref_h, [f.double() for f in feats], visual, None, cfg=dcal_cfg())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    check_grads(dcal, ref, out, expected, [h], [ref_h], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The untrained DCAL is the identity; gradients still reach the gates
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(share_gate=True, share_kv=True, bias=True), dict(v2v_scope="frame", bias=True)],
    ids=case_id,
)
def test_gate_zero_is_identity(dtype, kw):
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, **kw).to(dtype)
    randomize(dcal, gates=False)
    gates = [p for n, p in dcal.named_parameters() if n.endswith("alpha")]
    assert gates and all(torch.equal(p, torch.zeros_like(p)) for p in gates)
    feats, h, visual = make_batch([2, 0, 1], 8, dtype=dtype)
    memory = VisionMemory.from_list(feats, POOLED)
    h.requires_grad_()
    out = dcal(h, memory, visual)
    assert torch.equal(out, h)
    (out * torch.randn_like(out)).sum().backward()
    for p in gates:
        assert p.grad is not None and p.grad.abs().sum() > 0, "no gradient reached a gate"


def test_tanh_gate():
    gate = TanhGate()
    assert gate.alpha.shape == (1,) and gate.alpha.item() == 0.0
    x = torch.randn(3, 4)
    assert torch.equal(gate(x), torch.zeros_like(x))
    g = TanhGate(0.5)
    torch.testing.assert_close(g(x), math.tanh(0.5) * x)
    with torch.no_grad():
        g.alpha.fill_(3.0)
    g.reset_parameters()
    assert g.alpha.item() == 0.5
    with pytest.raises(ValueError, match="init_value"):
        TanhGate(float("nan"))


# ----------------------------------------------------------------------------------------------
# Batches: variable frames, padding, decoding, beams, non-contiguous input
# ----------------------------------------------------------------------------------------------


def test_from_features_with_frame_mask_equals_from_list():
    """A padded (B, T, N, Dv) batch with a frame mask gives the same memory, and the same DCAL
    output, as the per-sample list (padded frames hold garbage that must not be read)."""
    frames = [3, 0, 2]
    feats = [torch.randn(t, N, VISION, dtype=torch.float64) for t in frames]
    padded = torch.full((3, 3, N, VISION), float("nan"), dtype=torch.float64)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    for b, f in enumerate(feats):
        padded[b, : f.shape[0]] = f
        mask[b, : f.shape[0]] = True
    a = VisionMemory.from_features(padded, POOLED, frame_mask=mask)
    b = VisionMemory.from_list(feats, POOLED)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert torch.equal(a.frame_cu_seqlens, b.frame_cu_seqlens)
    assert a.frames_per_sample == (3, 0, 2) and a.max_seqlen == 3 * N
    assert a.cu_seqlens.tolist() == [0, 18, 18, 30]
    assert a.frame_cu_seqlens.tolist() == [0, 6, 12, 18, 24, 30]
    assert [t.shape[0] for t in a.per_sample()] == frames
    full = VisionMemory.from_features(padded[:1], POOLED)
    assert full.tokens.data_ptr() == padded.data_ptr(), "no frame mask: a view, not a copy"


def test_decoding_and_text_only_rows():
    """Decoding: one new position per sample, no visual positions (visual_mask None): only T2V
    runs, each sample against its own frames; V2V alone is the identity."""
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM).double())
    feats, _, _ = make_batch([2, 0, 1], 1)
    memory = VisionMemory.from_list(feats, POOLED)
    h = torch.randn(3, 1, HIDDEN, dtype=torch.float64)
    with crosslmm_ops.record_backends() as log:
        out = dcal(h, memory)
    assert [op for op, _ in log].count("projected_cross_attention") == 1, (
        "only T2V attends while decoding"
    )
    expected = ref_dcal(Ref(dcal), dcal, h, feats, None, None, cfg=dcal_cfg())
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert torch.equal(out[1], h[1])
    v2v_only = DualCrossAttention(HIDDEN, VISION, HEADS, t2v=False).double()
    assert v2v_only(h, memory) is h


def test_beam_select_and_to():
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS).double())
    feats, h, visual = make_batch([2, 1], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    out = dcal(h, memory, visual)
    order = [1, 1, 0, 1]
    picked = memory.select(torch.tensor(order))
    assert picked.frames_per_sample == (1, 1, 2, 1)
    torch.testing.assert_close(
        dcal(h[order], picked, visual[order]), out[order], atol=1e-12, rtol=0
    )
    assert memory.select([0, 1]) is memory
    half = memory.to(torch.float32)
    assert half.tokens.dtype == torch.float32 and half.cu_seqlens.dtype == torch.int32
    assert memory.to(torch.float64) is memory
    with pytest.raises(ValueError, match="batch_indices"):
        memory.select([2])


def test_non_contiguous_inputs():
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM).double())
    feats, h, visual = make_batch([2, 2], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    expected = dcal(h, memory, visual)
    h_nc = non_contiguous(h, 1)
    feats_nc = torch.stack(feats).transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, N, Dv)
    assert not h_nc.is_contiguous() and not feats_nc.is_contiguous()
    memory_nc = VisionMemory.from_features(feats_nc, POOLED)
    visual_nc = torch.zeros(2, 14, dtype=torch.bool)[:, ::2]
    visual_nc.copy_(visual)
    assert not visual_nc.is_contiguous()
    torch.testing.assert_close(dcal(h_nc, memory_nc, visual_nc), expected, atol=1e-12, rtol=0)


def test_plan_is_reused_and_follows_in_place_changes():
    """The counts and indices computed from the masks are reused by later layers (one host read
    per forward), and recomputed when a mask changes in place."""
    layers = [DualCrossAttention(HIDDEN, VISION, HEADS).double() for _ in range(3)]
    feats, h, visual = make_batch([2, 1], 7)
    memory = VisionMemory.from_list(feats, POOLED)
    for layer in layers:
        h = layer(h, memory, visual)
    assert len(memory._plans) == 1
    visual[1, -1] = True  # now sample 1 has 3 visual positions, not 2
    with pytest.raises(ValueError, match="visual_mask marks 3 positions of sample 1"):
        layers[0](h, memory, visual)


def test_cache_kv_for_generation():
    """cache_kv=True (the materialised path's): K/V computed once per layer under no_grad /
    inference_mode and reused; the same outputs as without; a weight update in place
    recomputes; with gradients it is unused."""
    layers = [
        randomize(
            DualCrossAttention(
                HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, share_kv=share, kv_path="materialized"
            )
        )
        for share in (False, True)
    ]
    feats, h, visual = make_batch([2, 1], 7, dtype=torch.float32)
    plain = VisionMemory.from_list(feats, POOLED)
    cached = VisionMemory.from_list(feats, POOLED, cache_kv=True)
    with torch.no_grad():
        expected = [layer(h, plain, visual) for layer in layers]
        for _ in range(2):
            for layer, e in zip(layers, expected):
                assert torch.equal(layer(h, cached, visual), e)
        assert len(cached._kv) == 3  # v2v and t2v of the first layer, the shared pair of the second
        layers[0].t2v.v_proj.weight.mul_(1.5)
        changed = layers[0](h, cached, visual)
        assert torch.equal(changed, layers[0](h, plain, visual))
        assert not torch.equal(changed, expected[0])
    with torch.inference_mode():
        step = torch.randn(2, 1, HIDDEN)
        assert torch.equal(layers[1](step, cached), layers[1](step, plain))
        inf_visual = visual.clone()
        assert torch.equal(layers[1](h, cached, inf_visual), expected[1])
    cached._kv.clear()
    out = layers[1](h.requires_grad_(), cached, visual)
    assert not cached._kv and out.requires_grad
    assert cached.select([1, 0]).cache_kv and not cached.select([1, 0])._kv


# ----------------------------------------------------------------------------------------------
# Parameters: names, sharing, transformers' initialisation
# ----------------------------------------------------------------------------------------------


def test_state_dict_is_plain():
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, bias=True)
    keys = set(dcal.state_dict())
    branch = {
        "query_norm.weight",
        "q_proj.weight",
        "q_proj.bias",
        "vision_norm.weight",
        "k_proj.weight",
        "k_proj.bias",
        "v_proj.weight",
        "v_proj.bias",
        "o_proj.weight",
        "o_proj.bias",
        "gate.alpha",
    }
    assert keys == {f"{b}.{k}" for b in ("v2v", "t2v") for k in branch}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(dcal.v2v, name)) is nn.Linear
    assert dcal.v2v.q_proj.weight.shape == (HEADS * HEAD_DIM, HIDDEN)
    assert dcal.v2v.k_proj.weight.shape == (KV_HEADS * HEAD_DIM, VISION)
    assert dcal.v2v.o_proj.weight.shape == (HIDDEN, HEADS * HEAD_DIM)
    # A state_dict round trip gives the same function.
    other = DualCrossAttention(HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, bias=True)
    randomize(dcal)
    other.load_state_dict(dcal.state_dict())
    feats, h, visual = make_batch([1, 2], 6, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    assert torch.equal(other(h, memory, visual), dcal(h, memory, visual))


def test_sharing_layouts():
    shared = DualCrossAttention(HIDDEN, VISION, HEADS, share_kv=True, share_gate=True)
    keys = set(shared.state_dict())
    assert {"k_proj.weight", "v_proj.weight", "vision_norm.weight", "gate.alpha"} <= keys
    assert not any(
        k.startswith(("v2v.k_proj", "t2v.k_proj", "v2v.gate", "t2v.gate", "v2v.vision_norm"))
        for k in keys
    )
    # Each tensor has exactly one name (safetensors and FSDP need that).
    assert len(keys) == len(list(shared.parameters()))
    # Sharing needs both branches; with one it changes nothing.
    single = DualCrossAttention(HIDDEN, VISION, HEADS, t2v=False, share_kv=True, share_gate=True)
    assert set(single.state_dict()) == {
        f"v2v.{k}"
        for k in (
            "query_norm.weight",
            "q_proj.weight",
            "vision_norm.weight",
            "k_proj.weight",
            "v_proj.weight",
            "o_proj.weight",
            "gate.alpha",
        )
    }
    with pytest.raises(RuntimeError, match="DualCrossAttention"):
        shared.t2v(
            torch.randn(1, 3, HIDDEN), VisionMemory.from_list([torch.randn(1, N, VISION)], POOLED)
        )


def test_reset_parameters():
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS, share_gate=True, bias=True))
    dcal.reset_parameters()
    assert dcal.gate.alpha.item() == 0.0
    assert torch.equal(dcal.v2v.query_norm.weight, torch.ones(HIDDEN))
    assert not torch.equal(dcal.v2v.q_proj.bias, torch.zeros_like(dcal.v2v.q_proj.bias))


def _tiny_hf_models():
    from transformers import PretrainedConfig, PreTrainedModel

    class TinyConfig(PretrainedConfig):
        model_type = "crosslmm-nn-test"

        def __init__(self, with_dcal=True, **kw):
            self.with_dcal = with_dcal
            super().__init__(**kw)

    class Generic(PreTrainedModel):
        """transformers' own _init_weights (as a patched pretrained model has)."""

        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(HIDDEN, HIDDEN)
            self.dcal = (
                DualCrossAttention(HIDDEN, VISION, HEADS, bias=True) if config.with_dcal else None
            )
            self.post_init()

    class Guarded(Generic):
        """What a model that may load checkpoints without DCAL weights must add."""

        def _init_weights(self, module):
            super()._init_weights(module)
            if isinstance(module, TanhGate):
                module.reset_parameters()

    return TinyConfig, Generic, Guarded


def test_transformers_initialisation_keeps_the_identity():
    """post_init() / init_weights() re-initialise the projections (nn.Linear: normal) and norms
    (ones), leave TanhGate alone: alpha stays 0 and the DCAL the identity. A Guarded model loading
    a checkpoint without DCAL weights zeros the gates (torch.empty otherwise); loading one with
    trained gates keeps their values."""
    TinyConfig, Generic, Guarded = _tiny_hf_models()
    feats, h, visual = make_batch([2, 1], 7, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    for cls in (Generic, Guarded):
        model = cls(TinyConfig())
        model.init_weights()
        alphas = [p for n, p in model.named_parameters() if n.endswith("alpha")]
        assert len(alphas) == 2 and all(p.item() == 0.0 for p in alphas)
        assert torch.equal(model.dcal(h, memory, visual), h)
    with tempfile.TemporaryDirectory() as d:
        Guarded(TinyConfig(with_dcal=False)).save_pretrained(d)
        loaded = Guarded.from_pretrained(d, with_dcal=True)
        assert all(p.item() == 0.0 for n, p in loaded.named_parameters() if n.endswith("alpha"))
        assert torch.equal(loaded.dcal(h, memory, visual), h)
    with tempfile.TemporaryDirectory() as d:
        trained = Guarded(TinyConfig())
        with torch.no_grad():
            trained.dcal.t2v.gate.alpha.fill_(0.7)
        trained.save_pretrained(d)
        loaded = Guarded.from_pretrained(d)
        assert loaded.dcal.t2v.gate.alpha.item() == pytest.approx(0.7)
        assert torch.equal(loaded.dcal.v2v.q_proj.weight, trained.dcal.v2v.q_proj.weight)


# ----------------------------------------------------------------------------------------------
# TokenPooling
# ----------------------------------------------------------------------------------------------


def test_token_pooling_module():
    x = torch.randn(2, 5, 27 * 27, 8)
    pool = TokenPooling((27, 27), "avg", kernel_size=3)
    assert pool.tokens_out == 81 and pool.output_grid == (9, 9) and pool.tokens_in == 729
    assert torch.equal(pool(x), token_pool(x, (27, 27), "avg", kernel_size=3))
    adaptive = TokenPooling((27, 27), "adaptive", output_grid=3, temporal_stride=2)
    assert adaptive.tokens_out == 9 and adaptive.frames_out(5) == 3
    y = adaptive(x)
    assert y.shape == (2, 3, 9, 8)
    assert torch.equal(y, token_pool(x, (27, 27), "adaptive", output_size=3, temporal_stride=2))
    assert list(pool.parameters()) == [] and "kernel_size=(3, 3)" in repr(pool)
    with pytest.raises(ValueError, match="kernel_size"):
        TokenPooling((27, 27), "avg")
    with pytest.raises(ValueError, match="not both"):
        TokenPooling((27, 27), "adaptive", output_size=3, output_grid=3)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _mem(frames=(2, 1), vision=VISION, dtype=torch.float32):
    return VisionMemory.from_list([torch.randn(t, N, vision, dtype=dtype) for t in frames], POOLED)


def _visual(B=2, L=8, counts=(4, 2)):
    m = torch.zeros(B, L, dtype=torch.bool)
    for b, c in enumerate(counts):
        m[b, :c] = True
    return m


_H = torch.randn(2, 8, HIDDEN)

BAD_CALLS = [
    (
        "hidden size",
        lambda d: d(torch.randn(2, 8, HIDDEN + 1), _mem(), _visual()),
        "hidden_states has hidden size 37",
    ),
    (
        "hidden rank",
        lambda d: d(torch.randn(8, HIDDEN), _mem(), _visual()),
        r"hidden_states must have shape \(B, L, hidden_size\)",
    ),
    (
        "vision width",
        lambda d: d(_H, _mem(vision=VISION + 2), _visual()),
        "memory.tokens have width 22",
    ),
    (
        "not a memory",
        lambda d: d(_H, torch.randn(3, N, VISION), _visual()),
        "memory must be a crosslmm_ops.nn.VisionMemory",
    ),
    ("batch", lambda d: d(_H, _mem(frames=(1, 1, 1)), _visual()), "memory holds 3 samples"),
    (
        "dtype",
        lambda d: d(_H, _mem(dtype=torch.float64), _visual()),
        "memory.tokens are torch.float64",
    ),
    (
        "mask shape",
        lambda d: d(_H, _mem(), _visual()[:, :5]),
        r"visual_mask must be a bool tensor of shape \(B, L\)",
    ),
    ("mask dtype", lambda d: d(_H, _mem(), _visual().long()), "visual_mask must be a bool"),
    (
        "text mask shape",
        lambda d: d(_H, _mem(), _visual(), torch.ones(2, 9, dtype=torch.bool)),
        "text_mask must be a bool",
    ),
    (
        "visual count",
        lambda d: d(_H, _mem(), _visual(counts=(4, 3))),
        "visual_mask marks 3 positions of sample 1, but its 1 frames x pooled_per_frame=2",
    ),
    (
        "overlap",
        lambda d: d(_H, _mem(), _visual(), torch.ones(2, 8, dtype=torch.bool)),
        "visual_mask and text_mask overlap",
    ),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_clear_errors(call, match):
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS)
    with pytest.raises(ValueError, match=match):
        call(dcal)


BAD_BUILDS = [
    (lambda: DualCrossAttention(HIDDEN, VISION, 5), "not a multiple of num_heads"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, 3), "multiple of num_kv_heads"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, v2v=False, t2v=False), "at least one branch"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, v2v_scope="video"), "v2v_scope must be"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, vision_norm="batchnorm"), "vision_norm must"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, query_norm="rms"), "query_norm must"),
    (lambda: DualCrossAttention(0, VISION, 4), "hidden_size must be an int >= 1"),
    (lambda: DualCrossAttention(HIDDEN, VISION, 4, share_kv=1), "share_kv must be a bool"),
    (lambda: T2VCrossAttention(HIDDEN, VISION, 4, scope="frame"), "no scope"),
    (lambda: CrossAttention(HIDDEN, VISION, 4, norm_eps=0), "norm_eps"),
    (lambda: VisionMemory.from_list([], POOLED), "features_per_sample"),
    (
        lambda: VisionMemory.from_list([torch.randn(1, N, 4), torch.randn(1, N + 1, 4)], POOLED),
        r"features_per_sample\[1\] has \(N, Dv\)",
    ),
    (lambda: VisionMemory.from_list([torch.randn(1, N, 4)], 0), "pooled_per_frame"),
    (lambda: VisionMemory.from_features(torch.randn(2, 3, N), POOLED), r"\(B, T, N, Dv\)"),
    (
        lambda: VisionMemory.from_features(
            torch.randn(2, 3, N, 4), POOLED, frame_mask=torch.tensor([[1, 0, 1], [1, 1, 0]]).bool()
        ),
        "prefix",
    ),
    (
        lambda: VisionMemory.from_features(
            torch.randn(2, 3, N, 4), POOLED, frame_mask=torch.ones(3, 2, dtype=torch.bool)
        ),
        "frame_mask must be a bool tensor of shape",
    ),
]


@pytest.mark.parametrize("build,match", BAD_BUILDS, ids=[m for _, m in BAD_BUILDS])
def test_bad_construction_raises_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_device_mismatch_is_named():
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS)
    memory = _mem().to("meta")
    with pytest.raises(ValueError, match="memory is on meta"):
        dcal(_H, memory, _visual())


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_autocast_mixes_dtypes():
    """Under autocast the memory may be in another dtype than the hidden states."""
    dcal = randomize(DualCrossAttention(HIDDEN, VISION, HEADS))
    feats, h, visual = make_batch([2, 1], 7, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcal(h, memory, visual)
    assert out.dtype == h.dtype
    expected = dcal(h, memory.to(torch.float32), visual)
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("kv_path", KV_PATHS)
@pytest.mark.parametrize("kw", [dict(), dict(v2v_scope="frame", share_kv=True)], ids=case_id)
def test_triton_backend_cpu(kw, kv_path):
    """The modules on the Triton kernels (CPU interpreter, float32, small shapes), on both paths:
    the same output and gradients as on the torch back end, outputs poisoned, the back end on
    record."""
    torch_dcal = randomize(
        DualCrossAttention(
            HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, **kw, kv_path=kv_path, backend="torch"
        )
    )
    triton_dcal = DualCrossAttention(
        HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, **kw, kv_path=kv_path, backend="triton"
    )
    triton_dcal.load_state_dict(torch_dcal.state_dict())
    feats, h, visual = make_batch([2, 0, 1], 7, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    g = torch.randn_like(h)
    results = []
    for module in (torch_dcal, triton_dcal):
        x = h.clone().requires_grad_()
        with poison_outputs(), crosslmm_ops.record_backends() as log:
            out = module(x, memory, visual)
            out.backward(g)
        results.append((out, x.grad, [p.grad for p in module.parameters()], log))
    (ref_out, ref_dx, ref_dp, _), (out, dx, dp, log) = results
    assert {b for _, b in log} == {"triton"}
    op = "cross_attention" if kv_path == "materialized" else "projected_attention_core"
    assert (op, "triton") in log and (op + "_backward", "triton") in log
    assert [o for o, _ in log].count("projected_cross_attention") == 2  # V2V and T2V
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dx, ref_dx, atol=2e-5, rtol=2e-5)
    for a, e in zip(dp, ref_dp):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_backend_is_passed_and_recorded():
    dcal = DualCrossAttention(HIDDEN, VISION, HEADS)
    feats, h, visual = make_batch([1, 1], 5, dtype=torch.float32)
    memory = VisionMemory.from_list(feats, POOLED)
    for kv_path in KV_PATHS:
        dcal.kv_path = kv_path
        dcal.backend = None
        with crosslmm_ops.record_backends() as log:
            dcal(h, memory, visual)
        # auto on the CPU, for V2V and T2V
        assert [e for e in log if e[0] == "projected_cross_attention"] == [
            ("projected_cross_attention", "torch")
        ] * 2
        assert {b for _, b in log} == {"torch"}
        dcal.backend = "cuda"
        assert dcal.v2v.backend == "cuda" and dcal.t2v.backend == "cuda"
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
            dcal(h, memory, visual)


@pytest.mark.cuda
@pytest.mark.parametrize("kv_path", KV_PATHS)
@pytest.mark.parametrize("kw", [dict(), dict(v2v_scope="frame"), dict(share_kv=True)], ids=case_id)
def test_cuda_dcal_bf16(kw, kv_path):
    """A DCAL with the paper's shapes per frame (27x27 tokens of width 1152, 9 pooled) in bf16 on
    the CUDA kernels against the float64 reference; the error at most 2x that of the same module
    on plain PyTorch in bf16 (+ rounding), gradients 3x."""
    if not hasattr(_backend.extension(), "attention_forward"):
        pytest.skip("the CUDA extension has no attention kernels (not built)")
    if kv_path == "fused" and not hasattr(_backend.extension(), "projected_attention_core_forward"):
        pytest.skip("the CUDA extension has no projected-attention kernel (not built)")
    hidden, vision, heads, kv_heads, head_dim, tokens, pooled = 512, 1152, 4, 2, 128, 729, 9
    frames = [4, 0, 2]
    dev = "cuda"
    base = randomize(DualCrossAttention(hidden, vision, heads, kv_heads, head_dim, **kw))
    feats = [torch.randn(t, tokens, vision) for t in frames]
    L = 60
    h = torch.randn(len(frames), L, hidden)
    visual = torch.zeros(len(frames), L, dtype=torch.bool)
    for b, t in enumerate(frames):
        visual[b, 2 : 2 + t * pooled] = True

    def run(dtype, backend):
        module = DualCrossAttention(
            hidden, vision, heads, kv_heads, head_dim, **kw, kv_path=kv_path, backend=backend
        )
        module.load_state_dict(base.state_dict())
        module = module.to(dev, dtype)
        x = h.to(dev, dtype).requires_grad_()
        memory = VisionMemory.from_list([f.to(dev, dtype) for f in feats], pooled)
        with poison_outputs(), crosslmm_ops.record_backends() as log:
            out = module(x, memory, visual.to(dev))
            out.backward(grad.to(dev, dtype))
        return out.double().cpu(), x.grad.double().cpu(), log

    grad = torch.randn(len(frames), L, hidden)
    ref_out, ref_dx, _ = run(torch.float64, "torch")
    low_out, low_dx, _ = run(torch.bfloat16, "torch")
    out, dx, log = run(torch.bfloat16, "cuda")
    # record_backends() sees this thread's calls; a CUDA backward runs on autograd's device
    # thread, so its back end is read from last_backend() (the CUDA run is the last one here).
    if kv_path == "materialized":
        assert ("cross_attention", "cuda") in log
        assert crosslmm_ops.last_backend("cross_attention_backward") == "cuda"
    else:  # the fused core's backward: CUDA where the extension has it (the planner says)
        assert ("projected_attention_core", "cuda") in log
        expected = crosslmm_ops.planner.projected_backward_backend("cuda", dev)[0]
        assert crosslmm_ops.last_backend("projected_attention_core_backward") == expected
    assert not torch.isnan(out).any() and not torch.isnan(dx).any()
    eps = torch.finfo(torch.bfloat16).eps
    err = (out - ref_out).abs().max().item()
    low_err = (low_out - ref_out).abs().max().item()
    assert err <= 2 * low_err + eps * ref_out.abs().max().item(), (err, low_err)
    derr = (dx - ref_dx).abs().max().item()
    low_derr = (low_dx - ref_dx).abs().max().item()
    assert derr <= 3 * low_derr + eps * ref_dx.abs().max().item(), (derr, low_derr)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

COMPILE_CASES = [dict(), dict(v2v_scope="frame", share_kv=True, bias=True)]


@pytest.mark.parametrize("kv_path", ["auto", "fused"])
@pytest.mark.parametrize("kw", COMPILE_CASES, ids=case_id)
def test_dcal_compiles_fullgraph(kw, kv_path):
    """torch.compile(fullgraph=True) traces a DCAL without a graph break (the query counts read
    from the masks are symbolic there): output and every gradient equal eager's, also for other
    masks run by the same graph (padding, no visual positions as while decoding), and masks that
    overlap still fail, as an assertion of the graph."""
    torch._dynamo.reset()
    dcal = DualCrossAttention(
        HIDDEN, VISION, HEADS, KV_HEADS, HEAD_DIM, **kw, kv_path=kv_path, backend="torch"
    )
    randomize(dcal.double())
    frames, L = [2, 0, 3], 11
    feats, h, visual = make_batch(frames, L)
    memory = VisionMemory.from_list([f.requires_grad_() for f in feats], POOLED)
    h.requires_grad_()
    leaves = [h, *feats, *dcal.parameters()]
    compiled = torch.compile(dcal, fullgraph=True, backend="aot_eager")
    padded = ~visual
    padded[0, 9:] = False
    padded[2, :1] = False
    for v, t in ((visual, ~visual), (visual, padded), (torch.zeros_like(visual), padded)):
        expected = dcal(h, memory, v, t)
        g = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, leaves, g, allow_unused=True)
        out = compiled(h, memory, v, t)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
        for leaf, actual, want in zip(leaves, grads, expected_grads):
            zero = torch.zeros_like(leaf)
            torch.testing.assert_close(
                zero if actual is None else actual,
                zero if want is None else want,
                atol=1e-12,
                rtol=1e-12,
            )
    with pytest.raises(RuntimeError):
        compiled(h, memory, visual, torch.ones_like(visual))
