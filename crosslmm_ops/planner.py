"""The planner: for each call of an op, which back end, which path and which kernel run, and why.

Every decision about *how* a call runs is taken here, in one place:

* the **back end** (:func:`choose_backend`): the call's ``backend=``, else ``CROSSLMM_BACKEND``,
  else ``auto`` = the first of cuda -> triton -> torch that can run it (an op adds its own limits:
  dtype, head dim, width). Asking for a back end that cannot run the call is a ``RuntimeError``
  that says why; there is no silent fallback;
* the **path** of :func:`~crosslmm_ops.projected_cross_attention` and of the DCAL modules
  (:func:`choose_path`): projection-fused or materialised K/V, from the op's cost model unless the
  call or ``CROSSLMM_PROJECTED_PATH`` names one;
* the **CUDA attention kernel** (:func:`attention_kernel`): the Hopper wgmma + TMA kernels or the
  mma.sync ones, passed to ``crosslmm_ops._C`` as an argument (``CROSSLMM_ATTENTION_SM90`` /
  ``CROSSLMM_ATTENTION_BWD_SM90`` override);
* the **CUDA kernel of the projection-fused core** (:func:`projected_core_kernel`): the Hopper
  2-CTA-cluster kernel, or the mma.sync kernels with the decode kernel for one-tile calls
  (``CROSSLMM_PROJECTED_KERNEL`` overrides);
* the **back end of the projection-fused core's backward** (:func:`projected_backward_backend`):
  the forward's, with the CUDA one's on Triton (else torch) where the extension lacks it
  (``CROSSLMM_PROJECTED_BWD_CUDA=0`` forces that).

What ran is recorded once, in this module (:func:`note`; read with :func:`last_backend`,
:func:`last_path`, :func:`last_kernel`, :func:`last_record`, :func:`record_backends`), and
:func:`explain` tells the user what a call would run and why, without running it. The environment
is read in :mod:`crosslmm_ops.environment` only.

Each op registers how it plans a call (:func:`register`): its ``plan`` function validates the
arguments exactly as the op does and returns a :class:`Plan`; the op itself runs that plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable, Iterator

import torch

from crosslmm_ops import _backend, environment

BACKENDS = ("cuda", "triton", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS
PATHS = ("auto", "fused", "materialized")
# The sm90 attention kernels tile 128 (forward: one query head, or a GQA group packed where that
# gives fewer tiles) or 64/128 (backward: one query head) rows: shorter query segments (decode, 9
# queries per frame) fill GQA-packed 64-row tiles better, which the forward runs on wgmma
# (sm90_packed: 3-7% faster than on mma.sync on the H100, docs/performance.md) and the backward
# on mma.sync.
SM90_MIN_SEQLEN_Q = 64
SM90_HEAD_DIM = 128
# The extension's kernel argument -> the name it reports for the kernel that ran.
KERNEL_NAMES = {
    "sm90": "sm90_wgmma",
    "sm90_packed": "sm90_packed",
    "sm90_dkdv": "sm90_dkdv",
    "mma_sync": "mma_sync",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: ``backend``; for :func:`~crosslmm_ops.projected_cross_attention` the
    ``path`` (``"fused"`` / ``"materialized"``); the ``kernel`` (``"sm90"`` / ``"sm90_packed"`` /
    ``"mma_sync"`` for CUDA attention; ``None`` where a back end has one kernel); ``reasons``, one
    line per decision."""

    op: str
    backend: str
    path: str | None = None
    kernel: str | None = None
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.op}", f"  back end  {self.backend}"]
        if self.path is not None:
            lines.append(f"  path      {self.path}")
        if self.kernel is not None:
            lines.append(f"  kernel    {self.kernel}")
        lines += [
            f"  why       {r}" if i == 0 else f"            {r}" for i, r in enumerate(self.reasons)
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The back end
# ----------------------------------------------------------------------------------------------


def requested_backend(backend: str | None) -> str:
    """The back end a call asked for: its argument, else ``CROSSLMM_BACKEND``, else ``auto``."""
    if backend is None:
        return environment.backend()
    if not isinstance(backend, str) or backend.lower() not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend.lower()


def choose_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    *,
    cuda_ok=None,
    triton_ok=None,
    explain: bool = True,
) -> tuple[str, str]:
    """``(back end, reason)`` for one call of ``op`` on ``device``.

    ``cuda_ok`` / ``triton_ok`` let an op add its own limits (dtype, head dim ...) on top of what
    is installed: ``(False, reason)`` excludes that back end for this call. Either may be a
    zero-argument callable returning that pair, evaluated only when the back end is considered
    (a call that asks for ``cuda`` never pays for the Triton check: host time of short calls).
    On the meta device any back end is accepted as asked (``auto``: ``torch``): nothing runs, the
    custom ops' fake kernels give the shapes. ``explain=False``: the reason is ``""`` (the op
    running the call discards it; formatting it is host time of every short call)."""
    wanted = requested_backend(backend)
    if device.type == "meta":
        chosen = "torch" if wanted == "auto" else wanted
        return chosen, "meta tensors: nothing runs, the fake kernels give the shapes"
    if wanted != "auto":
        ok, why = _runnable(wanted, device, cuda_ok, triton_ok)
        if not ok:
            raise RuntimeError(f"{op}: backend={wanted!r} cannot run this call: {why}")
        if not explain:
            return wanted, ""
        source = "backend=" if backend is not None else f"{environment.BACKEND_VAR}="
        return wanted, f"{source}{wanted!r} asked for it"
    skipped = []
    for name in BACKENDS:
        # auto never picks the Triton interpreter: it is a testing tool, far too slow to use.
        if name == "triton" and device.type == "cpu":
            skipped.append("triton: auto does not take the CPU interpreter")
            continue
        ok, why = _runnable(name, device, cuda_ok, triton_ok)
        if ok:
            if not explain:
                return name, ""
            head = "auto: the first of cuda -> triton -> torch that runs this call"
            return name, "; ".join([head] + [f"not {s}" for s in skipped])
        skipped.append(f"{name}: {why}")
    raise AssertionError("unreachable: the torch back end always runs")


def _runnable(name: str, device: torch.device, cuda_ok, triton_ok) -> tuple[bool, str]:
    """Whether back end ``name`` can run a call (see :func:`choose_backend`)."""
    if name == "torch":
        return True, ""
    ok = cuda_ok if name == "cuda" else triton_ok
    if ok is None:
        return (_backend.cuda_runnable if name == "cuda" else _backend.triton_runnable)(device)
    return ok() if callable(ok) else ok


def resolve(
    op: str, backend: str | None, device: torch.device, *, cuda_ok=None, triton_ok=None
) -> str:
    """The back end for one call (:func:`choose_backend` without the reason)."""
    return choose_backend(op, backend, device, cuda_ok=cuda_ok, triton_ok=triton_ok, explain=False)[
        0
    ]


def projected_backward_backend(
    backend: str, device: torch.device, triton_ok: Callable[[], tuple[bool, str]] | None = None
) -> tuple[str, str]:
    """``(back end, reason)`` of the projection-fused core's backward after its forward ran on
    ``backend``: the same back end, except a CUDA forward's backward on Triton (torch without
    Triton, or where ``triton_ok()`` says the call's Triton kernels cannot run it) where the
    extension has no ``projected_attention_core_backward`` or ``CROSSLMM_PROJECTED_BWD_CUDA=0``.
    The CUDA backward takes every call its forward took (the same dtypes, widths and devices)."""
    if backend != "cuda":
        return backend, f"the forward ran on {backend}"
    if environment.projected_bwd_cuda() == "0":
        why = f"{environment.PROJECTED_BWD_CUDA_VAR}=0"
    elif not hasattr(_backend.extension(), "projected_attention_core_backward"):
        why = "the CUDA extension was built without the projected-attention backward"
    else:
        return "cuda", "the forward ran on cuda, and the extension has its backward"
    triton, no_triton = _backend.triton_runnable(device)
    if triton and triton_ok is not None:
        triton, no_triton = triton_ok()
    if triton:
        return "triton", f"the forward ran on cuda, but {why}"
    return "torch", f"the forward ran on cuda, but {why}; triton: {no_triton}"


# ----------------------------------------------------------------------------------------------
# The path of projection-fused attention
# ----------------------------------------------------------------------------------------------


def path_override(path) -> str | None:
    """The path a call names: ``path`` when it is ``"fused"`` or ``"materialized"``, else
    ``CROSSLMM_PROJECTED_PATH`` when that names one, else ``None`` (the cost model decides)."""
    if not isinstance(path, str) or path.lower() not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    path = path.lower()
    if path != "auto":
        return path
    env = environment.projected_path()
    return None if env == "auto" else env


def choose_path(
    path,
    estimate: Callable[[], tuple[float, float]],
    *,
    unfused_reason: str | None = None,
    fused_fast: Callable[[], tuple[bool, str]] | None = None,
    tracing: bool = False,
    explain: bool = True,
) -> tuple[str, str]:
    """``("fused" | "materialized", reason)`` for one call.

    * ``path``: the call's ``path`` / ``kv_path`` (``"auto"`` reads ``CROSSLMM_PROJECTED_PATH``);
    * ``estimate()``: the op's cost model, ``(fused_ms, materialized_ms)``; ties go to fused,
      which needs less memory;
    * ``unfused_reason``: why the fused path cannot stand in for the caller's modules (an
      adapter-wrapped projection, hooks ...): then ``auto`` is materialised and ``"fused"`` an
      error;
    * ``fused_fast()``: whether the fused core runs on a kernel for this call (the cost model
      assumes kernels on both paths): ``auto`` stays materialised where it does not;
    * ``tracing``: under torch.compile ``auto`` is materialised (the cost model reads counts that
      a traced graph only knows at run time);
    * ``explain=False``: the reason is ``""`` (see :func:`choose_backend`)."""
    forced = path_override(path)
    if forced == "materialized":
        return forced, _forced_reason(path) if explain else ""
    if unfused_reason is not None:
        if forced == "fused" and path == "fused":
            raise ValueError(
                f"kv_path='fused' cannot be used: {unfused_reason} (the fused path "
                "reads the weights directly); use kv_path='auto' or 'materialized'"
            )
        return "materialized", f"the fused path cannot stand in: {unfused_reason}"
    if forced == "fused":
        return forced, _forced_reason(path) if explain else ""
    if tracing:
        return "materialized", (
            "traced by torch.compile: the cost model reads query counts known only at run time"
        )
    fused_ms, mat_ms = estimate()
    costs = f"cost model: fused {fused_ms:.3g} ms, materialized {mat_ms:.3g} ms" if explain else ""
    if fused_ms > mat_ms:
        return "materialized", costs
    if fused_fast is not None:
        fast, why = fused_fast()
        if not fast:
            if not explain:
                return "materialized", ""
            return "materialized", f"{costs}, but the fused core would not run on a kernel: {why}"
    return "fused", costs


def _forced_reason(path) -> str:
    if isinstance(path, str) and path.lower() != "auto":
        return f"path={path.lower()!r} asked for it"
    return f"{environment.PROJECTED_PATH_VAR}={environment.projected_path()!r}"


# ----------------------------------------------------------------------------------------------
# The CUDA attention kernel
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _sm90_device(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` can run any of the extension's Hopper (sm_90a) kernels."""
    if "90a" not in _backend.extension_archs():
        return False, "the extension holds no sm_90a code"
    if device.type != "cuda":
        return False, f"not a CUDA device ({device})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _is_sm90(index):
        return False, "the GPU is not sm_90"
    return True, ""


def sm90_usable(
    device: torch.device, head_dim: int, softmax_scale: float | None = None
) -> tuple[bool, str]:
    """Whether the Hopper attention kernels can run a call (the extension checks again, and runs
    the mma.sync kernel where TMA cannot describe the tensors)."""
    ready, why = _sm90_device(device)
    if not ready:
        return False, why
    if head_dim != SM90_HEAD_DIM:
        return False, f"head dim {head_dim} (the sm90 kernels take {SM90_HEAD_DIM})"
    if softmax_scale is not None and not softmax_scale > 0:
        return False, f"softmax_scale {softmax_scale} <= 0 (the sm90 forward needs a positive one)"
    return True, ""


def attention_kernel(
    device: torch.device,
    head_dim: int,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
    *,
    backward: bool = False,
    explain: bool = True,
) -> tuple[str, str]:
    """``(kernel, reason)`` of the CUDA attention forward (or ``backward``) for one call:
    ``"sm90"``, ``"sm90_packed"`` (forward, short query sets), ``"sm90_dkdv"`` (backward,
    diagnostic) or ``"mma_sync"``; what
    ``crosslmm_ops._C.attention_forward / attention_backward`` take as ``kernel``.
    ``explain=False``: the reason of the usual choices (by the query length) is ``""``."""
    var = environment.ATTENTION_BWD_SM90_VAR if backward else environment.ATTENTION_SM90_VAR
    mode = environment.attention_bwd_sm90() if backward else environment.attention_sm90()
    if mode == "0":
        return "mma_sync", f"{var}=0"
    usable, why = sm90_usable(device, head_dim, None if backward else softmax_scale)
    if not usable:
        return "mma_sync", f"the sm90 kernel cannot run: {why}"
    if mode == "1":
        return "sm90", f"{var}=1"
    if mode == "packed":
        return "sm90_packed", f"{var}=packed"
    if mode == "dkdv":
        return "sm90_dkdv", f"{var}=dkdv"
    fills = max_seqlen_q >= SM90_MIN_SEQLEN_Q
    kernel = "sm90" if fills else "mma_sync" if backward else "sm90_packed"
    if not explain:
        return kernel, ""
    if fills:
        return kernel, (
            f"max_seqlen_q {max_seqlen_q} >= {SM90_MIN_SEQLEN_Q} fills the sm90 "
            "kernel's head-major tiles"
        )
    if not backward:
        return kernel, (
            f"max_seqlen_q {max_seqlen_q} < {SM90_MIN_SEQLEN_Q}: GQA-packed 64-row tiles "
            "(query x head of a group) fill better than head-major ones; wgmma on them"
        )
    return kernel, (
        f"max_seqlen_q {max_seqlen_q} < {SM90_MIN_SEQLEN_Q}: the GQA-packed "
        "mma.sync tiles fill better"
    )


# ----------------------------------------------------------------------------------------------
# The CUDA kernel of the projection-fused attention core
# ----------------------------------------------------------------------------------------------

# sm90_cluster (csrc/projected/projected_attention_sm90_kernel.cuh): a 2-CTA cluster per 64-row
# tile, each CTA a fixed half (9 atoms of 64 channels) of Dv <= 1152.
PROJECTED_SM90_MAX_WIDTH = 1152
PROJECTED_SM90_ATOM = 64
PROJECTED_SM90_BLOCK_M = 64


def projected_sm90_usable(device: torch.device, width: int) -> tuple[bool, str]:
    """Whether the sm90_cluster core kernel can run a call with x's width ``width`` (Dv) on
    ``device`` (the extension checks again, and runs mma_sync where TMA cannot describe the
    tensors)."""
    ready, why = _sm90_device(device)
    if not ready:
        return False, why
    if width % PROJECTED_SM90_ATOM or width > PROJECTED_SM90_MAX_WIDTH:
        return False, (
            f"Dv {width} (sm90_cluster takes multiples of {PROJECTED_SM90_ATOM} up to "
            f"{PROJECTED_SM90_MAX_WIDTH})"
        )
    return True, ""


def projected_sm90_preferred(width: int, rows: int) -> bool:
    """Whether ``sm90_cluster`` is the core kernel for a call of x's width ``width`` (Dv) and
    ``rows`` (query, head) rows in its longest segment, where it can run: both CTAs of its pair
    hold channels (Dv above half its width) and the rows fill its 64-row tiles."""
    return 2 * width > PROJECTED_SM90_MAX_WIDTH and rows >= PROJECTED_SM90_BLOCK_M


def projected_core_kernel(
    device: torch.device, width: int, rows: int, *, explain: bool = True
) -> tuple[str, str]:
    """``(kernel, reason)`` of the CUDA projection-fused core for one call, what
    ``crosslmm_ops._C.projected_attention_core_forward`` takes as ``kernel``: ``"sm90_cluster"``
    (the Hopper kernel), or ``"auto"``: the mma.sync kernels, whose launch plan in the extension
    takes the decode kernel for one-tile calls where its shared memory fits (what ran:
    ``projected_attention_core_forward_kernel_name()``, recorded by the op).
    ``CROSSLMM_PROJECTED_KERNEL`` names one instead. ``width``: Dv; ``rows``: (query, head) rows
    of the longest segment (``max_seqlen_q * heads``). ``explain=False``: the reason of the usual
    choices (by width and rows) is ``""``."""
    var = environment.PROJECTED_KERNEL_VAR
    mode = environment.projected_kernel()
    if mode != "auto" and mode != "sm90_cluster":
        return mode, f"{var}={mode}"
    usable, why = projected_sm90_usable(device, width)
    if not usable:
        return "auto", f"the sm90_cluster kernel cannot run: {why}"
    if mode == "sm90_cluster":
        return "sm90_cluster", f"{var}=sm90_cluster"
    kernel = "sm90_cluster" if projected_sm90_preferred(width, rows) else "auto"
    if not explain:
        return kernel, ""
    pair_used = 2 * width > PROJECTED_SM90_MAX_WIDTH
    if not pair_used:
        return kernel, (
            f"Dv {width} <= {PROJECTED_SM90_MAX_WIDTH // 2}: one CTA of sm90_cluster's pair would "
            "only multiply zeros"
        )
    if kernel != "sm90_cluster":
        return kernel, (
            f"{rows} rows per segment < {PROJECTED_SM90_BLOCK_M}: sm90_cluster's 64-row tiles "
            "would be mostly empty (decode); the mma.sync kernels' 16-row tiles (the decode "
            "kernel where it fits) with key splits read x at the bandwidth instead"
        )
    return kernel, (
        f"{rows} rows per segment >= {PROJECTED_SM90_BLOCK_M} fill sm90_cluster's 64-row tiles"
    )


# ----------------------------------------------------------------------------------------------
# What ran: the one record store
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """What the most recent call of one op ran."""

    backend: str
    path: str | None = None
    kernel: str | None = None


_records: dict[str, Record] = {}
_recorders = threading.local()
# One Record per (backend, path, kernel), shared (they are frozen): building a frozen dataclass
# is host time in every call, and a call notes one or two of them.
_record_of: dict[tuple, Record] = {}


def note(
    op: str, backend: str | None, *, path: str | None = None, kernel: str | None = None
) -> None:
    """Record that ``op`` just ran on ``backend`` (and ``path``, ``kernel`` where it has them)."""
    key = (backend, path, kernel)
    record = _record_of.get(key)
    if record is None:
        record = _record_of[key] = Record(backend, path, kernel)
    _records[op] = record
    for log in getattr(_recorders, "stack", ()):
        log.append((op, backend))


def last_record(op: str) -> Record | None:
    """Back end, path and kernel of the most recent call of ``op`` (``None`` if none)."""
    return _records.get(op)


def last_backend(op: str) -> str | None:
    """The back end that ran the most recent call of ``op`` in this process (``None`` if none)."""
    record = _records.get(op)
    return None if record is None else record.backend


def last_path(op: str = "projected_cross_attention") -> str | None:
    """The path (``"fused"`` / ``"materialized"``) of the most recent eager call of ``op``."""
    record = _records.get(op)
    return None if record is None else record.path


def last_kernel(op: str) -> str | None:
    """The kernel of the most recent call of ``op`` (e.g. ``"sm90_wgmma"``, ``"mma_sync"``,
    ``"triton"``, ``"reference"``), ``None`` if none was recorded."""
    record = _records.get(op)
    return None if record is None else record.kernel


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, backend)`` for every op call in this thread inside the ``with`` block."""
    log: list[tuple[str, str]] = []
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    stack.append(log)
    try:
        yield log
    finally:
        # By identity: a nested log with the same entries compares equal to this one.
        del stack[next(i for i, entry in enumerate(stack) if entry is log)]


# ----------------------------------------------------------------------------------------------
# Explaining a call
# ----------------------------------------------------------------------------------------------

_planners: dict[str, Callable[..., Plan]] = {}
_names: dict[int, str] = {}


def register(name: str, function: Callable, plan: Callable[..., Plan]) -> None:
    """Make ``explain(function or name, ...)`` call ``plan(...)``: how ``function`` would run a
    call with these arguments (the same validation and decisions, nothing launched)."""
    _planners[name] = plan
    _names[id(function)] = name


def explain(op, *args, print_plan: bool = True, **kwargs) -> Plan:
    """How a call ``op(*args, **kwargs)`` would run, and why, without running it: the back end,
    the path (projected attention), the kernel, and the reason for each choice (the call's
    arguments, the environment overrides, what is installed, the cost model). ``op``: a public
    op (``crosslmm_ops.cross_attention``) or its name (``"cross_attention"``). Prints the plan
    (``print_plan=False``: only returns it). Invalid arguments raise the op's own error.

    ``op`` may also be a DCAL module (:class:`~crosslmm_ops.nn.CrossAttention` and its V2V/T2V
    subclasses, :class:`~crosslmm_ops.nn.DualCrossAttention`) with its forward's arguments: the
    plan of its attention (a tuple, one per branch, for a DCAL)."""
    if isinstance(op, torch.nn.Module) and callable(getattr(op, "plan", None)):
        plan = op.plan(*args, **kwargs)  # a DCAL module: one plan per branch that runs
    else:
        name = op if isinstance(op, str) else _names.get(id(op))
        if name not in _planners:
            known = ", ".join(sorted(_planners))
            raise ValueError(
                f"explain: no plan for {op!r}; ops that explain their calls: "
                f"{known}, and the modules of crosslmm_ops.nn"
            )
        plan = _planners[name](*args, **kwargs)
    if print_plan:
        print("\n".join(map(str, plan)) if isinstance(plan, tuple) else plan)
    return plan


def explainable_ops() -> tuple[str, ...]:
    """The names :func:`explain` takes."""
    return tuple(sorted(_planners))
