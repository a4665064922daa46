"""Compiling Triton kernels for a GPU on a machine without one (tests' helper).

The CPU tests run the Triton kernels in Triton's interpreter, which executes a kernel's Python
code with numpy: it accepts code that Triton's compiler rejects (``.to()`` on an argument that a
launch specialised to a constant, for one) and never specialises integer arguments of value 1 to
constants, as a launch on a GPU does. :func:`record_launches` records the signature of every
launch the interpreter runs, as a GPU launch would specialise it; :func:`compile_for_gpu` compiles
such signatures with Triton's own compiler and ptxas for an H100 (sm_90a). The compiler runs in a
fresh process without ``TRITON_INTERPRET`` (in the interpreter's process its language functions
are not the compiler's)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import subprocess
import sys
from typing import Iterator

import torch

_POINTER = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def signature(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """``(types, constants, options)`` of one launch of ``kernel`` (a ``JITFunction``), as a GPU
    launch specialises it: constexpr parameters, ``None`` and integers equal to 1 are constants."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    types, constants = {}, {}
    for param in kernel.params:
        value = bound.get(param.name, param.default)
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            types[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[param.name] = "*" + _POINTER[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} of type {type(value)}")
    return types, constants, options


@contextlib.contextmanager
def record_launches() -> Iterator[dict]:
    """Inside the block, every launch of a Triton kernel in the interpreter is recorded once per
    distinct signature: ``{key: (module, kernel name, types, constants, options)}``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: dict = {}
    compiled_form: dict = {}  # kernel function -> its JITFunction (parsing it once)
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if self.fn not in compiled_form:
            compiled_form[self.fn] = JITFunction(self.fn)
        types, constants, options = signature(compiled_form[self.fn], args, kwargs)
        spec = (self.fn.__module__, self.fn.__name__, types, constants, options)
        seen.setdefault(repr(spec), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def gpu_launch_options(*modules) -> Iterator[None]:
    """Inside the block, the launchers of ``modules`` (crosslmm_ops.triton.*) pick the launch
    options a GPU gets (warps, pipeline stages), not the interpreter's (one warp, one stage)."""
    saved = [module.triton_interpreted for module in modules]
    for module in modules:
        module.triton_interpreted = lambda: False
    try:
        yield
    finally:
        for module, value in zip(modules, saved):
            module.triton_interpreted = value


# An H100's shared memory for one block (227 KB, what a kernel can opt in to), and an A100's.
H100_SHARED_MEMORY = 232448
A100_SHARED_MEMORY = 166912

_WORKER = """
import importlib, pickle, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
target = GPUTarget("cuda", 90, 32)
results = []
for module, name, types, constants, options in pickle.load(sys.stdin.buffer):
    kernel = getattr(importlib.import_module(module), name)
    try:
        source = ASTSource(kernel, types, constants)
        compiled = triton.compile(source, target=target, options=options)
        results.append((None, compiled.metadata.shared))
    except Exception as error:
        lines = [line for line in str(error).splitlines() if line.strip()][-3:]
        results.append((f"{type(error).__name__}: " + " | ".join(lines), None))
pickle.dump(results, sys.stdout.buffer)
"""


def compile_for_gpu(specs, processes: int = 2, timeout: float = 900) -> list[tuple]:
    """Compiles each ``(module, kernel name, types, constants, options)`` for sm_90a in fresh
    processes (``processes`` at once, each a share of ``specs``): ``(error, shared memory
    bytes)`` for each, in order, one of the two ``None``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    specs = list(specs)
    n = max(1, min(processes, len(specs)))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(n)
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outputs = list(
                pool.map(
                    lambda i: workers[i].communicate(pickle.dumps(specs[i::n]), timeout=timeout),
                    range(n),
                )
            )
    finally:
        for worker in workers:
            worker.kill()
    results = [None] * len(specs)
    for i, (worker, (out, err)) in enumerate(zip(workers, outputs)):
        if worker.returncode != 0:
            raise RuntimeError(f"a compiler process failed:\n{err.decode()[-3000:]}")
        results[i::n] = pickle.loads(out)
    return results


def compile_failures(specs) -> list[str]:
    """One line for each spec that does not compile for sm_90a or needs more shared memory than
    an H100 gives a block."""
    failures = []
    for (_, name, types, _, options), (error, shared) in zip(specs, compile_for_gpu(specs)):
        if error is not None:
            failures.append(f"{name} {types} {options}: {error}")
        elif shared > H100_SHARED_MEMORY:
            failures.append(
                f"{name} {types} {options}: {shared} bytes of shared memory, more than an "
                f"H100 gives a block ({H100_SHARED_MEMORY})"
            )
    return failures


def with_bf16_twins(specs) -> list:
    """``specs`` and, for each one with float16 pointers, the same with bfloat16 ones (the
    interpreter cannot run bfloat16 dots, so the CPU tests launch float16)."""
    out = []
    for module, name, types, constants, options in specs:
        out.append((module, name, types, constants, options))
        if "*fp16" in types.values():
            twin = {n: "*bf16" if t == "*fp16" else t for n, t in types.items()}
            out.append((module, name, twin, constants, options))
    return out
