"""Where the Triton attention backward stands against the CUDA back end's on the forward+backward
rows, and which launch options would serve it better: per row, the CUDA backward and the Triton
backward as launched by default (direct launcher calls on the same forward's output and LSE), an
older Triton launcher for comparison (``--old FILE``), and the Triton backward over a grid of the
dK/dV kernel's and the dQ kernel's tiles, warps, pipeline stages and dQ key splits, each varied
with the other kernel at its default. Every gradient is checked against the CUDA back end's.

    git show main:crosslmm_ops/triton/cross_attention.py > old_cross_attention.py
    python tools/triton_backward_probe.py [--rows v2v64,v2v64h12,v2v256] [--old FILE]
                                          [--no-grid] [--json out.json]

It calls ``crosslmm_ops.triton.cross_attention.attention_backward`` with ``_backward_config``
replaced, so expect to adapt it when that launcher changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

from crosslmm_ops import _backend, planner  # noqa: E402
from crosslmm_ops.triton import common  # noqa: E402
from crosslmm_ops.triton import cross_attention as tca  # noqa: E402

ROWS = {  # name: (frames, kv heads, queries) of V2V global
    "v2v64": (64, 2, 64 * 9),
    "v2v64h12": (64, 12, 64 * 9),
    "v2v256": (256, 2, 256 * 9),
}


def bench(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=5, rep=60), 4)


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_cross_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_row(name, frames, hk, lq, old=None, grid=True, cuda=True) -> dict:
    q, k, v = peers._inputs("global", frames, hk, lq, False)
    q, k, v = q[0], k[0], v[0]
    lk = k.shape[0]
    cu_q = torch.tensor([0, lq], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, lk], device="cuda", dtype=torch.int32)
    scale = q.shape[-1] ** -0.5
    ext = _backend.extension() if cuda else None
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], lq, device="cuda", dtype=torch.float32)
    if cuda:
        fwd_kernel = planner.attention_kernel(q.device, q.shape[-1], lq)[0]
        bwd_kernel = planner.attention_kernel(q.device, q.shape[-1], lq, backward=True)[0]
        ext.attention_forward(q, k, v, out, lse, cu_q, cu_k, lq, lk, scale, 0, fwd_kernel)
    else:  # no extension: the Triton forward, and gradients checked against the old launcher's
        tca.attention_forward(q, k, v, out, lse, cu_q, cu_k, lq, lk, scale, 0)
    dout = torch.randn_like(out)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    flops = 4 * lq * lk * q.shape[1] * q.shape[2] * 2.5
    row: dict = {"row": name, "ms": {}, "tflops": {}}
    if cuda:
        row["cuda_kernels"] = [fwd_kernel, bwd_kernel]

    def cuda_bwd():
        ext.attention_backward(
            dout, q, k, v, out, lse, *grads, cu_q, cu_k, lq, lk, scale, True, bwd_kernel
        )

    def triton_bwd(module=tca, splits=0):
        kw = {"num_splits": splits} if module is tca else {}
        module.attention_backward(
            dout, q, k, v, out, lse, *grads, cu_q, cu_k, lq, lk, scale, True, **kw
        )

    (cuda_bwd if cuda else lambda: triton_bwd(old or tca))()
    expect = [g.float().clone() for g in grads]

    def checked(fn) -> tuple[float, float]:
        for g in grads:
            g.fill_(float("nan"))
        fn()
        err = max((g.float() - e).abs().max().item() for g, e in zip(grads, expect))
        return bench(fn), err

    if cuda:
        row["ms"]["cuda"], _ = checked(cuda_bwd)
    row["ms"]["triton_default"], row["triton_default_err"] = checked(triton_bwd)
    if old is not None:
        row["ms"]["triton_old"], row["triton_old_err"] = checked(lambda: triton_bwd(old))
    for key, ms in row["ms"].items():
        row["tflops"][key] = round(flops / (ms * 1e-3) / 1e12, 1)
    if not grid:
        return row

    group = q.shape[1] // hk
    packed_rows = lq * group
    dkdv_default, dq_default = tca._backward_config(packed_rows, q.shape[-1], q.dtype)
    row["default_config"] = {"dkdv": dkdv_default, "dq": dq_default}
    original = tca._backward_config
    results = []
    dkdv_grid = itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
    dq_grid = itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
    trials = [
        ("dkdv", dict(BLOCK_N=a, BLOCK_M=b, num_warps=w, num_stages=s)) for a, b, w, s in dkdv_grid
    ]
    trials += [
        ("dq", dict(BLOCK_M=a, BLOCK_N=b, num_warps=w, num_stages=s)) for a, b, w, s in dq_grid
    ]
    for which, change in trials:
        dkdv = dict(dkdv_default, **change) if which == "dkdv" else dict(dkdv_default)
        dq = dict(dq_default, **change) if which == "dq" else dict(dq_default)
        tca._backward_config = lambda *a, dkdv=dkdv, dq=dq: (dict(dkdv), dict(dq))
        programs = triton.cdiv(packed_rows, dq["BLOCK_M"]) * hk
        model = common.num_splits_heuristic(
            programs, common.sm_count(q.device), triton.cdiv(lk, dq["BLOCK_N"])
        )
        splits_tried = sorted({model, max(1, model // 2), min(common.MAX_SPLITS, 2 * model)})
        if which == "dkdv":
            splits_tried = [model]
        try:
            for splits in splits_tried:
                ms, err = checked(lambda s=splits: triton_bwd(splits=s))
                results.append(
                    {
                        "kernel": which,
                        **change,
                        "splits": splits,
                        "model_splits": model,
                        "ms": ms,
                        "max_abs_err": err,
                    }
                )
        except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory)
            results.append(
                {"kernel": which, **change, "error": f"{type(exc).__name__}: {str(exc)[:100]}"}
            )
        finally:
            tca._backward_config = original
    row["grid"] = results
    for which in ("dkdv", "dq"):
        ok = [r for r in results if r["kernel"] == which and "ms" in r and r["max_abs_err"] < 0.1]
        ok.sort(key=lambda r: r["ms"])
        row[f"best_{which}"] = ok[:4]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--old", default=None, help="an older cross_attention.py to time beside")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument(
        "--no-cuda",
        action="store_true",
        help="without the extension: Triton forward, gradients checked against --old's",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    old = load_module(args.old) if args.old else None
    rows = []
    for name in args.rows.split(","):
        row = probe_row(name, *ROWS[name], old=old, grid=not args.no_grid, cuda=not args.no_cuda)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("row", "ms", "tflops", "triton_default_err")}))
        for which in ("dkdv", "dq"):
            for r in row.get(f"best_{which}", [])[:3]:
                print("   ", json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": peers.environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
