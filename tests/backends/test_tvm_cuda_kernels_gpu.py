"""fxopt's own CUDA kernels against PyTorch math on the GPU: attention.cu, norm_act.cu and cublaslt_gemm.cc.

Every test is marked ``gpu`` (tests/conftest.py skips them without a CUDA device). The extension is
``$FXOPT_CUDA_EXTENSION`` (a libfxopt_cuda_ext.so that extension.extension_path() built, e.g. on the CPU
machine) or else built here by extension.extension_path() (nvcc and the nvidia-cublas headers). On the GPU
machine, which has no TVM, tvm_ffi comes from ``.tvm`` (../shared/gpu/pack-tvm.sh); the library is built on the
CPU machine (``.venv/bin/python -c "from fxopt.backends.tvm_cuda import extension; print(extension.extension_path())"``,
copied to build/kernel_tests_lib/) and carried along:

    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \
        FXOPT_CUDA_EXTENSION=build/kernel_tests_lib/libfxopt_cuda_ext.so \
        python3 -m pytest tests/backends/test_tvm_cuda_kernels_gpu.py -m gpu -v

Outputs are written into NaN-filled buffers with guard regions on both sides: an output element left unwritten
fails the comparison, and a write past either end of the output fails the guard check.
"""
from __future__ import annotations

import math
import os
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.gpu_attention import math_reference
from fxopt.backends.tvm_cuda import extension, offload
from tests.harness import examples, relative_error

pytestmark = pytest.mark.gpu

#: unit roundoff (half an ulp of 1) of each dtype: a correctly rounded result is off by at most u * |value|
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
F32_ULP = 2.0 ** -24
GUARD = 64  # elements of NaN before and after each output (128 bytes or more: 16-byte alignment is kept)
FUNCTIONS = {"gemm": offload.GEMM, "gemm_bias": offload.GEMM_BIAS, "attention": offload.ATTENTION,
             "attention_bias": offload.ATTENTION_BIAS, "layer_norm": offload.LAYER_NORM,
             "add_layer_norm": offload.ADD_LAYER_NORM, "add_layer_norm_sum": offload.ADD_LAYER_NORM_SUM,
             "gelu": offload.GELU, "gelu_tanh": offload.GELU_TANH}


@pytest.fixture(scope="module")
def kernels():
    import tvm_ffi

    extension.load_extension(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32, not TF32
    yield types.SimpleNamespace(**{key: tvm_ffi.get_global_func(name) for key, name in FUNCTIONS.items()})
    torch.backends.cuda.matmul.allow_tf32 = tf32


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def guarded(shape, dtype, offset: int = 0):
    """(buffer, view): a NaN-filled output ``view`` of ``shape`` at element GUARD + offset of a longer buffer."""
    numel = math.prod(shape)
    buffer = torch.full((2 * GUARD + offset + numel,), float("nan"), dtype=dtype, device="cuda")
    return buffer, buffer[GUARD + offset:GUARD + offset + numel].view(shape)


def placed(values: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``values`` starting ``offset`` elements into a fresh buffer (offset 1: a 2-byte-aligned pointer)."""
    buffer = torch.empty(offset + values.numel() + 8, dtype=values.dtype, device=values.device)
    view = buffer[offset:offset + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def assert_guards_untouched(buffer: torch.Tensor, view: torch.Tensor) -> None:
    start = view.storage_offset()
    end = start + view.numel()
    assert torch.isnan(buffer[:start]).all() and torch.isnan(buffer[end:]).all(), "the kernel wrote outside its output"


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|got - ref| <= bound elementwise (a NaN, an unwritten element, fails)."""
    err = (got.double() - ref.double()).abs()
    bad = ~(err <= bound.double())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst err "
                           f"{err.nan_to_num(float('inf')).max().item():.3e} at bound {bound.max().item():.3e}")


# ------------------------------------------------------------------------------------------------ attention
LENGTHS = st.one_of(st.sampled_from([1, 2, 7, 16, 17, 63, 64, 65, 127, 129, 257]), st.integers(1, 300))
HEAD_DIMS = st.sampled_from([16, 32, 48, 64, 80, 96, 128, 144, 192, 256])  # multiples of 16 up to 256


@st.composite
def attention_cases(draw):
    length = draw(LENGTHS)
    case = dict(batch=draw(st.integers(1, 3)), heads=draw(st.integers(1, 3)), len_q=length,
                len_k=draw(st.one_of(st.just(length), LENGTHS)), dim=draw(HEAD_DIMS),
                causal=draw(st.sampled_from([0, 1, 2])),
                bias=draw(st.sampled_from([None, "additive", "padding"])), seed=draw(st.integers(0, 2 ** 31)),
                bias_dtype=draw(st.sampled_from([torch.float16, torch.float32])),
                bias_full=draw(st.tuples(*[st.booleans()] * 4)),  # each of [B, N, L, S] full or broadcast (1)
                mask_value=draw(st.sampled_from([float("-inf"), -65504.0])),  # -65504: HF's fp16 finfo.min
                q_scale=draw(st.sampled_from([1.0, 3.0])))  # 3: peaky softmax, so a wrong mask moves the output
    case["dim_v"] = draw(st.one_of(st.just(case["dim"]), HEAD_DIMS))
    case["scale"] = draw(st.sampled_from([case["dim"] ** -0.5, 0.3]))
    return case


def attention_bias(c, gen):
    """An additive bias (randn * 2) or a key-padding mask (keys at and past a per-batch length get mask_value)."""
    full = (c["batch"], c["heads"], c["len_q"], c["len_k"])
    shape = [size if keep else 1 for size, keep in zip(full, c["bias_full"])]
    if c["bias"] == "additive":
        return (torch.randn(shape, generator=gen, device="cuda") * 2).to(c["bias_dtype"])
    shape[3] = c["len_k"]
    # -inf may mask every key of a row (the kernel and the reference give zeros); a finite mask keeps key 0, so no
    # row has only finitely masked keys (softmax over those would be decided by fp32 rounding of score + mask)
    lowest = 0 if c["mask_value"] == float("-inf") else 1
    valid = torch.randint(lowest, c["len_k"] + 1, (shape[0], 1, 1, 1), generator=gen, device="cuda")
    keys = torch.arange(c["len_k"], device="cuda")
    bias = torch.where(keys < valid, 0.0, c["mask_value"]).expand(shape).contiguous()
    return bias.to(c["bias_dtype"])


@examples(25)
@given(attention_cases())
def test_attention_matches_fp32_math(kernels, case):
    """softmax(Q Kᵀ·scale + bias) V with causal 0/1/2, against benchmarks.gpu_attention.math_reference (fp32).

    Bound, per output element: |out - ref| <= 3u·(W|V|) + S·2⁻²⁴·max|V| + 2⁻²⁴, u = 2⁻¹¹ (fp16), W the exact
    softmax weights. The kernel's only coarse roundings are P (each weight ≤ 1) rounded to fp16 before P·V
    (relative u; absolute ≤ 2⁻²⁵ where p < 2⁻¹⁴ is subnormal in fp16, at most S of them against a row sum ≥ 1)
    while the row sum stays fp32, and the output rounded to fp16 (u·|out| ≤ u·W|V|): 2u·W|V| in all; the third
    u covers fp32 scores, ex2.approx and the online rescaling (each ~2⁻²² relative). A leaked masked key, a
    wrong causal diagonal or bias element moves an output by about its weight times |V|, far more.
    """
    c = case
    gen = generator(c["seed"])
    b, n = c["batch"], c["heads"]
    q = (torch.randn(b, c["len_q"], n, c["dim"], generator=gen, device="cuda") * c["q_scale"]).half()
    k = torch.randn(b, c["len_k"], n, c["dim"], generator=gen, device="cuda").half()
    v = torch.randn(b, c["len_k"], n, c["dim_v"], generator=gen, device="cuda").half()
    bias = None if c["bias"] is None else attention_bias(c, gen)
    buffer, out = guarded((b, c["len_q"], n, c["dim_v"]), torch.float16)
    if bias is None:
        kernels.attention(q, k, v, c["scale"], c["causal"], out)
    else:
        kernels.attention_bias(q, k, v, bias, c["scale"], c["causal"], out)
    torch.cuda.synchronize()
    ref = math_reference(q, k, v, bias, c["scale"], c["causal"])
    weighted_abs = math_reference(q, k, v.abs(), bias, c["scale"], c["causal"])  # W|V|
    bound = 3 * UNIT[torch.float16] * weighted_abs + c["len_k"] * F32_ULP * v.abs().max().float() + F32_ULP
    assert_within(out, ref, bound, f"attention {dict(c, bias_dtype=str(c['bias_dtype']))}")
    assert_guards_untouched(buffer, out)


def _qkv(length=8, dim=64, heads=2):
    q, k, v = (torch.randn(2, length, heads, dim, device="cuda").half() for _ in range(3))
    return q, k, v, torch.full_like(v, float("nan"))


@pytest.mark.parametrize("change, message", [
    ("dim 40", "head sizes must be multiples of 16 up to 256"), ("dim 272", "head sizes must be multiples of 16"),
    ("causal 3", "causal must be 0, 1 or 2"), ("bf16 q", "q, k, v and out must be float16"),
    ("k heads", "k does not match q"), ("v length", "v does not match k"), ("q misaligned", "16-byte aligned"),
    ("bias 3-D", "bias must be 4-D"), ("bias S+1", "bias does not broadcast"), ("bias int", "float16 or float32"),
])
def test_attention_rejects_bad_input(kernels, change, message):
    """Each check in attention.cu's host code raises ValueError before any launch: out stays NaN."""
    dim = {"dim 40": 40, "dim 272": 272}.get(change, 64)
    q, k, v, out = _qkv(dim=dim)
    causal, bias = 0, torch.zeros(2, 1, 1, 8, device="cuda")
    if change == "causal 3":
        causal = 3
    elif change == "bf16 q":
        q = q.bfloat16()
    elif change == "k heads":
        k = torch.randn(2, 8, 3, 64, device="cuda").half()
    elif change == "v length":
        v = torch.randn(2, 9, 2, 64, device="cuda").half()
    elif change == "q misaligned":
        q = placed(q, 1)
    elif change.startswith("bias"):
        bias = {"bias 3-D": torch.zeros(2, 8, 8), "bias S+1": torch.zeros(2, 1, 1, 9),
                "bias int": torch.zeros(2, 1, 1, 8, dtype=torch.int32)}[change].cuda()
    with pytest.raises(ValueError, match=f"fxopt.attention: .*{message}"):
        if change.startswith("bias"):
            kernels.attention_bias(q, k, v, bias, 0.125, causal, out)
        else:
            kernels.attention(q, k, v, 0.125, causal, out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


# ----------------------------------------------------------------------------------------------- LayerNorm
DT = {"f16": torch.float16, "f32": torch.float32}
#: hidden sizes on both sides of each kernel configuration's edge (a warp a row up to H = 256, 512, 768, 1024;
#: 4 warps up to 2048, 3072, 4096; 8 warps up to 8192), and sizes that are no multiple of 32 or 256
NORM_EDGES = [8, 24, 248, 256, 264, 512, 520, 768, 776, 1000, 1024, 1032, 2048, 2056, 3072, 3080, 4096, 4104, 8184,
              8192]


def check_layer_norm(kernels, rows, hidden, dts, eps, offset, seed):
    """Run one LayerNorm call; return None or what was wrong.

    dts: (x, residual | None, gamma, beta, out, sum | None) dtype names. The reference is torch's layer_norm in
    float64 over the fp32 sum x + residual (the kernel forms the same fp32 sum). Bound, per element:
    u_out·|ref| + 2⁻¹⁷·(|γ|·(|x̂| + max|v|/σ) + |β|): one rounding to the output dtype, plus 128 fp32 ulps of
    the terms for the kernel's fp32 statistics (a mean and variance summed over ≤ 32 values a thread and a
    shuffle tree: ≲ 45 ulps of max|v| in the mean, scaled by 1/σ into x̂; ≲ 25 ulps relative in 1/σ; 2 in
    the affine step). The sum output must equal the fp32 sum rounded once to its dtype, exactly.
    """
    xd, rd, gd, bd, od, sd = dts
    gen = generator(seed)
    x = (torch.randn(rows, hidden, generator=gen, device="cuda") * 3 + offset).to(DT[xd])
    r = None if rd is None else torch.randn(rows, hidden, generator=gen, device="cuda").to(DT[rd])
    gamma = ((torch.rand(hidden, generator=gen, device="cuda") * 3 - 1.5)).to(DT[gd])
    beta = torch.randn(hidden, generator=gen, device="cuda").to(DT[bd])
    buffer, out = guarded((rows, hidden), DT[od])
    sum_buffer, total = guarded((rows, hidden), DT[sd]) if sd is not None else (None, None)
    if r is None:
        kernels.layer_norm(x, gamma, beta, eps, out)
    elif total is None:
        kernels.add_layer_norm(x, r, gamma, beta, eps, out)
    else:
        kernels.add_layer_norm_sum(x, r, gamma, beta, eps, out, total)
    torch.cuda.synchronize()
    summed = x.float() + (0 if r is None else r.float())
    v = summed.double()
    ref = torch.nn.functional.layer_norm(v, (hidden,), gamma.double(), beta.double(), eps)
    rstd = (v.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    x_hat = (v - v.mean(-1, keepdim=True)) * rstd
    bound = UNIT[DT[od]] * ref.abs() + 2.0 ** -17 * (
        gamma.double().abs() * (x_hat.abs() + rstd * v.abs().amax(-1, keepdim=True)) + beta.double().abs())
    try:
        assert_within(out, ref, bound, "out")
        assert_guards_untouched(buffer, out)
        if total is not None:
            assert torch.equal(total, summed.to(DT[sd])), "sum is not the fp32 sum x + residual rounded once"
            assert_guards_untouched(sum_buffer, total)
    except AssertionError as failure:
        return f"rows {rows} H {hidden} dtypes {dts} eps {eps}: {failure}"
    return None


@st.composite
def norm_cases(draw):
    residual = draw(st.sampled_from([None, "f16", "f32"]))
    half_or_float = st.sampled_from(["f16", "f32"])
    total = None if residual is None else draw(st.sampled_from([None, "f16", "f32"]))
    dts = (draw(half_or_float), residual, draw(half_or_float), draw(half_or_float), draw(half_or_float), total)
    hidden = draw(st.one_of(st.sampled_from(NORM_EDGES), st.integers(1, 1024).map(lambda c: 8 * c)))
    rows = draw(st.one_of(st.sampled_from([1, 2, 3, 5, 7, 33]), st.integers(1, 200)))  # 4 rows a block of 128
    return rows, hidden, dts, draw(st.sampled_from([1e-12, 1e-5, 0.5])), draw(st.sampled_from([0.0, 1.0, -2.0]))


@examples(25)
@given(norm_cases(), st.integers(0, 2 ** 31))
def test_layer_norm_matches_torch_on_random_shapes(kernels, case, seed):
    """Hidden sizes (multiples of 8 up to 8192) across every kernel configuration, rows not filling a block,
    random dtype combinations, with and without residual and sum output; bound: check_layer_norm's docstring."""
    rows, hidden, dts, eps, offset = case
    assert check_layer_norm(kernels, rows, hidden, dts, eps, offset, seed) is None


def all_norm_dtypes():
    """Every (x, residual, gamma, beta, out, sum) the kernel takes: 16 without residual, 96 with (sum or not)."""
    combos = []
    for xd in DT:
        for gd in DT:
            for bd in DT:
                for od in DT:
                    combos.append((xd, None, gd, bd, od, None))
                    combos += [(xd, rd, gd, bd, od, sd) for rd in DT for sd in (None, *DT)]
    return combos


@pytest.mark.parametrize("rows, hidden", [(7, 1000), (3, 2056)])  # a warp a row with a masked chunk; 4 warps
def test_layer_norm_every_dtype_combination(kernels, rows, hidden):
    """All 112 dtype combinations at one odd shape each; bound: check_layer_norm's docstring."""
    combos = all_norm_dtypes()
    assert len(combos) == 112
    failures = [f for i, dts in enumerate(combos) if (f := check_layer_norm(kernels, rows, hidden, dts, 1e-5, 1.0, i))]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("change, message", [
    ("H 12", "H must be a multiple of 8 up to 8192"), ("H 8200", "H must be a multiple of 8 up to 8192"),
    ("bf16 x", "x must be float16 or float32"), ("x transposed", "tensors must be contiguous"),
    ("x misaligned", "tensors must be 16-byte aligned"), ("gamma size", "gamma and beta must have H elements"),
    ("x numel", "x and out must have as many elements"),
])
def test_layer_norm_rejects_bad_input(kernels, change, message):
    """Each check in norm_act.cu's LayerNorm host code raises ValueError before any launch: out stays NaN."""
    hidden = {"H 12": 12, "H 8200": 8200}.get(change, 64)
    x = torch.randn(16, hidden, device="cuda").half()
    gamma, beta = torch.ones(hidden, device="cuda"), torch.zeros(hidden, device="cuda")
    out = torch.full((16, hidden), float("nan"), device="cuda", dtype=torch.float16)
    x = {"bf16 x": x.bfloat16(), "x transposed": torch.randn(hidden, 16, device="cuda").half().t(),
         "x misaligned": placed(x, 1), "x numel": x[:15]}.get(change, x)
    if change == "gamma size":
        gamma = torch.ones(hidden - 8, device="cuda")
    with pytest.raises(ValueError, match=f"fxopt.layer_norm: {message}"):
        kernels.layer_norm(x, gamma, beta, 1e-5, out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------------------------------- GELU
def check_gelu(kernels, n, x_offset, out_offset, approximate, seed):
    """GELU (erf or tanh) of an fp16 view against torch's fp32 GELU of the same values.

    Bound: u·|ref| + 2⁻²²·|x| + 2⁻²⁵. The kernel evaluates torch's formula in fp32 (erff / tanhf, ≤ 2 ulps) and
    rounds once to fp16 (u·|ref|; 2⁻²⁵ where the result is subnormal); 1 + erf(·) or 1 + tanh(·) cancels for
    negative x, so a few fp32 ulps of 1 in that bracket, times x/2, are allowed absolutely (8 ulps · |x|/2).
    A fast approximation (tanh.approx, ~2⁻¹¹ relative) or a wrong constant exceeds this.
    """
    gen = generator(seed)
    values = torch.randn(n, generator=gen, device="cuda") * 3
    specials = torch.tensor([0.0, -0.0, 1e-4, -1e-4, 5, -5, 10, -10, 65504, -65504, -3, 3], device="cuda")
    values[:min(n, 12)] = specials[:min(n, 12)]
    x = placed(values.half(), x_offset)  # offsets not a multiple of 8 elements: the one-element-a-thread kernel
    buffer, out = guarded((n,), torch.float16, out_offset)
    (kernels.gelu if approximate == "none" else kernels.gelu_tanh)(x, out)
    torch.cuda.synchronize()
    ref = torch.nn.functional.gelu(x.float(), approximate=approximate)
    bound = UNIT[torch.float16] * ref.abs() + 2.0 ** -22 * x.float().abs() + 2.0 ** -25
    assert_within(out, ref, bound, f"gelu {approximate} n {n} offsets {x_offset}/{out_offset}")
    assert_guards_untouched(buffer, out)


@examples(25)
@given(st.one_of(st.sampled_from([1, 7, 8, 9, 15, 1001, 4099]), st.integers(1, 20000)), st.integers(0, 9),
       st.integers(0, 9), st.sampled_from(["none", "tanh"]), st.integers(0, 2 ** 31))
def test_gelu_matches_torch_with_tails_and_unaligned_views(kernels, n, x_offset, out_offset, approximate, seed):
    """Sizes with tails (n % 8), views starting at any element of x and out; bound: check_gelu's docstring."""
    check_gelu(kernels, n, x_offset, out_offset, approximate, seed)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n, offset", [(8 * 256 * 65536 + 8 * 100 + 5, 0), (256 * 65536 + 3, 1)])
def test_gelu_grid_stride_loops(kernels, n, offset, approximate):
    """Sizes past one grid (65536 blocks of 256 threads): the 8-wide kernel (with a tail) and the scalar one loop."""
    check_gelu(kernels, n, offset, offset, approximate, seed=n)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_rejects_bad_input(kernels, name):
    """float32, non-contiguous and size-mismatched tensors raise ValueError before any launch: out stays NaN."""
    out = torch.full((64,), float("nan"), device="cuda", dtype=torch.float16)
    cases = [(torch.randn(64, device="cuda"), "x and out must be float16"),
             (torch.randn(128, device="cuda").half()[::2], "x and out must be contiguous"),
             (torch.randn(63, device="cuda").half(), "x and out must have as many elements")]
    for x, message in cases:
        with pytest.raises(ValueError, match=f"fxopt.{name}: {message}"):
            getattr(kernels, name)(x, out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


# --------------------------------------------------------------------------------------------- cuBLASLt GEMM
SIZES = st.one_of(st.sampled_from([1, 7, 8, 63, 64, 65, 129]), st.integers(1, 300))


@st.composite
def gemm_cases(draw):
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    max_k = 500 if dtype == torch.float16 else 240
    return dict(dtype=dtype, m=draw(SIZES), n=draw(SIZES), k=draw(st.integers(1, max_k)),
                layout=draw(st.sampled_from(["weight", "weight 3-D", "batched"])), batch=draw(st.integers(1, 3)),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)),
                offsets=draw(st.tuples(*[st.sampled_from([0, 1, 8])] * 4)))  # elements: 2, 16 or 256-byte pointers


@examples(25)
@given(gemm_cases())
def test_gemm_is_exact_on_small_integers(kernels, case):
    """out = a @ b (+ bias) for a [M, K] or [batch, M, K] with b [K, N] or [batch, K, N], odd M/N/K, pointers
    aligned to 2, 16 or 256 bytes, float16 and bfloat16, with and without the bias epilogue.

    Bound: zero. Entries are integers in [-2, 2] (fp16, K ≤ 500, bias in [-40, 40]) or [-1, 1] (bf16, K ≤ 240,
    bias in [-16, 16]), so every product, partial sum and result is an integer of magnitude ≤ 2048 (fp16) or
    ≤ 256 (bf16): exact in fp32 and in the output dtype, whatever the summation order, split-K reduction or
    epilogue. Any wrong element (operand order, a missed K slice, bias, alignment handling) is an error.
    """
    c = case
    gen, dtype = generator(c["seed"]), c["dtype"]
    top, bias_top = (2, 40) if dtype == torch.float16 else (1, 16)
    lead = {"weight": (), "weight 3-D": (c["batch"],), "batched": (c["batch"],)}[c["layout"]]
    b_lead = lead if c["layout"] == "batched" else ()

    def ints(shape, high):
        return torch.randint(-high, high + 1, shape, generator=gen, device="cuda").to(dtype)

    a = placed(ints((*lead, c["m"], c["k"]), top), c["offsets"][0])
    b = placed(ints((*b_lead, c["k"], c["n"]), top), c["offsets"][1])
    bias = placed(ints((c["n"],), bias_top), c["offsets"][2]) if c["bias"] else None
    buffer, out = guarded((*lead, c["m"], c["n"]), dtype, c["offsets"][3])
    if bias is None:
        kernels.gemm(a, b, out)
    else:
        kernels.gemm_bias(a, b, bias, out)
    torch.cuda.synchronize()
    ref = a.double() @ b.double() + (0 if bias is None else bias.double())
    wrong = out.double() != ref
    assert not wrong.any(), f"{int(wrong.sum())} of {wrong.numel()} elements wrong: {dict(c, dtype=str(dtype))}"
    assert_guards_untouched(buffer, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(1024, 768, 768), (1024, 3072, 768), (1024, 768, 3072), (77, 3072, 768)])
def test_gemm_accumulates_in_fp32(kernels, m, n, k, dtype):
    """BERT-base shapes with normal data: ‖out - ref‖/‖ref‖ <= u against float64 math on the same 16-bit inputs.

    Each element is an fp32-accumulated sum rounded once to the output dtype: off by at most u·|ref| (the fp32
    error is ~sqrt(K)·2⁻²⁴), so by at most u in norm. Emulated in torch on these inputs: 0.42u; with a split-K
    reduction in the output dtype 0.62u; accumulating 32-wide K slices in the 16-bit dtype 1.16u-2.1u, which fails.
    """
    gen = generator(k + n)
    a = (torch.randn(m, k, generator=gen, device="cuda") * 0.5).to(dtype)
    b = (torch.randn(k, n, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    bias = (torch.randn(n, generator=gen, device="cuda") * 0.5).to(dtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    kernels.gemm_bias(a, b, bias, out)
    torch.cuda.synchronize()
    ref = a.double() @ b.double() + bias.double()
    assert relative_error(ref, out) <= UNIT[dtype]


@pytest.mark.parametrize("change, error, message", [
    ("float32", TypeError, "only float16 and bfloat16"), ("mixed dtypes", TypeError, "a, b and out must share a dtype"),
    ("inner", ValueError, "inner dimensions differ"), ("out numel", ValueError, "out has the wrong number of elements"),
    ("bias size", ValueError, "bias must be \\[N\\]"), ("b 3-D, a 2-D", ValueError, "a must be \\[..., M, K\\]"),
    ("batch", ValueError, "batch sizes differ"),
])
def test_gemm_rejects_bad_input(kernels, change, error, message):
    """Each check in cublaslt_gemm.cc's Describe() raises before any GEMM: out stays NaN."""
    a, b = torch.randn(2, 8, 16, device="cuda").half(), torch.randn(16, 24, device="cuda").half()
    bias = torch.zeros(24, device="cuda").half()
    out = torch.full((2, 8, 24), float("nan"), device="cuda", dtype=torch.float16)
    if change == "float32":
        a, b, out = a.float(), b.float(), out.float()
    a = {"inner": a[..., :15]}.get(change, a)
    b = {"mixed dtypes": b.bfloat16(), "b 3-D, a 2-D": b.expand(2, 16, 24), "batch": b.expand(3, 16, 24)}.get(change, b)
    a = a[0] if change == "b 3-D, a 2-D" else a
    out = out[..., :23] if change == "out numel" else out
    bias = bias[:23] if change == "bias size" else bias
    with pytest.raises(error, match=f"fxopt.cublaslt: {message}"):
        kernels.gemm_bias(a, b, bias, out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------- strides: refused
# Both kernels read their operands as contiguous; on the H100 (2026-12-07) a transposed view gave a wrong answer,
# not an error, until they checked IsContiguous (benchmarks/results/gpu_tests.md).
def test_gemm_refuses_or_handles_a_transposed_view(kernels):
    """A [K, N] view of an [N, K] tensor must be refused (ValueError/TypeError) or multiplied right (exactly)."""
    a = torch.randint(-2, 3, (8, 16), device="cuda").half()
    b = torch.randint(-2, 3, (24, 16), device="cuda").half().t()
    out = torch.full((8, 24), float("nan"), device="cuda", dtype=torch.float16)
    try:
        kernels.gemm(a, b, out)
    except (ValueError, TypeError):
        return
    torch.cuda.synchronize()
    assert torch.equal(out.double(), a.double() @ b.double())


def test_attention_refuses_or_handles_a_transposed_view(kernels):
    """q as a BSNH view of a BNSH tensor must be refused (ValueError) or attended right (the attention bound)."""
    q = torch.randn(2, 2, 8, 64, device="cuda").half().transpose(1, 2)
    k, v = (torch.randn(2, 8, 2, 64, device="cuda").half() for _ in range(2))
    out = torch.full((2, 8, 2, 64), float("nan"), device="cuda", dtype=torch.float16)
    try:
        kernels.attention(q, k, v, 0.125, 0, out)
    except ValueError:
        return
    torch.cuda.synchronize()
    bound = 3 * UNIT[torch.float16] * math_reference(q, k, v.abs(), None, 0.125, 0) + 8 * F32_ULP * 8
    assert_within(out, math_reference(q, k, v, None, 0.125, 0), bound, "attention of a transposed q")
