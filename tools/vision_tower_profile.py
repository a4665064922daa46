"""Where the vision tower's time goes (issue 20, item 5): crosslmm-2b's SigLIP so400m/14@384
(27 layers, width 1152, MLP 4304, 16 heads of 72, 729 tokens per frame), random weights, bf16,
one chunk of frames at a time as the model encodes them.

For each variant (SDPA back end, torch.compile and its mode, GELU fused into the MLP's first
matmul) and chunk size: the median time per frame (``triton.testing.do_bench``), the achieved
TFLOP/s, counting the matmuls (patch embedding, q/k/v/o, MLP) and attention (4·N²·width per
layer) at 2 FLOPs per multiply-add, and the relative error of the output against the eager tower
(a variant must compute the same function). For every variant that does not force an SDPA back
end, the kernels one chunk launches (torch.profiler), so the matmuls' share and the rest (norms,
GELU, attention, gaps) are visible.

    python tools/vision_tower_profile.py [--chunks 8 16 32] [--variants ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from crosslmm_ops.models.configuration import preset_config
from crosslmm_ops.models.vision import fuse_gelu_epilogues


def tower_flops_per_frame(vc) -> float:
    n = (vc.image_size // vc.patch_size) ** 2
    d, m = vc.hidden_size, vc.intermediate_size
    patch = 2 * n * (3 * vc.patch_size**2) * d
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    return patch + vc.num_hidden_layers * per_layer


def build_tower():
    """crosslmm-2b's SigLIP tower on the GPU, bf16, attention through SDPA (a variant switches
    the implementation on the shared config)."""
    from transformers import SiglipVisionModel

    vc = preset_config("crosslmm-2b").vision_config
    vc._attn_implementation = "sdpa"
    with torch.device("cuda"):  # random init on the GPU: seconds, not the CPU's minute
        tower = SiglipVisionModel(vc).to(torch.bfloat16).eval()
    return tower, vc


def kernel_table(fn, top=14) -> list[dict]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name == "CUDA":
            entry = by_name[event.name]
            entry[0] += event.device_time_total if hasattr(event, "device_time_total") else 0.0
            entry[1] += 1
    total = sum(v[0] for v in by_name.values()) or 1.0
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        dict(kernel=name[:110], us=round(us, 1), calls=calls, share=round(us / total, 3))
        for name, (us, calls) in rows
    ] + [dict(kernel="(all kernels)", us=round(total, 1))]


# name: (label, SDPA back end or None for torch's choice, torch.compile kwargs or None for eager,
# the fusions applied to the tower ("gelu": the MLP's first matmul with GELU in its cuBLASLt
# epilogue, as vision_compile does; "qkv": q, k and v as one matmul), the attention implementation)
VARIANTS = {
    "eager": ("eager, sdpa (torch's choice)", None, None, (), "sdpa"),
    "eager-cudnn": ("eager, sdpa cuDNN", SDPBackend.CUDNN_ATTENTION, None, (), "sdpa"),
    "eager-flash": ("eager, sdpa flash", SDPBackend.FLASH_ATTENTION, None, (), "sdpa"),
    "eager-efficient": (
        "eager, sdpa efficient",
        SDPBackend.EFFICIENT_ATTENTION,
        None,
        (),
        "sdpa",
    ),
    "eager-fa4": ("eager, FlashAttention-4", None, None, (), "fa4"),
    "eager-crosslmm": ("eager, crosslmm_ops.cross_attention", None, None, (), "crosslmm"),
    "eager-gelu-epilogue": ("eager, GELU in fc1's epilogue", None, None, ("gelu",), "sdpa"),
    "compile": ("torch.compile, sdpa (torch's choice)", None, {}, (), "sdpa"),
    "compile-gelu-epilogue": ("torch.compile, GELU in fc1's epilogue", None, {}, ("gelu",), "sdpa"),
    "compile-reduce-overhead": (
        "torch.compile mode=reduce-overhead",
        None,
        {"mode": "reduce-overhead"},
        (),
        "sdpa",
    ),
    "compile-gelu-epilogue-reduce-overhead": (
        "torch.compile mode=reduce-overhead, GELU in fc1's epilogue",
        None,
        {"mode": "reduce-overhead"},
        ("gelu",),
        "sdpa",
    ),
    "compile-gelu-epilogue-fa4": (
        "torch.compile, GELU in fc1's epilogue, FlashAttention-4",
        None,
        {},
        ("gelu",),
        "fa4",
    ),
    "compile-gelu-epilogue-crosslmm": (
        "torch.compile, GELU in fc1's epilogue, crosslmm_ops.cross_attention",
        None,
        {},
        ("gelu",),
        "crosslmm",
    ),
    "compile-gelu-epilogue-fused-qkv": (
        "torch.compile, GELU in fc1's epilogue, q/k/v as one matmul",
        None,
        {},
        ("gelu", "qkv"),
        "sdpa",
    ),
    "compile-max-autotune": (
        "torch.compile mode=max-autotune-no-cudagraphs",
        None,
        {"mode": "max-autotune-no-cudagraphs"},
        (),
        "sdpa",
    ),
}
DEFAULT_VARIANTS = ["eager", "compile", "compile-gelu-epilogue"]


@torch.library.custom_op("crosslmm_tools::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention-4's forward on ``(B, S, H, D)`` tensors (head dim 72 runs on sm90: FA4
    takes any multiple of 8 up to 256 there), as a custom op so that torch.compile calls it
    whole instead of tracing into the CuTe DSL."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale)[0]


@fa4_attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fa4_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' attention interface over FlashAttention-4 (``flash_attn.cute``):
    ``(B, H, S, D)`` in, ``(B, S, H, D)`` out."""
    assert attention_mask is None, "the vision tower's attention has no mask"
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    return fa4_attention(q, k, v, scale), None


def _crosslmm_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The same over ``crosslmm_ops.cross_attention`` (``auto`` back end: head dim 72 runs on
    Triton)."""
    import crosslmm_ops

    assert attention_mask is None, "the vision tower's attention has no mask"
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return crosslmm_ops.cross_attention(q, k, v, softmax_scale=scaling), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("fa4", _fa4_attention)
    AttentionInterface.register("crosslmm", _crosslmm_attention)


def fuse_qkv(tower) -> None:
    """Each attention layer's q, k and v projections as one matmul over weights concatenated once
    (inference only: the copy does not follow later changes of the weights), then the layer's
    own attention implementation and output projection, as transformers' SiglipAttention does."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.siglip.modeling_siglip import eager_attention_forward

    for module in tower.modules():
        if type(module).__name__ != "SiglipAttention":
            continue
        projections = (module.q_proj, module.k_proj, module.v_proj)
        module.register_buffer("qkv_weight", torch.cat([m.weight.detach() for m in projections]))
        module.register_buffer("qkv_bias", torch.cat([m.bias.detach() for m in projections]))

        def forward(hidden_states, attention_mask=None, attn=module, **kwargs):
            shape = hidden_states.shape[:-1]
            qkv = torch.nn.functional.linear(hidden_states, attn.qkv_weight, attn.qkv_bias)
            qkv = qkv.view(*shape, 3, -1, attn.head_dim)
            q, k, v = (qkv[..., i, :, :].transpose(1, 2) for i in range(3))
            impl = attn.config._attn_implementation
            attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
            out, weights = attend(
                attn, q, k, v, attention_mask, is_causal=False, scaling=attn.scale, dropout=0.0
            )
            return attn.out_proj(out.reshape(*shape, -1).contiguous()), weights

        module.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--table-chunk", type=int, default=16, help="chunk of the kernel tables")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        choices=list(VARIANTS),
        help=f"default: {' '.join(DEFAULT_VARIANTS)}",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = dict(
        env=dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            cudnn=torch.backends.cudnn.version(),
        ),
        rows=[],
    )
    register_attention()
    base, vc = build_tower()
    flops = tower_flops_per_frame(vc)
    towers = {(): base}  # the tower with each set of fusions, made once
    inputs, reference = {}, {}  # chunk -> pixels, and the eager tower's output for them
    with torch.no_grad():
        for chunk in args.chunks:
            g = torch.Generator(device="cuda").manual_seed(chunk)
            inputs[chunk] = torch.randn(
                chunk, 3, vc.image_size, vc.image_size, device="cuda", generator=g
            ).to(torch.bfloat16)
            reference[chunk] = base(pixel_values=inputs[chunk]).last_hidden_state.float()
    for name in args.variants:
        label, backend, compile_kwargs, fusions, attention = VARIANTS[name]
        if fusions not in towers:
            towers[fusions] = copy.deepcopy(base)
            if "gelu" in fusions:
                fuse_gelu_epilogues(towers[fusions])  # what vision_compile does to the tower
            if "qkv" in fusions:
                fuse_qkv(towers[fusions])
        tower = towers[fusions]
        # Every layer reads the implementation from the shared config at call time.
        tower.config._attn_implementation = attention
        module = tower if compile_kwargs is None else torch.compile(tower, **compile_kwargs)
        for chunk in args.chunks:
            pixels = inputs[chunk]

            def run(module=module, pixels=pixels, backend=backend):
                with torch.no_grad():
                    if backend is None:
                        return module(pixel_values=pixels).last_hidden_state
                    with sdpa_kernel([backend]):
                        return module(pixel_values=pixels).last_hidden_state

            t0 = time.perf_counter()
            try:
                out = run().float()
                torch.cuda.synchronize()
            except Exception as exc:  # a back end that cannot run this shape says so
                print(
                    f"{label:46s} chunk {chunk:3d}: cannot run ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120]})"
                )
                results["rows"].append(dict(variant=label, chunk=chunk, error=str(exc)[:300]))
                continue
            first_s = time.perf_counter() - t0
            ref = reference[chunk]
            error = ((out - ref).norm() / ref.norm()).item()
            del out
            ms = do_bench(run, warmup=100, rep=1000, return_mode="median")
            per_frame = ms / chunk
            tflops = flops * chunk / (ms * 1e-3) / 1e12
            print(
                f"{label:46s} chunk {chunk:3d}: {ms:8.2f} ms, {per_frame:6.3f} ms/frame "
                f"(256 frames: {256 * per_frame:6.1f} ms), {tflops:5.0f} TFLOP/s "
                f"[first call {first_s:5.1f} s; relative error against eager {error:.1e}]"
            )
            results["rows"].append(
                dict(
                    variant=label,
                    chunk=chunk,
                    ms=round(ms, 3),
                    ms_per_frame=round(per_frame, 4),
                    tflops=round(tflops, 1),
                    first_call_s=round(first_s, 2),
                    relative_error_vs_eager=error,
                )
            )
            if chunk == args.table_chunk and backend is None:
                table = kernel_table(run)
                results["rows"][-1]["kernels"] = table
                for row in table:
                    print(
                        f"    {row['us']:10.1f} us  {row.get('share', 1):6.1%}  "
                        f"x{row.get('calls', '')!s:4s} {row['kernel']}"
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
