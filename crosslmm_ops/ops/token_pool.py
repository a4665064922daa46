"""token_pool: per-frame 2D pooling of token-major video features ``[..., T, N, D]``.

Everything about the op lives here, side by side:

* :class:`PoolSpec` and :func:`pool_plan` - the user's arguments, validated, and the pooling written
  as a sparse map from the ``N`` tokens of a frame to the ``n`` pooled ones (CSR, plus its transpose
  for the backward). The plan is pure Python from the definitions of torch's pooling functions; the
  tests check it against ``F.avg_pool2d`` & co.
* :func:`token_pool_reference` - the plain-PyTorch reference (the ``torch`` back end and the test
  oracle), written for clarity from the plan: a weighted sum (or a first-wins max) over each
  output's taps, one tap slot at a time, in memory linear in the input and with torch's NaN/inf
  semantics (a NaN or inf reaches only the windows that read it).
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

from crosslmm_ops import _backend, planner

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
        if (
            not isinstance(temporal_stride, (int, np.integer))
            or isinstance(temporal_stride, bool)
            or temporal_stride < 1
        ):
            raise ValueError(f"temporal_stride must be an int >= 1, got {temporal_stride!r}")
        for name, flag in (
            ("ceil_mode", ceil_mode),
            ("count_include_pad", count_include_pad),
            ("align_corners", align_corners),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if mode in ("avg", "max"):
            if kernel_size is None:
                raise ValueError(f"mode={mode!r} needs kernel_size (e.g. kernel_size=3)")
            if output_size is not None:
                raise ValueError(
                    f"output_size is for the adaptive and bilinear modes, not {mode!r}; "
                    "give kernel_size/stride/padding"
                )
            k = _pair("kernel_size", kernel_size)
            s = _pair("stride", k if stride is None else stride)
            p = _pair("padding", padding, allow_zero=True)
            for axis, length in enumerate((H, W)):
                if 2 * p[axis] > k[axis]:
                    raise ValueError(
                        f"padding must be at most half of kernel_size, got padding={p} for "
                        f"kernel_size={k}"
                    )
                if length + 2 * p[axis] < k[axis]:
                    raise ValueError(
                        f"kernel_size {k} is larger than the padded grid "
                        f"({H + 2 * p[0]}, {W + 2 * p[1]}) (grid {(H, W)}, padding {p})"
                    )
            out = (
                _window_out(H, k[0], s[0], p[0], ceil_mode),
                _window_out(W, k[1], s[1], p[1], ceil_mode),
            )
            return PoolSpec(
                (H, W),
                mode,
                k,
                s,
                p,
                ceil_mode,
                count_include_pad,
                out,
                False,
                int(temporal_stride),
            )
        # adaptive / bilinear: a target grid, no windows.
        if output_size is None:
            raise ValueError(f"mode={mode!r} needs output_size (e.g. output_size=3 for a 3x3 grid)")
        if kernel_size is not None or stride is not None or padding not in (0, (0, 0)):
            raise ValueError(
                f"kernel_size, stride and padding are for the avg and max modes, not {mode!r}"
            )
        out = _pair("output_size", output_size)
        return PoolSpec(
            (H, W),
            mode,
            output_size=out,
            align_corners=align_corners,
            temporal_stride=int(temporal_stride),
        )

    @property
    def tokens_in(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_out(self) -> int:
        return self.output_size[0] * self.output_size[1]

    def frames_out(self, frames_in: int) -> int:
        return -(-frames_in // self.temporal_stride)


def _typed(value):
    """``value`` with the type of every element: Python's ``==`` and hash equate ``6`` and ``6.0``,
    ``0`` and ``False``, so a cache keyed on values alone would hand the spec validated for
    ``grid=(6, 6)`` to ``grid=(6.0, 6.0)`` or ``ceil_mode=0`` without checking them."""
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_typed(v) for v in value)
    return type(value), value


class _SpecArgs:
    """The arguments of one call as a cache key: equal only to the same values of the same types,
    so a hit always means these very arguments were validated."""

    __slots__ = ("args", "key", "_hash")

    def __init__(self, args: tuple):
        self.args = args
        self.key = tuple(_typed(a) for a in args)
        self._hash = hash(self.key)  # TypeError for an unhashable argument

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _SpecArgs) and self.key == other.key


def make_spec(*args) -> PoolSpec:
    """PoolSpec.make, memoised: validation runs once per distinct set of arguments, types
    included (eagerly; torch.compile traces the validation itself, once)."""
    if torch.compiler.is_compiling():
        return PoolSpec.make(*args)
    try:
        key = _SpecArgs(args)
    except TypeError:  # unhashable argument: validate uncached (make raises the clear error)
        return PoolSpec.make(*args)
    return _make_spec_cached(key)


@functools.lru_cache(maxsize=1024)
def _make_spec_cached(key: _SpecArgs) -> PoolSpec:
    return PoolSpec.make(*key.args)


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
    """Per output index, the two (input index, weight) taps of linear interpolation, as
    F.interpolate(mode='bilinear') computes them on the CPU (compute_source_index_and_lambda).
    Both taps are kept even where they read the same index (the last one, or every one when the
    axis keeps its size) or a weight is 0, as torch keeps them: an inf they read then gives
    ``inf * 1 + inf * 0 = NaN`` there, as in torch."""
    taps = []
    for o in range(out):
        if length == out:  # torch's identity case: index o twice, weights 1 and 0
            taps.append([(o, 1.0), (o, 0.0)])
            continue
        if align_corners:
            src = o * (length - 1) / (out - 1) if out > 1 else 0.0
        else:
            src = max((o + 0.5) * length / out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), length - 1)
        i1 = min(i0 + 1, length - 1)
        l1 = src - i0
        taps.append([(i0, 1.0 - l1), (i1, l1)])
    return taps


def _axis_taps(spec: PoolSpec, axis: int) -> list[list[tuple[int, float]]]:
    """Per output index along one grid axis (0: rows, 1: columns), the (input index, weight) pairs
    it reads. Every mode is separable: a 2D window is the product of one range per axis, and its
    weight the product of the two axes' weights (the divisor of ``F.avg_pool2d`` is the product of
    the window's lengths, padding included with ``count_include_pad``)."""
    length, out = spec.grid[axis], spec.output_size[axis]
    if spec.mode == "bilinear":
        return _bilinear_taps(length, out, spec.align_corners)
    k, s, p = spec.kernel_size[axis], spec.stride[axis], spec.padding[axis]
    taps = []
    for o in range(out):
        if spec.mode == "adaptive":
            start, end = (o * length) // out, -(-((o + 1) * length) // out)
            divisor = end - start
        else:
            start = o * s - p
            end = min(start + k, length + p)
            divisor = end - start  # the padded window
            start, end = max(start, 0), min(end, length)
            if not spec.count_include_pad:
                divisor = end - start
        weight = 1.0 if spec.mode == "max" else 1.0 / divisor
        taps.append([(i, weight) for i in range(start, end)])
    return taps


@functools.lru_cache(maxsize=256)
def pool_plan(spec: PoolSpec) -> PoolPlan:
    W = spec.grid[1]
    entries = [
        [(h * W + w, wh * ww) for h, wh in rows for w, ww in cols]
        for rows in _axis_taps(spec, 0)
        for cols in _axis_taps(spec, 1)
    ]
    row_ptr = np.zeros(len(entries) + 1, dtype=np.int32)
    row_ptr[1:] = np.cumsum([len(e) for e in entries])
    col_idx = np.array([i for e in entries for i, _ in e], dtype=np.int32)
    weight = np.array([w for e in entries for _, w in e], dtype=np.float64)
    # Transpose: for each input token, the output tokens that read it (ascending).
    out_of = np.repeat(np.arange(len(entries), dtype=np.int32), np.diff(row_ptr))
    order = np.lexsort((out_of, col_idx))
    t_row_ptr = np.zeros(spec.tokens_in + 1, dtype=np.int32)
    t_row_ptr[1:] = np.cumsum(np.bincount(col_idx, minlength=spec.tokens_in))
    return PoolPlan(row_ptr, col_idx, weight, t_row_ptr, out_of[order], weight[order])


@functools.lru_cache(maxsize=256)
def _plan_tensors(spec: PoolSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """The plan as int32/float32 tensors on ``device`` (cached per device)."""
    plan = pool_plan(spec)
    as_t = functools.partial(torch.as_tensor, device=device)
    return {
        "row_ptr": as_t(plan.row_ptr),
        "col_idx": as_t(plan.col_idx),
        "weight": as_t(plan.weight, dtype=torch.float32),
        "t_row_ptr": as_t(plan.t_row_ptr),
        "t_col_idx": as_t(plan.t_col_idx),
        "t_weight": as_t(plan.t_weight, dtype=torch.float32),
    }


# ----------------------------------------------------------------------------------------------
# The reference (torch back end and test oracle)
# ----------------------------------------------------------------------------------------------


def csr_table(row_ptr: torch.Tensor, col_idx: torch.Tensor, weight: torch.Tensor):
    """The CSR rows as a ``[rows, width]`` table of tokens (-1 = padding) and weights (0 =
    padding), ``width`` the longest row: what the Triton kernel and the reference read."""
    lengths = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = lengths.numel()
    width = max(int(lengths.max().item()) if rows else 1, 1)
    taps = torch.full((rows, width), -1, dtype=col_idx.dtype, device=row_ptr.device)
    table_w = torch.zeros((rows, width), dtype=weight.dtype, device=row_ptr.device)
    row_of = torch.repeat_interleave(torch.arange(rows, device=row_ptr.device), lengths)
    slot = torch.arange(col_idx.numel(), device=row_ptr.device) - row_ptr[:-1].long()[row_of]
    taps[row_of, slot] = col_idx
    table_w[row_of, slot] = weight
    return taps, table_w


@functools.lru_cache(maxsize=256)
def _reference_tables(spec: PoolSpec) -> dict[str, torch.Tensor]:
    """The plan (float64 weights) as ``[width, rows]`` tables, one row per tap slot, for the
    pooling (``taps``, ``weight``: output token -> input tokens) and its transpose (``t_*``).
    A padding tap reads, with weight 0, the row the reference appends after the real ones."""
    plan = pool_plan(spec)
    tables = {}
    for prefix, row_ptr, col_idx, weight, pad in (
        ("", plan.row_ptr, plan.col_idx, plan.weight, spec.tokens_in),
        ("t_", plan.t_row_ptr, plan.t_col_idx, plan.t_weight, spec.tokens_out),
    ):
        taps, w = csr_table(
            torch.as_tensor(row_ptr), torch.as_tensor(col_idx).long(), torch.as_tensor(weight)
        )
        tables[prefix + "taps"] = torch.where(taps < 0, pad, taps).T.contiguous()
        tables[prefix + "weight"] = w.T.contiguous()
    return tables


# The reference computes from the plan the kernels read, one tap slot at a time: slot j selects
# the j-th input token of every output token (whole rows of a token-major matrix, what torch
# selects fastest). Only the windows' own tokens are multiplied, so a NaN or inf reaches only the
# outputs whose windows read it, as in torch's pooling, and memory stays linear in the input (a
# dense [n, N] map would multiply it by the zeros of every other output of the frame, and take
# n*N elements: 16 GB for a 300x300 grid).


def _token_rows(x: torch.Tensor, fill: float) -> torch.Tensor:
    """``x [B, T, N, D]`` as an ``[N + 1, B*T*D]`` matrix (one copy), the last row ``fill``:
    what a padding tap reads."""
    rows = x.permute(2, 0, 1, 3)
    rows = torch.cat([rows, rows.new_full((1, *rows.shape[1:]), fill)])
    return rows.reshape(rows.shape[0], -1)


def _weighted_sum(rows: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[o] = sum_j weight[j, o] * rows[taps[j, o]]``. Differentiable."""
    weight = weight.to(rows.device, rows.dtype)
    taps = taps.to(rows.device)
    out = None
    for j in range(taps.shape[0]):
        term = rows.index_select(0, taps[j]) * weight[j].unsqueeze(1)
        out = term if out is None else out + term
    return out


def _frame_groups(x: torch.Tensor, dim: int, s: int, fill: float) -> torch.Tensor:
    """The frames along ``dim`` in groups of ``s`` (a new dim after it), the last group padded
    with ``fill``."""
    frames = x.shape[dim]
    pad = -(-frames // s) * s - frames
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, fill)], dim)
    return x.unflatten(dim, (-1, s))


def _group_sizes(frames: int, s: int, like: torch.Tensor) -> torch.Tensor:
    """Frames per group of ``s`` (the last may be shorter), in ``like``'s dtype and device."""
    starts = torch.arange(0, frames, s, device=like.device)
    return (torch.clamp(frames - starts, max=s)).to(like.dtype)


def _weighted_reference(x: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """The averaging modes (avg, adaptive, bilinear) of ``x [B, T, N, D]``, then the average of
    each group of frames."""
    B, T, N, D = x.shape
    tables = _reference_tables(spec)
    out = _weighted_sum(_token_rows(x, 0.0), tables["taps"], tables["weight"])
    out = out.view(spec.tokens_out, B, T, D)
    s = spec.temporal_stride
    if s > 1:
        sizes = _group_sizes(T, s, out)
        out = _frame_groups(out, 2, s, 0.0).sum(3) / sizes.view(-1, 1)
    return out.permute(1, 2, 0, 3)


def _weighted_backward(grad: torch.Tensor, spec: PoolSpec, frames_in: int) -> torch.Tensor:
    """The transpose of :func:`_weighted_reference`: ``grad [B, T', n, D]`` -> ``[B, T, N, D]``."""
    B, _, _, D = grad.shape
    g = grad.permute(2, 0, 1, 3)
    s = spec.temporal_stride
    if s > 1:
        g = g / _group_sizes(frames_in, s, g).view(-1, 1)
        g = g.repeat_interleave(s, dim=2)[:, :, :frames_in]
    tables = _reference_tables(spec)
    g = _weighted_sum(_token_rows(g.permute(1, 2, 0, 3), 0.0), tables["t_taps"], tables["t_weight"])
    return g.view(spec.tokens_in, B, frames_in, D).permute(1, 2, 0, 3)


def _first_max(candidates):
    """Over ``(value, index)`` candidates in order: the max and the index of the first one that
    reaches it, NaN beating every number (the kernels' rule)."""
    best = winner = None
    for v, i in candidates:
        if best is None:
            best, winner = v, i.expand_as(v)
            continue
        better = (v > best) | (v.isnan() & ~best.isnan())
        best, winner = torch.where(better, v, best), torch.where(better, i, winner)
    return best, winner


def _max_reference(x: torch.Tensor, spec: PoolSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of ``x [B, T, N, D]``: the pooled tensor and the winner of each element as
    ``frame * N + token``, the first maximum in (frame, tap) order as the kernels scan; padding
    taps read -inf after the window's own, so they never win. The values are gathered at the
    winners, so autograd sends each gradient to its winner."""
    B, T, N, D = x.shape
    s, n = spec.temporal_stride, spec.tokens_out
    with torch.no_grad():
        tables = _reference_tables(spec)
        taps = tables["taps"].to(x.device)
        rows = _token_rows(x, float("-inf"))
        best, token = _first_max(
            (rows.index_select(0, taps[j]), taps[j].unsqueeze(1)) for j in range(taps.shape[0])
        )
        best, token = best.view(n, B, T, D), token.view(n, B, T, D)
        if s > 1:
            groups = _frame_groups(best, 2, s, float("-inf"))  # [n, B, T', s, D]
            tokens = _frame_groups(token, 2, s, 0)
            offsets = torch.arange(s, device=x.device).view(1, 1, 1, s, 1)
            best, pick = _first_max((groups[:, :, :, f], offsets[:, :, :, f]) for f in range(s))
            token = tokens.gather(3, pick.unsqueeze(3)).squeeze(3)
            frame = torch.arange(0, T, s, device=x.device).view(1, 1, -1, 1) + pick
        else:
            frame = torch.arange(T, device=x.device).view(1, 1, T, 1)
        argmax = (frame * N + token).permute(1, 2, 0, 3).contiguous()
        values = best.permute(1, 2, 0, 3)
    if torch.is_grad_enabled() and x.requires_grad:
        values = x.reshape(B, T * N, D).gather(1, argmax.reshape(B, -1, D)).view(argmax.shape)
    return values, argmax.to(torch.int32)


def token_pool_reference(x: torch.Tensor, spec: PoolSpec, *, compute_dtype=None) -> torch.Tensor:
    """Plain-PyTorch token pooling of ``x: [..., T, N, D]`` (as :func:`token_pool`),
    differentiable through autograd.

    Computes in ``compute_dtype`` (default: float32, or float64 for float64 input) and returns
    that dtype; the torch back end casts the result to the input's dtype.
    """
    if not isinstance(spec, PoolSpec):
        raise TypeError(
            f"spec must be a PoolSpec (PoolSpec.make(grid, mode, ...)), got {type(spec).__name__}"
        )
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-3]
    x = x.to(compute_dtype).reshape(-1, *x.shape[-3:])
    out = _max_reference(x, spec)[0] if spec.mode == "max" else _weighted_reference(x, spec)
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
    argmax = (
        _backend.new_output(out_shape, torch.int32, x.device)
        if is_max and need_argmax
        else x.new_empty(0, dtype=torch.int32)
    )
    mix = _mix_function(backend)
    mix(
        x,
        out,
        plan["row_ptr"],
        plan["col_idx"],
        plan["weight"],
        argmax if argmax.numel() else None,
        KIND_MAX_FORWARD if is_max else KIND_WEIGHTED_SUM,
        spec.temporal_stride,
        T,
        N,
        False,
        pool_plan(spec).max_row_len,
    )
    return out, argmax


def _backward_reference(
    grad: torch.Tensor, argmax: torch.Tensor, spec: PoolSpec, in_shape: tuple
) -> torch.Tensor:
    """The torch back end's backward: the transposed pooling map (or the max's winners)."""
    B, frames_in, N, D = in_shape
    cdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if spec.mode == "max":
        grad_x = grad.new_zeros(B, frames_in * N, D, dtype=cdt)
        grad_x.scatter_add_(1, argmax.reshape(B, -1, D).long(), grad.reshape(B, -1, D).to(cdt))
        return grad_x.reshape(in_shape).to(grad.dtype)
    return _weighted_backward(grad.to(cdt), spec, frames_in).to(grad.dtype).contiguous()


def _backward(
    backend: str, grad: torch.Tensor, argmax: torch.Tensor, spec: PoolSpec, frames_in: int
) -> torch.Tensor:
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
    mix(
        grad,
        grad_x,
        plan["t_row_ptr"],
        plan["t_col_idx"],
        plan["t_weight"],
        argmax if is_max else None,
        KIND_MAX_BACKWARD if is_max else KIND_WEIGHTED_SUM,
        spec.temporal_stride,
        frames_in,
        N,
        True,
        pool_plan(spec).t_max_row_len,
    )
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
    return (
        list(spec.grid),
        spec.mode,
        list(spec.kernel_size),
        list(spec.stride),
        list(spec.padding),
        spec.ceil_mode,
        spec.count_include_pad,
        list(spec.output_size),
        spec.align_corners,
        spec.temporal_stride,
    )


def _spec_from_args(
    grid,
    mode,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    output_size,
    align_corners,
    temporal_stride,
) -> PoolSpec:
    return PoolSpec(
        tuple(grid),
        mode,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        ceil_mode,
        count_include_pad,
        tuple(output_size),
        align_corners,
        temporal_stride,
    )


@torch.library.custom_op("crosslmm::token_pool", mutates_args=())
def _token_pool_op(
    x: torch.Tensor,
    grid: list[int],
    mode: str,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
    output_size: list[int],
    align_corners: bool,
    temporal_stride: int,
    need_argmax: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(
        x,
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
        need_argmax,
        backend,
    )


def _forward_impl(
    x,
    grid,
    mode,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    output_size,
    align_corners,
    temporal_stride,
    need_argmax,
    backend,
):
    """The forward custom op's implementation (also the eager function's forward)."""
    spec = _spec_from_args(
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
    )
    out, argmax = _forward(backend, x, spec, need_argmax)
    planner.note(OP_NAME, backend)
    return out, argmax


@_token_pool_op.register_fake
def _(
    x,
    grid,
    mode,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    output_size,
    align_corners,
    temporal_stride,
    need_argmax,
    backend,
):
    B, T, _, D = x.shape
    shape = (B, -(-T // temporal_stride), output_size[0] * output_size[1], D)
    argmax = x.new_empty(shape if (need_argmax and mode == "max") else (0,), dtype=torch.int32)
    return x.new_empty(shape), argmax


@torch.library.custom_op("crosslmm::token_pool_backward", mutates_args=())
def _token_pool_backward_op(
    grad: torch.Tensor,
    argmax: torch.Tensor,
    frames_in: int,
    grid: list[int],
    mode: str,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
    output_size: list[int],
    align_corners: bool,
    temporal_stride: int,
    backend: str,
) -> torch.Tensor:
    return _backward_impl(
        grad,
        argmax,
        frames_in,
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
        backend,
    )


def _backward_impl(
    grad,
    argmax,
    frames_in,
    grid,
    mode,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    output_size,
    align_corners,
    temporal_stride,
    backend,
):
    """The backward custom op's implementation (also the eager function's backward)."""
    spec = _spec_from_args(
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
    )
    grad_x = _backward(backend, grad, argmax, spec, frames_in)
    planner.note(OP_NAME + "_backward", backend)
    return grad_x


@_token_pool_backward_op.register_fake
def _(
    grad,
    argmax,
    frames_in,
    grid,
    mode,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    output_size,
    align_corners,
    temporal_stride,
    backend,
):
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
_TokenPoolFunction = _backend.eager_function(
    "_TokenPoolFunction", _forward_impl, _setup_context, _backward_formula
)


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor, spec: PoolSpec) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"x must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if x.dim() < 3:
        raise ValueError(
            f"x must have shape [..., T, N, D] (at least 3 dims), got {tuple(x.shape)}"
        )
    if any(d == 0 for d in x.shape):
        raise ValueError(f"x must not have empty dimensions, got shape {tuple(x.shape)}")
    if x.shape[-2] != spec.tokens_in:
        raise ValueError(
            f"x has N={x.shape[-2]} tokens per frame (shape {tuple(x.shape)}), but "
            f"grid {spec.grid} needs N = {spec.grid[0]}*{spec.grid[1]} = {spec.tokens_in}"
        )


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
    return _backend_and_reason(backend, device, dtype)[0]


def _backend_and_reason(backend: str | None, device: torch.device, dtype: torch.dtype):
    return planner.choose_backend(
        OP_NAME,
        backend,
        device,
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
    spec = make_spec(
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
    )
    _check_input(x, spec)
    chosen = _choose_backend(backend, x.device, x.dtype)
    lead = x.shape[:-3]
    x4 = x.reshape(-1, *x.shape[-3:])
    need_argmax = spec.mode == "max" and torch.is_grad_enabled() and x.requires_grad
    # In plain eager mode the custom op's autograd.Function twin (no torch.library host cost).
    pool = _TokenPoolFunction.apply if _backend.eager_function_ok(x4) else _token_pool_op
    out, _ = pool(x4, *_spec_args(spec), need_argmax, chosen)
    return out.reshape(*lead, *out.shape[1:])


def plan(
    x,
    grid=(27, 27),
    mode="avg",
    *,
    kernel_size=None,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    output_size=None,
    align_corners=False,
    temporal_stride=1,
    backend=None,
) -> planner.Plan:
    """How :func:`token_pool` would run this call (:func:`crosslmm_ops.explain`)."""
    spec = make_spec(
        grid,
        mode,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        output_size,
        align_corners,
        temporal_stride,
    )
    _check_input(x, spec)
    chosen, reason = _backend_and_reason(backend, x.device, x.dtype)
    kernel = {"cuda": "token_pool_mix", "triton": "triton", "torch": "reference"}[chosen]
    return planner.Plan(OP_NAME, chosen, None, kernel, (reason,))


planner.register(OP_NAME, token_pool, plan)
