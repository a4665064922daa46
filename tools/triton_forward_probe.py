"""Where the Triton attention forward stands against the CUDA back end on the rows where it is
slowest, and which launch options would serve it better: per row, the public op on both back ends,
the Triton launch replayed from a CUDA graph (GPU time without the host's launch cost), and the
Triton forward over a grid of tile shapes, warps, pipeline stages and key-split counts, each
output checked against the CUDA back end's.

    python tools/triton_forward_probe.py [--rows v2v32,v2v64,t2v32,decode32,decode256]
                                         [--cuda-splits] [--json out.json]

``--cuda-splits`` also times the CUDA back end at a range of explicit key-split counts, to check
its own split model (``sm90_key_splits`` in csrc/attention/attention.cu) the same way.

It calls ``crosslmm_ops.triton.cross_attention.attention_forward`` with ``_forward_config``
replaced, so expect to adapt it when that launcher changes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402
from conftest import graph_ms  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops.triton import common  # noqa: E402
from crosslmm_ops.triton import cross_attention as tca  # noqa: E402

ROWS = {  # name: (frames, kv heads, queries)
    "v2v32": (32, 2, 32 * 9),
    "v2v64": (64, 2, 64 * 9),
    "t2v32": (32, 2, 128),
    "decode32": (32, 2, 1),
    "decode256": (256, 2, 1),
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def probe_row(name: str, frames: int, hk: int, lq: int, cuda_splits: bool = False) -> dict:
    q, k, v = peers._inputs("global", frames, hk, lq, False)
    q, k, v = q[0], k[0], v[0]
    cu_q = torch.tensor([0, lq], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], device="cuda", dtype=torch.int32)
    scale = q.shape[-1] ** -0.5
    row: dict = {"row": name, "ms": {}}
    with torch.no_grad():
        for backend in ("cuda", "triton"):

            def fn(b=backend):
                return crosslmm_ops.cross_attention(q[None], k[None], v[None], backend=b)

            fn()
            assert crosslmm_ops.last_backend("cross_attention") == backend
            row["ms"][f"public_{backend}"] = round(bench(fn), 5)
        expect = crosslmm_ops.cross_attention(q[None], k[None], v[None], backend="cuda")[0].float()
        if cuda_splits:
            # The CUDA back end's split count (its own model picks it for num_splits=0), swept.
            row["cuda_splits"] = {}
            for splits in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
                out = crosslmm_ops.cross_attention(
                    q[None], k[None], v[None], num_splits=splits, backend="cuda"
                )
                err = (out[0].float() - expect).abs().max().item()
                ms = bench(
                    lambda s=splits: crosslmm_ops.cross_attention(
                        q[None], k[None], v[None], num_splits=s, backend="cuda"
                    )
                )
                row["cuda_splits"][splits] = {"ms": round(ms, 5), "max_abs_err": err}

        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], device="cuda", dtype=torch.float32)

        def launch(splits: int) -> None:
            tca.attention_forward(q, k, v, out, lse, cu_q, cu_k, lq, k.shape[0], scale, splits)

        # The default launch, and the same replayed from a graph: its GPU time alone.
        launch(0)
        row["ms"]["triton_default_eager"] = round(bench(lambda: launch(0)), 5)
        row["ms"]["triton_default_graph"] = round(graph_ms(lambda: launch(0), rep_ms=40), 5)

        group = q.shape[1] // hk
        packed_rows = lq * group
        default_cfg = tca._forward_config(packed_rows, q.shape[-1], q.dtype)
        row["default_config"] = default_cfg
        original = tca._forward_config
        grid = []
        block_ms = sorted({default_cfg["BLOCK_M"], min(default_cfg["BLOCK_M"], 64)})
        for bm, bn, warps, stages in itertools.product(block_ms, (64, 128), (4, 8), (2, 3)):
            cfg = dict(
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_D=default_cfg["BLOCK_D"],
                num_warps=warps,
                num_stages=stages,
            )
            programs = triton.cdiv(packed_rows, bm) * hk
            key_blocks = triton.cdiv(k.shape[0], bn)
            model = common.num_splits_heuristic(programs, common.sm_count(q.device), key_blocks)
            tca._forward_config = lambda *a, cfg=cfg: dict(cfg)
            try:
                for splits in sorted({model, max(1, model // 2)}):
                    out.fill_(float("nan"))
                    launch(splits)
                    err = (out.float() - expect).abs().max().item()
                    ms = bench(lambda s=splits: launch(s))
                    grid.append(
                        {
                            **cfg,
                            "splits": splits,
                            "model_splits": model,
                            "ms": round(ms, 5),
                            "max_abs_err": err,
                        }
                    )
            except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory)
                grid.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:100]}"})
            finally:
                tca._forward_config = original
        ok = [g for g in grid if "ms" in g and g["max_abs_err"] < 0.05]
        ok.sort(key=lambda g: g["ms"])
        row["best"] = ok[:5]
        row["grid"] = grid
        row["best_vs_cuda"] = round(row["ms"]["public_cuda"] / ok[0]["ms"], 3) if ok else None
        row["default_vs_cuda"] = round(row["ms"]["public_cuda"] / row["ms"]["public_triton"], 3)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--cuda-splits", action="store_true", help="also sweep the CUDA back end's key splits"
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.rows.split(","):
        row = probe_row(name, *ROWS[name], cuda_splits=args.cuda_splits)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("row", "ms", "default_vs_cuda", "best_vs_cuda")}))
        for g in row["best"][:3]:
            print("   ", json.dumps(g))
        if "cuda_splits" in row:
            print(
                "    cuda splits:", json.dumps({s: r["ms"] for s, r in row["cuda_splits"].items()})
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"env": peers.environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
