"""Greedy decoding with a static-shape decode step (crosslmm_ops.models.graph_decode), captured in
a CUDA graph on a GPU.

On the CPU the same static step runs without a graph (``capture=False``) and is compared with
``generate()``: the reference model, the three patched LLaVA families, a model without DCALs and
a plain transformers LM, batch 1 and 2, with the DCAL gates open (0.5: a DCAL that did not run
would change the logits). The step itself is checked for host reads (``.item()``, ``nonzero``,
boolean indexing ...), which a CUDA graph cannot capture. Tests marked ``cuda`` capture the graph
and compare its tokens and scores with eager decoding.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import test_models as ref  # noqa: E402
import test_patch_llava as llava  # noqa: E402

from crosslmm_ops.models import (  # noqa: E402
    CrossLMMForConditionalGeneration,
    GraphDecoder,
    generate_with_cuda_graph,
)
from crosslmm_ops.models.graph_decode import WARMUP_STEPS  # noqa: E402
from crosslmm_ops.nn import DualCrossAttention, VisionMemory  # noqa: E402

GATE = 0.5
NEW_TOKENS = 6
CASES = ("reference", "baseline", "qwen2") + llava.FAMILIES


def _reference(batch: int, gates=GATE, **overrides):
    model = ref._model(gates=gates, **overrides)
    frames = (3, 1)[:batch]
    data = ref._batch(model.config, frames=frames, T=max(frames), pad="left")
    return model, dict(input_ids=data["input_ids"], **ref._video_kwargs(data)), {}


def _case(case: str, batch: int):
    """(model with gates at GATE, prompt inputs, generation options)."""
    if case == "reference":
        return _reference(batch)
    if case == "baseline":  # the same model without DCALs (the demo's baseline)
        return _reference(batch, gates=None, dcal_layers=[])
    if case == "qwen2":  # a plain transformers LM
        torch.manual_seed(0)
        config = llava._text("qwen2")
        config._attn_implementation = "sdpa"
        model = transformers.Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
        ids = torch.randint(1, llava.VOCAB, (batch, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1:, :2] = 0  # the second row left-padded
        ids[1:, :2] = llava.PAD
        return model, dict(input_ids=ids, attention_mask=mask), {}
    model, _ = llava._pair(case)
    llava._set_gates(model, GATE)
    inputs = llava._batch(case, (1, 2)[:batch])
    return model, inputs, dict(suppress_tokens=[llava.IMAGE, llava.VIDEO, llava.PAD])


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two score tensors over their finite entries (the suppressed
    tokens are -inf in both)."""
    finite = a.isfinite() & b.isfinite()
    return float((a - b)[finite].abs().max())


class _Scores:
    """The last position's logits of every forward of ``model`` (prefill, then each step)."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.seen.append(output.logits[:, -1].detach().float().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("case", CASES)
def test_static_step_gives_the_tokens_and_logits_of_generate(case, batch):
    model, inputs, opts = _case(case, batch)
    kw = dict(opts, do_sample=False, max_new_tokens=NEW_TOKENS)
    with _Scores(model) as eager:
        expected = model.generate(**inputs, **kw)
    with _Scores(model) as static:
        got = generate_with_cuda_graph(model, **inputs, **kw, capture=False)
    assert torch.equal(got, expected)
    assert got.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    # generate() stops calling the model after the last token; the static loop too.
    assert len(static.seen) == len(eager.seen) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(static.seen, eager.seen)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_reference_generate_takes_cuda_graph_keyword():
    model, inputs, _ = _reference(2)
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    # cuda_graph=True on the CPU is refused with the argument named ...
    with pytest.raises(ValueError, match="capture=True"):
        model.generate(**inputs, max_new_tokens=4, cuda_graph=True)
    # ... and the same path without the capture gives generate()'s tokens.
    got = model.generate(**inputs, max_new_tokens=4, cuda_graph=True, capture=False)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="cuda_graph must be a bool"):
        model.generate(**inputs, max_new_tokens=4, cuda_graph="yes")


@pytest.mark.parametrize("case", ("reference", "llava_onevision"))
def test_every_dcal_runs_static_in_every_step_and_changes_it(case):
    model, inputs, opts = _case(case, 2)
    dcals = model.dcals if case == "reference" else model.crosslmm_patch.dcals
    calls = []

    def record(index):
        def hook(module, args, kwargs, output):
            static = bool(kwargs.get("static_shapes"))
            calls.append((index, args[0].shape[1], static, not torch.equal(output, args[0])))

        return hook

    handles = [d.register_forward_hook(record(i), with_kwargs=True) for i, d in dcals.items()]
    try:
        generate_with_cuda_graph(model, **inputs, **opts, max_new_tokens=4, capture=False)
    finally:
        for h in handles:
            h.remove()
    prompt = inputs["input_ids"].shape[1]
    layers = sorted(dcals)
    expected = [(i, prompt, False, True) for i in layers]
    expected += [(i, 1, True, True) for _ in range(3) for i in layers]
    assert calls == expected


def test_closed_gates_give_other_scores():
    """The comparisons above see the DCALs: with the gates closed the decode scores move."""
    scores = []
    for gates in (GATE, 0.0):
        model, inputs, _ = _reference(2, gates=gates)
        decoder = GraphDecoder(model, max_new_tokens=3, capture=False)
        decoder.prefill(**inputs)
        decoder.decode(steps=1)
        scores.append(decoder.last_scores.clone())
    assert _gap(*scores) > 1e-2


@pytest.mark.parametrize("every", (1, 3, 100))
def test_end_of_sequence_cuts_where_generate_does(every):
    model, inputs, _ = _reference(2)
    free = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    prompt = inputs["input_ids"].shape[1]
    # An end-of-sequence token that one row produces early (the other row later or never).
    eos = int(free[0, prompt + 2])
    kw = dict(do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=7)
    expected = model.generate(**inputs, **kw)
    got = generate_with_cuda_graph(model, **inputs, **kw, capture=False, eos_check_every=every)
    assert expected.shape[1] < free.shape[1] or (expected[:, prompt:] == eos).any()
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------
# No host reads in the step
# ----------------------------------------------------------------------------------------------

aten = torch.ops.aten
_SYNCS = {
    aten._local_scalar_dense.default,  # .item(), int(), float(), bool() of a tensor
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
}
_INDEX_OPS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor back to the host or takes a shape from its values."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bad = func in _SYNCS or func.name().startswith("aten::unique")
        bad |= func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if func in _INDEX_OPS:  # boolean-mask indexing: its shape is the mask's count
            bad |= any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if bad:
            where = "; ".join(
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[-8:-1]
            )
            self.found.append(f"{func} at {where}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", ("reference", "baseline", "llava_onevision", "llava"))
def test_the_static_step_reads_nothing_back_to_the_host(case, monkeypatch):
    """What a CUDA graph could not capture. ``tolist()`` (no dispatch op of its own) is checked
    apart, outside the ops (crosslmm_ops/ops): their value checks are skipped while a graph
    captures, and the reference back end that reads its offsets runs on the CPU only."""
    model, inputs, opts = _case(case, 2)
    decoder = GraphDecoder(model, max_new_tokens=5, capture=False, **opts)
    decoder.prefill(**inputs)
    decoder.decode(steps=1)  # the first step builds the plans (before a capture too)
    tolist = torch.Tensor.tolist
    outside_ops = []

    def checked_tolist(self):
        stack = traceback.extract_stack()[:-1]
        if not any("crosslmm_ops/ops/" in f.filename for f in stack):
            outside_ops.append(f"{stack[-1].filename}:{stack[-1].lineno}")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", checked_tolist)
    with _HostReads() as mode:
        decoder.decode(steps=2, check_eos=False)
    monkeypatch.undo()
    assert mode.found == [] and outside_ops == []
    assert decoder.produced == 4


# ----------------------------------------------------------------------------------------------
# The DCAL's static-shape form
# ----------------------------------------------------------------------------------------------


def test_dcal_static_shapes_equals_the_default_form():
    torch.manual_seed(0)
    dcal = DualCrossAttention(32, 24, 4, 2, gate_init=0.5).eval()
    memory = VisionMemory.from_list([torch.randn(2, 9, 24), torch.randn(3, 9, 24)], 1)
    h = torch.randn(2, 1, 32)
    for text in (None, torch.tensor([[True], [False]])):
        with torch.no_grad():
            want = dcal(h, memory, text_mask=text)
            got = dcal(h, memory, text_mask=text, static_shapes=True)
        # Bitwise when every position queries; with a mask the default form's GEMMs see fewer
        # rows (another blocking, the last bits differ).
        exact = text is None
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert torch.equal(got[1], h[1]) and not torch.equal(got[0], h[0])
    with pytest.raises(ValueError, match="static_shapes=True takes no visual_mask"):
        dcal(h, memory, visual_mask=torch.zeros(2, 1, dtype=torch.bool), static_shapes=True)
    with pytest.raises(ValueError, match="static_shapes must be a bool"):
        dcal(h, memory, static_shapes="yes")


# ----------------------------------------------------------------------------------------------
# What is refused
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True), "do_sample"),
        (dict(num_beams=2), "num_beams"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(min_new_tokens=2), "min_new_tokens"),
        (dict(output_logits=True, return_dict_in_generate=True), "output_logits"),
        (dict(max_new_tokens=None), "max_new_tokens is required"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(eos_check_every=0), "eos_check_every"),
        (dict(capture="no"), "capture must be a bool"),
        (dict(capture=True), "capture=True .* CUDA device"),
        (dict(cuda_graph=True), "cuda_graph"),
        (dict(streamer=object()), "streamer"),
    ],
)
def test_unsupported_options_are_refused_by_name(kwargs, match):
    model, inputs, _ = _reference(1)
    kwargs = {"max_new_tokens": 3, "capture": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_with_cuda_graph(model, **inputs, **kwargs)


def test_right_padding_and_a_given_cache_are_refused():
    model, inputs, _ = _reference(2)
    mask = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="attention_mask: a row ends in padding"):
        generate_with_cuda_graph(
            model, **dict(inputs, attention_mask=mask), max_new_tokens=3, capture=False
        )
    with pytest.raises(ValueError, match="past_key_values: .* builds its own StaticCache"):
        generate_with_cuda_graph(
            model, **inputs, max_new_tokens=3, capture=False, past_key_values=object()
        )
    with pytest.raises(ValueError, match="input_ids is required"):
        generate_with_cuda_graph(model, max_new_tokens=3, capture=False)
    decoder = GraphDecoder(model, max_new_tokens=3, capture=False)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.decode()


# ----------------------------------------------------------------------------------------------
# On the GPU: the captured graph
# ----------------------------------------------------------------------------------------------


def _cuda_reference(dtype, gates=GATE, frames=(3, 1), **overrides):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CrossLMMForConditionalGeneration.from_preset(
            "crosslmm-tiny", dtype=dtype, **overrides
        ).eval()
    ref._set_gates(model, gates)
    data = ref._batch(model.config, frames=frames, T=max(frames), pad="left", dtype=dtype)
    inputs = dict(input_ids=data["input_ids"], **ref._video_kwargs(data))
    return model, {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("batch", (1, 2))
def test_captured_graph_gives_the_tokens_of_generate_on_cuda(batch):
    """float32 (the Triton/torch-free paths' precision) so that eager generate() with its dynamic
    cache and the graph over the static cache choose the same tokens."""
    model, inputs = _cuda_reference(torch.float32, frames=(3, 1)[:batch])
    kw = dict(do_sample=False, max_new_tokens=12)
    expected = model.generate(**inputs, **kw)
    decoder = GraphDecoder(model, **kw)
    decoder.prefill(**inputs)
    decoder.decode()
    assert decoder.captured
    assert torch.equal(decoder.sequences(), expected)
    assert torch.equal(model.generate(**inputs, **kw, cuda_graph=True), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_replayed_graph_runs_the_dcals_on_cuda(dtype):
    """Scores of every replayed step equal the same step run eagerly (capture=False), and move
    when the gates close: the replay runs the DCALs and reads their parameters."""
    runs = {}
    variants = (("graph", GATE, True), ("eager", GATE, False), ("closed", 0.0, True))
    for name, gates, capture in variants:
        model, inputs = _cuda_reference(dtype, gates=gates)
        decoder = GraphDecoder(model, max_new_tokens=WARMUP_STEPS + 6, capture=capture)
        decoder.prefill(**inputs)
        scores = []
        while decoder.decode(steps=1) < decoder.max_new_tokens:
            scores.append(decoder.last_scores.clone())
        scores.append(decoder.last_scores.clone())
        runs[name] = (decoder, torch.stack(scores))
    assert runs["graph"][0].captured and not runs["eager"][0].captured
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(runs["graph"][1], runs["eager"][1], **tol)
    replayed = slice(WARMUP_STEPS, None)
    assert _gap(runs["graph"][1][replayed], runs["closed"][1][replayed]) > 1e-2


@pytest.mark.cuda
def test_captured_graph_stops_at_end_of_sequence_as_generate_on_cuda():
    model, inputs = _cuda_reference(torch.float32)
    free = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    prompt = inputs["input_ids"].shape[1]
    eos = int(free[0, prompt + 5])  # after the warm-up: a replayed step hits it
    kw = dict(do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=7)
    expected = model.generate(**inputs, **kw)
    for every in (1, 4):
        got = generate_with_cuda_graph(model, **inputs, **kw, eos_check_every=every)
        assert torch.equal(got, expected)


@pytest.mark.cuda
def test_patched_llava_and_plain_lm_capture_on_cuda():
    for case in ("llava_onevision", "qwen2"):
        model, inputs, opts = _case(case, 2)
        model = model.cuda()
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        kw = dict(opts, do_sample=False, max_new_tokens=10)
        expected = model.generate(**inputs, **kw)
        decoder = GraphDecoder(model, **kw)
        decoder.prefill(**inputs)
        decoder.decode()
        assert decoder.captured, case
        assert torch.equal(decoder.sequences(), expected), case
