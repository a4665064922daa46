"""The demo's measurement (crosslmm_ops.demo: the compared models share their weights, the
synthetic inputs, measure()) and the efficiency study's own pieces (benchmarks/study.py: the
analytical FLOP model against torch.utils.flop_counter, the consistency checks)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from crosslmm_ops import demo


def _load_study():
    # benchmarks/ is a folder of scripts, not a package: load study.py by path, once.
    name = "crosslmm_benchmarks_study"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


study = _load_study()


@pytest.mark.parametrize("variant", ["baseline", "crosslmm", "crosslmm-frame"])
def test_analytic_flops_match_the_flop_counter(variant):
    """Every matmul of the prefill (projector, decoder, DCAL projections and cross-attention, the
    LM head) is in the analytical model: within 2% of what FlopCounterMode counts (the rest is
    the torch back end's pooling einsum, which the model leaves out)."""
    check = study.flop_check("demo", variant, frames=2)
    assert check["counted"] > 0
    assert abs(check["ratio"] - 1) < 0.02, check


def test_compared_models_share_weights_and_differ_in_compression():
    models = demo.build_models("demo", ["baseline", "crosslmm"])
    base, cross = models["baseline"].state_dict(), models["crosslmm"].state_dict()
    shared = [k for k in base if k in cross]
    assert len(shared) == len(base)  # the baseline has nothing the CrossLMM lacks
    assert all(torch.equal(base[k], cross[k]) for k in shared)
    assert any("dcal" in k for k in cross if k not in base)
    assert models["baseline"].config.pooled_per_frame == 196
    assert models["crosslmm"].config.pooled_per_frame == 9


def test_synthetic_video_and_prompt():
    video = demo.synthetic_video(3, 48)
    assert video.shape == (1, 3, 3, 48, 48) and video.std() > 0.1
    assert not torch.equal(video[0, 0], video[0, 1])  # the square moves
    config = demo.variant_config("demo", "crosslmm")
    ids = demo.video_prompt(config, 3)
    assert int((ids == config.video_token_id).sum()) == 3 * 9


def _measurement(variant, vision, llm, prefill):
    return demo.Measurement(
        variant, 4, 36, 60, vision, llm, prefill, 1.0, None, None, None, 0, [], {}
    )


def test_consistency_checks_catch_a_cold_tower_and_an_impossible_prefill():
    fine = [
        _measurement("baseline", 100.0, 300.0, 390.0),
        _measurement("crosslmm", 110.0, 50.0, 160.0),
    ]
    assert demo.consistency_problems(fine) == []
    cold = [
        _measurement("baseline", 1233.1, 1469.5, 1239.1),
        _measurement("crosslmm", 526.3, 244.2, 602.0),
    ]
    problems = demo.consistency_problems(cold)
    assert any("same vision tower" in p for p in problems)
    assert any("baseline: the prefill from pixels" in p for p in problems)


def test_measure_takes_warmup_and_repeats_and_checks_them():
    models = demo.build_models("demo", ["crosslmm"])
    model = models["crosslmm"]
    video = demo.synthetic_video(2, model.config.vision_config.image_size)
    ids = demo.video_prompt(model.config, 2)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        m = demo.measure(model, "crosslmm", video, ids, new_tokens=3, repeats=2, warmup=1)
    finally:
        handle.remove()
    # tower alone and the prefill from pixels, each 1 warm-up + 2 timed calls
    assert len(calls) == 6
    assert m.vision_ms > 0 and m.prefill_ms > 0 and len(m.generated) == 3
    with pytest.raises(ValueError, match="repeats must be"):
        demo.measure(model, "crosslmm", video, ids, repeats=0)
    with pytest.raises(ValueError, match="warmup must be"):
        demo.measure(model, "crosslmm", video, ids, warmup=-1)


def test_efficiency_study_reports_inconsistent_measurements(monkeypatch):
    # benchmarks/efficiency.py checks the variants' measurements at each length against each
    # other with the demo's checks, and keeps what they find (main prints it and exits 1).
    import argparse

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(
        "crosslmm_benchmarks_efficiency", bench / "efficiency.py"
    )
    efficiency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(efficiency)
    towers = {"baseline": 1233.1, "crosslmm": 526.3}  # a cold first call

    def measure(model, variant, video, ids, *, new_tokens, repeats):
        return _measurement(variant, towers[variant], 300.0, towers[variant] + 300.0)

    monkeypatch.setattr(efficiency, "flop_check", lambda *a, **k: {"ratio": 1.0})
    monkeypatch.setattr(efficiency.study, "prefill_flops", lambda *a, **k: {})
    monkeypatch.setattr(demo, "measure", measure)
    args = argparse.Namespace(
        presets=["demo"],
        variants=["baseline", "crosslmm"],
        frames=[1],
        device="cpu",
        dtype="float32",
        repeats=None,
        new_tokens=2,
    )
    result = efficiency.run(args)
    assert len(result["runs"]) == 2
    assert len(result["inconsistent"]) == 1
    assert result["inconsistent"][0].startswith("demo 1 frames: the same vision tower took 1233.1")
    towers["crosslmm"] = 1200.0
    assert efficiency.run(args)["inconsistent"] == []
