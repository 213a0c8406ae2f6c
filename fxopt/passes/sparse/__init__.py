"""Sparsity: the ``sparsify`` pass (magnitude pruning, unstructured or N:M) and its CSR linear."""
from fxopt.passes.sparse.csr import CSR_MAX_DENSITY_MANY_ROWS, CSR_MAX_DENSITY_ONE_ROW, to_csr
from fxopt.passes.sparse.magnitude import global_masks, layer_masks, nm_mask, parse_nm
from fxopt.passes.sparse.sparsify import Sparsify

__all__ = [
    "Sparsify", "CSR_MAX_DENSITY_ONE_ROW", "CSR_MAX_DENSITY_MANY_ROWS", "to_csr", "layer_masks", "global_masks",
    "nm_mask", "parse_nm",
]
