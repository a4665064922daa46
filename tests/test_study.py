"""The efficiency study's pieces (crosslmm_ops.study): the analytical FLOP model against
torch.utils.flop_counter, the shared weights of the compared models, the synthetic inputs."""

import pytest
import torch

from crosslmm_ops import study


@pytest.mark.parametrize("variant", ["baseline", "crosslmm", "crosslmm-frame"])
def test_analytic_flops_match_the_flop_counter(variant):
    """Every matmul of the prefill (projector, decoder, DCAL projections and cross-attention, the
    LM head) is in the analytical model: within 2% of what FlopCounterMode counts (the rest is
    the torch back end's pooling einsum, which the model leaves out)."""
    check = study.flop_check("demo", variant, frames=2)
    assert check["counted"] > 0
    assert abs(check["ratio"] - 1) < 0.02, check


def test_compared_models_share_weights_and_differ_in_compression():
    models = study.build_models("demo", ["baseline", "crosslmm"])
    base, cross = models["baseline"].state_dict(), models["crosslmm"].state_dict()
    shared = [k for k in base if k in cross]
    assert len(shared) == len(base)  # the baseline has nothing the CrossLMM lacks
    assert all(torch.equal(base[k], cross[k]) for k in shared)
    assert any("dcal" in k for k in cross if k not in base)
    assert models["baseline"].config.pooled_per_frame == 196
    assert models["crosslmm"].config.pooled_per_frame == 9


def test_synthetic_video_and_prompt():
    video = study.synthetic_video(3, 48)
    assert video.shape == (1, 3, 3, 48, 48) and video.std() > 0.1
    assert not torch.equal(video[0, 0], video[0, 1])  # the square moves
    config = study.study_config("demo", "crosslmm")
    ids = study.video_prompt(config, 3)
    assert int((ids == config.video_token_id).sum()) == 3 * 9
