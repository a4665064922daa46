"""The planner (crosslmm_ops/planner.py): one place decides back end, path and kernel, records what
ran in one store, and explains a call; the environment is read in crosslmm_ops/environment.py
only. CPU tests (the CUDA kernel choice is checked with the GPU facts stubbed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import _backend, environment, planner
from crosslmm_ops.nn import CrossAttention, VisionMemory
from crosslmm_ops.ops import projected_attention as pa

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crosslmm_ops"
TRITON_CPU = _backend.triton_runnable(torch.device("cpu"))[0]


def _attention_inputs(sq=5, sk=7):
    q = torch.randn(2, sq, 4, 16)
    k, v = torch.randn(2, sk, 2, 16), torch.randn(2, sk, 2, 16)
    return q, k, v


def _projected_inputs(sq=3, sk=11, width=32):
    q = torch.randn(2, sq, 4, 16)
    x = torch.randn(2, sk, width)
    w_k, w_v = torch.randn(2 * 16, width), torch.randn(2 * 16, width)
    return q, x, w_k, w_v


# ----------------------------------------------------------------------------------------------
# explain()
# ----------------------------------------------------------------------------------------------


def test_explain_cross_attention(capsys):
    q, k, v = _attention_inputs()
    plan = crosslmm_ops.explain(crosslmm_ops.cross_attention, q, k, v)
    assert isinstance(plan, crosslmm_ops.Plan)
    assert (plan.op, plan.backend, plan.path, plan.kernel) == (
        "cross_attention",
        "torch",
        None,
        "reference",
    )
    assert any("auto" in r and "not cuda" in r for r in plan.reasons), plan.reasons
    printed = capsys.readouterr().out
    assert printed.strip() == str(plan) and "back end  torch" in printed and "why" in printed
    # By name, the same plan; print_plan=False prints nothing.
    assert crosslmm_ops.explain("cross_attention", q, k, v, print_plan=False) == plan
    assert capsys.readouterr().out == ""


def test_explain_names_the_backend_asked_for(monkeypatch):
    q, k, v = _attention_inputs()
    plan = crosslmm_ops.explain("cross_attention", q, k, v, backend="torch", print_plan=False)
    assert plan.backend == "torch" and "backend='torch' asked for it" in plan.reasons[0]
    monkeypatch.setenv(environment.BACKEND_VAR, "torch")
    plan = crosslmm_ops.explain("cross_attention", q, k, v, print_plan=False)
    assert plan.backend == "torch" and environment.BACKEND_VAR in plan.reasons[0]
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
        crosslmm_ops.explain("cross_attention", q, k, v, backend="cuda", print_plan=False)


@pytest.mark.skipif(not TRITON_CPU, reason="needs Triton (TRITON_INTERPRET=1 on the CPU)")
def test_explain_triton_then_run_records_the_same():
    q, k, v = _attention_inputs()
    plan = crosslmm_ops.explain("cross_attention", q, k, v, backend="triton", print_plan=False)
    assert (plan.backend, plan.kernel) == ("triton", "triton")
    crosslmm_ops.cross_attention(q, k, v, backend="triton")
    record = planner.last_record("cross_attention")
    assert (record.backend, record.kernel) == (plan.backend, plan.kernel)


def test_explain_rejects_what_the_op_rejects():
    q, k, v = _attention_inputs()
    with pytest.raises(ValueError, match="k and v must have q's head dim"):
        crosslmm_ops.explain("cross_attention", q, k[..., :8], v[..., :8], print_plan=False)
    with pytest.raises(ValueError, match="no plan for 'sideways'.*cross_attention"):
        crosslmm_ops.explain("sideways", q)


def test_explain_token_pool():
    x = torch.randn(1, 2, 9, 8)
    plan = crosslmm_ops.explain(
        crosslmm_ops.token_pool, x, grid=(3, 3), kernel_size=3, print_plan=False
    )
    assert (plan.op, plan.backend) == ("token_pool", "torch")
    crosslmm_ops.token_pool(x, grid=(3, 3), kernel_size=3)
    assert crosslmm_ops.last_backend("token_pool") == plan.backend


@pytest.mark.parametrize("path", ["fused", "materialized"])
def test_explain_projected_path_then_run(path):
    q, x, w_k, w_v = _projected_inputs()
    plan = crosslmm_ops.explain(
        crosslmm_ops.projected_cross_attention, q, x, w_k, w_v, path=path, print_plan=False
    )
    assert plan.path == path and f"path={path!r} asked for it" in plan.reasons[0]
    crosslmm_ops.projected_cross_attention(q, x, w_k, w_v, path=path)
    record = planner.last_record("projected_cross_attention")
    assert (record.backend, record.path) == (plan.backend, plan.path)


def test_explain_projected_environment_and_cost_model(monkeypatch):
    q, x, w_k, w_v = _projected_inputs()
    monkeypatch.delenv(environment.PROJECTED_PATH_VAR, raising=False)
    auto = crosslmm_ops.explain("projected_cross_attention", q, x, w_k, w_v, print_plan=False)
    assert "cost model" in auto.reasons[0]
    layout = pa.check_inputs(
        q, x, w_k, w_v, None, None, None, None, None, None, None, None, None, 1e-6
    )
    assert auto.path == pa.choose_path(layout, q.dtype)
    monkeypatch.setenv(environment.PROJECTED_PATH_VAR, "fused")
    plan = crosslmm_ops.explain("projected_cross_attention", q, x, w_k, w_v, print_plan=False)
    assert plan.path == "fused" and environment.PROJECTED_PATH_VAR in plan.reasons[0]
    monkeypatch.setenv(environment.PROJECTED_PATH_VAR, "sideways")
    with pytest.raises(ValueError, match=environment.PROJECTED_PATH_VAR):
        crosslmm_ops.explain("projected_cross_attention", q, x, w_k, w_v, print_plan=False)


def test_info_explains_example_calls(capsys):
    from crosslmm_ops import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "example calls on" in out and "path      " in out and "why       " in out


# ----------------------------------------------------------------------------------------------
# One record store
# ----------------------------------------------------------------------------------------------


def test_one_record_store():
    """The op, the public readers, the old _backend names and the projected op's last_path read
    the planner's one store; the DCAL modules' materialised path writes into it."""
    assert crosslmm_ops.last_backend is planner.last_backend
    assert _backend.last_backend is planner.last_backend
    assert _backend.record_backends is planner.record_backends
    planner.note("some_op", "triton", path="fused", kernel="k")
    assert planner.last_record("some_op") == planner.Record("triton", "fused", "k")
    assert crosslmm_ops.last_backend("some_op") == "triton"
    assert crosslmm_ops.last_path("some_op") == "fused"
    assert crosslmm_ops.last_kernel("some_op") == "k"

    q, x, w_k, w_v = _projected_inputs()
    with crosslmm_ops.record_backends() as ran:
        crosslmm_ops.projected_cross_attention(q, x, w_k, w_v, path="fused")
    assert pa.last_path() == "fused" == planner.last_path("projected_cross_attention")
    assert ("projected_attention_core", "torch") in ran
    assert ("projected_cross_attention", "torch") in ran

    # A module's materialised call (it projects K/V itself) is recorded in the same store.
    block = CrossAttention(32, 24, num_heads=4, num_kv_heads=2, kv_path="materialized")
    memory = VisionMemory.from_features(torch.randn(2, 3, 5, 24), pooled_per_frame=1)
    with crosslmm_ops.record_backends() as ran:
        block(torch.randn(2, 6, 32), memory)
    assert pa.last_path() == "materialized"
    assert ran[-1] == ("projected_cross_attention", "torch")
    assert planner.last_record("projected_cross_attention").kernel == "reference"
    block.kv_path = "fused"
    block(torch.randn(2, 6, 32), memory)
    assert pa.last_path() == "fused"


def test_record_backends_nests_and_is_per_thread():
    q, k, v = _attention_inputs()
    with crosslmm_ops.record_backends() as outer:
        with crosslmm_ops.record_backends() as inner:
            crosslmm_ops.cross_attention(q, k, v)
        crosslmm_ops.token_pool(torch.randn(1, 1, 9, 4), grid=(3, 3), kernel_size=3)
    assert inner == [("cross_attention", "torch")]
    assert outer == [("cross_attention", "torch"), ("token_pool", "torch")]


# ----------------------------------------------------------------------------------------------
# The CUDA attention kernel
# ----------------------------------------------------------------------------------------------


def test_attention_kernel_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    for var in (environment.ATTENTION_SM90_VAR, environment.ATTENTION_BWD_SM90_VAR):
        monkeypatch.delenv(var, raising=False)
    # Where the sm90 kernel cannot run, the mma.sync kernel, whatever the environment asks.
    here = cuda if torch.cuda.is_available() else torch.device("cpu")
    if not planner.sm90_usable(here, 128, 0.1)[0]:
        monkeypatch.setenv(environment.ATTENTION_SM90_VAR, "1")
        kernel, why = planner.attention_kernel(here, 128, 200, 0.1)
        assert kernel == "mma_sync" and "cannot run" in why
        monkeypatch.delenv(environment.ATTENTION_SM90_VAR)
    # The rule itself, with the GPU facts stubbed.
    monkeypatch.setattr(planner, "sm90_usable", lambda *args: (True, ""))
    assert planner.attention_kernel(cuda, 128, 9, 0.1)[0] == "sm90_packed"  # decode / per frame
    assert planner.attention_kernel(cuda, 128, 9, backward=True)[0] == "mma_sync"
    assert planner.attention_kernel(cuda, 128, 200, 0.1)[0] == "sm90"
    assert planner.attention_kernel(cuda, 128, 200, backward=True)[0] == "sm90"
    monkeypatch.setenv(environment.ATTENTION_SM90_VAR, "0")
    assert planner.attention_kernel(cuda, 128, 200, 0.1) == (
        "mma_sync",
        f"{environment.ATTENTION_SM90_VAR}=0",
    )
    monkeypatch.setenv(environment.ATTENTION_SM90_VAR, "1")
    assert planner.attention_kernel(cuda, 128, 9, 0.1)[0] == "sm90"
    monkeypatch.setenv(environment.ATTENTION_BWD_SM90_VAR, "dkdv")
    assert planner.attention_kernel(cuda, 128, 9, backward=True)[0] == "sm90_dkdv"
    monkeypatch.setenv(environment.ATTENTION_SM90_VAR, "packed")
    assert planner.attention_kernel(cuda, 128, 200, 0.1) == (
        "sm90_packed",
        f"{environment.ATTENTION_SM90_VAR}=packed",
    )
    monkeypatch.setenv(environment.ATTENTION_SM90_VAR, "yes")
    with pytest.raises(ValueError, match=environment.ATTENTION_SM90_VAR):
        planner.attention_kernel(cuda, 128, 9, 0.1)


def test_sm90_usable_needs_head_dim_128_and_a_positive_scale(monkeypatch):
    monkeypatch.setattr(_backend, "extension_archs", lambda: ["80", "90a"])
    monkeypatch.setattr(planner, "_is_sm90", lambda index: True)
    cuda = torch.device("cuda", 0)
    assert planner.sm90_usable(cuda, 128, 0.1) == (True, "")
    assert not planner.sm90_usable(cuda, 64, 0.1)[0]
    assert not planner.sm90_usable(cuda, 128, -0.1)[0]
    assert not planner.sm90_usable(torch.device("cpu"), 128, 0.1)[0]


def test_projected_core_kernel_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    var = environment.PROJECTED_KERNEL_VAR
    monkeypatch.delenv(var, raising=False)
    here = cuda if torch.cuda.is_available() else torch.device("cpu")
    if not planner.projected_sm90_usable(here, 1152)[0]:
        monkeypatch.setenv(var, "sm90_cluster")
        kernel, why = planner.projected_core_kernel(here, 1152, 108)
        assert kernel == "auto" and "cannot run" in why
        monkeypatch.delenv(var)
    # The rule itself, with the GPU facts stubbed. "auto" leaves the mma.sync kernels' launch plan
    # to choose between the decode kernel and the general one.
    monkeypatch.setattr(_backend, "extension_archs", lambda: ["80", "90a"])
    monkeypatch.setattr(planner, "_is_sm90", lambda index: True)
    assert planner.projected_core_kernel(cuda, 1152, 108)[0] == "sm90_cluster"  # V2V frame
    assert planner.projected_core_kernel(cuda, 1152, 12)[0] == "auto"  # decode
    assert planner.projected_core_kernel(cuda, 512, 108)[0] == "auto"  # half a cluster
    kernel, why = planner.projected_core_kernel(cuda, 1160, 108)
    assert kernel == "auto" and "multiples of 64" in why
    assert planner.projected_core_kernel(cuda, 2048, 108)[0] == "auto"
    monkeypatch.setenv(var, "sm90_cluster")
    assert planner.projected_core_kernel(cuda, 512, 12) == ("sm90_cluster", f"{var}=sm90_cluster")
    assert planner.projected_core_kernel(cuda, 1160, 108)[0] == "auto"
    for named in ("mma_sync", "decode", "decode_bulk"):
        monkeypatch.setenv(var, named)
        assert planner.projected_core_kernel(cuda, 1152, 108) == (named, f"{var}={named}")
    monkeypatch.setenv(var, "yes")
    with pytest.raises(ValueError, match=var):
        planner.projected_core_kernel(cuda, 1152, 108)


def test_choices_without_reasons_are_the_same(monkeypatch):
    """The ops ask without reasons (``explain=False``: formatting them is host time of every short
    call) and must get the very choices :func:`crosslmm_ops.explain` reports."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "extension_archs", lambda: ["80", "90a"])
    monkeypatch.setattr(planner, "_is_sm90", lambda index: True)
    fwd, bwd = environment.ATTENTION_SM90_VAR, environment.ATTENTION_BWD_SM90_VAR
    for mode in ("", "0", "1", "packed", "dkdv"):
        monkeypatch.setenv(fwd, mode if mode != "dkdv" else "")
        monkeypatch.setenv(bwd, mode if mode != "packed" else "")
        for head_dim in (64, 128):
            for max_q in (1, 9, 63, 64, 200):
                for scale in (0.1, -0.1):
                    for backward in (False, True):
                        args = (cuda, head_dim, max_q, scale)
                        kernel = planner.attention_kernel(*args, backward=backward)[0]
                        quiet = planner.attention_kernel(*args, backward=backward, explain=False)
                        assert quiet[0] == kernel, (mode, args, backward)
    var = environment.PROJECTED_KERNEL_VAR
    for mode in ("", "sm90_cluster", "mma_sync", "decode"):
        monkeypatch.setenv(var, mode)
        for device in (cuda, torch.device("cpu")):
            for width in (64, 512, 576, 640, 1152, 1160, 2048):
                for rows in (1, 12, 63, 64, 108):
                    kernel = planner.projected_core_kernel(device, width, rows)[0]
                    quiet = planner.projected_core_kernel(device, width, rows, explain=False)[0]
                    assert quiet == kernel, (mode, device, width, rows)
    monkeypatch.delenv(environment.BACKEND_VAR, raising=False)
    oks = (None, (True, ""), (False, "no"), lambda: (False, "no"))
    for device in (torch.device("cpu"), torch.device("meta")):
        for backend in (None, "auto", "torch", "triton", "cuda"):
            for cuda_ok in oks:
                for triton_ok in oks:
                    kw = dict(cuda_ok=cuda_ok, triton_ok=triton_ok)
                    try:
                        chosen = planner.choose_backend("op", backend, device, **kw)[0]
                    except RuntimeError as error:
                        with pytest.raises(RuntimeError, match=re.escape(str(error))):
                            planner.choose_backend("op", backend, device, explain=False, **kw)
                        continue
                    quiet = planner.choose_backend("op", backend, device, explain=False, **kw)
                    assert quiet[0] == chosen
                    assert planner.resolve("op", backend, device, **kw) == chosen
    for path in ("auto", "fused", "materialized"):
        for costs in ((1.0, 2.0), (2.0, 1.0), (1.0, 1.0)):
            for fast in (None, (True, ""), (False, "no kernel")):
                for tracing in (False, True):
                    kw = dict(
                        fused_fast=None if fast is None else (lambda fast=fast: fast),
                        tracing=tracing,
                    )
                    chosen = planner.choose_path(path, lambda costs=costs: costs, **kw)[0]
                    quiet = planner.choose_path(
                        path, lambda costs=costs: costs, explain=False, **kw
                    )
                    assert quiet[0] == chosen


# ----------------------------------------------------------------------------------------------
# Structure: the environment read in one module, the kernel choice an argument of the extension
# ----------------------------------------------------------------------------------------------


def test_environment_read_in_one_module():
    reads = re.compile(r"""environ(\.get)?\s*[\[(]\s*["'](CROSSLMM_|TRITON_INTERPRET)|getenv""")
    offenders = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if p.name != "environment.py" and reads.search(p.read_text())
    ]
    assert offenders == []
    for source in (ROOT / "csrc").rglob("*.c*"):
        assert "getenv" not in source.read_text(), source


def test_library_modules_import_no_underscore_names():
    """No module of the library imports another module's underscore names (the compiled
    extension and the package-internal _backend module aside)."""
    allowed = {"_C", "_backend", "annotations"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crosslmm_ops"):
                offenders += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name not in allowed
                ]
    assert offenders == []


def test_explain_flash_attn_drop_ins():
    q, k, v = _attention_inputs()
    plan = crosslmm_ops.explain(crosslmm_ops.flash_attn_func, q, k, v, 0.0, print_plan=False)
    assert plan == crosslmm_ops.explain("cross_attention", q, k, v, print_plan=False)
    with pytest.raises(NotImplementedError, match="causal=True"):
        crosslmm_ops.explain(crosslmm_ops.flash_attn_func, q, k, v, causal=True)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 14], dtype=torch.int32)
    packed = q.reshape(10, 4, 16), k.reshape(14, 2, 16), v.reshape(14, 2, 16)
    plan = crosslmm_ops.explain(
        crosslmm_ops.flash_attn_varlen_func, *packed, cu, cu_k, 5, 7, print_plan=False
    )
    assert (plan.op, plan.backend) == ("cross_attention", "torch")


def test_plan_names_the_cuda_kernel_as_the_extension_reports_it(monkeypatch):
    """A CUDA call's plan (GPU facts stubbed): the sm90 forward for long query segments, named as
    _C reports it (what last_kernel then says), with the backward's choice among the reasons."""
    from crosslmm_ops.ops import cross_attention as attention

    for var in (environment.ATTENTION_SM90_VAR, environment.ATTENTION_BWD_SM90_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(planner, "sm90_usable", lambda *args: (True, ""))
    cuda = torch.device("cuda", 0)
    for sq, kernel in ((200, "sm90_wgmma"), (9, "sm90_packed")):
        q, k = torch.randn(1, sq, 12, 128), torch.randn(1, 729, 2, 128)
        layout = attention.check_inputs(q, k, k, None, None, None, None)
        plan = attention.AttentionCall(layout, 0.088, "cuda", "stub").plan("cross_attention", cuda)
        assert (plan.backend, plan.kernel) == ("cuda", kernel), plan
        assert any(
            r.startswith(f"backward kernel {'sm90_wgmma' if sq > 64 else 'mma_sync'}")
            for r in plan.reasons
        ), plan.reasons


@pytest.mark.parametrize("kv_path", ["auto", "fused", "materialized"])
def test_explain_a_dcal_module(kv_path):
    """explain(module, *forward's arguments): one plan per branch, the path each then takes."""
    from crosslmm_ops.nn import DualCrossAttention

    dcal = DualCrossAttention(32, 24, num_heads=4, num_kv_heads=2, kv_path=kv_path)
    memory = VisionMemory.from_features(torch.randn(2, 3, 5, 24), pooled_per_frame=1)
    hidden = torch.randn(2, 8, 32)
    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[:, :3] = True
    plans = crosslmm_ops.explain(dcal, hidden, memory, visual, print_plan=False)
    assert [p.op for p in plans] == ["V2VCrossAttention", "T2VCrossAttention"]
    if kv_path != "auto":
        assert all(p.path == kv_path for p in plans)
    dcal(hidden, memory, visual)  # the T2V branch runs last
    assert pa.last_path() == plans[-1].path
    assert crosslmm_ops.last_backend("projected_cross_attention") == plans[-1].backend
    # A branch without queries: nothing runs.
    block = CrossAttention(32, 24, num_heads=4, num_kv_heads=2)
    plan = crosslmm_ops.explain(
        block, hidden, memory, torch.zeros(2, 8, dtype=torch.bool), print_plan=False
    )
    assert plan.backend == "none"
