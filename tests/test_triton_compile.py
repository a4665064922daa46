"""Every Triton kernel of the package compiled for an H100 (sm_90a) on a machine without a GPU.

The kernels are launched through the public ops on small shapes (float16 and float32, head dims
40, 64 and 128, token widths 40 and 1152) in the interpreter, with the launch configurations a
GPU gets (warps, pipeline stages), each distinct launch signature is recorded, and each is
compiled by Triton's compiler and ptxas, in float16 and bfloat16 where it ran in float16
(tests/triton_compile.py says why the interpreter alone is not enough), and must fit an H100's
shared memory. Whether the kernels are right and fast is for the GPU tests; this catches what
would not build or launch there."""

from __future__ import annotations

import pytest
import torch
from triton_compile import (
    A100_SHARED_MEMORY,
    H100_SHARED_MEMORY,
    compile_failures,
    compile_for_gpu,
    gpu_launch_options,
    record_launches,
    with_bf16_twins,
)

import crosslmm_ops
from crosslmm_ops.ops.projected_attention import projected_attention_core
from crosslmm_ops.testing import cu_seqlens

pytest.importorskip("triton")
if not crosslmm_ops._backend.triton_runnable(torch.device("cpu"))[0]:
    pytest.skip(
        "needs TRITON_INTERPRET=1 (launches are recorded in the interpreter)",
        allow_module_level=True,
    )


def exercise() -> None:
    """The public ops on small shapes, forward and backward, on the Triton back end."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

        # cross_attention: batched GQA with the LSE and its gradient, and the gated epilogue
        q, k, v = randn(2, 5, 4, 64), randn(2, 300, 2, 64), randn(2, 300, 2, 64)
        out, lse = crosslmm_ops.cross_attention(q, k, v, return_lse=True, backend="triton")
        (out.float().sum() + lse.sum()).backward()
        gate, residual = randn(4), randn(2, 5, 4, 64)
        out = crosslmm_ops.cross_attention(
            q, k, v, gate=gate, residual=residual, num_splits=3, backend="triton"
        )
        out.float().sum().backward()
        # packed segments, split keys (the backward's dq too), head dim 40
        lens_q, lens_k = [3, 0, 2], [200, 5, 0]
        q, k, v = randn(5, 2, 40), randn(205, 1, 40), randn(205, 1, 40)
        out = crosslmm_ops.cross_attention(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens(lens_q),
            cu_seqlens_k=cu_seqlens(lens_k),
            num_splits=2,
            deterministic=True,
            backend="triton",
        )
        out.float().sum().backward()
        # CrossLMM-2B's head dim, GQA 12 / 2
        q, k, v = randn(1, 9, 12, 128), randn(1, 70, 2, 128), randn(1, 70, 2, 128)
        crosslmm_ops.cross_attention(q, k, v, backend="triton").float().sum().backward()
        # the projection-fused core at SigLIP's width 1152 (a decode row of 6 heads)
        q, x = randn(1, 6, 1152), randn(40, 1152)
        out = projected_attention_core(
            q,
            x,
            cu_seqlens_q=cu_seqlens([1]),
            cu_seqlens_k=cu_seqlens([40]),
            backend="triton",
        )
        out.float().sum().backward()
        # the projection-fused core, with and without key splits
        q, x = randn(4, 6, 40), randn(320, 40)  # 6 query heads
        for splits in (1, 3):
            out, lse = projected_attention_core(
                q,
                x,
                cu_seqlens_q=cu_seqlens([1, 3]),
                cu_seqlens_k=cu_seqlens([300, 20]),
                num_splits=splits,
                return_lse=True,
                backend="triton",
            )
            (out.float().sum() + lse.sum()).backward()
        # token_pool, every mode
        x = randn(1, 4, 36, 24)
        for mode, extra in (
            ("avg", dict(kernel_size=3)),
            ("max", dict(kernel_size=3, temporal_stride=2)),
            ("adaptive", dict(output_size=1)),
            ("bilinear", dict(output_size=4)),
        ):
            out = crosslmm_ops.token_pool(x, (6, 6), mode, backend="triton", **extra)
            out.float().sum().backward()


@pytest.fixture(scope="module")
def launches():
    import crosslmm_ops.triton.cross_attention as attention
    import crosslmm_ops.triton.projected_attention as projected
    import crosslmm_ops.triton.token_pool as pool

    with gpu_launch_options(attention, projected, pool), record_launches() as seen:
        exercise()
    return list(seen.values())


def test_every_kernel_is_launched(launches):
    """The exercise reaches every Triton kernel of the package (a new one needs a call above)."""
    from triton.runtime.interpreter import InterpretedFunction

    import crosslmm_ops.triton.cross_attention as attention
    import crosslmm_ops.triton.projected_attention as projected
    import crosslmm_ops.triton.token_pool as pool

    kernels = {
        name
        for module in (attention, projected, pool)
        for name, value in vars(module).items()
        if isinstance(value, InterpretedFunction) and name.endswith("_kernel")
    }
    launched = {name for _, name, *_ in launches}
    assert kernels <= launched, f"never launched: {sorted(kernels - launched)}"


def test_kernels_compile_for_sm90(launches):
    specs = with_bf16_twins(launches)
    failures = compile_failures(specs)
    assert not failures, f"{len(failures)} of {len(specs)} failed:\n" + "\n".join(failures)


def test_projected_core_shared_memory_estimate():
    """The projected core's shared-memory estimate (what decides whether its Triton kernels can
    run on a GPU, crosslmm_ops.ops.projected_attention.triton_shared_memory_ok) is at least what
    Triton's compiler reports for each of its kernels, and decides as the compiled sizes do on an
    H100 and an A100, at the widths on either side of each decision (the padded widths DV_HI +
    DV_LO 768 / 1040 in float32 on an A100, 1152 / 1280 on an H100; 1536 / 2064 in float16 on
    an A100). Every width bucket from 512 agreed when the estimate was written."""
    import crosslmm_ops.triton.projected_attention as projected

    widths = (768, 1024, 1152, 1280, 1536, 2048)
    kernel_names = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dx_kernel")
    cases, specs = [], []
    for dv in widths:
        for dtype in (torch.float16, torch.float32):
            with gpu_launch_options(projected), record_launches() as seen:
                q = torch.randn(2, 6, dv, dtype=dtype, requires_grad=True)
                x = torch.randn(40, dv, dtype=dtype, requires_grad=True)
                out = projected_attention_core(
                    q,
                    x,
                    cu_seqlens_q=cu_seqlens([2]),
                    cu_seqlens_k=cu_seqlens([40]),
                    backend="triton",
                )
                out.float().sum().backward()
            kernels = [s for s in seen.values() if s[1] in kernel_names]
            assert len(kernels) == len(kernel_names)
            cases.append((dv, dtype))
            specs += kernels
    results = iter(compile_for_gpu(specs))
    wrong = []
    for dv, dtype in cases:
        compiled = [next(results) for _ in kernel_names]
        assert all(error is None for error, _ in compiled), compiled
        need = max(shared for _, shared in compiled)
        estimate = projected.shared_memory_bytes(dv, dtype)
        for capacity in (H100_SHARED_MEMORY, A100_SHARED_MEMORY):
            if need > estimate or (need <= capacity) != (estimate <= capacity):
                wrong.append(f"width {dv} {dtype}: compiled {need}, estimated {estimate}")
    assert not wrong, "\n".join(sorted(set(wrong)))
