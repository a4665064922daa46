"""The CUDA attention forward's kernels against each other and the peers, in one process: the
planner's choice (``auto``), the GQA-packed wgmma kernel forced (``CROSSLMM_ATTENTION_SM90=packed``)
and the mma.sync kernel (``=0``). ``auto`` takes ``sm90_packed`` for short query sets and the
Hopper TMA kernel (``sm90_wgmma``) for longer ones; the global V2V rows show whether the packed
tiles would serve those too.

    python benchmarks/forward_kernels.py \
        [--json benchmarks/results/sm90_packed_vs_mma_sync_h100.json]

Rows: per-frame V2V varlen (9 queries per frame against its own 729 keys), decode (1 query
against T*729 keys) and global V2V (9 T queries); inputs and peers as in ``benchmarks/peers.py``.
Each row gives the time per kernel (the name the extension reports), the peers' times, the
largest difference between the kernels' outputs, and the floor: reading q, k and v and writing
the output once at the copy bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from conftest import copy_bandwidth_tbs, do_bench_ms  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import environment  # noqa: E402
from crosslmm_ops.testing import env_value  # noqa: E402

# (case, scope, frames, kv heads, queries per frame or in all)
CASES = [
    ("fwd v2v-per-frame varlen T=256 Hk=2", "frame", 256, 2, 9),
    ("fwd v2v-per-frame varlen T=256 Hk=12", "frame", 256, 12, 9),
    ("fwd v2v-per-frame varlen T=64 Hk=2", "frame", 64, 2, 9),
    ("fwd decode T=32 Hk=2", "global", 32, 2, 1),
    ("fwd decode T=256 Hk=2", "global", 256, 2, 1),
    ("fwd decode T=256 Hk=12", "global", 256, 12, 1),
    ("fwd v2v T=4 Hk=2 (36 q)", "global", 4, 2, 36),
    ("fwd v2v T=32 Hk=2", "global", 32, 2, 32 * 9),
    ("fwd v2v T=64 Hk=2", "global", 64, 2, 64 * 9),
]
# CROSSLMM_ATTENTION_SM90: the planner's choice, the packed kernel forced, the mma.sync kernel.
MODES = ("auto", "packed", "0")


def run_row(name, scope, frames, hk, lq, copy_tbs) -> dict:
    q, k, v = peers._inputs(scope, frames, hk, lq, False)
    runs = peers._runners(scope, frames, q, k, v)
    row = {"case": name, "ms": {}, "kernel": {}}
    outputs = []
    with torch.no_grad():
        for mode in MODES:
            with env_value(environment.ATTENTION_SM90_VAR, mode):
                outputs.append(runs["ours"]().float())
                assert crosslmm_ops.last_backend("cross_attention") == "cuda"
                kernel = crosslmm_ops.last_kernel("cross_attention")
                row["kernel"][mode] = kernel
                if kernel not in row["ms"]:  # auto is one of the other two
                    row["ms"][kernel] = round(do_bench_ms(runs["ours"]), 5)
        row["max_abs_diff_vs_auto"] = max((o - outputs[0]).abs().max().item() for o in outputs)
        for peer in ("fa4", "sdpa_cudnn", "sdpa_flash"):
            if peer not in runs:
                continue
            try:
                runs[peer]()
                row["ms"][peer] = round(do_bench_ms(runs[peer]), 5)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run the row
                row.setdefault("skipped", {})[peer] = f"{type(exc).__name__}: {str(exc)[:160]}"
    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v)) + q.numel() * q.element_size()
    row["floor_ms"] = round(nbytes / (copy_tbs * 1e12) * 1e3, 5)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("forward_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    copy_tbs = copy_bandwidth_tbs()
    rows = []
    for case in CASES:
        rows.append(run_row(*case, copy_tbs))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        result = {"env": peers.environment(), "copy_tbs": copy_tbs, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
