"""LayerNorms whose float16 output an fp8 or int8 linear quantizes write the codes themselves.

After :func:`~fxopt.backends.tvm_cuda.offload.offload`, a LayerNorm feeding fp8 or int8 linears (BERT's q/k/v and
its FFN's first linear) is two kernels, the second reading the first's output back::

    y = fxopt.add_layer_norm(x, r, gamma, beta, eps)               (or layer_norm, or add_layer_norm_sum's [0])
    q = fxopt.fp8.quantize_rows(y)                                 (or fxopt.int8.quantize_rows)

Here they become one, ``t = fxopt.add_layer_norm_quantized(x, r, gamma, beta, eps)`` writing ``y`` and ``q``'s
codes and scales: ``y = t[0]`` for the LayerNorm's other readers (the residual) and ``q = (t[1], t[2])``. The
kernel quantizes ``y`` as stored, so the codes are bitwise the row quantizer's (``norm_act.cu``). A
LayerNorm writing float32, or quantized twice (fp8 and int8 readers), keeps its first quantization only fused.
"""
from __future__ import annotations

from typing import Dict, Optional

from fxopt.backends.tvm_cuda.extension_calls import (
    ADD_LAYER_NORM, ADD_LAYER_NORM_SUM, FP8_QUANTIZE_ROWS, INT8_QUANTIZE_ROWS, LAYER_NORM, packed_call,
)
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of

#: each LayerNorm kernel and its quantizing variant (outputs: its own, then codes and scales)
QUANTIZING = {name: f"{name}_quantized" for name in (LAYER_NORM, ADD_LAYER_NORM, ADD_LAYER_NORM_SUM)}
QUANTIZERS = (FP8_QUANTIZE_ROWS, INT8_QUANTIZE_ROWS)


def packed_name(value) -> Optional[str]:
    """The extension function a ``R.call_dps_packed`` calls; None for anything else."""
    op = getattr(value, "op", None)
    if getattr(op, "name", None) != "relax.call_dps_packed":
        return None
    return str(value.args[0].global_symbol)


def fusable_pairs(func) -> Dict[object, object]:
    """``{LayerNorm call's var: quantization's var}`` for each quantization of a float16 LayerNorm output."""
    from tvm import relax

    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    pairs: Dict[object, object] = {}
    for var, value in bound.items():
        if packed_name(value) not in QUANTIZERS:
            continue
        source = value.args[1].fields[0]
        norm = source
        if isinstance(bound.get(source), relax.TupleGetItem) and bound[source].index == 0:
            norm = bound[source].tuple_value  # add_layer_norm_sum's first output
        name = packed_name(bound.get(norm))
        is_sum = name == ADD_LAYER_NORM_SUM
        if name in QUANTIZING and (norm is not source) == is_sum and dtype_of(source) == "float16" \
                and norm not in pairs:
            pairs[norm] = var
    return pairs


def fuse_norm_quantize(func):
    """``func`` with each LayerNorm + row quantization pair of :func:`fusable_pairs` one quantizing LayerNorm."""
    from tvm import relax

    pairs = fusable_pairs(func)
    if not pairs:
        return func
    norm_of = {quantized: norm for norm, quantized in pairs.items()}

    @relax.expr_functor.mutator
    class Fuse(relax.PyExprMutator):
        def __init__(self):
            super().__init__()
            self.calls = {}  # LayerNorm var -> (quantizing call's var, its own outputs)

        def visit_var_binding_(self, binding):
            var = binding.var
            if var in pairs:
                return self.emit_quantizing_norm(var, self.visit_expr(binding.value), pairs[var].ty)
            if var in norm_of:
                call, own = self.calls[norm_of[var]]
                return self.rebind(var, relax.Tuple([relax.TupleGetItem(call, own), relax.TupleGetItem(call, own + 1)]))
            return super().visit_var_binding_(binding)

        def emit_quantizing_norm(self, var, value, quantized_ty):
            own = list(value.ty_args[0].fields) if isinstance(var.ty, relax.TupleType) else [value.ty_args[0]]
            call = self.builder_.emit(packed_call(QUANTIZING[packed_name(value)], list(value.args[1].fields),
                                                  own + list(quantized_ty.fields)))
            self.calls[var] = (call, len(own))
            items = [relax.TupleGetItem(call, i) for i in range(len(own))]
            self.rebind(var, relax.Tuple(items) if len(own) > 1 else items[0])

        def rebind(self, var, value):
            self.builder_.emit_normalized(relax.VarBinding(var, self.builder_.normalize(value)))

    return Fuse().visit_expr(func)
