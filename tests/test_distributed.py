"""crosslmm_ops.distributed on CPU with gloo: 2 and 4 processes, each computing its shard, every
result compared on every rank with the single-process computation on the same data (float64, so
the only difference is rounding): forward outputs, LSE and all gradients.

Process start-up dominates, so each spawned group runs many cases in a row (``_CASES``). Ranks
rendezvous through a file in a temporary directory (no port to collide), with a short timeout so
that a rank stuck in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crosslmm_ops
from crosslmm_ops import distributed as cd
from crosslmm_ops.models import FrameShardedCrossLMM
from crosslmm_ops.ops.cross_attention import cross_attention_reference
from crosslmm_ops.ops.projected_attention import projected_cross_attention_reference
from crosslmm_ops.testing import non_contiguous, poison_outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = dict(dtype=torch.float64)
TIGHT = dict(atol=1e-11, rtol=1e-9)  # float64: rounding only


def _close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TIGHT), msg=lambda m: f"{what}: {m}")


def _same_lse(actual, expected, what, **tol):
    """LSEs with -inf where a query has no keys: the same -inf positions, close elsewhere."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{what}: -inf rows"
    fin = torch.isfinite(expected)
    _close(actual[fin], expected[fin].to(actual.dtype), what, **tol)


def _lse_loss(lse, weights):
    return (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * weights).sum()


def _cuts(n: int, world: int, gen: torch.Generator, empty_rank: int | None) -> list[int]:
    """``world + 1`` offsets splitting ``n`` items unevenly (random cuts); ``empty_rank`` gets
    none."""
    ranks = [r for r in range(world) if r != empty_rank]
    inner = sorted(torch.randint(0, n + 1, (len(ranks) - 1,), generator=gen).tolist())
    sizes = dict.fromkeys(range(world), 0)
    bounds = [0, *inner, n]
    for r, a, b in zip(ranks, bounds, bounds[1:]):
        sizes[r] = b - a
    cuts = [0]
    for r in range(world):
        cuts.append(cuts[-1] + sizes[r])
    return cuts


def _cu(lengths) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Op cases
# ----------------------------------------------------------------------------------------------


def _packed_keys(rank, world, gen, lens_k, empty_rank):
    """This rank's rows of packed keys with segments ``lens_k`` (each segment cut over the
    ranks), and its cu_seqlens_k."""
    starts = _cu(lens_k).tolist()
    rows, local_lens = [], []
    for s, n in enumerate(lens_k):
        cuts = _cuts(n, world, gen, empty_rank)
        rows += list(range(starts[s] + cuts[rank], starts[s] + cuts[rank + 1]))
        local_lens.append(cuts[rank + 1] - cuts[rank])
    return torch.tensor(rows, dtype=torch.long), _cu(local_lens)


def case_packed(
    rank,
    world,
    *,
    backend="torch",
    dtype=torch.float64,
    grad_scale=1.0,
    empty_rank=None,
    seed=1,
    tol=None,
):
    """Packed (varlen) T2V / V2V-global-like segments, GQA, a segment without queries and one
    without keys anywhere, keys cut unevenly over the ranks; out, LSE, dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed)
    Hq, Hk, D = 4, 2, 8
    lens_q, lens_k = [5, 0, 7, 3, 2], [13, 9, 0, 6, 1]
    q = torch.randn(sum(lens_q), Hq, D, generator=gen, **F64)
    k = torch.randn(sum(lens_k), Hk, D, generator=gen, **F64)
    v = torch.randn(sum(lens_k), Hk, D, generator=gen, **F64)
    go = torch.randn(sum(lens_q), Hq, D, generator=gen, **F64)
    gl = torch.randn(Hq, sum(lens_q), generator=gen, **F64)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    rows, cu_k_r = _packed_keys(rank, world, gen, lens_k, empty_rank)

    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = cross_attention_reference(
        *ref, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True
    )
    ((out * go).sum() + _lse_loss(lse, gl)).backward()

    qs = non_contiguous(q.to(dtype)).requires_grad_()
    ks = k[rows].to(dtype).requires_grad_()
    vs = v[rows].to(dtype).requires_grad_()
    o, l = cd.sharded_cross_attention(
        qs,
        ks,
        vs,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k_r,
        return_lse=True,
        backend=backend,
        grad_scale=grad_scale,
    )
    assert crosslmm_ops.last_backend("sharded_cross_attention") == backend
    assert o.dtype == dtype and o.shape == q.shape
    ((o.double() * go).sum() + _lse_loss(l.double(), gl)).backward()
    tol = tol or TIGHT
    _close(o.double(), out, "out", **tol)
    _same_lse(l.double(), lse, "lse", **tol)
    _close(qs.grad.double(), ref[0].grad, "dq", **tol)
    _close(ks.grad.double(), grad_scale * ref[1].grad[rows], "dk", **tol)
    _close(vs.grad.double(), grad_scale * ref[2].grad[rows], "dv", **tol)
    # Only the output used: no gradient reaches the LSE (the path the CUDA backward takes).
    qs.grad = ks.grad = vs.grad = None
    ref2 = [t.clone().requires_grad_() for t in (q, k, v)]
    (cross_attention_reference(*ref2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) * go).sum().backward()
    o = cd.sharded_cross_attention(
        qs, ks, vs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k_r, backend=backend, grad_scale=grad_scale
    )
    (o.double() * go).sum().backward()
    _close(qs.grad.double(), ref2[0].grad, "dq (out only)", **tol)
    _close(ks.grad.double(), grad_scale * ref2[1].grad[rows], "dk (out only)", **tol)


def case_batched(rank, world, *, empty_rank=None, seed=2):
    """Batched (B, S, H, D) layout: every rank's Sk_r different (one rank may hold none)."""
    gen = torch.Generator().manual_seed(seed)
    B, Sq, Sk, Hq, Hk, D = 2, 9, 23, 6, 3, 5
    q = torch.randn(B, Sq, Hq, D, generator=gen, **F64)
    k = torch.randn(B, Sk, Hk, D, generator=gen, **F64)
    v = torch.randn(B, Sk, Hk, D, generator=gen, **F64)
    go = torch.randn(B, Sq, Hq, D, generator=gen, **F64)
    cuts = _cuts(Sk, world, gen, empty_rank)
    mine = slice(cuts[rank], cuts[rank + 1])
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = cross_attention_reference(*ref, return_lse=True)
    (out * go).sum().backward()
    qs = q.clone().requires_grad_()
    ks, vs = (t[:, mine].clone().requires_grad_() for t in (k, v))
    o, l = cd.sharded_cross_attention(qs, ks, vs, return_lse=True)
    (o * go).sum().backward()
    _close(o, out, "out")
    _same_lse(l, lse, "lse")
    _close(qs.grad, ref[0].grad, "dq")
    _close(ks.grad, ref[1].grad[:, mine], "dk")
    _close(vs.grad, ref[2].grad[:, mine], "dv")


def case_projected(rank, world, *, path="fused", grad_scale=1.0, empty_rank=None, seed=3):
    """Projection-fused (and materialised) sharded attention: LayerNorm with weight and bias,
    K/V biases, GQA, segments; out, LSE and the gradients of q, x (this rank's rows), w_k, w_v,
    b_k, b_v and the norm's weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    Hq, Hk, d, Dv = 4, 2, 8, 12
    lens_q, lens_k = [3, 6, 0, 4], [10, 7, 5, 0]
    q = torch.randn(sum(lens_q), Hq, d, generator=gen, **F64)
    x = torch.randn(sum(lens_k), Dv, generator=gen, **F64)
    params = [
        torch.randn(Hk * d, Dv, generator=gen, **F64) * 0.4,
        torch.randn(Hk * d, Dv, generator=gen, **F64) * 0.4,
        torch.randn(Hk * d, generator=gen, **F64),
        torch.randn(Hk * d, generator=gen, **F64),
        1 + 0.1 * torch.randn(Dv, generator=gen, **F64),
        0.1 * torch.randn(Dv, generator=gen, **F64),
    ]
    go = torch.randn(sum(lens_q), Hq, d, generator=gen, **F64)
    gl = torch.randn(Hq, sum(lens_q), generator=gen, **F64)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    rows, cu_k_r = _packed_keys(rank, world, gen, lens_k, empty_rank)

    ref = [t.clone().requires_grad_() for t in (q, x, *params)]
    out, lse = projected_cross_attention_reference(
        ref[0],
        ref[1],
        *ref[2:6],
        norm="layernorm",
        norm_weight=ref[6],
        norm_bias=ref[7],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        return_lse=True,
    )
    ((out * go).sum() + _lse_loss(lse, gl)).backward()

    mine = [q.clone(), x[rows].clone(), *(p.clone() for p in params)]
    mine = [t.requires_grad_() for t in mine]
    o, l = cd.sharded_projected_cross_attention(
        mine[0],
        mine[1],
        *mine[2:6],
        norm="layernorm",
        norm_weight=mine[6],
        norm_bias=mine[7],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k_r,
        return_lse=True,
        path=path,
        grad_scale=grad_scale,
    )
    ((o * go).sum() + _lse_loss(l, gl)).backward()
    _close(o, out, "out")
    _same_lse(l, lse, "lse")
    _close(mine[0].grad, ref[0].grad, "dq")
    _close(mine[1].grad, grad_scale * ref[1].grad[rows], "dx")
    for name, a, b in zip(
        ("w_k", "w_v", "b_k", "b_v", "norm_weight", "norm_bias"), mine[2:], ref[2:]
    ):
        _close(a.grad, b.grad, f"d{name}")


def case_frame_local(rank, world, seed=4):
    """Frame-local attention with sharded queries: no communication; each rank's rows are the
    single-process rows of its frames."""
    gen = torch.Generator().manual_seed(seed)
    frames, n, N, Hq, Hk, D = 7, 3, 11, 4, 2, 8
    q = torch.randn(frames * n, Hq, D, generator=gen, **F64)
    k = torch.randn(frames * N, Hk, D, generator=gen, **F64)
    v = torch.randn(frames * N, Hk, D, generator=gen, **F64)
    ref = cross_attention_reference(
        q, k, v, cu_seqlens_q=_cu([n] * frames), cu_seqlens_k=_cu([N] * frames)
    )
    cuts = _cuts(frames, world, gen, None)
    a, b = cuts[rank], cuts[rank + 1]
    out = cd.frame_local_cross_attention(
        q[a * n : b * n], k[a * N : b * N], v[a * N : b * N], queries_per_frame=n
    )
    _close(out, ref[a * n : b * n], "frame-local out")


def _dcal_inputs(gen, frames, n, N, Dv, H):
    """Hidden states, masks and per-sample features of a batch with ``frames`` per sample."""
    B, text = len(frames), 4
    L = 1 + max(frames) * n + text
    visual = torch.zeros(B, L, dtype=torch.bool)
    for b, t in enumerate(frames):
        visual[b, 1 : 1 + t * n] = True
    text_mask = ~visual
    text_mask[0, -1] = False  # a padding position: asks nothing
    h = torch.randn(B, L, H, generator=gen, **F64)
    feats = [torch.randn(t, N, Dv, generator=gen, **F64) for t in frames]
    return h, visual, text_mask, feats


def case_module(
    rank,
    world,
    *,
    scope="global",
    kv_path="materialized",
    gradients="mean",
    frames=(3, 0, 4),
    frames_per_rank=None,
    seed=5,
):
    """DualCrossAttention on a frame-sharded VisionMemory against the unsharded one: output, the
    gradient of the hidden states (replicated), of this rank's tokens, and of every parameter
    (the mean over ranks with gradients="mean")."""
    gen = torch.Generator().manual_seed(seed)
    H, Dv, n, N = 32, 24, 2, 5
    torch.manual_seed(seed)
    dcal = crosslmm_ops.DualCrossAttention(
        H,
        Dv,
        num_heads=4,
        num_kv_heads=2,
        v2v_scope=scope,
        bias=True,
        vision_norm="layernorm",
        kv_path=kv_path,
    ).double()
    with torch.no_grad():
        for p in dcal.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, **F64))  # gates != 0, biases != 0
    mine = copy.deepcopy(dcal)
    h, visual, text_mask, feats = _dcal_inputs(gen, list(frames), n, N, Dv, H)
    go = torch.randn(h.shape, generator=gen, **F64)

    tokens = torch.cat([f.reshape(-1, Dv) for f in feats]).requires_grad_()
    full = crosslmm_ops.VisionMemory._from_packed(tokens, frames, N, n)
    hr = h.clone().requires_grad_()
    (dcal(hr, full, visual, text_mask) * go).sum().backward()

    shard = cd.FrameShard(
        frames, dist.group.WORLD, frames_per_rank=frames_per_rank, gradients=gradients
    )
    local = tokens.detach()[shard.start * N : shard.stop * N].clone().requires_grad_()
    memory = shard.memory(local, N, n)
    hs = h.clone().requires_grad_()
    out = mine(hs, memory, visual, text_mask)
    (out * go).sum().backward()
    _close(out, dcal(h, full, visual, text_mask).detach(), "module out")
    _close(hs.grad, hr.grad, "module d hidden")
    _close(
        local.grad,
        shard.grad_scale * tokens.grad[shard.start * N : shard.stop * N],
        "module d tokens",
    )
    for (name, a), b in zip(mine.named_parameters(), dcal.parameters()):
        g = a.grad.clone()
        dist.all_reduce(g)
        if gradients == "mean":
            _close(g / world, b.grad, f"module d{name} (mean over ranks)")
        elif kv_path == "materialized" and any(
            s in name for s in ("k_proj", "v_proj", "vision_norm")
        ):
            # Applied to the local tokens outside the op: this rank's part of the gradient.
            _close(g, b.grad, f"module d{name} (sum over ranks)")
        else:  # replicated, or a weight the fused op all-reduces: exact on every rank
            _close(a.grad, b.grad, f"module d{name} (exact on every rank)")


# ----------------------------------------------------------------------------------------------
# The model under DDP / FSDP2
# ----------------------------------------------------------------------------------------------


def _model_batch(config, frames, gen):
    """A padded batch for crosslmm-tiny: pixels (B, T, 3, H, W), frame mask, input_ids with the
    placeholders, attention mask and labels."""
    vc = config.vision_config
    n = config.pooled_per_frame
    B, T = len(frames), max(frames)
    pixels = torch.randn(B, T, 3, vc.image_size, vc.image_size, generator=gen, **F64)
    frame_mask = torch.arange(T).unsqueeze(0) < torch.tensor(frames).unsqueeze(1)
    text = 5
    L = 1 + T * n + text
    ids = torch.zeros(B, L, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    for b, t in enumerate(frames):
        row = (
            [1]
            + [config.video_token_id] * (t * n)
            + torch.randint(3, config.video_token_id, (text,), generator=gen).tolist()
        )
        ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = 1
    labels = ids.clone()
    labels[(ids == config.video_token_id) | (attn == 0)] = -100
    return dict(
        input_ids=ids,
        pixel_values_videos=pixels,
        video_frame_mask=frame_mask,
        attention_mask=attn,
        labels=labels,
    )


def _tiny_model(seed):
    from crosslmm_ops.models import CrossLMMForConditionalGeneration

    torch.manual_seed(seed)
    model = CrossLMMForConditionalGeneration.from_preset("crosslmm-tiny", dtype=torch.float64)
    with torch.no_grad():  # open the gates so that the DCALs contribute (and get gradients)
        for dcal in model.dcals.values():
            for branch in (dcal.v2v, dcal.t2v):
                branch.gate.alpha.fill_(0.5)
    return model


def case_model_ddp(rank, world, *, frames=(3, 1), frames_per_rank=None, kv_path="auto", seed=6):
    """One training step of crosslmm-tiny (vision tower on each rank's frames, pooled tokens
    all-gathered, sharded DCALs) under DDP: the loss and, after DDP's average, every gradient
    equal the single-process model's; so do the parameters after an SGD step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _tiny_model(seed)
    for dcal in model.dcals.values():
        dcal.kv_path = kv_path
    ref = copy.deepcopy(model)
    batch = _model_batch(model.config, list(frames), torch.Generator().manual_seed(seed))
    out_ref = ref(**batch)
    out_ref.loss.backward()

    ddp = DDP(FrameShardedCrossLMM(model, cd.frame_group()))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = ddp(**batch, frames_per_rank=frames_per_rank)
    _close(out.logits, out_ref.logits, "model logits")
    _close(out.loss, out_ref.loss, "model loss")
    out.loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{name}: no gradient"
        _close(p.grad, q.grad, f"model d{name}")
    opt.step()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            q.sub_(0.1 * q.grad)
            _close(p, q, "parameters after a step")


def case_model_local_input(rank, world, seed=7):
    """The same forward from each rank's own frames (``frames_per_sample``) and from encoder
    tokens (``vision_features``), gradients="exact", no DDP: equal loss and logits."""
    model = _tiny_model(seed)
    config = model.config
    frames = [2, 3]
    gen = torch.Generator().manual_seed(seed)
    batch = _model_batch(config, frames, gen)
    feats = torch.randn(
        2, 3, config.tokens_per_frame, config.vision_config.hidden_size, generator=gen, **F64
    )
    del batch["pixel_values_videos"]
    ref = model(vision_features=feats, **batch)
    wrapped = FrameShardedCrossLMM(model, cd.frame_group(), gradients="exact")
    shard = wrapped.frame_shard(frames)
    packed = feats[batch.pop("video_frame_mask")]
    out = wrapped(vision_features=shard.local(packed), frames_per_sample=frames, **batch)
    _close(out.loss, ref.loss, "loss from local features")
    _close(out.logits, ref.logits, "logits from local features")


def case_model_fsdp2(rank, world, seed=8):
    """One training step under FSDP2 (fully_shard per decoder layer, the vision tower and the
    root): the loss and every (DTensor) gradient equal the single-process model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny_model(seed)
    ref = copy.deepcopy(model)
    batch = _model_batch(model.config, [3, 2], torch.Generator().manual_seed(seed))
    out_ref = ref(**batch)
    out_ref.loss.backward()

    mesh = init_device_mesh("cpu", (world,))
    wrapped = FrameShardedCrossLMM(model, cd.frame_group())
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.model.vision_tower, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    out = wrapped(**batch)
    _close(out.loss, out_ref.loss, "fsdp2 loss")
    out.loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        _close(g, q.grad, f"fsdp2 d{name}")


# ----------------------------------------------------------------------------------------------
# Spawning
# ----------------------------------------------------------------------------------------------


def _triton_case(rank, world):
    # The Triton kernels in the interpreter, float32, outputs poisoned (NaN) before they run.
    with poison_outputs():
        case_packed(
            rank,
            world,
            backend="triton",
            dtype=torch.float32,
            empty_rank=world - 1,
            tol=dict(atol=2e-5, rtol=2e-4),
        )


def _raises_everywhere(call, match):
    """``call()`` raises a ValueError matching ``match`` (on this rank; every rank runs this)."""
    try:
        call()
    except ValueError as exc:
        assert re.search(match, str(exc)), f"wrong error: {exc}"
        return str(exc)
    raise AssertionError(f"no error (expected one matching {match!r})")


def case_replicas(rank, world, *, env_debug=False):
    """Replicated arguments that differ between ranks: a ValueError on every rank (no collective
    mismatch, no hang, no silently merged different queries), after which the group still works.
    ``env_debug``: CROSSLMM_CHECK_REPLICAS=1 is set, so q's values are compared by default."""
    gen = torch.Generator().manual_seed(21)
    Hq, Hk, D, Dv = 4, 2, 8, 12
    lens_q, lens_k = [5, 7], [9, 6]
    q = torch.randn(sum(lens_q), Hq, D, generator=gen, **F64)
    k = torch.randn(sum(lens_k), Hk, D, generator=gen, **F64)
    x = torch.randn(sum(lens_k), Dv, generator=gen, **F64)
    w_k = torch.randn(Hk * D, Dv, generator=gen, **F64)
    cu_q = _cu(lens_q)
    rows, cu_k_r = _packed_keys(rank, world, gen, lens_k, None)
    ks = k[rows]
    last = rank == world - 1  # the odd one out

    def attend(q=q, k=ks, cu_q=cu_q, cu_k=cu_k_r, **kw):
        return cd.sharded_cross_attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)

    def project(q=q, cu_q=cu_q, w_k=w_k, **kw):
        return cd.sharded_projected_cross_attention(
            q, x[rows], w_k, w_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k_r, **kw
        )

    expected = attend()
    # cu_seqlens_q with other values (the same length and total: the collectives would match).
    shifted = _cu([6, 6]) if last else cu_q
    _raises_everywhere(lambda: attend(cu_q=shifted), "cu_seqlens_q.*same values.*rank")
    _raises_everywhere(lambda: project(cu_q=shifted), "cu_seqlens_q.*same values")
    # Another number of queries (the collectives would have other sizes).
    more_q = torch.cat([q, q[:2]]) if last else q
    more_cu = _cu([7, 7]) if last else cu_q
    message = _raises_everywhere(lambda: attend(q=more_q, cu_q=more_cu), "q is replicated")
    assert "rank 0: (12, 4, 8) float64" in message and f"rank {world - 1}: (14, 4, 8)" in message
    # Another number of segments.
    three = _cu([5, 7, 0]) if last else cu_q
    _raises_everywhere(
        lambda: attend(cu_q=three, cu_k=torch.cat([cu_k_r, cu_k_r[-1:]]) if last else cu_k_r),
        "cu_seqlens_q",
    )
    # Other key/value heads on one rank.
    _raises_everywhere(lambda: attend(k=ks[:, :1] if last else ks), "key/value heads")
    # A rank whose own arguments are wrong: its error there, a pointer to it everywhere else.
    bad = torch.tensor([0, 5, 11], dtype=torch.int32) if last else cu_q
    _raises_everywhere(
        lambda: attend(cu_q=bad),
        "must end at the number" if last else rf"rank\(s\) \[{world - 1}\]",
    )
    # The values of q: compared in the debug mode (argument, or the environment variable).
    other_q = q + 1 if last else q
    if env_debug:
        _raises_everywhere(lambda: attend(q=other_q), "q is replicated.*same values")
        _raises_everywhere(lambda: project(q=other_q), "q is replicated.*same values")
    else:
        attend(q=other_q)  # the cheap checks cannot see it
    _raises_everywhere(lambda: attend(q=other_q, check_replicas=True), "q is replicated")
    _raises_everywhere(lambda: project(w_k=w_k + last, check_replicas=True), "w_k")
    _raises_everywhere(lambda: attend(check_replicas=last), "check_replicas")
    # The group is still in step: the same call gives the same result.
    _close(attend(check_replicas=True), expected, "out after the errors")


_CASES = {
    "packed": lambda r, w: case_packed(r, w),
    "packed_empty_rank": lambda r, w: case_packed(r, w, empty_rank=0, seed=11),
    "packed_mean": lambda r, w: case_packed(r, w, grad_scale=float(w), seed=12),
    "packed_triton": _triton_case,
    "batched": lambda r, w: case_batched(r, w, empty_rank=w - 1),
    "projected_fused": lambda r, w: case_projected(r, w, path="fused", empty_rank=1),
    "projected_materialized": lambda r, w: case_projected(
        r, w, path="materialized", grad_scale=float(w), seed=13
    ),
    "frame_local": case_frame_local,
    "module_global_materialized": lambda r, w: case_module(r, w),
    "module_global_fused": lambda r, w: case_module(
        r, w, kv_path="fused", frames_per_rank=[7] + [0] * (w - 1)
    ),
    "module_frame_fused": lambda r, w: case_module(r, w, scope="frame", kv_path="fused"),
    "module_frame_materialized": lambda r, w: case_module(
        r, w, scope="frame", frames=(2, 3, 1), seed=9
    ),
    "module_exact_fused": lambda r, w: case_module(
        r, w, kv_path="fused", gradients="exact", seed=14
    ),
    "module_exact_materialized": lambda r, w: case_module(r, w, gradients="exact", seed=15),
    "model_ddp": case_model_ddp,
    "model_ddp_empty_rank": lambda r, w: case_model_ddp(
        r, w, frames=(2, 1), kv_path="fused", frames_per_rank=[0, 3], seed=10
    ),
    "model_local_input": case_model_local_input,
    "model_fsdp2": case_model_fsdp2,
    "replicas": case_replicas,
    "replicas_env": lambda r, w: case_replicas(r, w, env_debug=True),
}


def case_cuda_ops(rank, world):
    """On GPUs (NCCL): the sharded op in bf16 on the fastest back end against one GPU, both
    measured against a float64 reference: flash-attn's bound (the sharded error at most 2x one
    GPU's forward, 3x for gradients, plus a little for the extra rounding of the merge)."""
    from crosslmm_ops.testing import relative_error

    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(21)
    Hq, Hk, D = 12, 2, 128
    lens_q, lens_k = [288, 0, 37, 5], [3000, 50, 0, 729]
    q = torch.randn(sum(lens_q), Hq, D, generator=gen, **F64)
    k = torch.randn(sum(lens_k), Hk, D, generator=gen, **F64)
    v = torch.randn(sum(lens_k), Hk, D, generator=gen, **F64)
    go = torch.randn(sum(lens_q), Hq, D, generator=gen, **F64)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    rows, cu_k_r = _packed_keys(rank, world, gen, lens_k, None)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = cross_attention_reference(*ref, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    (out_ref * go).sum().backward()

    def run(sharded):
        ks, vs = (k[rows], v[rows]) if sharded else (k, v)
        leaves = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, ks, vs)]
        cu_kk = (cu_k_r if sharded else cu_k).to(device)
        fn = cd.sharded_cross_attention if sharded else crosslmm_ops.cross_attention
        out = fn(*leaves, cu_seqlens_q=cu_q.to(device), cu_seqlens_k=cu_kk)
        out.backward(go.to(device, torch.bfloat16))
        expect_k = (ref[1].grad[rows], ref[2].grad[rows]) if sharded else (ref[1].grad, ref[2].grad)
        return [
            relative_error(out.cpu(), out_ref),
            relative_error(leaves[0].grad.cpu(), ref[0].grad),
            relative_error(leaves[1].grad.cpu(), expect_k[0]),
            relative_error(leaves[2].grad.cpu(), expect_k[1]),
        ]

    one, many = run(False), run(True)
    for name, a, b, factor in zip(("out", "dq", "dk", "dv"), many, one, (2, 3, 3, 3)):
        assert a <= factor * b + 1e-3, f"{name}: sharded error {a:.2e} vs one GPU {b:.2e}"


_CASES["cuda_ops"] = case_cuda_ops


def _worker(rank, world, init_file, cases, backend="gloo"):
    torch.set_num_threads(1)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
        **kwargs,
    )
    try:
        for name in cases:
            try:
                _CASES[name](rank, world)
            except Exception as exc:
                raise AssertionError(
                    f"case {name!r} failed on rank {rank}/{world}:\n{traceback.format_exc()}"
                ) from exc
    finally:
        dist.destroy_process_group()


def _spawn(world, cases, tmp_path, backend="gloo"):
    mp.spawn(
        _worker, args=(world, str(tmp_path / "rendezvous"), cases, backend), nprocs=world, join=True
    )


OP_CASES = [
    "packed",
    "packed_empty_rank",
    "packed_mean",
    "packed_triton",
    "batched",
    "projected_fused",
    "projected_materialized",
    "frame_local",
]
MODULE_CASES = [
    "module_global_materialized",
    "module_global_fused",
    "module_frame_fused",
    "module_frame_materialized",
    "module_exact_fused",
    "module_exact_materialized",
]
MODEL_CASES = ["model_ddp", "model_ddp_empty_rank", "model_local_input", "model_fsdp2"]


def test_two_processes(tmp_path):
    """Every op, module and model case with 2 ranks (gloo)."""
    _spawn(2, OP_CASES + MODULE_CASES + MODEL_CASES, tmp_path)


def test_four_processes(tmp_path):
    """The op and module cases with 4 ranks (gloo): uneven shards, ranks without keys."""
    _spawn(4, OP_CASES + MODULE_CASES, tmp_path)


def test_replicated_arguments_are_checked(tmp_path, monkeypatch):
    """Ranks that disagree on a replicated argument (cu_seqlens_q, q's shape, the heads, q's
    values in the debug mode) or whose own arguments are wrong: the same ValueError on every
    rank, 2 and 4 processes; then with CROSSLMM_CHECK_REPLICAS=1 (read at import by the new
    processes), which compares q's values by default."""
    for name, world in (("two", 2), ("four", 4), ("env", 2)):
        (tmp_path / name).mkdir()
        if name == "env":
            monkeypatch.setenv(cd.CHECK_REPLICAS_ENV, "1")
        _spawn(world, ["replicas_env" if name == "env" else "replicas"], tmp_path / name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl(tmp_path, monkeypatch):
    """2 GPUs over NCCL (NVLink multicast off): the sharded attention in bf16 on the GPU back
    ends within flash-attn's bound of one GPU's (the CPU cases above cover the rest)."""
    for name, value in (
        ("NCCL_NVLS_ENABLE", "0"),
        ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
        ("NVSHMEM_DISABLE_NVLS", "1"),
    ):
        monkeypatch.setenv(name, value)
    _spawn(2, ["cuda_ops"], tmp_path, backend="nccl")


# ----------------------------------------------------------------------------------------------
# Single-process checks (no group needed)
# ----------------------------------------------------------------------------------------------


def test_needs_initialised_process_group():
    q = torch.randn(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cd.sharded_cross_attention(q, q, q)


def test_bad_arguments_single_rank(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'single'}", rank=0, world_size=1
    )
    try:
        q = torch.randn(1, 2, 2, 8)
        with pytest.raises(ValueError, match="grad_scale"):
            cd.sharded_cross_attention(q, q, q, grad_scale=0)
        with pytest.raises(ValueError, match="check_replicas must be a bool"):
            cd.sharded_cross_attention(q, q, q, check_replicas=1)
        with pytest.raises(ValueError, match="gradients"):
            cd.FrameShard([2], dist.group.WORLD, gradients="sum")
        with pytest.raises(ValueError, match="frames_per_rank"):
            cd.FrameShard([2, 3], dist.group.WORLD, frames_per_rank=[4])
        shard = cd.FrameShard([2, 3], dist.group.WORLD)
        with pytest.raises(ValueError, match="packed"):
            shard.local(torch.zeros(4, 3))
        memory = shard.memory(torch.randn(5 * 4, 6), 4, 1)
        with pytest.raises(NotImplementedError, match="frame-sharded"):
            memory.select([1, 0])
        with pytest.raises(ValueError, match="queries_per_frame"):
            cd.frame_local_cross_attention(q[0], q[0], q[0], queries_per_frame=0)
        # One rank: the sharded op is the op itself.
        k = torch.randn(1, 5, 2, 8)
        torch.testing.assert_close(
            cd.sharded_cross_attention(q, k, k), crosslmm_ops.cross_attention(q, k, k)
        )
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The torchrun script
# ----------------------------------------------------------------------------------------------


def _torchrun(tmp_path, *script_args):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(REPO, "examples", "train_distributed.py"),
        "--device",
        "cpu",
        *script_args,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in run.stdout.splitlines() if line.startswith("step ")]


def test_train_distributed_script_ddp(tmp_path):
    """examples/train_distributed.py under torchrun: 2 CPU processes (gloo), DDP, frame sharding;
    one loss per step."""
    steps = _torchrun(tmp_path, "--steps", "2", "--strategy", "ddp")
    assert len(steps) == 2, steps


@pytest.mark.slow
def test_train_distributed_script_fsdp2(tmp_path):
    """The same under FSDP2: the same losses as DDP (same weights, same batches)."""
    ddp = _torchrun(tmp_path, "--steps", "2", "--strategy", "ddp")
    fsdp = _torchrun(tmp_path, "--steps", "2", "--strategy", "fsdp2")
    assert [line.split()[3] for line in fsdp] == [line.split()[3] for line in ddp]
