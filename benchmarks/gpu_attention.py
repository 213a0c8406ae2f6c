"""Time fxopt's fused attention kernel alone against torch SDPA on the GPU machine (BERT-base shapes).

    python3 benchmarks/gpu_attention.py --extension build/gpu_att4/libfxopt_cuda_ext.so

Prints one line per case: the kernel's median latency (triton do_bench), torch SDPA's, and the max error.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def math_reference(q, k, v, bias, scale: float, causal: int) -> torch.Tensor:
    """softmax(Q Kᵀ·scale + bias) V in fp32, BSNH in and out."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(source - length if causal == 2 else 0)
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extension", required=True)
    args = parser.parse_args()
    import triton.testing
    import tvm_ffi

    from fxopt.backends.tvm_cuda.extension import load_extension

    load_extension(args.extension)
    plain, biased = tvm_ffi.get_global_func("fxopt.attention"), tvm_ffi.get_global_func("fxopt.attention_bias")
    torch.manual_seed(0)
    for batch, length, heads, dim, with_bias, causal in [(8, 128, 12, 64, True, 0), (8, 128, 12, 64, False, 0),
                                                         (8, 128, 12, 64, False, 1), (8, 512, 12, 64, False, 0),
                                                         (1, 128, 1, 64, False, 0)]:
        q, k, v = (torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.float16) for _ in range(3))
        bias = torch.zeros(batch, 1, length, length, device="cuda")
        bias[1:, :, :, length * 3 // 4:] = -1e9
        out = torch.empty_like(q)
        scale = dim ** -0.5
        call = (lambda: biased(q, k, v, bias, scale, causal, out)) if with_bias else \
            (lambda: plain(q, k, v, scale, causal, out))
        mask = bias if with_bias else None
        ref = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=bool(causal),
            scale=scale).transpose(1, 2)
        call()
        torch.cuda.synchronize()
        err = (out.float() - math_reference(q, k, v, mask, scale, causal)).abs().max().item()
        ours = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
        theirs = triton.testing.do_bench(ref, warmup=25, rep=200, return_mode="median")
        print(f"B{batch} L{length} N{heads} D{dim} bias={with_bias} causal={causal}: fxopt {ours * 1e3:.1f} us, "
              f"torch SDPA {theirs * 1e3:.1f} us, max err vs fp32 math {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
