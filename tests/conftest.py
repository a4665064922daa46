"""Shared test setup.

Without a GPU the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


RUN_SLOW = os.environ.get("CROSSLMM_RUN_SLOW", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: set CROSSLMM_RUN_SLOW=1 to run")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not RUN_SLOW:
            item.add_marker(skip_slow)


def pytest_report_header(config):
    ext = _backend.extension()
    built = "built for sm_" + ", sm_".join(_backend.extension_archs()) if ext else "not built"
    return [
        f"crosslmm-ops {crosslmm_ops.__version__}, torch {torch.__version__}, "
        f"GPU: {torch.cuda.get_device_name() if HAS_CUDA else 'none'}",
        f"extension: {built}; "
        f"triton: {'yes' if _backend.triton_available() else 'no'}"
        f"{' (interpreter)' if _backend.triton_interpreted() else ''}",
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
