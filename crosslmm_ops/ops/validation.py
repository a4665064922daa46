"""The argument checks several ops (and the modules and sharded ops built on them) share.

Each raises the user-facing error (``TypeError`` / ``ValueError``) naming the argument. The packed
(varlen) layout's ``cu_seqlens`` / ``max_seqlen`` are checked here for every op that takes them.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections import OrderedDict

import torch
from torch._subclasses.fake_tensor import FakeTensor


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value, device: torch.device) -> torch.Tensor:
    """A floating tensor on ``device`` (q's)."""
    t = tensor(name, value)
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t


def positive_int(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def num_splits(value) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = heuristic), got {value!r}")
    return value


def softmax_scale(value, head_dim: int) -> float:
    """``value`` as a float, ``1 / sqrt(head_dim)`` when ``None``."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if type(value) is float and math.isfinite(value):
        return value  # the common case, without the numbers.Real check (host time)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"softmax_scale must be a finite number, got {value!r}")
    return float(value)


def eps(name: str, value) -> None:
    """A norm's epsilon: NaN, infinite or negative would turn every token's statistics to NaN."""
    if type(value) is float and math.isfinite(value) and value >= 0:
        return  # the common case, without the numbers.Real check (host time)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The packed (varlen) layout
# ----------------------------------------------------------------------------------------------


def shapes_only(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` computes shapes only: a meta tensor, or a fake tensor outside
    torch.compile (whose graph launches the kernels later). Such a call runs the custom ops' fake
    kernels, and ``t`` has no values to read."""
    return (t.is_meta or isinstance(t, FakeTensor)) and not torch.compiler.is_compiling()


def checking_values(cu_seqlens: torch.Tensor) -> bool:
    """Whether to read cu_seqlens back to the host to check them. Skipped while torch.compile
    traces or a CUDA graph captures (both forbid the host read; the caller vouches for them), and
    for meta and fake tensors (no values)."""
    if torch.compiler.is_compiling() or shapes_only(cu_seqlens):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def reference_host_values(op: str, *tensors: torch.Tensor) -> list[list[int]]:
    """The values of ``tensors`` (cu_seqlens) read to the host for a reference (torch back end)
    computation, which loops over segments in Python. A CUDA graph cannot capture that read, so a
    capture raises here, naming the way out, instead of failing inside torch."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{op}: the torch back end reads cu_seqlens on the host, which a CUDA graph cannot "
            "capture; use backend='cuda' or 'triton' inside a captured region"
        )
    return [t.tolist() for t in tensors]


def cu_seqlens(name: str, cu, device: torch.device) -> None:
    cu = tensor(name, cu)
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor (as in flash-attn), got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def cu_values(name: str, values: list[int], total: int) -> list[int]:
    """The segment lengths of valid cu_seqlens ``values``."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(
            f"{name} must end at the number of packed tokens {total}, got {values[-1]}"
        )
    return lengths


def max_seqlen(name: str, given, lengths: list[int] | None, total: int, only_shapes: bool) -> int:
    """``given`` (an upper bound of the segment lengths), else the longest segment; never more
    than ``total``, the packed tokens."""
    if given is not None and (
        not isinstance(given, numbers.Integral) or isinstance(given, bool) or given < 0
    ):
        raise ValueError(f"{name} must be an int >= 0, got {given!r}")
    if lengths is None:
        if given is None:
            if only_shapes:  # no kernel is launched: the loosest bound will do
                return total
            raise ValueError(
                f"{name} must be given when cu_seqlens cannot be read (torch.compile, "
                "CUDA graph capture)"
            )
        return min(given, total)
    actual = max(lengths, default=0)
    if given is not None and given < actual:
        raise ValueError(f"{name}={given} is smaller than the longest segment ({actual})")
    # A larger max_seqlen is a valid upper bound (flash-attn callers pass one); no segment is
    # longer than all the tokens.
    return actual if given is None else min(given, total)


# Segment lengths of cu_seqlens pairs already read and checked, so that a pair reused call after
# call (every DCAL layer of a forward, a benchmark loop) costs one host read, not one per call: a
# host read waits for the GPU to drain, and the GPU then idles while the host prepares the next
# launch. An entry is valid while both tensors are alive and unmodified: it holds weak references
# (an id is reused only after its object dies) and the version counters that every in-place write
# to the tensors or to any view of their storage bumps.
_VALIDATED: OrderedDict[tuple, tuple] = OrderedDict()
_VALIDATED_MAX = 64


def _versions(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """Both tensors' version counters, or None where there are none (inference tensors)."""
    try:
        return cu_q._version, cu_k._version
    except RuntimeError:
        return None


def _segment_lengths(cu_q: torch.Tensor, cu_k: torch.Tensor, batch, total_q, total_k):
    key = (id(cu_q), id(cu_k), total_q, total_k)
    versions = _versions(cu_q, cu_k)
    hit = _VALIDATED.get(key)
    if hit is not None and versions is not None:
        ref_q, ref_k, seen, lengths = hit
        if ref_q() is cu_q and ref_k() is cu_k and seen == versions:
            _VALIDATED.move_to_end(key)
            return lengths
    values = torch.cat([cu_q, cu_k]).tolist()  # one host read (a device sync on the GPU)
    lengths = (
        tuple(cu_values("cu_seqlens_q", values[: batch + 1], total_q)),
        tuple(cu_values("cu_seqlens_k", values[batch + 1 :], total_k)),
    )
    if versions is not None:
        try:
            refs = (weakref.ref(cu_q), weakref.ref(cu_k))
        except TypeError:  # a tensor type without weak references: read it every call
            return lengths
        _VALIDATED[key] = (*refs, versions, lengths)
        if len(_VALIDATED) > _VALIDATED_MAX:
            _VALIDATED.popitem(last=False)
    return lengths


def packed(
    cu_seqlens_q,
    cu_seqlens_k,
    total_q: int,
    total_k: int,
    max_seqlen_q,
    max_seqlen_k,
    device: torch.device,
):
    """The packed layout's ``cu_seqlens`` and ``max_seqlen``, validated (shared by every op that
    takes them): ``(batch, lens_q, lens_k, max_seqlen_q, max_seqlen_k)``, the segment lengths
    ``None`` where the values cannot be read (see :func:`checking_values`)."""
    cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
    cu_seqlens("cu_seqlens_k", cu_seqlens_k, device)
    batch = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
            f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    lens_q = lens_k = None
    if checking_values(cu_seqlens_q):
        lens_q, lens_k = _segment_lengths(cu_seqlens_q, cu_seqlens_k, batch, total_q, total_k)
    only_shapes = shapes_only(cu_seqlens_q)
    return (
        batch,
        lens_q,
        lens_k,
        max_seqlen("max_seqlen_q", max_seqlen_q, lens_q, total_q, only_shapes),
        max_seqlen("max_seqlen_k", max_seqlen_k, lens_k, total_k, only_shapes),
    )
