"""token_pool: per-frame 2D pooling of token-major video features ``[..., T, N, D]``.

Everything about the op lives here, side by side:

* :class:`PoolSpec` and :func:`pool_plan` - the user's arguments, validated, and the pooling written
  as a sparse map from the ``N`` tokens of a frame to the ``n`` pooled ones (CSR, plus its transpose
  for the backward). The plan is pure Python from the definitions of torch's pooling functions; the
  tests check it against ``F.avg_pool2d`` & co.
* :func:`token_pool_reference` - the plain-PyTorch reference (the ``torch`` back end and the test
  oracle), written for clarity from the plan: a dense matrix product for the averaging modes, a
  gather-and-max for max.
* the ``crosslmm::token_pool`` custom op (+ fake kernel + autograd), whose implementation runs the
  chosen back end: CUDA in ``csrc/pooling/token_pool.cu``, Triton in
  ``crosslmm_ops/triton/token_pool.py``, or the reference;
* :func:`token_pool`, the public function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
import torch

from crosslmm_ops import _backend

OP_NAME = "token_pool"
MODES = ("avg", "max", "adaptive", "bilinear")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Kernel kinds shared by the CUDA and Triton kernels (see csrc/pooling/token_pool.cu).
KIND_WEIGHTED_SUM, KIND_MAX_FORWARD, KIND_MAX_BACKWARD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# The spec: arguments, validated
# ----------------------------------------------------------------------------------------------


def _pair(name: str, value, *, allow_zero: bool = False) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    lo = 0 if allow_zero else 1
    if any(v < lo for v in value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _window_out(length: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooling output length (aten/src/ATen/native/Pool.h: pooling_output_shape)."""
    num = length + 2 * p - k + ((s - 1) if ceil_mode else 0)
    out = num // s + 1
    # With ceil_mode the last window must start inside the input or its left padding.
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1
    return out


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A validated pooling request. Build it with :meth:`PoolSpec.make`."""

    grid: tuple[int, int]
    mode: str
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    output_size: tuple[int, int] = (1, 1)
    align_corners: bool = False
    temporal_stride: int = 1

    @staticmethod
    def make(
        grid,
        mode: str = "avg",
        kernel_size=None,
        stride=None,
        padding=0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        output_size=None,
        align_corners: bool = False,
        temporal_stride: int = 1,
    ) -> "PoolSpec":
        H, W = _pair("grid", grid)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(temporal_stride, (int, np.integer)) or isinstance(temporal_stride, bool) \
                or temporal_stride < 1:
            raise ValueError(f"temporal_stride must be an int >= 1, got {temporal_stride!r}")
        for name, flag in (("ceil_mode", ceil_mode), ("count_include_pad", count_include_pad),
                           ("align_corners", align_corners)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if mode in ("avg", "max"):
            if kernel_size is None:
                raise ValueError(f"mode={mode!r} needs kernel_size (e.g. kernel_size=3)")
            if output_size is not None:
                raise ValueError(f"output_size is for the adaptive and bilinear modes, not {mode!r}; "
                                 "give kernel_size/stride/padding")
            k = _pair("kernel_size", kernel_size)
            s = _pair("stride", k if stride is None else stride)
            p = _pair("padding", padding, allow_zero=True)
            for axis, length in enumerate((H, W)):
                if 2 * p[axis] > k[axis]:
                    raise ValueError(
                        f"padding must be at most half of kernel_size, got padding={p} for "
                        f"kernel_size={k}")
                if length + 2 * p[axis] < k[axis]:
                    raise ValueError(
                        f"kernel_size {k} is larger than the padded grid "
                        f"({H + 2 * p[0]}, {W + 2 * p[1]}) (grid {(H, W)}, padding {p})")
            out = (_window_out(H, k[0], s[0], p[0], ceil_mode),
                   _window_out(W, k[1], s[1], p[1], ceil_mode))
            return PoolSpec((H, W), mode, k, s, p, ceil_mode, count_include_pad, out, False,
                            int(temporal_stride))
        # adaptive / bilinear: a target grid, no windows.
        if output_size is None:
            raise ValueError(f"mode={mode!r} needs output_size (e.g. output_size=3 for a 3x3 grid)")
        if kernel_size is not None or stride is not None or padding not in (0, (0, 0)):
            raise ValueError(f"kernel_size, stride and padding are for the avg and max modes, "
                             f"not {mode!r}")
        out = _pair("output_size", output_size)
        return PoolSpec((H, W), mode, output_size=out, align_corners=align_corners,
                        temporal_stride=int(temporal_stride))

    @property
    def tokens_in(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_out(self) -> int:
        return self.output_size[0] * self.output_size[1]

    def frames_out(self, frames_in: int) -> int:
        return -(-frames_in // self.temporal_stride)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _make_spec(*args) -> PoolSpec:
    """PoolSpec.make, memoised: validation runs once per distinct set of arguments (eagerly;
    torch.compile traces the validation itself, once)."""
    if torch.compiler.is_compiling():
        return PoolSpec.make(*args)
    try:
        return _make_spec_cached(*(_hashable(a) for a in args))
    except TypeError:  # unhashable argument: validate uncached (make raises the clear error)
        return PoolSpec.make(*args)


@functools.lru_cache(maxsize=1024)
def _make_spec_cached(*args) -> PoolSpec:
    return PoolSpec.make(*args)


def pooled_grid(grid, mode: str = "avg", **kwargs) -> tuple[int, int]:
    """The output grid ``(h, w)`` of :func:`token_pool` with the same arguments."""
    return PoolSpec.make(grid, mode, **kwargs).output_size


# ----------------------------------------------------------------------------------------------
# The plan: pooling as a sparse map between token indices
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """Output token ``o`` reads input tokens ``col_idx[row_ptr[o]:row_ptr[o+1]]`` with ``weight``
    (CSR, in row-major window order); ``t_*`` is the transpose (input token -> output tokens)."""

    row_ptr: np.ndarray
    col_idx: np.ndarray
    weight: np.ndarray
    t_row_ptr: np.ndarray
    t_col_idx: np.ndarray
    t_weight: np.ndarray

    # Read on every kernel launch: computed once per (cached) plan.
    @functools.cached_property
    def max_row_len(self) -> int:
        return int(np.diff(self.row_ptr).max(initial=0))

    @functools.cached_property
    def t_max_row_len(self) -> int:
        return int(np.diff(self.t_row_ptr).max(initial=0))


def _bilinear_taps(length: int, out: int, align_corners: bool) -> list[list[tuple[int, float]]]:
    """Per output index, the (input index, weight) pairs of linear interpolation, as
    F.interpolate(mode='bilinear') computes them (area_pixel_compute_source_index)."""
    taps = []
    for o in range(out):
        if align_corners:
            src = o * (length - 1) / (out - 1) if out > 1 else 0.0
        else:
            src = max((o + 0.5) * length / out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), length - 1)
        i1 = min(i0 + 1, length - 1)
        l1 = src - i0
        pairs = {i0: 1.0 - l1}
        pairs[i1] = pairs.get(i1, 0.0) + l1
        taps.append(sorted(pairs.items()))
    return taps


def _window_taps(spec: PoolSpec, axis: int) -> list[list[tuple[int, float]]]:
    """Per output index along one axis: the input indices it covers, and the divisor share that
    count_include_pad puts on that axis (the full window length, padding included)."""
    length, out = spec.grid[axis], spec.output_size[axis]
    k, s, p = spec.kernel_size[axis], spec.stride[axis], spec.padding[axis]
    taps = []
    for o in range(out):
        if spec.mode == "adaptive":
            start, end = (o * length) // out, -(-((o + 1) * length) // out)
            taps.append([(i, float(end - start)) for i in range(start, end)])
            continue
        start = o * s - p
        end = min(start + k, length + p)
        padded_len = end - start
        start, end = max(start, 0), min(end, length)
        taps.append([(i, float(padded_len)) for i in range(start, end)])
    return taps


@functools.lru_cache(maxsize=256)
def pool_plan(spec: PoolSpec) -> PoolPlan:
    H, W = spec.grid
    entries: list[list[tuple[int, float]]] = []
    if spec.mode == "bilinear":
        th = _bilinear_taps(H, spec.output_size[0], spec.align_corners)
        tw = _bilinear_taps(W, spec.output_size[1], spec.align_corners)
        for rows in th:
            for cols in tw:
                entries.append([(h * W + w, wh * ww) for h, wh in rows for w, ww in cols])
    else:
        th, tw = _window_taps(spec, 0), _window_taps(spec, 1)
        for rows in th:
            for cols in tw:
                if spec.mode == "max":
                    weight = 1.0
                elif spec.mode == "adaptive" or not spec.count_include_pad:
                    weight = 1.0 / (len(rows) * len(cols))
                else:  # avg counting the padding: divide by the padded window's area
                    weight = 1.0 / (rows[0][1] * cols[0][1]) if rows and cols else 0.0
                entries.append([(h * W + w, weight) for h, _ in rows for w, _ in cols])

    row_ptr = np.zeros(len(entries) + 1, dtype=np.int32)
    row_ptr[1:] = np.cumsum([len(e) for e in entries])
    col_idx = np.array([i for e in entries for i, _ in e], dtype=np.int32)
    weight = np.array([w for e in entries for _, w in e], dtype=np.float64)
    # Transpose: for each input token, the output tokens that read it (ascending).
    out_of = np.repeat(np.arange(len(entries), dtype=np.int32), np.diff(row_ptr))
    order = np.lexsort((out_of, col_idx))
    t_row_ptr = np.zeros(H * W + 1, dtype=np.int32)
    t_row_ptr[1:] = np.cumsum(np.bincount(col_idx, minlength=H * W))
    return PoolPlan(row_ptr, col_idx, weight, t_row_ptr, out_of[order], weight[order])


@functools.lru_cache(maxsize=256)
def _plan_tensors(spec: PoolSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """The plan as int32/float32 tensors on ``device`` (cached per device)."""
    plan = pool_plan(spec)
    as_t = functools.partial(torch.as_tensor, device=device)
    return {
        "row_ptr": as_t(plan.row_ptr), "col_idx": as_t(plan.col_idx),
        "weight": as_t(plan.weight, dtype=torch.float32),
        "t_row_ptr": as_t(plan.t_row_ptr), "t_col_idx": as_t(plan.t_col_idx),
        "t_weight": as_t(plan.t_weight, dtype=torch.float32),
    }


# ----------------------------------------------------------------------------------------------
# The reference (torch back end and test oracle)
# ----------------------------------------------------------------------------------------------


def _dense_map(spec: PoolSpec, dtype, device) -> torch.Tensor:
    """The spatial plan as a dense [n, N] matrix."""
    plan = pool_plan(spec)
    m = torch.zeros(spec.tokens_out, spec.tokens_in, dtype=torch.float64)
    rows = np.repeat(np.arange(spec.tokens_out), np.diff(plan.row_ptr))
    m[torch.as_tensor(rows), torch.as_tensor(plan.col_idx, dtype=torch.long)] = torch.as_tensor(plan.weight)
    return m.to(dtype=dtype, device=device)


def _temporal_map(frames: int, s: int, dtype, device) -> torch.Tensor:
    """[T', T] averaging over groups of s frames (the last group may be shorter)."""
    m = torch.zeros(-(-frames // s), frames, dtype=torch.float64)
    for t in range(m.shape[0]):
        first, last = t * s, min(t * s + s, frames)
        m[t, first:last] = 1.0 / (last - first)
    return m.to(dtype=dtype, device=device)


def _max_reference(x: torch.Tensor, spec: PoolSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling by gathering each window (frames x taps, scan order) and taking the first max.

    Returns the pooled tensor and the winner of each element as ``frame * N + token``.
    """
    B, T, N, D = x.shape
    plan = pool_plan(spec)
    s, Tout = spec.temporal_stride, spec.frames_out(T)
    lens = np.diff(plan.row_ptr)
    K = int(lens.max())
    gather = np.full((spec.tokens_out, K), N, dtype=np.int64)  # N = the -inf padding token
    for o in range(spec.tokens_out):
        gather[o, : lens[o]] = plan.col_idx[plan.row_ptr[o]: plan.row_ptr[o + 1]]
    gather = torch.as_tensor(gather, device=x.device)
    neg_inf = torch.full((B, T, 1, D), float("-inf"), dtype=x.dtype, device=x.device)
    xp = torch.cat([x, neg_inf], dim=2)  # [B, T, N+1, D]
    frames_pad = Tout * s - T
    if frames_pad:
        xp = torch.cat([xp, xp.new_full((B, frames_pad, N + 1, D), float("-inf"))], dim=1)
    windows = xp[:, :, gather.reshape(-1), :].reshape(B, Tout, s, spec.tokens_out, K, D)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(B, Tout, spec.tokens_out, s * K, D)
    values, pos = windows.max(dim=3)  # first maximal index in (frame, tap) order; NaN propagates
    frame = torch.arange(Tout, device=x.device).view(1, Tout, 1, 1) * s + pos // K
    token = gather[torch.arange(spec.tokens_out, device=x.device).view(1, 1, -1, 1), pos % K]
    return values, (frame * N + token).to(torch.int32)


def token_pool_reference(x: torch.Tensor, spec: PoolSpec, *, compute_dtype=None) -> torch.Tensor:
    """Plain-PyTorch token pooling of ``x: [..., T, N, D]`` (as :func:`token_pool`),
    differentiable through autograd.

    Computes in ``compute_dtype`` (default: float32, or float64 for float64 input) and returns
    that dtype; the torch back end casts the result to the input's dtype.
    """
    if not isinstance(spec, PoolSpec):
        raise TypeError(f"spec must be a PoolSpec (PoolSpec.make(grid, mode, ...)), got "
                        f"{type(spec).__name__}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-3]
    x = x.to(compute_dtype).reshape(-1, *x.shape[-3:])
    if spec.mode == "max":
        out = _max_reference(x, spec)[0]
    else:
        spatial = _dense_map(spec, compute_dtype, x.device)
        out = torch.einsum("on,btnd->btod", spatial, x)
        if spec.temporal_stride > 1:
            temporal = _temporal_map(x.shape[1], spec.temporal_stride, compute_dtype, x.device)
            out = torch.einsum("ut,btod->buod", temporal, out)
    return out.reshape(*lead, *out.shape[1:])


# ----------------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------------


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels read any strides on (B, T, N) but need the channels contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(backend: str, x: torch.Tensor, spec: PoolSpec, need_argmax: bool):
    B, T, N, D = x.shape
    out_shape = (B, spec.frames_out(T), spec.tokens_out, D)
    is_max = spec.mode == "max"
    if backend == "torch":
        with _backend.reference_mode(x.device):
            if is_max:
                out, argmax = _max_reference(x, spec)
            else:
                out = token_pool_reference(x, spec)
                argmax = x.new_empty(0, dtype=torch.int32)
        # Contiguous, as the fake kernel (and the CUDA/Triton back ends) promise.
        argmax = argmax.contiguous() if need_argmax else x.new_empty(0, dtype=torch.int32)
        return out.to(x.dtype).contiguous(), argmax

    plan = _plan_tensors(spec, x.device)
    x = _kernel_input(x)
    out = _backend.new_output(out_shape, x.dtype, x.device)
    # Max records each element's winner only when a backward will need it.
    argmax = (_backend.new_output(out_shape, torch.int32, x.device) if is_max and need_argmax
              else x.new_empty(0, dtype=torch.int32))
    mix = _mix_function(backend)
    mix(x, out, plan["row_ptr"], plan["col_idx"], plan["weight"], argmax if argmax.numel() else None,
        KIND_MAX_FORWARD if is_max else KIND_WEIGHTED_SUM, spec.temporal_stride, T, N, False,
        pool_plan(spec).max_row_len)
    return out, argmax


def _backward_reference(grad: torch.Tensor, argmax: torch.Tensor, spec: PoolSpec,
                        in_shape: tuple) -> torch.Tensor:
    """The torch back end's backward: the transposed pooling map (or the max's winners)."""
    B, frames_in, N, D = in_shape
    cdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if spec.mode == "max":
        grad_x = grad.new_zeros(B, frames_in * N, D, dtype=cdt)
        grad_x.scatter_add_(1, argmax.reshape(B, -1, D).long(), grad.reshape(B, -1, D).to(cdt))
        return grad_x.reshape(in_shape).to(grad.dtype)
    spatial = _dense_map(spec, cdt, grad.device)
    g = torch.einsum("on,btod->btnd", spatial, grad.to(cdt))
    if spec.temporal_stride > 1:
        temporal = _temporal_map(frames_in, spec.temporal_stride, cdt, grad.device)
        g = torch.einsum("ut,bund->btnd", temporal, g)
    return g.to(grad.dtype).contiguous()


def _backward(backend: str, grad: torch.Tensor, argmax: torch.Tensor, spec: PoolSpec,
              frames_in: int) -> torch.Tensor:
    B, _, _, D = grad.shape
    N = spec.tokens_in
    in_shape = (B, frames_in, N, D)
    if backend == "torch":
        with _backend.reference_mode(grad.device):
            return _backward_reference(grad, argmax, spec, in_shape)

    plan = _plan_tensors(spec, grad.device)
    grad = _kernel_input(grad)
    grad_x = _backend.new_output(in_shape, grad.dtype, grad.device)
    is_max = spec.mode == "max"
    mix = _mix_function(backend)
    mix(grad, grad_x, plan["t_row_ptr"], plan["t_col_idx"], plan["t_weight"],
        argmax if is_max else None, KIND_MAX_BACKWARD if is_max else KIND_WEIGHTED_SUM,
        spec.temporal_stride, frames_in, N, True, pool_plan(spec).t_max_row_len)
    return grad_x


def _mix_function(backend: str):
    if backend == "cuda":
        return _backend.extension().token_pool_mix
    from crosslmm_ops.triton.token_pool import token_pool_mix

    return token_pool_mix


# ----------------------------------------------------------------------------------------------
# The custom ops (torch.library): what torch.compile and autograd see
# ----------------------------------------------------------------------------------------------


def _spec_args(spec: PoolSpec) -> tuple:
    return (list(spec.grid), spec.mode, list(spec.kernel_size), list(spec.stride),
            list(spec.padding), spec.ceil_mode, spec.count_include_pad, list(spec.output_size),
            spec.align_corners, spec.temporal_stride)


def _spec_from_args(grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    output_size, align_corners, temporal_stride) -> PoolSpec:
    return PoolSpec(tuple(grid), mode, tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode,
                    count_include_pad, tuple(output_size), align_corners, temporal_stride)


@torch.library.custom_op("crosslmm::token_pool", mutates_args=())
def _token_pool_op(
    x: torch.Tensor, grid: list[int], mode: str, kernel_size: list[int], stride: list[int],
    padding: list[int], ceil_mode: bool, count_include_pad: bool, output_size: list[int],
    align_corners: bool, temporal_stride: int, need_argmax: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, grid, mode, kernel_size, stride, padding, ceil_mode,
                         count_include_pad, output_size, align_corners, temporal_stride,
                         need_argmax, backend)


def _forward_impl(x, grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad,
                  output_size, align_corners, temporal_stride, need_argmax, backend):
    """The forward custom op's implementation (also the eager function's forward)."""
    spec = _spec_from_args(grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           output_size, align_corners, temporal_stride)
    out, argmax = _forward(backend, x, spec, need_argmax)
    _backend.note(OP_NAME, backend)
    return out, argmax


@_token_pool_op.register_fake
def _(x, grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad, output_size,
      align_corners, temporal_stride, need_argmax, backend):
    B, T, _, D = x.shape
    shape = (B, -(-T // temporal_stride), output_size[0] * output_size[1], D)
    argmax = x.new_empty(shape if (need_argmax and mode == "max") else (0,), dtype=torch.int32)
    return x.new_empty(shape), argmax


@torch.library.custom_op("crosslmm::token_pool_backward", mutates_args=())
def _token_pool_backward_op(
    grad: torch.Tensor, argmax: torch.Tensor, frames_in: int, grid: list[int], mode: str,
    kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
    count_include_pad: bool, output_size: list[int], align_corners: bool, temporal_stride: int,
    backend: str,
) -> torch.Tensor:
    return _backward_impl(grad, argmax, frames_in, grid, mode, kernel_size, stride, padding,
                          ceil_mode, count_include_pad, output_size, align_corners,
                          temporal_stride, backend)


def _backward_impl(grad, argmax, frames_in, grid, mode, kernel_size, stride, padding, ceil_mode,
                   count_include_pad, output_size, align_corners, temporal_stride, backend):
    """The backward custom op's implementation (also the eager function's backward)."""
    spec = _spec_from_args(grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           output_size, align_corners, temporal_stride)
    grad_x = _backward(backend, grad, argmax, spec, frames_in)
    _backend.note(OP_NAME + "_backward", backend)
    return grad_x


@_token_pool_backward_op.register_fake
def _(grad, argmax, frames_in, grid, mode, kernel_size, stride, padding, ceil_mode,
      count_include_pad, output_size, align_corners, temporal_stride, backend):
    return grad.new_empty(grad.shape[0], frames_in, grid[0] * grid[1], grad.shape[3])


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    ctx.frames_in = x.shape[1]
    ctx.spec_args = inputs[1:11]
    ctx.backend = inputs[12]
    ctx.save_for_backward(output[1])


def _backward_formula(ctx, grad_out, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    backward = _backward_impl if getattr(ctx, "eager", False) else _token_pool_backward_op
    grad_x = backward(grad_out, argmax, ctx.frames_in, *ctx.spec_args, ctx.backend)
    return (grad_x,) + (None,) * 12


_token_pool_op.register_autograd(_backward_formula, setup_context=_setup_context)
_TokenPoolFunction = _backend.eager_function("_TokenPoolFunction", _forward_impl, _setup_context,
                                             _backward_formula)


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor, spec: PoolSpec) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x must be a floating tensor (float16, bfloat16, float32 or float64), "
                         f"got dtype {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"x must have shape [..., T, N, D] (at least 3 dims), got {tuple(x.shape)}")
    if any(d == 0 for d in x.shape):
        raise ValueError(f"x must not have empty dimensions, got shape {tuple(x.shape)}")
    if x.shape[-2] != spec.tokens_in:
        raise ValueError(f"x has N={x.shape[-2]} tokens per frame (shape {tuple(x.shape)}), but "
                         f"grid {spec.grid} needs N = {spec.grid[0]}*{spec.grid[1]} = {spec.tokens_in}")


def _fast_ok(dtype: torch.dtype, runnable: tuple[bool, str]) -> tuple[bool, str]:
    if not runnable[0]:
        return runnable
    if dtype not in _FAST_DTYPES:
        return False, f"dtype {dtype} runs on the torch back end only"
    return True, ""


# Evaluated once at trace time under torch.compile (it asks the extension and the GPU, which the
# compiler cannot trace), so the compiled graph holds the chosen back end as a constant.
@torch.compiler.assume_constant_result
def _choose_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    return _backend.resolve(
        OP_NAME, backend, device,
        cuda_ok=_fast_ok(dtype, _backend.cuda_runnable(device)),
        triton_ok=_fast_ok(dtype, _backend.triton_runnable(device)),
    )


def token_pool(
    x: torch.Tensor,
    grid: int | Sequence[int] = (27, 27),
    mode: str = "avg",
    *,
    kernel_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    output_size: int | Sequence[int] | None = None,
    align_corners: bool = False,
    temporal_stride: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Pool each frame's token grid of token-major ``x: [..., T, N, D]`` (``N = H*W``).

    Modes, each with the semantics of the torch function named:

    * ``"avg"`` - ``F.avg_pool2d(kernel_size, stride, padding, ceil_mode, count_include_pad)``;
    * ``"max"`` - ``F.max_pool2d(kernel_size, stride, padding, ceil_mode)``;
    * ``"adaptive"`` - ``F.adaptive_avg_pool2d(output_size)`` (27x27 -> 1, 3x3, 4x4 ...);
    * ``"bilinear"`` - ``F.interpolate(size=output_size, mode="bilinear", align_corners=...)``,
      LLaVA-OneVision's video pooling.

    ``temporal_stride=s`` also pools frames in groups of ``s`` (average, or max for ``"max"``); the
    last group may be shorter, so ``T' = ceil(T / s)``. Returns ``[..., T', h*w, D]`` in ``x``'s
    dtype, computed in float32. The layout stays token-major: nothing is permuted or copied
    (inputs whose channel dimension is not contiguous are copied once).

    ``backend``: ``"auto"`` (default; env ``CROSSLMM_BACKEND``), ``"cuda"``, ``"triton"`` or
    ``"torch"``; :func:`crosslmm_ops.last_backend` says which ran.
    """
    spec = _make_spec(grid, mode, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      output_size, align_corners, temporal_stride)
    _check_input(x, spec)
    chosen = _choose_backend(backend, x.device, x.dtype)
    lead = x.shape[:-3]
    x4 = x.reshape(-1, *x.shape[-3:])
    need_argmax = spec.mode == "max" and torch.is_grad_enabled() and x.requires_grad
    # In plain eager mode the custom op's autograd.Function twin (no torch.library host cost).
    pool = _TokenPoolFunction.apply if _backend.eager_function_ok(x4) else _token_pool_op
    out, _ = pool(x4, *_spec_args(spec), need_argmax, chosen)
    return out.reshape(*lead, *out.shape[1:])
