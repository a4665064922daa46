"""Diagnostics: does a C++ exception thrown from an extension reach Python on this machine?"""
import faulthandler, sys
faulthandler.enable()
import torch
from torch.utils.cpp_extension import load_inline

try:
    torch.empty(2, device="cuda").view(3)
except RuntimeError as e:
    print("torch's own throw: ok")
mod = load_inline("diag_throw", cpp_sources="""
#include <torch/extension.h>
void boom(const at::Tensor& t) { TORCH_CHECK(t.dim() == 7, "boom: dim must be 7, got ", t.dim()); }
""", functions=["boom"], verbose=False, extra_cflags=["-O2"])
try:
    mod.boom(torch.empty(2))
except RuntimeError as e:
    print("load_inline extension throw: ok:", str(e).splitlines()[0])
sys.stdout.flush()
