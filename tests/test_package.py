"""The package around the ops: the CLI, the examples, back-end selection."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import _backend, cli

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"crosslmm-ops   {crosslmm_ops.__version__}" in out
    assert f"torch          {torch.__version__}" in out
    assert "token_pool" in out and "auto ->" in out
    assert ("extension      built" in out) == (_backend.extension() is not None)


def test_pool_command_runs(capsys):
    assert cli.main(["pool", "--frames", "2", "--device", "cpu", "--dtype", "float32",
                     "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "avg 9x9 stride 9" in out and "(1, 2, 9, 1152)" in out


def test_demo_command_runs(capsys):
    """The README's main job on small settings: both models run end to end, CrossLMM feeds the LLM
    9 tokens per frame against the baseline's 196, and its DCALs ran cross_attention."""
    assert cli.main(["demo", "--frames", "2", "--new-tokens", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens into the LLM" in out
    assert "392 (196/frame)" in out and "18 (9/frame)" in out
    assert "95.4%" in out
    assert "cross_attention: torch" in out


def test_pool_example_script_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "pool_example.py"), "--frames", "2",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CrossLMM, 9 tokens/frame" in proc.stdout and "81x fewer" in proc.stdout


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.requested_backend("tpu")


def test_unavailable_backend_is_clear_runtime_error():
    ok, why = _backend.cuda_runnable(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    with pytest.raises(RuntimeError, match="token_pool: backend='cuda' cannot run this call"):
        _backend.resolve("token_pool", "cuda", torch.device("cpu"))
