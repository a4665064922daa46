"""The ``crosslmm-ops`` command line: --version, and bad values as usage errors (argparse's one
line and exit status 2), never tracebacks."""

import os
import subprocess
import sys

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import cli


def _usage_error(argv, capsys) -> str:
    """Runs the CLI on ``argv``, asserts a usage error, returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[0].startswith("usage: crosslmm-ops")
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"crosslmm-ops {crosslmm_ops.__version__}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--frames", "0"], "argument --frames: must be an integer >= 1, got '0'"),
        (["demo", "--frames", "-3"], "argument --frames: must be an integer >= 1, got '-3'"),
        (["demo", "--frames", "many"], "argument --frames: must be an integer >= 1, got 'many'"),
        (["demo", "--new-tokens", "0"], "argument --new-tokens: must be an integer >= 2"),
        (["demo", "--new-tokens", "1"], "argument --new-tokens: must be an integer >= 2"),
        (["demo", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
        (["demo", "--device", "tpu"], "argument --device: must be cpu, cuda or cuda:<index>"),
        (["demo", "--device", "mps"], "argument --device: must be cpu, cuda or cuda:<index>"),
        (["pool", "--frames", "0"], "argument --frames: must be an integer >= 1"),
        (["pool", "--repeat", "-1"], "argument --repeat: must be an integer >= 1"),
    ],
)
def test_bad_values_are_usage_errors(argv, message, capsys):
    assert message in _usage_error(argv, capsys)


@pytest.mark.parametrize("command", ["demo", "pool"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_usage_error(command, device, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _usage_error([command, "--device", device], capsys)
    assert f"argument --device: '{device}' needs a CUDA GPU and torch sees none" in line


def test_a_missing_cuda_device_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = _usage_error(["demo", "--device", "cuda:3"], capsys)
    assert "this machine has 1 CUDA device(s)" in line


def test_good_values_parse():
    args = cli.build_parser().parse_args(
        ["demo", "--frames", "1", "--new-tokens", "2", "--device", "cpu"]
    )
    assert (args.frames, args.new_tokens, args.device) == (1, 2, "cpu")


def _run_cli(*argv, **env):
    return subprocess.run(
        [sys.executable, "-m", "crosslmm_ops.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_command_line_version_and_usage_errors_in_a_process():
    """As a user runs it: --version exits 0; --frames 0 and --device cuda where no GPU is visible
    exit 2 with usage and one error line, no traceback."""
    proc = _run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"crosslmm-ops {crosslmm_ops.__version__}"
    for argv in (["demo", "--frames", "0"], ["demo", "--device", "cuda"]):
        proc = _run_cli(*argv, CUDA_VISIBLE_DEVICES="")
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("crosslmm-ops demo: error: argument")


def _demo_with_times(monkeypatch, capsys, towers, argv=()):
    """``crosslmm-ops demo`` on the CPU with the measurement replaced by fixed times (vision
    tower per variant as given): its exit status, stdout and stderr, and the repeats and warm-up
    the measurement was asked for."""
    from crosslmm_ops import demo

    asked = []

    def measure(model, variant, video, ids, *, new_tokens, repeats, warmup, progress):
        asked.append((repeats, warmup))
        vision = towers[variant]
        return demo.Measurement(
            variant, 1, 9, 40, vision, 50.0, vision + 50.0, 1.0, None, None, None, 0, [1, 2], {}
        )

    monkeypatch.setattr(demo, "measure", measure)
    status = cli.main(["demo", "--frames", "1", "--device", "cpu", "--quiet", *argv])
    out, err = capsys.readouterr()
    return status, out, err, asked


def test_demo_checks_its_measurements(monkeypatch, capsys):
    # Consistent times: exit 0, nothing on stderr; the CPU's plan (3 timed after 1 untimed).
    status, out, err, asked = _demo_with_times(
        monkeypatch, capsys, {"baseline": 100.0, "crosslmm": 105.0}
    )
    assert status == 0 and "not consistent" not in err
    assert asked == [(3, 1), (3, 1)]
    assert "the median of 3 timed runs after 1 untimed" in out
    # The same tower 2.3x apart (a cold first call): a warning on the CPU by default...
    cold = {"baseline": 1233.1, "crosslmm": 526.3}
    status, out, err, asked = _demo_with_times(monkeypatch, capsys, cold, ["--repeats", "7"])
    assert status == 0 and asked == [(7, 1), (7, 1)]
    assert "not consistent" in err and "same vision tower took 1233.1 ms" in err
    # ... and a failure when asked for (the default on a GPU)
    status, _, err, _ = _demo_with_times(monkeypatch, capsys, cold, ["--on-inconsistent", "fail"])
    assert status == 3 and "exit status 3" in err


def test_demo_measurement_plan():
    from crosslmm_ops import demo

    assert demo.measurement_plan("cuda") == (5, 1)
    assert demo.measurement_plan(torch.device("cuda", 1)) == (5, 1)
    assert demo.measurement_plan("cpu") == (3, 1)
