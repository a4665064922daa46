"""sm90_cluster's outputs before and after a kernel change, on fixed random inputs: run once on the
old build with ``--save F``, then on the new one with ``--compare F`` (bitwise equality of out and
lse per case, and the largest difference). Each case also prints the difference to mma_sync.

    python tools/projected_core_compare.py --save /tmp/core.pt      # old build
    python tools/projected_core_compare.py --compare /tmp/core.pt   # new build

Cases: frame-local V2V of CrossLMM-2B at T = 64 and 256 (9 queries x 12 heads per frame against
729 keys, Dv 1152) with splits 0 (heuristic), 1 and 3; three uneven segments (keys 1, 4999, 33;
queries 5, 130, 0; 6 heads, Dv 640) with splits 0, 1 and 5. bf16, the extension called directly.
"""

import argparse

import torch

from crosslmm_ops import _backend


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    def offsets(*lengths):
        return torch.tensor([0, *lengths], device="cuda", dtype=torch.int32).cumsum(0).int()

    for frames in (64, 256):
        q, x = randn(frames * 9, 12, 1152), randn(frames * 729, 1152)
        cu_q, cu_k = offsets(*[9] * frames), offsets(*[729] * frames)
        for splits in (0, 1, 3):
            yield f"frames{frames}_s{splits}", (q, x, cu_q, cu_k, 9, 729, splits)
    q, x = randn(135, 6, 640), randn(5033, 640)
    cu_q, cu_k = offsets(5, 130, 0), offsets(1, 4999, 33)
    for splits in (0, 1, 5):
        yield f"uneven_s{splits}", (q, x, cu_q, cu_k, 130, 4999, splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="FILE")
    mode.add_argument("--compare", metavar="FILE")
    args = parser.parse_args()
    ext = _backend.extension()
    results = {}
    for name, (q, x, cu_q, cu_k, max_q, max_k, splits) in cases():
        call = ext.projected_attention_core_forward
        out, lse = call(q, x, cu_q, cu_k, max_q, max_k, 0.088, splits, "sm90_cluster")
        assert ext.projected_attention_core_forward_kernel_name() == "sm90_cluster"
        ref, _ = call(q, x, cu_q, cu_k, max_q, max_k, 0.088, splits, "mma_sync")
        diff = (out.float() - ref.float()).abs().max().item()
        finite = torch.isfinite(out).all().item()
        print(f"{name}: max |sm90 - mma_sync| {diff:.3e}, finite {finite}")
        results[name] = (out.cpu(), lse.cpu())
    if args.save:
        torch.save(results, args.save)
        return
    before = torch.load(args.compare)
    for name, (out, lse) in results.items():
        out0, lse0 = before[name]
        same_lse = torch.equal(lse.nan_to_num(), lse0.nan_to_num())
        diff = (out.float() - out0.float()).abs().max().item()
        same_out = torch.equal(out, out0)
        print(f"{name}: out bitwise equal: {same_out}, lse: {same_lse}, max {diff:.3e}")


if __name__ == "__main__":
    main()
