"""The runnable examples in ``examples/`` and ``crosslmm-ops bench``.

Each script runs as a user runs it (a subprocess, CPU, tiny settings) and its output is checked:
generation produced tokens from the patched placeholder count, the loss fell in both training
stages, the attention-map PNG exists. The attention maps' numbers are checked in process against
plain PyTorch: the probabilities against a dense float64 softmax of the same queries and keys,
and (probabilities x values -> o_proj -> gate) against the update the DCAL's V2V branch really
adds, which ties "the queries and keys as the module computes them" to the module itself.
``bench`` is checked for its no-GPU error, the missing-benchmarks error, and (with pytest faked)
the command it runs and the plot it writes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosslmm_ops import cli
from crosslmm_ops.demo import synthetic_video, video_prompt
from crosslmm_ops.models import CrossLMMForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _load(script: str):
    """Import a script as a module (registered first: its dataclasses look their module up)."""
    name = f"crosslmm_example_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ----------------------------------------------------------------------------------------------
# The scripts, as a user runs them
# ----------------------------------------------------------------------------------------------


def test_patch_llava_onevision_script_generates():
    out = _run("patch_llava_onevision.py", "--frames", "2", "--new-tokens", "3")
    # 7x7 grid: LLaVA-OneVision's bilinear pooling keeps 4x4 per frame, the patch 3x3; + newline.
    assert "before patching: 33 visual tokens" in out
    assert "after patching: 19 visual tokens" in out
    ids = re.search(r"generated 3 token ids: \[([0-9, ]+)\]", out)
    assert ids, out
    assert len(ids.group(1).split(",")) == 3
    assert "saved and reloaded with load_patched" in out and "generates the same ids: True" in out


def test_train_two_stage_script_loss_falls():
    out = _run(
        "train_two_stage.py", "--steps", "3", "--frames", "2", "--batch", "2", "--lr", "1e-2"
    )
    assert "stage 1:" in out and "T2V off" in out and "stage 2:" in out and "T2V on" in out
    stage1 = out.split("stage 2:")[0]
    assert "projector: trains" in stage1 and "DCAL v2v: trains" in stage1
    assert "DCAL t2v: frozen" in stage1 and "LLM: frozen" in stage1
    assert "vision tower: frozen" in stage1
    assert "DCAL t2v: trains" in out.split("stage 2:")[1]
    losses = re.findall(r"stage (\d) loss ([0-9.]+) -> ([0-9.]+)", out)
    assert [s for s, _, _ in losses] == ["1", "2"], out
    for _, first, last in losses:
        assert float(last) < float(first), out


def test_attention_maps_script_writes_png(tmp_path):
    png = tmp_path / "maps" / "v2v.png"
    out = _run("attention_maps.py", "--out", str(png), "--frames", "2", "--tokens", "4", "13")
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random weights" in out
    # Each chosen token's probabilities sum to 1 over the frames (global scope: both frames).
    for mass in re.findall(r"attention mass per frame ([0-9. ]+)", out):
        assert abs(sum(map(float, mass.split())) - 1) < 2e-3


# ----------------------------------------------------------------------------------------------
# The attention maps' numbers against plain PyTorch and the module itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope,share_kv", [("global", False), ("frame", False), ("global", True)])
def test_attention_maps_match_the_v2v_branch(scope, share_kv):
    maps_mod = _load("attention_maps.py")
    torch.manual_seed(0)
    model = CrossLMMForConditionalGeneration.from_preset(
        "crosslmm-tiny", dcal_v2v_scope=scope, dcal_share_kv=share_kv
    ).eval()
    frames = 3
    with torch.no_grad():  # O(1) query/key weights, so the softmax is far from uniform
        for dcal in model.dcals.values():
            for p in dcal.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.5)
            (dcal.v2v.gate if dcal.v2v.gate is not None else dcal.gate).alpha.fill_(0.7)
    config = model.config
    video = synthetic_video(frames, config.vision_config.image_size, seed=1)
    ids = video_prompt(config, frames, seed=1)
    layer = min(model.dcals)
    maps = maps_mod.v2v_attention(model, video, ids, layer=layer)
    n, N = config.pooled_per_frame, config.tokens_per_frame
    assert maps.probs.shape == (frames * n, maps.q.shape[1], frames * N)
    assert maps.probs.dtype == torch.float32

    # (1) a dense float64 softmax of the same queries and keys
    q, k = maps.q.double(), maps.k.double()
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) / q.shape[-1] ** 0.5
    if scope == "frame":  # pooled token i sees frame i // n only
        own = torch.arange(frames * n) // n
        key_frame = torch.arange(frames * N) // N
        scores = scores.masked_fill(own[:, None] != key_frame[None, :], float("-inf"))
    expected = scores.softmax(-1).transpose(0, 1)  # [q, h, k]
    torch.testing.assert_close(maps.probs.double(), expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 1e-3  # not the uniform distribution

    # (2) probabilities x values through o_proj and the gate = what the V2V branch adds
    dcal = model.dcals[layer]
    seen = {}
    handle = dcal.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(h=args[0], memory=args[1], mask=kwargs["visual_mask"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=video, use_cache=False)
        handle.remove()
        h, memory, mask = seen["h"], seen["memory"], seen["mask"]
        no_text = torch.zeros_like(mask)
        update = (dcal(h, memory, visual_mask=mask, text_mask=no_text) - h)[mask].double()
        owner = dcal if dcal.shares_kv else dcal.v2v
        x = owner.vision_norm(memory.tokens) if owner.vision_norm is not None else memory.tokens
        v = owner.v_proj(x).view(x.shape[0], k.shape[1], -1).double()
        attn = torch.einsum("qhk,khd->qhd", maps.probs.double(), v.repeat_interleave(group, 1))
        o = dcal.v2v.o_proj.double()(attn.reshape(attn.shape[0], -1))
        gate = dcal.v2v.gate if dcal.v2v.gate is not None else dcal.gate
        rebuilt = torch.tanh(gate.alpha.double()) * o
    torch.testing.assert_close(rebuilt, update, rtol=1e-4, atol=1e-5)


def test_attention_maps_bad_arguments():
    maps_mod = _load("attention_maps.py")
    model = CrossLMMForConditionalGeneration.from_preset("crosslmm-tiny").eval()
    config = model.config
    video = synthetic_video(2, config.vision_config.image_size)
    ids = video_prompt(config, 2)
    with pytest.raises(ValueError, match="layer must be one of the DCAL layers"):
        maps_mod.v2v_attention(model, video, ids, layer=0)
    with pytest.raises(ValueError, match="tokens must index the 18 pooled tokens"):
        maps_mod.v2v_attention(model, video, ids, tokens=[18])


# ----------------------------------------------------------------------------------------------
# crosslmm-ops bench
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error")
def test_bench_without_gpu_says_so_and_fails(tmp_path, capsys):
    assert cli.main(["bench", "--only", "token_pool", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "need a CUDA GPU" in err
    assert not any(tmp_path.iterdir())


def test_bench_without_benchmarks_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "not the wheel" in capsys.readouterr().err


def test_benchmarks_folder_is_found_from_a_checkout():
    assert cli.benchmarks_dir() == ROOT / "benchmarks"


def test_bench_runs_pytest_and_plots(monkeypatch, tmp_path, capsys):
    """With pytest faked (it replays a recorded H100 summary into CROSSLMM_BENCH_DIR, as the
    benchmarks' conftest writes it): the command, the summary JSON and the bar chart."""
    calls = []

    def fake_run(cmd, cwd, env):
        calls.append((cmd, cwd, env["CROSSLMM_BENCH_DIR"]))
        suite = Path(cmd[3]).stem.removeprefix("bench_")
        shutil.copy(
            ROOT / "benchmarks" / "results" / f"{suite}_h100.json",
            Path(env["CROSSLMM_BENCH_DIR"]) / f"{suite}.json",
        )
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    out = tmp_path / "bench"
    assert (
        cli.main(
            [
                "bench",
                "--only",
                "token_pool",
                "--only",
                "cross_attention",
                "--out",
                str(out),
                "--pytest-args",
                "-k 'T=32'",
            ]
        )
        == 0
    )
    assert [Path(c[0][3]).name for c in calls] == [
        "bench_token_pool.py",
        "bench_cross_attention.py",
    ]
    cmd, cwd, bench_dir = calls[0]
    assert cmd[:3] == [sys.executable, "-m", "pytest"] and "--benchmark-only" in cmd
    assert f"--benchmark-json={out / 'token_pool_pytest_benchmark.json'}" in cmd
    assert cmd[-2:] == ["-k", "T=32"]
    assert Path(cwd) == ROOT and Path(bench_dir) == out
    printed = capsys.readouterr().out
    for suite, cases in (("token_pool", 30), ("cross_attention", 11)):
        png = out / f"{suite}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert json.loads((out / f"{suite}.json").read_text())["results"]
        assert f"{suite}: {cases} cases" in printed


def test_bench_reports_a_failed_suite(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        cli.subprocess, "run", lambda cmd, cwd, env: subprocess.CompletedProcess(cmd, 1)
    )
    assert cli.main(["bench", "--only", "token_pool", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "token_pool: pytest exited with 1 and wrote no token_pool.json" in err


@pytest.mark.cuda
def test_bench_quick_run_on_gpu(tmp_path):
    """The real thing, one small case of the token_pool suite."""
    rc = cli.main(
        [
            "bench",
            "--only",
            "token_pool",
            "--out",
            str(tmp_path),
            "--pytest-args",
            "-k 'bench_forward and avg3x3s3 and 32'",
        ]
    )
    assert rc == 0
    assert (tmp_path / "token_pool.json").is_file() and (tmp_path / "token_pool.png").is_file()
