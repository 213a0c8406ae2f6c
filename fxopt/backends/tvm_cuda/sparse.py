"""Relax lowerings of ``fxopt.csr_linear`` (the ``sparsify`` pass's CSR linear) for the CUDA backend.

Two converters, both taking the op's CSR arrays (``crow_indices`` [out + 1],
``col_indices`` [nnz], ``values`` [nnz]) as they are in the graph:

- :func:`csr_linear_densified`, the default (in ``FXOPT_CONVERTERS``): a TIR
  function scatters the CSR arrays into the dense weight [out, in], then an
  ordinary ``relax.op.linear``. The arrays are bound weights, so the pipeline's
  ``FoldConstant`` runs the scatter once at build time (with
  ``keep_params_as_input`` it is lifted into ``main_transform_params`` and runs
  at load time): the kernels are the dense ones, fp16 tensor-core GEMMs
  included. Sparsity saves disk and transfer here, not GPU time. This is the
  correct fallback, chosen because a dense tensor-core GEMM beats a scalar
  CSR kernel until very high sparsity (an expectation, not measured: the GPU
  machine has no TVM).
- :func:`csr_linear_sparse_kernel`, opt-in via
  ``custom_convert_map={"csr_linear.default": csr_linear_sparse_kernel}``: a
  TIR kernel that reads only the nonzeros, ``y[m, n] = sum over k in row n of
  values[k] * x[m, col[k]] (+ bias[n])``, one thread per output element (dlight's
  fallback schedule binds it). It computes in the values' dtype (float32 after
  a float32 import), so ToMixedPrecision leaves it alone.

Both are TIR with data-dependent loop bounds (``crow[n]`` .. ``crow[n + 1]``),
which TE cannot express, hence TVMScript (``tirx`` in TVM 0.27).
"""
from __future__ import annotations

import functools
from typing import Tuple


def _csr_args(node, importer):
    """The Relax values of the op's tensor arguments, and its (out_features, in_features)."""
    x, crow, col, values, out_features, in_features, bias = importer.retrieve_args(node)
    return x, crow, col, values, bias, (int(out_features), int(in_features))


@functools.lru_cache(maxsize=None)
def _densify_func(shape: Tuple[int, int], nnz: int, index_dtype: str, dtype: str):
    """TIR: the dense [out, in] weight of CSR arrays (zeros, then each row's nonzeros scattered)."""
    from tvm.script import tirx as T

    rows, cols = shape

    @T.prim_func(private=True, s_tir=True)
    def csr_densify(crow: T.Buffer((rows + 1,), index_dtype), col: T.Buffer((nnz,), index_dtype),
                    values: T.Buffer((nnz,), dtype), weight: T.Buffer((rows, cols), dtype)):
        T.func_attr({"tir.noalias": True})
        for r in range(rows):
            with T.sblock("csr_densify_row"):
                vr = T.axis.spatial(rows, r)
                T.reads(crow[vr:vr + 2], col[0:nnz], values[0:nnz])
                T.writes(weight[vr, 0:cols])
                for c in range(cols):
                    weight[vr, c] = T.cast(0, dtype)
                for k in range(crow[vr], crow[vr + 1]):
                    weight[vr, col[k]] = values[k]

    return csr_densify


@functools.lru_cache(maxsize=None)
def _sparse_kernel_func(rows: int, shape: Tuple[int, int], nnz: int, index_dtype: str, dtype: str):
    """TIR: ``out[m, n] = sum_{k in row n} values[k] * x[m, col[k]]`` for x [rows, in], out [rows, out]."""
    from tvm.script import tirx as T

    out_features, in_features = shape

    @T.prim_func(private=True, s_tir=True)
    def csr_linear(x: T.Buffer((rows, in_features), dtype), crow: T.Buffer((out_features + 1,), index_dtype),
                   col: T.Buffer((nnz,), index_dtype), values: T.Buffer((nnz,), dtype),
                   out: T.Buffer((rows, out_features), dtype)):
        T.func_attr({"tir.noalias": True})
        for m, n in T.grid(rows, out_features):
            with T.sblock("csr_linear"):
                vm, vn = T.axis.remap("SS", [m, n])
                T.reads(x[vm, 0:in_features], crow[vn:vn + 2], col[0:nnz], values[0:nnz])
                T.writes(out[vm, vn])
                out[vm, vn] = T.cast(0, dtype)
                for k in range(crow[vn], crow[vn + 1]):
                    out[vm, vn] = out[vm, vn] + values[k] * x[vm, col[k]]

    return csr_linear


def _dims(value) -> Tuple[int, ...]:
    return tuple(int(d) for d in value.ty.shape)


def csr_linear_densified(node, importer):
    """fxopt.csr_linear as ``linear(x, densify(crow, col, values), bias)``; the densify folds at build time."""
    from tvm import relax

    x, crow, col, values, bias, shape = _csr_args(node, importer)
    bb, dtype, nnz = importer.block_builder, str(values.ty.dtype), _dims(values)[0]
    if nnz == 0:  # an all-zero weight: TIR buffers cannot be empty
        weight = bb.emit(relax.op.zeros(shape, dtype))
    else:
        func = bb.add_func(_densify_func(shape, nnz, str(crow.ty.dtype), dtype), "csr_densify")
        weight = bb.emit(relax.call_tir(func, [crow, col, values], relax.TensorType(shape, dtype)))
    return bb.emit(relax.op.linear(x, weight, bias, out_dtype=dtype))


def csr_linear_sparse_kernel(node, importer):
    """fxopt.csr_linear as a TIR kernel over the nonzeros only (input flattened to [rows, in])."""
    from tvm import relax

    x, crow, col, values, bias, shape = _csr_args(node, importer)
    bb, dtype, nnz = importer.block_builder, str(values.ty.dtype), _dims(values)[0]
    if nnz == 0:
        return csr_linear_densified(node, importer)
    leading = _dims(x)[:-1]
    rows = 1
    for d in leading:
        rows *= d
    flat = bb.emit(relax.op.reshape(x, (rows, shape[1])))
    func = bb.add_func(_sparse_kernel_func(rows, shape, nnz, str(crow.ty.dtype), dtype), "csr_linear")
    out = bb.emit(relax.call_tir(func, [flat, crow, col, values], relax.TensorType((rows, shape[0]), dtype)))
    if bias is not None:
        out = bb.emit(relax.op.add(out, bias))
    return bb.emit(relax.op.reshape(out, (*leading, shape[0])))
