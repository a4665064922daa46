"""Ours against the attention peers on CrossLMM-2B's shapes, in one process, written as
``benchmarks/results/peers_<gpu>.json`` (the peers table of docs/performance.md).

    python benchmarks/peers.py [--out benchmarks/results/peers_h100.json] [--cases fwd,fwd+bwd]

bf16, 12 query heads of 128 (Hk = 2 or 12 key/value heads), keys T*729 original tokens; V2V
queries T*9, T2V 128, decode 1; per-frame V2V: each frame's 9 queries against its own 729 keys.
Columns: ``ours`` (the CUDA back end, asserted), ``ours_triton`` (the Triton fallback, asserted;
not a peer: ``triton_vs_cuda`` is its speed as a share of ``ours``, and
``triton_vs_cuda_gpu_time`` the share on GPU time), ``fa4`` (FlashAttention-4,
``flash_attn.cute``, when importable; said to be absent otherwise), ``sdpa_cudnn`` and
``sdpa_flash`` (PyTorch SDPA). On the forward rows ``ms_gpu`` holds every runner's GPU time
(CUDA-graph replay) and ``ours_vs_best_peer_gpu_time`` the ratio on it: the shortest calls are
bound by the host, whose speed moves between machines and processes.
A peer that cannot run a row is left out of it, with the reason under ``skipped``.

The ``projected`` rows (issue 19) time the projection-fused path against what a user does today:
``projected frame-local T=.. Hk=2`` is frame-local V2V including the K/V projections of the raw
vision tokens (width 1152): ``ours`` is ``projected_cross_attention(path="fused")`` on the CUDA
back end (the core asserted), ``ours_materialized`` our materialised path (cuBLAS projections and
our attention; not a peer), and the peers project with cuBLAS (``F.linear``) and then attend
(``cublas+fa4``, ``cublas+sdpa_cudnn``, ``cublas+sdpa_flash``). ``projected decode T=256 Hk=2`` is
one decode step from the cached tokens, with the floor of reading them once (``floor_ms``). ``fused
core fwd/bwd T=256 Hk=2`` is the core alone on frame-local V2V with the 12 query heads folded
through the key projection (queries of width 1152); its TFLOP/s count the backward as 2.5x the
forward, and ``backend`` says what the backward ran on.

Fairness: SDPA's back ends get K/V already expanded to the 12 query heads (GQA) and the per-frame
rows as a batch of frames (uniform frames: the same function as the packed varlen call), both
prepared outside the timed region. Times are ``triton.testing.do_bench`` medians; FLOPs
``4*Lq*Lk*H*d`` forward, 3.5x that forward+backward (the backward counted as 2.5x).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_projected_attention as projected  # noqa: E402
from conftest import do_bench_ms, graph_ms, load_fa4, warm_up_gpu  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops.ops import projected_attention as pa  # noqa: E402

HEADS, HEAD_DIM, N, n = 12, 128, 729, 9
OURS = {"ours": "cuda", "ours_triton": "triton"}  # column: the back end it must run on

fa4_func, fa4_varlen_func, FA4_ERROR = load_fa4()


def _case_table():
    rows = []
    for t in (32, 64, 128, 256):
        rows.append((f"fwd v2v T={t} Hk=2", "global", t, 2, t * n, False))
    rows.append(("fwd v2v T=256 Hk=12", "global", 256, 12, 256 * n, False))
    for t in (32, 256):
        rows.append((f"fwd t2v T={t} Hk=2", "global", t, 2, 128, False))
    for t in (32, 256):
        rows.append((f"fwd decode T={t} Hk=2", "global", t, 2, 1, False))
    for hk in (2, 12):
        rows.append((f"fwd v2v-per-frame varlen T=256 Hk={hk}", "frame", 256, hk, n, False))
    for t in (64, 256):
        for hk in (2, 12):
            rows.append((f"fwd+bwd v2v T={t} Hk={hk}", "global", t, hk, t * n, True))
    return rows


def _inputs(scope, frames, hk, lq, grad):
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(
            grad
        )

    if scope == "global":
        return (
            make(1, lq, HEADS, HEAD_DIM),
            make(1, frames * N, hk, HEAD_DIM),
            make(1, frames * N, hk, HEAD_DIM),
        )
    return (
        make(frames * lq, HEADS, HEAD_DIM),
        make(frames * N, hk, HEAD_DIM),
        make(frames * N, hk, HEAD_DIM),
    )


def _runners(scope, frames, q, k, v):
    """{peer: callable() -> output} for one row's inputs (layouts prepared outside)."""
    runs = {}
    if scope == "global":
        for name, backend in OURS.items():
            runs[name] = lambda backend=backend: crosslmm_ops.cross_attention(
                q, k, v, backend=backend
            )
        if fa4_func is not None:
            runs["fa4"] = lambda: fa4_func(q, k, v)[0]
        rep = HEADS // k.shape[2]
        qs = q.transpose(1, 2)
        ks = k.repeat_interleave(rep, 2).transpose(1, 2) if rep > 1 else k.transpose(1, 2)
        vs = v.repeat_interleave(rep, 2).transpose(1, 2) if rep > 1 else v.transpose(1, 2)
    else:
        lq = q.shape[0] // frames
        cu_q = torch.arange(frames + 1, device="cuda", dtype=torch.int32) * lq
        cu_k = torch.arange(frames + 1, device="cuda", dtype=torch.int32) * N
        for name, backend in OURS.items():
            runs[name] = lambda backend=backend: crosslmm_ops.cross_attention(
                q,
                k,
                v,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                max_seqlen_q=lq,
                max_seqlen_k=N,
                backend=backend,
            )
        if fa4_varlen_func is not None:
            runs["fa4"] = lambda: fa4_varlen_func(
                q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=lq, max_seqlen_k=N
            )[0]
        rep = HEADS // k.shape[1]
        qs = q.view(frames, lq, HEADS, HEAD_DIM).transpose(1, 2)
        kb = k.view(frames, N, -1, HEAD_DIM)
        vb = v.view(frames, N, -1, HEAD_DIM)
        ks = (kb.repeat_interleave(rep, 2) if rep > 1 else kb).transpose(1, 2)
        vs = (vb.repeat_interleave(rep, 2) if rep > 1 else vb).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qs, ks, vs)

        return run

    runs["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    runs["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    return runs


def _timed(fn, backward, inputs):
    if not backward:
        with torch.no_grad():
            fn()
            return do_bench_ms(fn)
    out = fn()
    dout = torch.randn_like(out)

    def step():
        o = fn()
        torch.autograd.grad(o, [t for t in inputs if t.requires_grad], dout)

    step()
    return do_bench_ms(step)


def run(selected: set[str]) -> dict:
    rows = []
    for name, scope, frames, hk, lq, backward in _case_table():
        kind = name.split()[0]
        if kind not in selected:
            continue
        q, k, v = _inputs(scope, frames, hk, lq, backward)
        lk = N if scope == "frame" else frames * N
        pairs = (frames if scope == "frame" else 1) * lq * lk
        flops = 4 * pairs * HEADS * HEAD_DIM * (3.5 if backward else 1.0)
        row = {"case": name, "ms": {}, "tflops": {}, "skipped": {}}
        runs = _runners(scope, frames, q, k, v)
        for peer, fn in runs.items():
            try:
                ms = _timed(fn, backward, (q, k, v))
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run the row
                row["skipped"][peer] = f"{type(exc).__name__}: {str(exc)[:160]}"
                continue
            if peer in OURS:
                ran = crosslmm_ops.last_backend("cross_attention")
                assert ran == OURS[peer], f"{peer} ran on {ran}, not the {OURS[peer]} back end"
                if peer == "ours":  # which CUDA kernel the planner chose for the row
                    row["kernel"] = crosslmm_ops.last_kernel("cross_attention")
            row["ms"][peer] = round(ms, 5)
            row["tflops"][peer] = round(flops / ms / 1e9, 1)
        if FA4_ERROR is not None:
            row["skipped"]["fa4"] = f"not importable: {FA4_ERROR[:160]}"
        if not backward:
            _record_gpu_times(row, runs)
        _summarise(row, set(OURS))
        if "ours" in row["ms"] and "ours_triton" in row["ms"]:
            row["triton_vs_cuda"] = round(row["ms"]["ours"] / row["ms"]["ours_triton"], 3)
        gpu = row.get("ms_gpu", {})
        if "ours" in gpu and "ours_triton" in gpu:
            row["triton_vs_cuda_gpu_time"] = round(gpu["ours"] / gpu["ours_triton"], 3)
        if not row["skipped"]:
            del row["skipped"]
        rows.append(row)
        ratio = row.get("ours_vs_best_peer", math.nan)
        print(
            f"{name:42s} "
            + "  ".join(f"{p} {ms:.4f}" for p, ms in row["ms"].items())
            + f"  | ours vs best peer {ratio:.2f}x"
            + f" ({row.get('ours_vs_best_peer_gpu_time', math.nan):.2f}x on GPU time)"
            + f", triton {row.get('triton_vs_cuda', math.nan):.0%} of cuda"
            + f" ({row.get('triton_vs_cuda_gpu_time', math.nan):.0%} on GPU time)",
            flush=True,
        )
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _record_gpu_times(row: dict, runs: dict) -> None:
    """``row["ms_gpu"]``: the GPU time of every runner timed in ``row["ms"]``, each call replayed
    from a CUDA graph (after do_bench's calls, so FA4 has compiled). Short calls are bound by the
    host, whose speed varies from process to process and machine to machine (up to 3x on the lent
    H100s). A runner that cannot be captured is said so under ``skipped``."""
    row["ms_gpu"] = {}
    for name in row["ms"]:
        try:
            with torch.no_grad():
                row["ms_gpu"][name] = round(graph_ms(runs[name]), 5)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal to the table
            row.setdefault("skipped", {})[f"{name} (graph)"] = (
                f"{type(exc).__name__}: {str(exc)[:160]}"
            )


def _summarise(row: dict, ours: set[str]) -> None:
    """Best peer and our ratio against it, for a row whose ``ms`` holds ours and the peers; the
    same on GPU time (``ms_gpu``) where the row has it for ours and a peer."""
    for times, suffix in ((row["ms"], ""), (row.get("ms_gpu", {}), "_gpu_time")):
        peers = [p for p in times if p not in ours]
        if "ours" in times and peers:
            best = min(peers, key=lambda p: times[p])
            row["best_peer" + suffix] = best
            row["ours_vs_best_peer" + suffix] = round(times[best] / times["ours"], 3)


def _projected_frame_local_row(frames: int, hk: int) -> dict:
    kind = "v2v-frame"
    t = projected.make_inputs(kind, frames, hk)
    row = {"case": f"projected frame-local T={frames} Hk={hk}", "ms": {}, "skipped": {}}
    # column: (path, the op whose back end must be cuda)
    ours = {
        "ours": ("fused", "projected_attention_core"),
        "ours_materialized": ("materialized", "cross_attention"),
    }
    runs = {}  # column: the call on this row's inputs
    for name, (path, op) in ours.items():
        run = runs[name] = lambda fn=projected.ours("cuda", path): fn(t)
        with torch.no_grad():
            run()
        ran = crosslmm_ops.last_path("projected_cross_attention")
        assert ran == path, f"{name} took the {ran} path, not {path}"
        assert crosslmm_ops.last_backend(op) == "cuda", f"{name}: {op} did not run on cuda"
        with torch.no_grad():
            row["ms"][name] = round(do_bench_ms(run), 5)

    peers = {}
    if fa4_func is not None:
        peers["cublas+fa4"] = projected.projected_then("fa4", "native")
    else:
        row["skipped"]["cublas+fa4"] = f"not importable: {FA4_ERROR[:160]}"
    for sdpa in ("cudnn", "flash"):
        fn, _, error = projected.first_working(
            lambda g, sdpa=sdpa: projected.projected_then(f"sdpa-{sdpa}", g), [t]
        )
        if fn is None:
            row["skipped"][f"cublas+sdpa_{sdpa}"] = error
        else:
            peers[f"cublas+sdpa_{sdpa}"] = fn
    for name, fn in peers.items():
        run = runs[name] = lambda fn=fn: fn(t)
        try:
            with torch.no_grad():
                run()
                row["ms"][name] = round(do_bench_ms(run), 5)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run the row
            row["skipped"][name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    _record_gpu_times(row, runs)
    flops = projected.fused_counts(kind, frames, hk)[0]
    row["tflops"] = {"ours": round(flops / row["ms"]["ours"] / 1e9, 1)}
    _summarise(row, set(ours))
    return row


def _projected_decode_row(frames: int, hk: int) -> dict:
    t = projected.make_inputs("decode", frames, hk)
    fn = projected.ours("cuda", "fused")
    with torch.no_grad():
        fn(t)
        assert crosslmm_ops.last_path("projected_cross_attention") == "fused"
        assert crosslmm_ops.last_backend("projected_attention_core") == "cuda"
        ms = do_bench_ms(lambda: fn(t))
    floor = projected.floor_ms("decode", frames, hk)
    row = {
        "case": f"projected decode T={frames} Hk={hk}",
        "ms": {"ours": round(ms, 5)},
        "floor_ms": round(floor, 5),
        "share_of_floor": round(floor / ms, 3),
    }
    _record_gpu_times(row, {"ours": lambda: fn(t)})
    if "ours" in row["ms_gpu"]:
        row["share_of_floor_gpu_time"] = round(floor / row["ms_gpu"]["ours"], 3)
    return row


def _fused_core_rows(frames: int, hk: int) -> list[dict]:
    """The core alone: frame-local V2V, 9 queries a frame, the 12 query heads' queries folded to
    the tokens' width (what the fused path hands the core; hk only names the model's shape)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dv = projected.DV
    q = torch.randn(frames, n, HEADS, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(frames, N, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 4 * frames * n * N * HEADS * dv
    with torch.no_grad():
        pa.projected_attention_core(q, x, backend="cuda")
        assert crosslmm_ops.last_backend("projected_attention_core") == "cuda"
        fwd_ms = do_bench_ms(lambda: pa.projected_attention_core(q, x, backend="cuda"))
    q.requires_grad_(True)
    x.requires_grad_(True)
    out = pa.projected_attention_core(q, x, backend="cuda")
    dout = torch.randn_like(out)
    torch.autograd.grad(out, (q, x), dout, retain_graph=True)
    bwd_backend = crosslmm_ops.last_backend("projected_attention_core_backward")
    bwd_ms = do_bench_ms(lambda: torch.autograd.grad(out, (q, x), dout, retain_graph=True))
    return [
        {
            "case": f"fused core fwd T={frames} Hk={hk}",
            "ms": {"ours": round(fwd_ms, 5)},
            "tflops": {"ours": round(flops / fwd_ms / 1e9, 1)},
            "backend": "cuda",
        },
        {
            "case": f"fused core bwd T={frames} Hk={hk}",
            "ms": {"ours": round(bwd_ms, 5)},
            "tflops": {"ours": round(2.5 * flops / bwd_ms / 1e9, 1)},
            "backend": bwd_backend,
        },
    ]


def run_projected() -> list[dict]:
    rows = [_projected_frame_local_row(t, 2) for t in (64, 256)]
    rows.append(_projected_decode_row(256, 2))
    rows += _fused_core_rows(256, 2)
    for row in rows:
        if "skipped" in row and not row["skipped"]:
            del row["skipped"]
        extra = {k: row[k] for k in ("floor_ms", "backend", "tflops", "ms_gpu") if k in row}
        print(
            f"{row['case']:42s} "
            + "  ".join(f"{p} {ms:.4f}" for p, ms in row["ms"].items())
            + (
                f"  | ours vs best peer {row['ours_vs_best_peer']:.2f}x"
                f" ({row.get('ours_vs_best_peer_gpu_time', math.nan):.2f}x on GPU time)"
                if "best_peer" in row
                else ""
            )
            + f"  {extra}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    try:
        import importlib.metadata as md

        fa4 = md.version("flash-attn-4")
    except Exception:  # noqa: BLE001
        fa4 = None
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "fa4": fa4,
        "python": platform.python_version(),
        "crosslmm_ops": crosslmm_ops.__version__,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/peers_<gpu>.json)"
    )
    parser.add_argument(
        "--cases",
        default="fwd,fwd+bwd,projected",
        help="comma-separated kinds of rows: fwd, fwd+bwd, projected",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("peers.py needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env))
    if FA4_ERROR is not None:
        print(f"FlashAttention-4 is not importable here ({FA4_ERROR}); its column is absent")
    cases = set(args.cases.split(","))
    warm_up_gpu()
    rows = run(cases)
    if "projected" in cases:
        rows += run_projected()
    gpu = "h100" if "H100" in env["gpu"] else "h200" if "H200" in env["gpu"] else "gpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"peers_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
