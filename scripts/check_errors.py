"""A failed check inside the extension must surface as a Python RuntimeError (not a crash):
calls each entry point of crosslmm_ops._C with an argument its own checks reject."""

import faulthandler

import torch

from crosslmm_ops import _backend, planner

faulthandler.enable()
ext = _backend.extension()
assert ext is not None, _backend.extension_import_error()
x = torch.randn(2, 3, 9, 8, device="cuda")
bad_row_ptr = torch.zeros(5, dtype=torch.int32, device="cuda")  # dst has 1 token: needs 2 entries
try:
    ext.token_pool_mix(
        x,
        torch.empty(2, 3, 1, 8, device="cuda"),
        bad_row_ptr,
        torch.zeros(9, dtype=torch.int32, device="cuda"),
        torch.zeros(9, device="cuda"),
        None,
        0,
        1,
        3,
        9,
        False,
        9,
    )
    raise SystemExit("token_pool_mix accepted a bad row_ptr")
except RuntimeError as e:
    print("token_pool_mix: RuntimeError:", str(e).splitlines()[0][:120])
if hasattr(ext, "attention_forward"):
    q = torch.randn(9, 4, 96, device="cuda", dtype=torch.half)  # head dim 96: not compiled
    kv = torch.randn(9, 2, 96, device="cuda", dtype=torch.half)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")
    kernel, _ = planner.attention_kernel(q.device, q.shape[-1], 5, 0.1)  # as the op asks
    try:
        ext.attention_forward(
            q,
            kv,
            kv,
            torch.empty_like(q),
            torch.empty(4, 9, device="cuda"),
            cu,
            cu,
            5,
            5,
            0.1,
            0,
            kernel=kernel,
        )
        raise SystemExit("attention_forward accepted head dim 96")
    except RuntimeError as e:
        print("attention_forward: RuntimeError:", str(e).splitlines()[0][:120])
print("check_errors: ok")
