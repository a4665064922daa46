"""Where the vision tower's time goes (issue 20, item 5): crosslmm-2b's SigLIP so400m/14@384
(27 layers, width 1152, MLP 4304, 16 heads of 72, 729 tokens per frame), random weights, bf16,
one chunk of frames at a time as the model encodes them.

For each variant (attention implementation, SDPA back end, torch.compile) and chunk size: the
median time per frame (CUDA events after warm-up) and the achieved TFLOP/s, counting the matmuls
(patch embedding, q/k/v/o, MLP) and attention (4·N²·width per layer) at 2 FLOPs per
multiply-add. Then, for the eager tower, the kernels one chunk launches grouped by kind
(torch.profiler), so the matmuls' share and the rest (norms, GELU, attention) are visible.

    python tools/vision_tower_profile.py [--chunks 8 16 32] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from crosslmm_ops.models.configuration import preset_config


def tower_flops_per_frame(vc) -> float:
    n = (vc.image_size // vc.patch_size) ** 2
    d, m = vc.hidden_size, vc.intermediate_size
    patch = 2 * n * (3 * vc.patch_size**2) * d
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    return patch + vc.num_hidden_layers * per_layer


def build_tower(attn: str):
    from transformers import SiglipVisionModel

    vc = preset_config("crosslmm-2b").vision_config
    vc._attn_implementation = attn
    with torch.device("cuda"):  # random init on the GPU: seconds, not the CPU's minute
        tower = SiglipVisionModel(vc).to(torch.bfloat16).eval()
    return tower, vc


def time_ms(fn, warmup=2, repeats=7) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--table-chunk", type=int, default=16, help="chunk of the kernel tables")
    parser.add_argument("--no-compile", action="store_true")
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
    variants = [
        ("eager, sdpa (torch's choice)", "sdpa", None, False),
        ("eager, sdpa cuDNN", "sdpa", SDPBackend.CUDNN_ATTENTION, False),
        ("eager, sdpa flash", "sdpa", SDPBackend.FLASH_ATTENTION, False),
        ("eager, sdpa efficient", "sdpa", SDPBackend.EFFICIENT_ATTENTION, False),
    ]
    if not args.no_compile:
        variants.append(("torch.compile, sdpa (torch's choice)", "sdpa", None, True))
    towers = {}
    for label, attn, backend, compiled in variants:
        if attn not in towers:
            towers[attn] = build_tower(attn)
        tower, vc = towers[attn]
        flops = tower_flops_per_frame(vc)
        module = torch.compile(tower) if compiled else tower
        for chunk in args.chunks:
            pixels = torch.randn(chunk, 3, vc.image_size, vc.image_size, device="cuda")
            pixels = pixels.to(torch.bfloat16)

            def run(module=module, pixels=pixels, backend=backend):
                with torch.no_grad():
                    if backend is None:
                        return module(pixel_values=pixels).last_hidden_state
                    with sdpa_kernel([backend]):
                        return module(pixel_values=pixels).last_hidden_state

            t0 = time.perf_counter()
            try:
                run()
                torch.cuda.synchronize()
            except Exception as exc:  # a back end that cannot run this shape says so
                print(
                    f"{label:40s} chunk {chunk:3d}: cannot run ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120]})"
                )
                results["rows"].append(dict(variant=label, chunk=chunk, error=str(exc)[:300]))
                continue
            first_s = time.perf_counter() - t0
            ms = time_ms(run)
            per_frame = ms / chunk
            tflops = flops * chunk / (ms * 1e-3) / 1e12
            print(
                f"{label:40s} chunk {chunk:3d}: {ms:8.2f} ms, {per_frame:6.3f} ms/frame "
                f"(256 frames: {256 * per_frame:6.1f} ms), {tflops:5.0f} TFLOP/s "
                f"[first call {first_s:5.1f} s]"
            )
            results["rows"].append(
                dict(
                    variant=label,
                    chunk=chunk,
                    ms=round(ms, 3),
                    ms_per_frame=round(per_frame, 4),
                    tflops=round(tflops, 1),
                    first_call_s=round(first_s, 2),
                )
            )
            if chunk == args.table_chunk and label.startswith(
                ("eager, sdpa (", "torch.compile, sdpa (")
            ):
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
