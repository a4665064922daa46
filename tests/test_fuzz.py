"""Fuzzing every back end against the reference (issue #9), plus numerical extremes.

Hypothesis draws shapes, dtypes, layouts and options for ``token_pool`` and ``cross_attention`` and
checks each back end that can run here against the float64 reference, forward and backward, with the
same bounds (and poisoned outputs) as the per-op tests, whose checkers are reused.

* CI (CPU): the torch back end and the Triton kernels under the interpreter, small draws,
  ``CROSSLMM_FUZZ_EXAMPLES`` examples per test (default 12), derandomised so CI is reproducible.
* GPU campaign: ``CROSSLMM_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py -m cuda`` draws larger
  problems for the CUDA and Triton back ends; ``CROSSLMM_FUZZ_REPORT=path.json`` records how many
  cases ran and which failed (``scripts/gpu_check.sh fuzz`` does both).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import PoolSpec, cross_attention, cross_attention_reference  # noqa: E402
from crosslmm_ops.testing import fast_backends, non_contiguous, poison_outputs  # noqa: E402
from test_cross_attention import check_backend as check_attention  # noqa: E402
from test_cross_attention import cu_seqlens  # noqa: E402
from test_token_pool import check_backend as check_pool  # noqa: E402

EXAMPLES = int(os.environ.get("CROSSLMM_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Cases run and failures seen, per test, written to CROSSLMM_FUZZ_REPORT at the end of the module.
_REPORT: dict[str, dict] = {}


def _record(test: str, case: dict, error: BaseException | None) -> None:
    entry = _REPORT.setdefault(test, {"cases": 0, "failures": []})
    entry["cases"] += 1
    if error is not None and len(entry["failures"]) < 50:
        entry["failures"].append({"case": case, "error": f"{type(error).__name__}: {error}"[:500]})


def _run(test: str, case: dict, fn) -> None:
    try:
        fn()
    except (AssertionError, RuntimeError, ValueError) as error:
        _record(test, case, error)
        raise
    _record(test, case, None)


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    path = os.environ.get("CROSSLMM_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                       "torch": torch.__version__, "examples_per_test": EXAMPLES,
                       "tests": _REPORT}, f, indent=1)


def _backends(dtype: torch.dtype, head_dim: int | None = None) -> list[str]:
    """The back ends to check for a draw: the reference's own low-precision path always, plus
    every fast back end that supports the dtype (and head dim)."""
    chosen = ["torch"]
    for name in fast_backends(DEVICE):
        if name == "cuda" and (dtype == torch.float32 or head_dim not in (None, 64, 128)):
            continue
        chosen.append(name)
    return chosen


# ----------------------------------------------------------------------------------------------
# cross_attention
# ----------------------------------------------------------------------------------------------

# CPU draws stay small enough for the Triton interpreter; the GPU campaign draws real lengths.
MAX_Q, MAX_K = (300, 3000) if HAS_CUDA else (20, 70)
HEAD_DIMS = [16, 40, 64, 96, 128] if HAS_CUDA else [8, 24, 40, 64]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if HAS_CUDA else [torch.float32, torch.float16]


@st.composite
def attention_problems(draw):
    varlen = draw(st.booleans())
    if varlen:
        segments = draw(st.integers(1, 4))
        lens_q = draw(st.lists(st.integers(0, MAX_Q), min_size=segments, max_size=segments))
        lens_k = draw(st.lists(st.integers(0, MAX_K), min_size=segments, max_size=segments))
        batch = None
    else:
        batch = draw(st.integers(1, 3))
        lens_q = [draw(st.integers(1, MAX_Q))]
        lens_k = [draw(st.integers(1, MAX_K))]
    return dict(
        varlen=varlen, batch=batch, lens_q=lens_q, lens_k=lens_k,
        hk=draw(st.sampled_from([1, 2, 3])), group=draw(st.sampled_from([1, 2, 4])),
        d=draw(st.sampled_from(HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
        num_splits=draw(st.integers(0, 5)), strided=draw(st.booleans()),
        epilogue=draw(st.sampled_from([None, "scalar", "per-head"])),
        lse_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a non-contiguous view along its first dimension (from the heads back) longer than
    1; a tensor with no such dimension stays as it is (every view of it is contiguous)."""
    for dim in range(t.dim() - 2, -1, -1):
        if t.shape[dim] > 1 and t.numel() > 0:
            return non_contiguous(t, dim=dim)
    return t


def _attention_inputs(case):
    torch.manual_seed(case["seed"])
    hq, hk, d, dtype = case["hk"] * case["group"], case["hk"], case["d"], case["dtype"]
    if case["varlen"]:
        shape_q, shape_k = (sum(case["lens_q"]), hq, d), (sum(case["lens_k"]), hk, d)
    else:
        shape_q = (case["batch"], case["lens_q"][0], hq, d)
        shape_k = (case["batch"], case["lens_k"][0], hk, d)
    q, k, v = (torch.randn(s, dtype=dtype, device=DEVICE) for s in (shape_q, shape_k, shape_k))
    if case["strided"]:  # heads (or tokens) strided, channels contiguous: slices of wider tensors
        q, k, v = (_strided(t) for t in (q, k, v))
    gate = residual = None
    if case["epilogue"]:
        gate = torch.randn((hq,) if case["epilogue"] == "per-head" else (), device=DEVICE)
        residual = torch.randn(shape_q, dtype=dtype, device=DEVICE)
    cu_q = cu_seqlens(case["lens_q"], DEVICE) if case["varlen"] else None
    cu_k = cu_seqlens(case["lens_k"], DEVICE) if case["varlen"] else None
    return q, k, v, cu_q, cu_k, gate, residual


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@FUZZ
@given(case=attention_problems())
def test_fuzz_cross_attention(backend, case):
    if backend not in ["torch", *fast_backends(DEVICE)]:
        pytest.skip(f"the {backend} back end cannot run here")
    assume(backend in _backends(case["dtype"], case["d"]))
    q, k, v, cu_q, cu_k, gate, residual = _attention_inputs(case)
    _run(f"cross_attention[{backend}]", {**case, "dtype": str(case["dtype"])},
         lambda: check_attention(backend, q, k, v, cu_q=cu_q, cu_k=cu_k,
                                 num_splits=case["num_splits"], gate=gate, residual=residual,
                                 lse_grad=case["lse_grad"]))


# ----------------------------------------------------------------------------------------------
# token_pool
# ----------------------------------------------------------------------------------------------

MAX_GRID = 29 if HAS_CUDA else 10


@st.composite
def pool_problems(draw):
    h, w = draw(st.integers(1, MAX_GRID)), draw(st.integers(1, MAX_GRID))
    mode = draw(st.sampled_from(["avg", "max", "adaptive", "bilinear"]))
    kw: dict = {}
    if mode in ("avg", "max"):
        kh, kw_ = draw(st.integers(1, min(h, 6) + 1)), draw(st.integers(1, min(w, 6) + 1))
        kw = dict(kernel_size=(kh, kw_), stride=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
                  padding=(draw(st.integers(0, kh // 2)), draw(st.integers(0, kw_ // 2))),
                  ceil_mode=draw(st.booleans()))
        if mode == "avg":
            kw["count_include_pad"] = draw(st.booleans())
    else:
        kw = dict(output_size=(draw(st.integers(1, h + 3)), draw(st.integers(1, w + 3))))
        if mode == "bilinear":
            kw["align_corners"] = draw(st.booleans())
    kw["temporal_stride"] = draw(st.integers(1, 3))
    return dict(grid=(h, w), mode=mode, kw=kw, frames=draw(st.integers(1, 5)),
                lead=draw(st.sampled_from([(), (2,)])), channels=draw(st.integers(1, 70)),
                dtype=draw(st.sampled_from(DTYPES)), strided=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@FUZZ
@given(case=pool_problems())
def test_fuzz_token_pool(backend, case):
    try:
        PoolSpec.make(case["grid"], case["mode"], **case["kw"])
    except ValueError:
        assume(False)  # an invalid draw: the bad-input tests cover the errors
    if backend not in ["torch", *fast_backends(DEVICE)]:
        pytest.skip(f"the {backend} back end cannot run here")
    # The torch back end is the reference itself: fuzz its layouts in float32 only.
    assume(backend in _backends(case["dtype"]) and (backend != "torch" or case["dtype"] == torch.float32))
    torch.manual_seed(case["seed"])
    h, w = case["grid"]
    x = torch.randn(*case["lead"], case["frames"], h * w, case["channels"], dtype=case["dtype"],
                    device=DEVICE)
    if case["strided"]:
        x = _strided(x)
    _run(f"token_pool[{backend}]", {**case, "dtype": str(case["dtype"])},
         lambda: check_pool(backend, x, case["grid"], case["mode"], case["kw"]))


# ----------------------------------------------------------------------------------------------
# Numerical extremes (cross_attention)
# ----------------------------------------------------------------------------------------------

def _extreme_backends(dtype):
    return [b for b in _backends(dtype, 64) if b != "torch"] + ["torch"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_do_not_overflow(dtype):
    """Scores of ~±3e4: fp16 cannot hold exp() of them; kernels subtract the row max before exp."""
    torch.manual_seed(0)
    q = (torch.randn(2, 7, 2, 64, device=DEVICE) * 20).to(dtype)
    k = (torch.randn(2, 50, 2, 64, device=DEVICE) * 20).to(dtype)
    v = torch.randn(2, 50, 2, 64, device=DEVICE).to(dtype)
    expected, expected_lse = cross_attention_reference(q.double(), k.double(), v.double(),
                                                       softmax_scale=1.0, return_lse=True)
    assert expected_lse.abs().max() > 1e3  # the test really has huge logits
    for backend in _extreme_backends(dtype):
        if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
            continue  # the interpreter has no bf16 dot
        with poison_outputs():
            out, lse = cross_attention(q, k, v, softmax_scale=1.0, return_lse=True, backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), backend
        torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-3, atol=0.5, msg=backend)
        # With a nearly one-hot softmax the output is one value row: compare loosely in its dtype.
        torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05, msg=backend)


def test_very_negative_scores_still_normalise():
    """All scores around -3e4: exp underflows unless the max is subtracted first."""
    q = torch.full((1, 3, 1, 16), 30.0, device=DEVICE)
    k = -torch.ones(1, 40, 1, 16, device=DEVICE) * 60 + torch.rand(1, 40, 1, 16, device=DEVICE)
    v = torch.randn(1, 40, 1, 16, device=DEVICE)
    expected = cross_attention_reference(q.double(), k.double(), v.double(), softmax_scale=1.0)
    for backend in _extreme_backends(torch.float32):
        if backend == "cuda":
            continue  # fp32 is not a CUDA-kernel dtype
        out = cross_attention(q, k, v, softmax_scale=1.0, backend=backend)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_propagates_and_stays_local(dtype):
    """A NaN in one query row makes that row's output NaN (never hidden), and only that row; a NaN
    in a key of one segment makes that segment NaN, not the others."""
    torch.manual_seed(0)
    lens_q, lens_k = [4, 5], [30, 20]
    q = torch.randn(9, 2, 64, device=DEVICE).to(dtype)
    k = torch.randn(50, 2, 64, device=DEVICE).to(dtype)
    v = torch.randn(50, 2, 64, device=DEVICE).to(dtype)
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    q[1, 0, 3] = float("nan")
    k[40, 1, 5] = float("nan")  # segment 1, head 1
    for backend in _extreme_backends(dtype):
        out = cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        nan = torch.isnan(out).any(-1)  # (tokens, heads)
        assert nan[1, 0], f"{backend}: NaN query row hidden"
        assert nan[4:, 1].all(), f"{backend}: NaN key hidden"
        expected_nan = torch.zeros_like(nan)
        expected_nan[1, 0] = True
        expected_nan[4:, 1] = True
        assert torch.equal(nan, expected_nan), f"{backend}: NaN leaked to other rows"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_one_million_keys(backend):
    """≥ 1M keys in one segment: the running max / sum in fp32 keep the LSE accurate."""
    torch.manual_seed(0)
    sk = 1 << 20
    q = torch.randn(1, 5, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, sk, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, sk, 2, 64, device="cuda", dtype=torch.bfloat16)
    with poison_outputs():
        out, lse = cross_attention(q, k, v, return_lse=True, backend=backend)
    expected, expected_lse = cross_attention_reference(q, k, v, return_lse=True,
                                                       compute_dtype=torch.float64)
    assert crosslmm_ops.last_backend("cross_attention") == backend
    assert (lse.double() - expected_lse).abs().max().item() < 1e-3 * math.log(sk)
    assert (out.double() - expected).abs().max().item() < 2e-3
