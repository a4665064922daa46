"""Shared machinery of the kernel benchmarks (pytest-benchmark).

Every benchmark times its case twice: pytest-benchmark's own rounds (each round runs the op a few
times and synchronises, so the time is the GPU's) and a ``triton.testing.do_bench`` median, which
goes into the summary with the achieved bandwidth or FLOP rate, the floor and the ratios between
back ends. The summary is printed at the end of the session and written as JSON (GPU name, torch and
triton versions) to ``benchmarks/results/`` (or ``$CROSSLMM_BENCH_DIR``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

RESULTS: list[dict] = []
_CEILINGS: dict[str, float] = {}


def load_fa4(user: str | None = None):
    """FlashAttention-4 (CuTe DSL; ``pip install flash-attn-4``), the strongest attention peer on
    Hopper: ``(flash_attn_func, flash_attn_varlen_func, None)``, or ``(None, None, why)`` where it
    is not importable, which is printed on behalf of benchmark ``user`` when given (its FA4
    columns are left out)."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func  # type: ignore
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        if user:
            print(
                f"{user}: FlashAttention-4 (flash_attn.cute) is not importable here "
                f"({type(exc).__name__}); its columns are skipped"
            )
        return None, None, f"{type(exc).__name__}: {exc}"
    return flash_attn_func, flash_attn_varlen_func, None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        item.add_marker(skip)


def warm_up_gpu(ms: float = 500.0) -> None:
    """Keep the GPU busy with bf16 matmuls for about ``ms``: a GPU left idle (a machine just
    started, a JIT compile, host-side setup) runs at low clocks for a while, which would slow the
    first cases timed after it."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < ms:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def do_bench_ms(fn, *, rep_ms: int = 200) -> float:
    """Median time of ``fn`` in ms from CUDA events (triton.testing.do_bench), after warm-up."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def graph_ms(op, *, rep_ms: int = 200) -> float:
    """GPU time of ``op`` in ms: captured in a CUDA graph and replayed, so none of the host's
    launch cost (Python, dispatch, the driver) is in it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op()
    return do_bench_ms(graph.replay, rep_ms=rep_ms)


def rotating(make, bytes_each: int, *, at_least_bytes: int = 200 * 2**20):
    """Enough independent inputs from ``make()`` that cycling through them defeats the 50 MB L2."""
    count = max(1, -(-at_least_bytes // max(bytes_each, 1)))
    return [make() for _ in range(min(count, 8))]


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy bandwidth measured now (bytes read + written), in TB/s."""
    if "copy" not in _CEILINGS:
        src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
        dst = torch.empty_like(src)
        ms = do_bench_ms(lambda: dst.copy_(src))
        _CEILINGS["copy"] = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
        del src, dst
    return _CEILINGS["copy"]


def matmul_tflops() -> float:
    """bf16 matmul rate measured now (8192^3 through cuBLAS), in TFLOP/s."""
    if "matmul" not in _CEILINGS:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = do_bench_ms(lambda: a @ b)
        _CEILINGS["matmul"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return _CEILINGS["matmul"]


def gpu_synced(fn, inputs, inner: int = 5):
    """A callable for pytest-benchmark: ``inner`` calls over rotating inputs, then a sync."""
    state = {"i": 0}

    def run():
        for _ in range(inner):
            fn(inputs[state["i"] % len(inputs)])
            state["i"] += 1
        torch.cuda.synchronize()

    return run


@pytest.fixture
def record():
    def _record(**fields):
        RESULTS.append(fields)

    return _record


def _environment() -> dict:
    import triton

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
    try:
        import crosslmm_ops
        from crosslmm_ops import _backend

        env["crosslmm_ops"] = crosslmm_ops.__version__
        env["extension_archs"] = _backend.extension_archs()
    except Exception:  # noqa: BLE001
        pass
    env.update({f"ceiling_{k}": v for k, v in _CEILINGS.items()})
    return env


OURS = ("cuda", "triton")


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per benchmark group: each back end's median ms and achieved rate, the floor, and
    ours against the best peer (peer ms / our ms: above 1 is faster)."""
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["backend"]] = r
    lines = []
    for group, by_backend in groups.items():
        any_row = next(iter(by_backend.values()))
        unit = any_row["unit"]
        cells = [f"{b} {r['ms']:.3f} ms {r['rate']:.2f} {unit}" for b, r in by_backend.items()]
        peers = {b: r for b, r in by_backend.items() if b not in OURS}
        ratios = []
        if peers:
            best_name, best = min(peers.items(), key=lambda kv: kv[1]["ms"])
            for ours in OURS:
                if ours in by_backend:
                    ratios.append(f"{ours}/{best_name} {best['ms'] / by_backend[ours]['ms']:.2f}x")
        if "cuda" in by_backend and "triton" in by_backend:
            ratios.append(
                f"triton at {by_backend['cuda']['ms'] / by_backend['triton']['ms']:.0%} of cuda"
            )
        if "cuda" in by_backend and any_row.get("floor_ms"):
            ratios.append(
                f"cuda at {any_row['floor_ms'] / by_backend['cuda']['ms']:.0%} of floor "
                f"{any_row['floor_ms']:.3f} ms"
            )
        lines.append(f"{group:<40} | " + " | ".join(cells) + " || " + "; ".join(ratios))
    return lines


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    by_suite: dict[str, list[dict]] = {}
    for r in RESULTS:
        by_suite.setdefault(r["suite"], []).append(r)
    out_dir = Path(os.environ.get("CROSSLMM_BENCH_DIR", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    for suite, rows in by_suite.items():
        lines = summary_lines(rows)
        path = out_dir / f"{suite}.json"
        path.write_text(
            json.dumps({"environment": env, "results": rows, "summary": lines}, indent=1)
        )
        terminalreporter.write_line(f"\n{suite}: {len(rows)} results written to {path}")
        terminalreporter.write_line(", ".join(f"{k}={v}" for k, v in env.items()))
        for line in lines:
            terminalreporter.write_line(line)
