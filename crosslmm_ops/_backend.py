"""What the back ends can run here, and the plumbing every op's implementation shares.

Each op runs on one of three back ends:

* ``cuda``   - hand-written CUDA C++ in ``csrc/``, bound into ``crosslmm_ops._C``;
* ``triton`` - Triton kernels in ``crosslmm_ops/triton/``;
* ``torch``  - the plain-PyTorch reference, the CPU path and the test oracle.

This module answers what is installed and runnable (:func:`extension`, :func:`cuda_runnable`,
:func:`triton_runnable` ...) and holds the plumbing of the implementations (output allocation,
poisoning, the eager autograd.Function twins). *Which* back end, path and kernel a call takes is
decided, recorded and explained by :mod:`crosslmm_ops.planner`; the environment is read by
:mod:`crosslmm_ops.environment`.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from crosslmm_ops import environment

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = environment.BACKEND_VAR


# ----------------------------------------------------------------------------------------------
# What is installed
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module ``crosslmm_ops._C``, or ``None`` when it was not built."""
    try:
        from crosslmm_ops import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def extension_import_error() -> str | None:
    """Why ``crosslmm_ops._C`` could not be imported (``None`` when it imports)."""
    try:
        from crosslmm_ops import _C  # noqa: F401  # type: ignore[attr-defined]
    except ImportError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton can fail to import in odd ways (missing libcuda, old glibc)
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return environment.triton_interpret()


@functools.lru_cache(maxsize=None)
def extension_archs() -> list[str]:
    """The GPU architectures the extension was compiled for (empty when not built)."""
    ext = extension()
    if ext is None:
        return []
    return [a for a in ext.cuda_archs().split(",") if a]


def _device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# cuda_runnable / triton_runnable ask the extension, the GPU and the environment, which
# torch.compile cannot trace: under compilation each is evaluated once and its answer baked in.
@torch.compiler.assume_constant_result
def cuda_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA back end can run on ``device``, and if not, why."""
    if device.type != "cuda":
        return False, f"the CUDA back end needs CUDA tensors, got tensors on {device}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_runnable_on(index)


@functools.lru_cache(maxsize=None)
def _cuda_runnable_on(index: int) -> tuple[bool, str]:
    device = torch.device("cuda", index)
    if extension() is None:
        return False, (
            "the CUDA extension crosslmm_ops._C is not built "
            f"({extension_import_error()}); reinstall with a CUDA toolchain: "
            "CROSSLMM_FORCE_BUILD=1 pip install --no-build-isolation crosslmm-ops"
        )
    arch = _device_arch(device)
    built = extension_archs()
    # Machine code for sm_XY runs on sm_XZ with Z >= Y (same major); "90a" code only on sm_90.
    for a in built:
        num = int(a.rstrip("a"))
        if a.endswith("a") and num == arch:
            return True, ""
        if not a.endswith("a") and num // 10 == arch // 10 and num <= arch:
            return True, ""
    return False, (
        f"the CUDA extension was built for sm_{', sm_'.join(built) or 'none'}, "
        f"not for this GPU (sm_{arch}); rebuild with CROSSLMM_CUDA_ARCHS={arch}"
    )


@torch.compiler.assume_constant_result
def triton_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton back end can run on ``device``, and if not, why."""
    if not triton_available():
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreted():
        return True, ""
    return False, (
        f"the Triton back end needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}"
    )


def triton_dot_dtype_ok(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether Triton kernels that multiply with ``tl.dot`` compute right in ``dtype`` here, and
    if not, why. The CPU interpreter's ``tl.dot`` on bfloat16 returns wrong values (near 1e9)
    without an error, so it is refused there; float16 and float32 are right."""
    if dtype == torch.bfloat16 and triton_interpreted():
        return False, (
            "the Triton interpreter (TRITON_INTERPRET=1) cannot compute bfloat16 (its tl.dot "
            "returns wrong values); use float16 or float32 inputs, or the torch back end "
            '(backend="torch"), or run on a GPU'
        )
    return True, ""


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device``'s type where it is on there, else
    ``None`` (also for device types without autocast)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, RuntimeError):  # device types without autocast
        pass
    return None


def kernel_index(t: torch.Tensor) -> torch.Tensor:
    """An index tensor (``cu_seqlens``) as a kernel reads it: contiguous. Kernels index its
    storage directly, without strides, so a strided view holding valid values (as validation
    reads them) would hand them other memory."""
    return t.contiguous()


# ----------------------------------------------------------------------------------------------
# Shared instances of per-shape objects
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _shared(build, args: tuple):
    return build(*args)


def shared_instance(build, *args):
    """``build(*args)``, one shared instance per ``(build, args)``: building a frozen layout
    dataclass is host time in every short call. Built anew under torch.compile (its trace holds
    no cache) and for symbolic sizes (fake tensors), which cannot be hashed. ``build`` must
    return an immutable object."""
    if torch.compiler.is_compiling():
        return build(*args)
    try:
        return _shared(build, args)
    except TypeError:  # a SymInt's hash raises it
        return build(*args)


# ----------------------------------------------------------------------------------------------
# Eager calls without torch.library's Python dispatch
# ----------------------------------------------------------------------------------------------

# Each op is a torch.library custom op (what torch.compile, export, fake tensors and
# FlopCounterMode see) with an autograd formula. In plain eager mode, torch's Python dispatch of a
# custom op costs 60-180 us of host time a call (measured on the H100 machine, torch 2.11), more
# than a decode step's or a short T2V call's kernels: the GPU then waits on the host. Plain eager
# calls therefore run an autograd.Function built from the same forward, context and backward
# functions. CROSSLMM_EAGER_FUNCTION=0 sends every call through the custom ops.
EAGER_FUNCTION = environment.EAGER_FUNCTION
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Looked up once: each eager_function_ok runs in every call of an op.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def eager_function_ok(*tensors) -> bool:
    """Whether a call on ``tensors`` may take an op's autograd.Function twin: not compiling or
    tracing, no dispatch mode (fake tensors, FlopCounterMode, ...) or functorch transform
    active, and plain tensors only (subclasses dispatch through the custom op, and so do meta
    tensors: the custom op's meta kernel is its fake kernel)."""
    if not EAGER_FUNCTION or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    if _transforms_active is not None and _transforms_active():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta):
            return False
    return True


def eager_function(name: str, forward, setup_context, backward_formula):
    """An autograd.Function computing what a custom op does whose implementation is ``forward``
    and whose autograd is ``register_autograd(backward_formula, setup_context=setup_context)``.
    ``ctx.eager`` is True in its backward, so ``backward_formula`` can call its backward's plain
    implementation instead of the backward custom op."""

    def function_forward(ctx, *inputs):
        output = forward(*inputs)
        ctx.eager = True
        setup_context(ctx, inputs, output)
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(t for t in outputs if not t.dtype.is_floating_point))
        return output

    def function_backward(ctx, *grads):
        return backward_formula(ctx, *grads)

    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(function_forward),
            "backward": staticmethod(
                torch.autograd.function.once_differentiable(function_backward)
            ),
            "__doc__": f"The eager twin of the custom op behind {name} (see eager_function_ok).",
        },
    )


# ----------------------------------------------------------------------------------------------
# Output allocation (poisoned under test, so that an element a kernel forgets to write fails)
# ----------------------------------------------------------------------------------------------

_poison = threading.local()


def poisoning() -> bool:
    # CROSSLMM_POISON_OUTPUTS=1 poisons every output of the process (read once, at import).
    return environment.POISON_OUTPUTS or getattr(_poison, "on", False)


@contextlib.contextmanager
def reference_mode(device: torch.device):
    """How the torch back end runs an op: without autograd (the op has its own formula) and with
    autocast off, so the reference computes in the precision it declares (float32 or float64)
    even when the caller is inside ``torch.autocast``."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output tensor; filled with NaN (floats) or INT_MIN (ints) when poisoning
    is on (:func:`crosslmm_ops.testing.poison_outputs`, or ``CROSSLMM_POISON_OUTPUTS=1`` at
    import)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


# ----------------------------------------------------------------------------------------------
# Moved to crosslmm_ops.planner (the one place that decides and records); kept here for callers
# written against this module.
# ----------------------------------------------------------------------------------------------

_MOVED_TO_PLANNER = ("resolve", "requested_backend", "note", "last_backend", "record_backends")


def __getattr__(name: str):
    if name in _MOVED_TO_PLANNER:
        from crosslmm_ops import planner

        return getattr(planner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
