"""Fuzzing every back end against the reference (issue #9), plus numerical extremes.

Hypothesis draws shapes, dtypes, layouts and options for every op -- ``cross_attention``,
``token_pool``, ``projected_cross_attention`` (both paths forced, norms, biases, segments, splits),
``merge_attention_states``, ``attention_weights``, the flash-attn shims -- and the modules
(``DualCrossAttention`` and its branches over a ``VisionMemory``, ``kv_path`` fused/materialised,
global/frame scope, samples with 0 frames), and checks each back end that can run here against a
float64 reference, forward and backward, with the same bounds (and poisoned outputs) as the per-op
tests, whose checkers are reused (the attention oracle and error bound: tests/attention_oracle.py).
The draws live in tests/fuzz_cases.py, shared with the time-bounded GPU campaign
``scripts/fuzz_campaign.py``.

* CI (CPU): the torch back end and the Triton kernels under the interpreter, small draws,
  ``CROSSLMM_FUZZ_EXAMPLES`` examples per test (default 12; the slower interpreter tests of
  projected attention and the modules take half), derandomised so CI is reproducible.
* GPU: the same tests draw larger problems for the CUDA and Triton back ends
  (``CROSSLMM_FUZZ_EXAMPLES=40 pytest tests/test_fuzz.py``); ``CROSSLMM_FUZZ_REPORT=path.json``
  records how many cases ran and which failed. The long campaign is scripts/fuzz_campaign.py
  (``scripts/gpu_check.sh fuzz`` runs both).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
import attention_oracle as oracle  # noqa: E402
import fuzz_cases as fc  # noqa: E402
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_cross_attention import cu_seqlens  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import cross_attention  # noqa: E402
from crosslmm_ops.testing import fast_backends, poison_outputs  # noqa: E402

EXAMPLES = int(os.environ.get("CROSSLMM_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# Projected attention and the modules run several Triton kernels per case in the interpreter.
FUZZ_SLOW = settings(FUZZ, max_examples=max(2, EXAMPLES // 2))
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
LIMITS = fc.limits_for(DEVICE)

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
    except Exception as error:  # noqa: BLE001 - recorded, then re-raised for hypothesis
        _record(test, case, error)
        raise
    _record(test, case, None)


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    path = os.environ.get("CROSSLMM_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                    "torch": torch.__version__,
                    "examples_per_test": EXAMPLES,
                    "tests": _REPORT,
                },
                f,
                indent=1,
            )


class HypothesisDrawer:
    """fuzz_cases' drawer interface over hypothesis' ``draw`` (so failing cases shrink)."""

    def __init__(self, draw):
        self._draw = draw

    def integers(self, lo, hi):
        return self._draw(st.integers(lo, hi))

    def sampled_from(self, seq):
        return self._draw(st.sampled_from(list(seq)))

    def booleans(self):
        return self._draw(st.booleans())


def _fuzz(op: str, backend: str, data) -> None:
    """Draw one case of ``op`` valid for ``backend`` and check it (skip back ends not here)."""
    if backend not in fc.runnable_backends(op, DEVICE):
        pytest.skip(f"the {backend} back end cannot run {op} here")
    draw, run = fc.OPS[op]
    case = draw(HypothesisDrawer(data.draw), backend, LIMITS)
    note(repr(fc.describe(case)))
    _run(f"{op}[{backend}]", fc.describe(case), lambda: run(backend, case, DEVICE))


ALL = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("backend", ALL)
@FUZZ
@given(data=st.data())
def test_fuzz_cross_attention(backend, data):
    _fuzz("cross_attention", backend, data)


@pytest.mark.parametrize("backend", ALL)
@FUZZ
@given(data=st.data())
def test_fuzz_token_pool(backend, data):
    _fuzz("token_pool", backend, data)


@pytest.mark.parametrize("backend", ALL)
@FUZZ_SLOW
@given(data=st.data())
def test_fuzz_projected_cross_attention(backend, data):
    _fuzz("projected_cross_attention", backend, data)


@pytest.mark.parametrize("backend", ALL)
@FUZZ_SLOW
@given(data=st.data())
def test_fuzz_merge_attention_states(backend, data):
    _fuzz("merge_attention_states", backend, data)


@FUZZ
@given(data=st.data())
def test_fuzz_attention_weights(data):
    _fuzz("attention_weights", "torch", data)


@pytest.mark.parametrize("backend", ALL)
@FUZZ_SLOW
@given(data=st.data())
def test_fuzz_flash_attn_shims(backend, data):
    _fuzz("flash_attn", backend, data)


@pytest.mark.parametrize("backend", ALL)
@FUZZ_SLOW
@given(data=st.data())
def test_fuzz_modules(backend, data):
    _fuzz("modules", backend, data)


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
    expected, expected_lse = oracle.attention(q, k, v, softmax_scale=1.0)
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
    expected, _ = oracle.attention(q, k, v, softmax_scale=1.0)
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
    expected, expected_lse = oracle.attention(q, k, v)
    assert crosslmm_ops.last_backend("cross_attention") == backend
    assert (lse.double() - expected_lse).abs().max().item() < 1e-3 * math.log(sk)
    assert (out.double() - expected).abs().max().item() < 2e-3
