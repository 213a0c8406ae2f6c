"""The Relax rewrite tables (rewrite_table.py and its rows), on small Relax functions built here.

The GEMM's bias is found by its role (either operand order, only a 1-D bias of N values, only where the
product has no other reader); GELU is found by its op, never by constants; the driver names a row that keeps
firing or fails. Meaning is checked on the CPU with numpy references of the extension's functions.
"""
from __future__ import annotations

import math

import pytest
import torch

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends.tvm_cuda import offload  # noqa: E402
from fxopt.backends.tvm_cuda.rewrite_gemm import bias_table, gemm_table  # noqa: E402
from fxopt.backends.tvm_cuda.rewrite_table import RelaxRewrite, apply_table, matches_by_row  # noqa: E402
from tests.backends.test_tvm_cuda_codegen import run_on_cpu  # noqa: E402
from tests.backends.test_tvm_cuda_extension import REFERENCES  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def numpy_references():
    for name, fn in REFERENCES.items():
        tvm.register_global_func(name, fn, override=True)


def _function(params, body):
    """``main(*params)`` whose dataflow block is ``body(bb, *params)`` (returning the output expression)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _tensor(name, shape, dtype="float16"):
    from tvm import relax

    return relax.Var(name, relax.TensorType(shape, dtype))


# --------------------------------------------------------------- GEMM + bias
def gemm_with_bias(bias_shape=(8,), bias_first=False, read_twice=False):
    """``astype(matmul(a16, b16) : f32, f16) + bias``, the bias on either side; the product also returned if asked."""
    from tvm import relax

    def body(bb, a, b, bias):
        product = bb.emit(relax.op.astype(bb.emit(relax.op.matmul(a, b, out_dtype="float32")), "float16"))
        y = bb.emit(relax.op.add(bias, product) if bias_first else relax.op.add(product, bias))
        return relax.Tuple([y, product]) if read_twice else y

    return _function([_tensor("a", (6, 16)), _tensor("b", (16, 8)), _tensor("bias", bias_shape)], body)


def gemm_rows_fired(mod) -> dict:
    func = apply_table(mod["main"], gemm_table())[0]
    return matches_by_row(func, bias_table())


def _inputs(bias_shape=(8,)):
    torch.manual_seed(0)
    return (torch.randn(6, 16).half(), torch.randn(16, 8).half(), torch.randn(*bias_shape).half())


@pytest.mark.parametrize("bias_first", [False, True])
def test_the_bias_is_fused_on_either_side_of_the_add(bias_first):
    mod = gemm_with_bias(bias_first=bias_first)
    assert gemm_rows_fired(mod) == {"gemm+bias": 1}  # dpl matches add's operands in either order
    rewritten = offload.offload(gemm_with_bias(bias_first=bias_first), norm_act=False)
    text = rewritten["main"].script()
    assert text.count(f'R.call_dps_packed("{offload.GEMM_BIAS}"') == 1 and "R.add" not in text
    a, b, bias = _inputs()
    (got,) = run_on_cpu(rewritten, (a, b, bias))
    expected = (a.float() @ b.float()).half() + bias
    assert torch.allclose(got.float(), expected.float(), atol=2e-2)


@pytest.mark.parametrize("bias_shape", [(1,), (6, 1), (6, 8)])
def test_an_addend_that_is_not_one_value_per_column_is_not_a_bias(bias_shape):
    """Broadcast over the columns, per row, or a whole matrix: the GEMM stays a GEMM, the add stays."""
    rewritten = offload.offload(gemm_with_bias(bias_shape), norm_act=False)
    text = rewritten["main"].script()
    assert text.count(f'R.call_dps_packed("{offload.GEMM}"') == 1 and offload.GEMM_BIAS not in text
    assert "R.add" in text
    assert gemm_rows_fired(gemm_with_bias(bias_shape)) == {}
    a, b, bias = _inputs(bias_shape)
    (got,) = run_on_cpu(rewritten, (a, b, bias))
    assert torch.allclose(got.float(), ((a.float() @ b.float()).half() + bias).float(), atol=2e-2)


def test_a_product_read_elsewhere_keeps_its_bias_apart():
    assert gemm_rows_fired(gemm_with_bias(read_twice=True)) == {}


# ---------------------------------------------------------------------- GELU
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu_of_half(spelled_out: bool):
    """``gelu_tanh(astype(x16, f32))``, as Relax's op or spelled out in multiplies (what Relax no longer matches)."""
    from tvm import relax

    def const(value):
        return relax.const(value, "float32")

    def body(bb, x16):
        x = bb.emit(relax.op.astype(x16, "float32"))
        if not spelled_out:
            return bb.emit(relax.op.nn.gelu_tanh(x))
        cube = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(x, x)), x))
        inner = bb.emit(relax.op.add(x, bb.emit(relax.op.multiply(cube, const(0.044715)))))
        tanh = bb.emit(relax.op.tanh(bb.emit(relax.op.multiply(inner, const(SQRT_2_OVER_PI)))))
        half_x = bb.emit(relax.op.multiply(x, const(0.5)))
        return bb.emit(relax.op.multiply(half_x, bb.emit(relax.op.add(tanh, const(1.0)))))

    return _function([_tensor("x", (4, 8))], body)


def test_relax_gelu_tanh_goes_to_the_kernel():
    rewritten = offload.offload(gelu_of_half(spelled_out=False))
    text = rewritten["main"].script()
    assert text.count(f'R.call_dps_packed("{offload.GELU_TANH}"') == 1 and "R.nn.gelu" not in text
    x = torch.randn(4, 8).half()
    (got,) = run_on_cpu(rewritten, (x,))
    expected = torch.nn.functional.gelu(x.float(), approximate="tanh").half().float()
    assert torch.allclose(got, expected, atol=1e-3)


def test_gelu_spelled_out_in_constants_is_left_to_tvm():
    """GELU is recognised in fx (fuse-gelu); in Relax, a chain of multiplies and a tanh is just that."""
    rewritten = offload.offload(gelu_of_half(spelled_out=True))
    text = rewritten["main"].script()
    assert offload.GELU_TANH not in text and offload.GELU not in text and "R.tanh" in text


# -------------------------------------------------------------------- driver
def relu_module():
    from tvm import relax

    return _function([_tensor("x", (4, 8), "float32")], lambda bb, x: bb.emit(relax.op.nn.relu(x)))


def test_a_row_that_keeps_matching_its_own_output_is_named():
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    row = RelaxRewrite("relu-again", is_op("relax.nn.relu")(x),
                       lambda expr, facts, x: relax.op.nn.relu(relax.op.nn.relu(x)), {"x": x})
    with pytest.raises(fxopt.LoweringError, match=r"did not converge after 3 rounds; rows that kept firing in the "
                                                  r"last rounds: relu-again"):
        apply_table(relu_module()["main"], [row], max_rounds=3)


def test_a_failing_row_raises_a_lowering_error_naming_it():
    from tvm.relax.dpl import is_op, wildcard

    def broken(expr, facts, x):
        return {}["missing"]

    x = wildcard()
    row = RelaxRewrite("broken", is_op("relax.nn.relu")(x), broken, {"x": x})
    with pytest.raises(fxopt.LoweringError, match=r"Relax rewrite broken failed on a call of relax.nn.relu: KeyError"):
        apply_table(relu_module()["main"], [row])

