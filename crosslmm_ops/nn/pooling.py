"""TokenPooling: :func:`crosslmm_ops.token_pool` as a module (no parameters)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crosslmm_ops.ops.token_pool import make_spec, token_pool


class TokenPooling(nn.Module):
    """Pool each frame's token grid of token-major ``x: [..., T, N, D]`` to ``[..., T', n, D]``.

    The arguments are :func:`crosslmm_ops.token_pool`'s, validated here once: ``mode="avg"`` /
    ``"max"`` take ``kernel_size`` (``stride`` defaults to it), ``"adaptive"`` / ``"bilinear"``
    take ``output_size`` (``output_grid`` is accepted as another name for it). The paper's 3x3
    windows on SigLIP's 27x27 grid: ``TokenPooling((27, 27), "avg", kernel_size=3)`` (81 tokens per
    frame); down to 9 tokens: ``TokenPooling((27, 27), "adaptive", output_size=3)``.
    """

    def __init__(
        self,
        grid: int | Sequence[int] = (27, 27),
        mode: str = "avg",
        *,
        kernel_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        output_size: int | Sequence[int] | None = None,
        output_grid: int | Sequence[int] | None = None,
        align_corners: bool = False,
        temporal_stride: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        if output_grid is not None:
            if output_size is not None:
                raise ValueError("give output_size or output_grid (the same thing), not both")
            output_size = output_grid
        # Validate now, so that a bad configuration fails when the model is built.
        self.spec = make_spec(
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
        self._kwargs = dict(
            grid=grid,
            mode=mode,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad,
            output_size=output_size,
            align_corners=align_corners,
            temporal_stride=temporal_stride,
        )
        self.backend = backend

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid

    @property
    def output_grid(self) -> tuple[int, int]:
        """The pooled grid ``(h, w)``."""
        return self.spec.output_size

    @property
    def tokens_in(self) -> int:
        """``N``: tokens per input frame."""
        return self.spec.tokens_in

    @property
    def tokens_out(self) -> int:
        """``n``: pooled tokens per output frame (``VisionMemory``'s ``pooled_per_frame``)."""
        return self.spec.tokens_out

    @property
    def temporal_stride(self) -> int:
        return self.spec.temporal_stride

    def frames_out(self, frames_in: int) -> int:
        """``T' = ceil(T / temporal_stride)``."""
        return self.spec.frames_out(frames_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_pool(x, **self._kwargs, backend=self.backend)

    @property
    def arguments(self) -> dict:
        """The pooling arguments this module was built with (``TokenPooling(**arguments)``
        rebuilds it; ``backend`` is not among them)."""
        return dict(self._kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"grid={s.grid}", f"mode={s.mode!r}"]
        if s.mode in ("avg", "max"):
            parts += [f"kernel_size={s.kernel_size}", f"stride={s.stride}"]
            if s.padding != (0, 0):
                parts.append(f"padding={s.padding}")
            if s.ceil_mode:
                parts.append("ceil_mode=True")
        parts.append(f"output_grid={s.output_size}")
        if s.temporal_stride != 1:
            parts.append(f"temporal_stride={s.temporal_stride}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
