"""The ops inside the machinery users put them in (issue #9): deterministic mode, several threads,
autocast, CUDA graph capture, and bounded memory (no op allocates O(Sq·Sk)).

torch.compile(fullgraph=True) is covered next to each op (test_token_pool.py,
test_cross_attention.py).
"""

from __future__ import annotations

import threading

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import cross_attention, token_pool
from crosslmm_ops.testing import fast_backends

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _backends():
    return ["torch", *fast_backends(DEVICE)]


def _attention_step(backend, seed, dtype=torch.float32):
    """Forward + backward of a small varlen problem; returns every result."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(13, 4, 64, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(90, 2, 64, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(90, 2, 64, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    cu_q = torch.tensor([0, 6, 13], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 41, 90], dtype=torch.int32, device=DEVICE)
    out = cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend,
                          deterministic=True)
    out.backward(torch.ones_like(out))
    return [out.detach(), q.grad, k.grad, v.grad]


def _pool_step(backend, seed, dtype=torch.float32):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(2, 3, 81, 24, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    out = token_pool(x, (9, 9), "avg", kernel_size=3, stride=2, padding=1, backend=backend)
    out.backward(torch.ones_like(out))
    return [out.detach(), x.grad]


def _dtype(backend):
    return torch.bfloat16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("backend", _backends())
def test_deterministic_algorithms_mode(backend):
    """Under torch.use_deterministic_algorithms(True) every op runs (no non-deterministic path is
    taken) and gives bitwise-identical results and gradients run after run."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        for step in (_attention_step, _pool_step):
            first = step(backend, 0, _dtype(backend))
            again = step(backend, 0, _dtype(backend))
            for a, b in zip(first, again):
                assert torch.equal(a, b), step.__name__
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend", _backends())
def test_several_threads_at_once(backend):
    """The ops keep no shared mutable state a second thread could corrupt: four threads running
    different problems at once get exactly the single-threaded results."""
    if backend == "triton" and crosslmm_ops._backend.triton_interpreted():
        pytest.skip("Triton's CPU interpreter keeps the launch grid in global state: not thread-safe")
    expected = {seed: (_attention_step(backend, seed, _dtype(backend)),
                       _pool_step(backend, seed, _dtype(backend))) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            for _ in range(2):
                results[seed] = (_attention_step(backend, seed, _dtype(backend)),
                                 _pool_step(backend, seed, _dtype(backend)))
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed, (attn, pool) in expected.items():
        for a, b in zip(attn + pool, results[seed][0] + results[seed][1]):
            assert torch.equal(a, b)


def test_autocast_keeps_the_op_dtype():
    """Inside autocast the ops compute in their inputs' dtype and return it (they are not on
    autocast's lists, so no silent cast happens around them); the following matmul is autocast."""
    device_type = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(2, 4, 81, 32, device=DEVICE)
    q = torch.randn(2, 5, 4, 32, device=DEVICE)
    kv = torch.randn(2, 40, 2, 32, device=DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        pooled = token_pool(x, (9, 9), "avg", kernel_size=3)
        out = cross_attention(q, kv, kv)
        projected = out @ torch.randn(32, 8, device=DEVICE)
    assert pooled.dtype == torch.float32 and out.dtype == torch.float32
    assert projected.dtype == torch.bfloat16
    torch.testing.assert_close(pooled, token_pool(x, (9, 9), "avg", kernel_size=3))
    torch.testing.assert_close(out, cross_attention(q, kv, kv))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(backend):
    """Both ops can be captured in a CUDA graph (max_seqlen given, so no host read of cu_seqlens
    happens during capture) and replay on new data in the captured buffers."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(13, 4, 64, device="cuda", dtype=dtype)
    k = torch.randn(90, 2, 64, device="cuda", dtype=dtype)
    v = torch.randn(90, 2, 64, device="cuda", dtype=dtype)
    x = torch.randn(2, 3, 729, 64, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0, 6, 13], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 41, 90], dtype=torch.int32, device="cuda")

    def run():
        attn = cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7,
                               max_seqlen_k=49, backend=backend)
        return attn, token_pool(x, (27, 27), "avg", kernel_size=3, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles Triton kernels, caches pooling plans
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for t in (q, k, v, x):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run()):
        assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_peak_memory_is_bounded_by_the_inputs(backend):
    """No O(Sq·Sk) buffer: at V2V T=32 scale (288 queries x 23,328 keys x 12 heads the score
    matrix would be 161 MB in bf16) the extra memory of forward and backward stays within a small
    multiple of the inputs' own size; token pooling allocates its output and little else."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(1, 288, 12, 128, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, 23328, 2, 128, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, 23328, 2, 128, device="cuda", dtype=dtype, requires_grad=True)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    scores = 288 * 23328 * 12 * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = cross_attention(q, k, v, backend=backend)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out + dout + dq/dk/dv (= 2x inputs) + split-KV scratch and lse: well under 4x the inputs.
    assert extra < 4 * inputs, (extra, inputs)
    assert extra < scores / 2, (extra, scores)
    assert crosslmm_ops.last_backend("cross_attention") == backend

    x = torch.randn(64, 729, 1152, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pooled = token_pool(x, (27, 27), "avg", kernel_size=3, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    output = pooled.numel() * pooled.element_size()
    assert extra < output + (1 << 20), (extra, output)
