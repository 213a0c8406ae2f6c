"""A pruned linear weight in CSR form, and when ``fxopt.csr_linear`` is faster than the dense product.

``fxopt.csr_linear`` (fxopt/ir/ops.py) multiplies by a weight stored as its
CSR arrays: ``crow_indices`` [out + 1], ``col_indices`` [nnz], ``values``
[nnz]. The indices are int32, which MKL takes as they are (int64 ones are
converted on every call), and which halve their size on disk.

Whether CSR pays depends on the density (nonzeros / elements) and on how many
rows the linear multiplies per call: one row is a sparse matrix-vector
product, which beats the memory-bound dense GEMV from about a third density
down; many rows are a sparse x dense product that only beats the dense GEMM
(which runs near the machine's peak) at lower densities. Each crossover is the
largest measured density at which ``fxopt.csr_linear`` beat dense for both
benchmarked shapes (4096x4096 and 768->3072) at every lower measured density,
so between grid points it errs towards dense. Measured by
``benchmarks/sparse_linear.py``, whose results files say more:

- sparse_linear_1thread.md, this machine (2 Zen 1 cores, MKL), 1 thread:
  one row 0.3 in three runs, 32 rows 0.1 in two and 0.3 in the third (the
  load average was 6-8 throughout); the values below, the lower one for 32 rows;
- sparse_linear.md, this machine at 2 threads (the default here), quiet
  (load average 1.1-1.4): one row 0.5, 32 rows 0.3. Fewer threads move the
  crossovers down, so the constants keep the 1-thread values: CSR then wins at
  either thread count;
- sparse_linear_xeon.md, the GPU host's Xeon at 2 threads, quiet: one row
  0.05-0.1, 32 rows 0.1-0.3 over five runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fxopt.ir import meta as M

#: CSR beats dense at or below this density when the linear multiplies one row (batch 1, no sequence dim).
#: Measured: benchmarks/results/sparse_linear_1thread.md and sparse_linear.md (2 threads: 0.5); see the docstring.
CSR_MAX_DENSITY_ONE_ROW = 0.3
#: CSR beats dense at or below this density when the linear multiplies several rows (or a dynamic number).
#: Measured: benchmarks/results/sparse_linear_1thread.md and sparse_linear.md (2 threads: 0.3); see the docstring.
CSR_MAX_DENSITY_MANY_ROWS = 0.1
#: The index dtype of the CSR arrays (the benchmark's int64 variant was slower).
INDEX_DTYPE = torch.int32


def to_csr(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow_indices, col_indices, values)`` of a 2-D weight, zeros dropped, indices int32."""
    csr = weight.detach().to_sparse_csr()
    # clone: the accessors return views of the sparse tensor, which fake tensors (and safetensors) cannot take
    return (csr.crow_indices().to(INDEX_DTYPE).clone(), csr.col_indices().to(INDEX_DTYPE).clone(),
            csr.values().clone())


def density(weight: torch.Tensor) -> float:
    """The fraction of nonzero entries."""
    return int(torch.count_nonzero(weight)) / max(1, weight.numel())


def rows_per_call(input_node) -> Optional[int]:
    """How many rows a linear multiplies per call: the product of its input's leading dims (None if dynamic)."""
    info = M.tensor_info(input_node)
    if not info.is_static:
        return None
    rows = 1
    for dim in info.shape[:-1]:
        rows *= dim
    return rows


def csr_is_faster(weight_density: float, rows: Optional[int]) -> bool:
    """Whether the measured crossover says CSR beats the dense product at this density and row count."""
    limit = CSR_MAX_DENSITY_ONE_ROW if rows == 1 else CSR_MAX_DENSITY_MANY_ROWS
    return weight_density <= limit
