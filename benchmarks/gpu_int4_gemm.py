"""fxopt's weight-only int4 GEMM (``fxopt.int4.linear``) against fp16 cuBLAS and torch's int4 kernel, few rows.

    # here: build the extension (nvcc, no GPU) and copy it into the tree that travels
    .venv/bin/python -c "from fxopt.backends.tvm_cuda import extension; print(extension.extension_path())"
    mkdir -p build/kernel_tests_lib && cp <that path> build/kernel_tests_lib/
    # on the GPU machine (carry .tvm and build/kernel_tests_lib):
    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \\
        python3 benchmarks/gpu_int4_gemm.py --extension build/kernel_tests_lib/libfxopt_cuda_ext.so --json $OUT/int4.json

Issue 22's bar: M = 1 to 16 rows (also measured: 32 to 1024), K = N = 4096, at least 2.5x faster than the fp16 cuBLAS GEMM. Also a Llama-8B
MLP shape. In one process, each timed with ``triton.testing.do_bench`` (median): torch fp16 ``F.linear``
(cuBLAS), torch's own int4 kernel ``torch._weight_int4pack_mm`` (tinygemm, what gpt-fast and torchao's int4
weight-only use) where this torch has it, and fxopt's kernel with group size 128 (symmetric). Each int4 result
is checked against fp32 math on the dequantized weight (relative Frobenius error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [("4096 x 4096", 4096, 4096), ("llama-8b up (14336 x 4096)", 14336, 4096),
          ("llama-8b down (4096 x 14336)", 4096, 14336)]
ROWS = (1, 2, 4, 8, 16, 32, 64, 256, 1024)  # past 64: blocks of 64 rows, each dequantizing the weight again
GROUP = 128


def relative_error(out, reference) -> float:
    return float((out.float() - reference).norm() / reference.norm())


def tinygemm(x, codes, scales, group):
    """torch._weight_int4pack_mm on the same weight: it computes w = (q - 8) * scale + zero per group, with q the
    nibble (our code + 8) and zero 0 here; packed as gpt-fast packs it (even column in the high nibble)."""
    packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    scales_and_zeros = torch.stack([scales.T, torch.zeros_like(scales.T)], dim=-1).to(torch.bfloat16).contiguous()
    x16 = x.to(torch.bfloat16)  # tinygemm takes bf16 activations: converted once, not timed
    return lambda: torch._weight_int4pack_mm(x16, packed, group, scales_and_zeros)


def one(linear, m: int, n: int, k: int) -> dict:
    from triton.testing import do_bench

    from fxopt.backends.tvm_cuda.int4_layout import mma_layout
    from fxopt.ir.ops import INT4_OFFSET
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8)  # nibbles: code + 8
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = (torch.rand(n, k // GROUP, generator=gen, device="cuda") + 0.5) / (8 * k ** 0.5)
    weight = ((codes.float() - INT4_OFFSET).reshape(n, -1, GROUP) * scales[..., None]).reshape(n, k)
    reference = x.float() @ weight.T
    w16 = weight.half()
    row = {"m": m, "n": n, "k": k}
    row["fp16_ms"] = do_bench(lambda: torch.nn.functional.linear(x, w16), return_mode="median")
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    laid = mma_layout(packed)  # the kernel's layout, made once (the cuda target makes it at load)
    try:
        linear(x, laid, scales, out)
        row["fxopt_int4_err"] = relative_error(out, reference)
        row["fxopt_int4_ms"] = do_bench(lambda: linear(x, laid, scales, out), return_mode="median")
    except Exception as exc:  # recorded: a refusal or a launch failure
        row["fxopt_int4"] = f"refused: {exc}"[:300]
    try:
        call = tinygemm(x, codes, scales, GROUP)
        row["tinygemm_err"] = relative_error(call(), reference)  # bf16 activations: ~4e-3 expected
        row["tinygemm_ms"] = do_bench(call, return_mode="median")
    except Exception as exc:  # recorded: a torch without it, or another packing
        row["tinygemm"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return row


#: --streaming: the weights each system cycles through exceed the 50 MB L2 this many times over
STREAM_BYTES = 3 * 50 * 2**20


def per_call_us(calls, reps: int = 200, trials: int = 5) -> float:
    """Median over trials of the time per call of ``reps`` calls cycling through ``calls`` (one per weight copy),
    captured in one CUDA graph: the weights stream from memory as in a decoder's step, layer after layer, with no
    launch overhead from Python and no cache flush before every call (whose dirty lines the timed call writes
    back, as under do_bench)."""
    import tvm_ffi
    for call in calls:  # warm-up outside the graph (cuBLAS picks its kernels here)
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):  # fxopt's kernels launch on the capturing stream
        for r in range(reps):
            calls[r % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def streaming(linear, m: int, n: int, k: int) -> dict:
    """fp16 cuBLAS, fxopt int4 and tinygemm, each over enough weight copies to stream from HBM (µs per call)."""
    from fxopt.backends.tvm_cuda.int4_layout import mma_layout
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    copies = lambda nbytes: max(2, -(-STREAM_BYTES // nbytes))  # noqa: E731
    w16 = [torch.randn(n, k, generator=gen, device="cuda").half() for _ in range(copies(n * k * 2))]
    codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = (torch.rand(n, k // GROUP, generator=gen, device="cuda") + 0.5) / (8 * k ** 0.5)
    laid = [(mma_layout(packed), scales.clone()) for _ in range(copies(n * k // 2))]
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    row = {"m": m, "n": n, "k": k, "fp16_copies": len(w16), "int4_copies": len(laid)}
    row["fp16_us"] = per_call_us([lambda w=w: torch.nn.functional.linear(x, w) for w in w16])
    row["fxopt_int4_us"] = per_call_us([lambda w=w, s=s: linear(x, w, s, out) for w, s in laid])
    try:
        row["tinygemm_us"] = per_call_us([tinygemm(x, codes, scales, GROUP) for _ in range(len(laid))])
    except Exception as exc:  # recorded: a torch without it
        row["tinygemm"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extension", required=True, help="a built libfxopt_cuda_ext.so")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--streaming", action="store_true", help="time back-to-back calls over weight copies "
                        "larger than L2 in one CUDA graph (per_call_us) instead of do_bench's flushed single calls")
    args = parser.parse_args(argv)
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(args.extension)
    linear = tvm_ffi.get_global_func("fxopt.int4.linear")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.streaming:
        rows = [{"shape": name, **streaming(linear, m, n, k)} for name, n, k in SHAPES for m in (1, 2, 4, 8, 16)]
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "mode": "streaming", "rows": rows}, f, indent=1)
        return
    print(f"{'shape':30s} {'M':>3s} {'fp16 us':>8s} {'int4 us':>8s} {'x fp16':>7s} {'tinygemm us':>11s} {'err':>9s}")
    rows = []
    for name, n, k in SHAPES:
        for m in ROWS:
            row = {"shape": name, **one(linear, m, n, k)}
            rows.append(row)
            tiny, ours = row.get("tinygemm_ms"), row.get("fxopt_int4_ms")
            cells = ("-", "-", "-") if ours is None else (f"{ours * 1e3:.1f}", f"{row['fp16_ms'] / ours:.2f}",
                                                          f"{row['fxopt_int4_err']:.2e}")
            print(f"{name:30s} {m:3d} {row['fp16_ms'] * 1e3:8.1f} {cells[0]:>8s} {cells[1]:>7s} "
                  f"{'-' if tiny is None else f'{tiny * 1e3:.1f}':>11s} {cells[2]:>9s}", flush=True)
    for row in rows:
        if "tinygemm" in row:
            print("tinygemm:", row["tinygemm"])
            break
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
