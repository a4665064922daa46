"""The vision tower over many frames: a chunk of frames at a time, optionally compiled.

A long video's frames through the vision tower at once make its transient activations (and, where
the model asks for several layers' outputs, every layer's output) grow with the frame count,
though CrossLMM keeps only one layer's tokens per frame. Both the reference model and
``patch_llava`` encode frames ``chunk`` at a time with these helpers; the tokens are the same.

The tower is most of CrossLMM's prefill from pixels, and in eager mode a third of its GPU time is
element-wise work between the matmuls (residual adds, layout copies around attention, LayerNorm,
GELU). ``vision_compile`` (on the reference model and on a patch) runs each chunk through
``torch.compile`` instead, which fuses that work, and computes each MLP's GELU in its first
matmul's epilogue (:func:`fuse_gelu_epilogues`), which the compiler does not: see
:func:`compiled_tower`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

#: Transient activations one chunk may take, by default.
CHUNK_BUDGET_BYTES = 256 * 2**20


def auto_chunk_frames(
    tokens_per_frame: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    budget_bytes: int = CHUNK_BUDGET_BYTES,
) -> int:
    """Frames per vision-tower call whose transient activations (one layer's MLP and attention
    inputs and outputs, plus the tokens kept per frame) stay near ``budget_bytes``."""
    width = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_frame = tokens_per_frame * (intermediate_size + 6 * hidden_size) * width
    return max(1, budget_bytes // max(per_frame, 1))


def check_chunk_frames(value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"vision_chunk_frames must be None (automatic) or an int >= 1, got {value!r}"
        )
    return value


def check_compile_option(value) -> dict | None:
    """``vision_compile``: False or None (eager), True (``torch.compile``'s defaults) or a dict of
    ``torch.compile`` keyword arguments (``mode``, ``backend``, ``dynamic``, ...). Returns the
    keyword arguments, or None for eager."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ValueError(
        "vision_compile must be False/None (eager), True (torch.compile's defaults) or a dict of "
        f"torch.compile keyword arguments, got {value!r}"
    )


class CompiledTowerCache:
    """Where :func:`compiled_tower` keeps one owner's compiled forward. A deep copy or a pickle of
    the owner starts empty (compiled graphs are not copied) and compiles again when used."""

    def __init__(self):
        self.key = self.forward = self.compiled = None

    def __reduce__(self):  # copies and pickles (any protocol) rebuild an empty cache
        return (CompiledTowerCache, ())


def compiled_tower(
    forward: Callable, option, cache: CompiledTowerCache, tower: torch.nn.Module
) -> Callable:
    """``forward`` (the tower, or its original ``forward``) as each chunk should call it: itself
    when ``option`` (``vision_compile``) is off, else ``torch.compile(forward, **option)``, built
    once and kept in ``cache`` while the option and ``forward`` stay the same, so later calls reuse
    its compiled graphs. A last chunk shorter than the others makes torch.compile recompile once
    with a dynamic frame count, which then serves every length.

    Before compiling, ``tower``'s MLPs get their GELU in the first matmul's epilogue
    (:func:`fuse_gelu_epilogues`; the same function, in place, and it stays): on the H100 that
    took crosslmm-2b's compiled SigLIP tower from 381 to 439 TFLOP/s (16 frames a call)."""
    options = check_compile_option(option)
    if options is None:
        return forward
    key = repr(sorted(options.items()))
    if cache.key != key or cache.forward is not forward:
        fuse_gelu_epilogues(tower)
        cache.key, cache.forward = key, forward
        cache.compiled = torch.compile(forward, **options)
    return cache.compiled


# ----------------------------------------------------------------------------------------------
# GELU in the matmul's epilogue
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("crosslmm::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")``. On CUDA one cuBLASLt matmul whose
    epilogue adds the bias and applies GELU (its GELU is the tanh approximation), so the
    pre-activation never goes through memory; elsewhere the plain composition. A custom op, so
    that ``torch.compile`` keeps the call whole instead of splitting the GELU back off."""
    flat = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    else:  # the CPU kernel of _addmm_activation computes the exact (erf) GELU, not tanh
        out = F.gelu(F.linear(flat, weight, bias), approximate="tanh")
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_gelu_tanh_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _linear_gelu_tanh_backward(ctx, grad):
    # The pre-activation is recomputed (one more matmul) rather than kept: the fused call exists
    # so that it is never written out.
    x, weight, bias = ctx.saved_tensors
    pre = F.linear(x, weight, bias)
    grad_pre = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    flat = grad_pre.reshape(-1, grad_pre.shape[-1])
    grad_x = grad_pre @ weight if ctx.needs_input_grad[0] else None
    grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = flat.sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


linear_gelu_tanh.register_autograd(
    _linear_gelu_tanh_backward, setup_context=_linear_gelu_tanh_setup
)


def _is_gelu_tanh(activation) -> bool:
    """Whether ``activation`` computes GELU's tanh approximation, told by its values (the class
    that does it is named differently across transformers releases)."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        got = activation(probe)
    except Exception:  # noqa: BLE001 - anything that cannot take the probe is not fused
        return False
    want = F.gelu(probe, approximate="tanh")
    return isinstance(got, torch.Tensor) and torch.allclose(got, want, rtol=0, atol=1e-12)


def _plain_linear(module) -> bool:
    """Whether calling ``module`` is exactly ``F.linear(x, weight, bias)``: an ``nn.Linear``
    itself (not a quantised or adapter subclass) with a bias, no hooks and no replaced forward.
    Anything else (a LoRA wrapper or an offloading hook added after fusing) must be called as it
    is, so the fused path steps aside for it."""
    return (
        type(module) is torch.nn.Linear
        and module.bias is not None
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _fused_mlp_forward(mlp: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _plain_linear(mlp.fc1):  # changed since it was fused: the module's own composition
        return mlp.fc2(mlp.activation_fn(mlp.fc1(hidden_states)))
    h = linear_gelu_tanh(hidden_states, mlp.fc1.weight, mlp.fc1.bias)
    return mlp.fc2(h)


def fuse_gelu_epilogues(tower: torch.nn.Module) -> int:
    """Computes each MLP of ``tower`` (a module with an ``fc1`` that is a plain ``nn.Linear``
    with a bias, an ``fc2`` and an ``activation_fn`` that is GELU's tanh approximation, as
    SigLIP's) through :func:`linear_gelu_tanh`: the module's ``forward`` is replaced in place; its
    parameters, ``state_dict`` and function stay, and an ``fc1`` wrapped or hooked later is called
    as it is. Idempotent; returns how many MLPs are fused."""
    fused = 0
    for module in tower.modules():
        if isinstance(module.__dict__.get("forward"), functools.partial) and (
            module.forward.func is _fused_mlp_forward
        ):
            fused += 1
            continue
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if not (_plain_linear(fc1) and isinstance(fc2, torch.nn.Module)):
            continue
        if not _is_gelu_tanh(getattr(module, "activation_fn", None)):
            continue
        module.forward = functools.partial(_fused_mlp_forward, module)
        fused += 1
    return fused


def encode_in_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``encode(pixels)`` computed ``chunk`` frames (rows of ``pixels``) at a time. Without
    autograd the result is written into one buffer (no second copy for a concatenation)."""
    total = pixels.shape[0]
    if chunk >= total:
        return encode(pixels)
    if torch.is_grad_enabled():  # autograd keeps every chunk's activations anyway
        return torch.cat([encode(pixels[i : i + chunk]) for i in range(0, total, chunk)])
    first = encode(pixels[:chunk])
    out = first.new_empty((total,) + tuple(first.shape[1:]))
    out[:chunk] = first
    del first
    for i in range(chunk, total, chunk):
        out[i : i + chunk] = encode(pixels[i : i + chunk])
    return out


def concat_outputs(outputs: list):
    """One model output from the outputs of consecutive chunks of a batch: tensors and tuples of
    tensors concatenated along the batch, everything else taken from the first."""
    first = outputs[0]

    def merge(values):
        head = values[0]
        if isinstance(head, torch.Tensor):
            return torch.cat(values)
        if isinstance(head, tuple):
            return tuple(merge([v[i] for v in values]) for i in range(len(head)))
        return head

    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return merge(outputs)
    return type(first)(**{key: merge([o[key] for o in outputs]) for key in first.keys()})


__all__ = [
    "CHUNK_BUDGET_BYTES",
    "auto_chunk_frames",
    "check_chunk_frames",
    "CompiledTowerCache",
    "check_compile_option",
    "compiled_tower",
    "concat_outputs",
    "encode_in_chunks",
    "fuse_gelu_epilogues",
    "linear_gelu_tanh",
]
