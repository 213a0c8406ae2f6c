"""Relax rewrites that hand work to fxopt's CUDA extension (:mod:`fxopt.backends.tvm_cuda.extension`).

- :func:`offload_attention`, on the fp32 import *before* ``ToMixedPrecision``:
  ``nn.attention[_bias]`` (what ``aten.scaled_dot_product_attention`` imports
  to, BSNH layout) becomes ``fxopt.attention[_bias]`` on fp16 casts of q, k and
  v. It cannot wait: TVM 0.27's ToMixedPrecision rebuilds ``nn.attention``
  without its bias and scale (a wrong answer for every masked or rescaled SDPA).
- :func:`offload`, on the fp16 module after ``ToMixedPrecision``, before
  ``LegalizeOps``: a 16-bit ``matmul`` with fp32 accumulation cast back to 16
  bits, and a bias ``add`` that follows it, become ``fxopt.cublaslt.matmul[_bias]``; then
  (:func:`offload_norm_act`) ``layer_norm`` (with the residual ``add`` before it) and GELU, which
  ToMixedPrecision leaves in fp32 between casts, become ``fxopt.[add_]layer_norm[_sum]`` and
  ``fxopt.gelu[_tanh]`` on the 16-bit tensors.
"""
from __future__ import annotations

import math
from typing import List, Optional

GEMM = "fxopt.cublaslt.matmul"
GEMM_BIAS = "fxopt.cublaslt.matmul_bias"
ATTENTION = "fxopt.attention"
ATTENTION_BIAS = "fxopt.attention_bias"
LAYER_NORM = "fxopt.layer_norm"
ADD_LAYER_NORM = "fxopt.add_layer_norm"
ADD_LAYER_NORM_SUM = "fxopt.add_layer_norm_sum"
GELU = "fxopt.gelu"
GELU_TANH = "fxopt.gelu_tanh"
NORM_ACT_FUNCTIONS = (LAYER_NORM, ADD_LAYER_NORM, ADD_LAYER_NORM_SUM, GELU, GELU_TANH)
#: tensors the LayerNorm kernel reads and writes (gamma and beta too)
NORM_DTYPES = ("float16", "float32")
#: the LayerNorm kernel holds a row in registers: H a multiple of 8 (16-byte loads), at most this
MAX_NORM_HIDDEN = 8192
HALF_DTYPES = ("float16", "bfloat16")
#: ``nn.attention``'s causal_mask attribute -> the kernel's ``causal`` argument
CAUSAL_CODES = {None: 0, "TopLeft": 1, "BottomRight": 2}


# ----------------------------------------------------------- Relax rewrite
def _sinfo(expr):
    """The expression's type (TVM 0.27's name for struct info): shape and dtype, or None where not normalized."""
    return getattr(expr, "ty", None)


def _dtype(expr) -> Optional[str]:
    dtype = getattr(_sinfo(expr), "dtype", None)
    return None if dtype is None else str(dtype)  # a DataType: equal to its name, but hashed differently


def _static_shape(expr) -> Optional[List[int]]:
    shape = getattr(_sinfo(expr), "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def is_offloadable(a, b, matmul, cast) -> bool:
    """A 16-bit GEMM with fp32 accumulation cast back to its input dtype, shaped as the extension takes it."""
    dtype = _dtype(a)
    if dtype not in HALF_DTYPES or _dtype(b) != dtype or _dtype(matmul) != "float32" or _dtype(cast) != dtype:
        return False
    sa, sb = _static_shape(a), _static_shape(b)
    if sa is None or sb is None or len(sa) < 2:
        return False
    return len(sb) == 2 or (len(sb) == 3 and len(sa) == 3 and sa[0] == sb[0])


def is_bias_for(bias, gemm, add_dtype: Optional[str]) -> bool:
    """A 1-D [N] bias in the GEMM's dtype, or in float32 added to the GEMM's widened output."""
    shape = _static_shape(bias)
    return shape is not None and len(shape) == 1 and _dtype(bias) == add_dtype and \
        add_dtype in (_dtype(gemm), "float32") and shape[0] == _static_shape(gemm)[-1]


def offload(mod, norm_act: bool = True):
    """Rewrite every Relax function's 16-bit GEMMs (and their bias adds) into cuBLASLt calls, then tidy the glue.

    ``norm_act``: also residual + LayerNorm and GELU into fxopt's kernels (:func:`offload_norm_act`).
    """
    def rewrite(func):
        func = simplify_layout_glue(_fuse_bias(_offload_gemms(func)))
        return simplify_layout_glue(offload_norm_act(func)) if norm_act else func

    return _each_function(mod, rewrite)


def offload_attention(mod):
    """Rewrite every Relax function's float32 ``nn.attention[_bias]`` into fxopt's fp16 kernel, cast around it."""
    return _each_function(mod, _offload_attention)


def _each_function(mod, rewrite):
    from tvm import relax

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite(func)
    return mod


def _offload_gemms(func):
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    a, b = wildcard(), wildcard()
    matmul = is_op("relax.matmul")(a, b)
    cast = is_op("relax.astype")(matmul)

    def rewrite(expr, matched):
        if not is_offloadable(matched[a], matched[b], matched[matmul], expr):
            return expr
        return relax.op.call_dps_packed(GEMM, [matched[a], matched[b]], out_ty=_sinfo(expr))

    return rewrite_call(cast, rewrite, func)


def _fuse_bias(func):
    """``add(gemm, bias)`` -> ``gemm_bias``; ``add(astype(gemm, f32), bias32)`` -> ``astype(gemm_bias(.., bias16), f32)``.

    The second form is what ToMixedPrecision leaves where the sum feeds fp32
    work (a residual add, GELU); cuBLASLt adds the bias in its fp32 epilogue
    before the one rounding to 16 bits.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    gemm, bias = is_op("relax.call_dps_packed")(wildcard(), wildcard()), wildcard()
    widened = is_op("relax.astype")(gemm)
    add = (is_op("relax.add")(gemm, bias) | is_op("relax.add")(bias, gemm) |
           is_op("relax.add")(widened, bias) | is_op("relax.add")(bias, widened))
    uses = _use_counts(func)

    def rewrite(expr, matched):
        call = matched[gemm]
        gemm_var = max(expr.args, key=lambda arg: len(_static_shape(arg) or ()))  # the bias is 1-D
        if call.args[0].global_symbol != GEMM or not is_bias_for(matched[bias], call, _dtype(expr)) or \
                uses.get(gemm_var, 0) > 1:
            return expr
        if widened in matched and uses.get(matched[widened].args[0], 0) > 1:
            return expr
        bias16 = matched[bias] if _dtype(matched[bias]) == _dtype(call) else relax.op.astype(matched[bias], _dtype(call))
        fused = relax.op.call_dps_packed(GEMM_BIAS, [*call.args[1].fields, bias16], out_ty=_sinfo(call))
        return fused if _dtype(expr) == _dtype(call) else relax.op.astype(fused, _dtype(expr))

    return rewrite_call(add, rewrite, func)


def _use_counts(func) -> dict:
    """How many times each variable of ``func`` is read."""
    from tvm import relax

    counts: dict = {}

    @relax.expr_functor.visitor
    class Reads(relax.PyExprVisitor):
        def visit_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

    Reads().visit_expr(func)
    return counts


def attention_arguments(call) -> Optional[tuple]:
    """(scale, causal code) of a float32 ``nn.attention[_bias]`` call the kernel can take in fp16, or None."""
    q, k, v = call.args[:3]
    shapes = [_static_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or {_dtype(t) for t in (q, k, v)} != {"float32"}:
        return None
    head, head_v = shapes[0][3], shapes[2][3]
    if head % 16 or head_v % 16 or head > 256 or head_v > 256 or call.attrs.window_size is not None:
        return None
    if call.attrs.causal_mask not in CAUSAL_CODES:
        return None
    scale = call.attrs.scale
    return (float(scale.value) if scale is not None else 1.0 / math.sqrt(head)), CAUSAL_CODES[call.attrs.causal_mask]


def _offload_attention(func):
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    plain = is_op("relax.nn.attention")(wildcard(), wildcard(), wildcard())
    biased = is_op("relax.nn.attention_bias")(wildcard(), wildcard(), wildcard(), wildcard())

    def rewrite(expr, _matched):
        found = attention_arguments(expr)
        if found is None:
            return expr
        scale, causal = found
        name = ATTENTION_BIAS if len(expr.args) == 4 else ATTENTION
        halves = [relax.op.astype(t, "float16") for t in expr.args[:3]]
        extra = [relax.prim_value(tvm_float(scale)), relax.prim_value(causal)]
        out_ty = relax.TensorType(_static_shape(expr), "float16")
        call = relax.op.call_dps_packed(name, [*halves, *expr.args[3:], *extra], out_ty=out_ty)
        return relax.op.astype(call, "float32")

    return rewrite_call(plain | biased, rewrite, func)


def tvm_float(value: float):
    """A float64 PrimExpr: the packed function takes a C double."""
    import tvm

    return tvm.tirx.FloatImm("float64", value)  # TVM 0.27 (pinned) names the TIR module tirx


# ------------------------------------------------------------ LayerNorm and GELU
#: what an fp32 LayerNorm's consumers may be for the kernel to write it in fp16 (cast back to fp32 for them):
#: the casts to the next GEMM, and the next residual add, which the next LayerNorm's kernel takes in fp16
HALF_FRIENDLY_CONSUMERS = ("relax.astype", "relax.reshape", "relax.permute_dims", "relax.add", "relax.nn.layer_norm")
GELU_OPS = {"relax.nn.gelu": GELU, "relax.nn.gelu_tanh": GELU_TANH}
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def offload_norm_act(func):
    """LayerNorm (and the residual add before it) and GELU into fxopt's kernels, on 16-bit tensors.

    After ToMixedPrecision the residual stream of BERT, GPT-2 and ViT is fp32:
    ``layer_norm(add(reshape(astype(gemm16, f32)), residual32))`` then ``astype(.., f16)`` for the
    next GEMM; TVM runs that as three kernels (add, LayerNorm, cast). Here it becomes one
    ``fxopt.add_layer_norm(gemm16, residual, gamma, beta, eps)`` writing fp16 (fp32 statistics),
    cast back to fp32 for the consumers that were fp32, so the casts around it cancel
    (:func:`simplify_layout_glue`) and the next residual add reads the fp16 output: the residual
    stream is fp16, as in PyTorch's fp16 model. Where the sum is read again (pre-LN models: GPT-2,
    ViT), ``fxopt.add_layer_norm_sum`` also writes it (fp16), and its later readers take that. A
    LayerNorm of anything else (the embeddings' sum, broadcast) is ``fxopt.layer_norm``; a
    LayerNorm whose output the function returns writes fp32.

    ``gelu(reshape(astype(x16, f32)))`` (and the tanh form: ``nn.gelu_tanh`` or GPT-2's
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` spelled out in multiplies) becomes
    ``fxopt.gelu[_tanh](x16)``, fp32 math, fp16 out. Shapes must be static, dtypes float16 or
    float32 and H a multiple of 8 up to 8192; anything else is left as it is.

    Also ``split(reshape(astype(x16, f32)))`` (GPT-2's fused QKV, split in fp32 and each part cast
    back to fp16 for attention: six glue kernels a layer) becomes the split of ``x16``.
    """
    from tvm import relax

    uses = _use_counts(func)
    consumers = _consumer_ops(func)
    mutated = _norm_act_mutator(uses, consumers).visit_expr(func)
    return relax.analysis.remove_all_unused(mutated)


def _consumer_ops(func) -> dict:
    """For each variable, the op names (or node kinds, e.g. ``Tuple``) of the bindings that read it."""
    from tvm import relax

    found: dict = {}

    def note(value, kind):
        for var in relax.analysis.free_vars(value):
            found.setdefault(var, []).append(kind)

    body = func.body
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            note(value, _op_name(value) or type(value).__name__)
    note(body.body if hasattr(body, "body") else body, "output")
    return found


def _scalar(expr, lookup) -> Optional[float]:
    """The value of a scalar constant, also through a variable bound to ``astype(constant)``."""
    from tvm import relax
    from tvm.ir.expr import Constant  # TVM 0.27: relax.const makes a tvm.ir GenericConst

    for _ in range(4):
        if isinstance(expr, Constant):
            data = expr.value.numpy()
            return float(data.reshape(-1)[0]) if data.size == 1 else None
        if isinstance(expr, relax.Var):
            expr = lookup(expr)
        elif _op_name(expr) == "relax.astype":
            expr = expr.args[0]
        else:
            return None
    return None


def _close(value: Optional[float], target: float, rtol: float = 2e-3) -> bool:
    return value is not None and abs(value - target) <= rtol * abs(target)


def _norm_act_mutator(uses: dict, consumers: dict):
    from tvm import relax

    halved: dict = {}  # an fp32 split's variable -> the split of its 16-bit source

    @relax.expr_functor.mutator
    class NormAct(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            value = binding.value
            name = _op_name(value)
            done = False
            if isinstance(binding.var, relax.DataflowVar):
                if name == "relax.nn.layer_norm":
                    done = self._layer_norm(binding)
                elif name in GELU_OPS:
                    done = self._gelu(binding, GELU_OPS[name], value.args[0])
                elif name == "relax.multiply":
                    x = self._tanh_gelu_input(value)
                    done = x is not None and self._gelu(binding, GELU_TANH, x)
                elif name == "relax.split":
                    done = self._split(binding)
                elif isinstance(value, relax.TupleGetItem) and value.tuple_value in halved:
                    done = self._split_item(binding)
            if not done:
                super().visit_var_binding_(binding)

        # ---- split: GPT-2's fused QKV GEMM output, widened to fp32 and split, is split in 16 bits
        def _split(self, binding) -> bool:
            """``split(reshape(astype(x16, f32)))`` whose parts are only taken apart -> the split of ``x16``.

            Each part is cast back to fp32 where it is taken, so the casts to fp16 that follow cancel
            (:func:`simplify_layout_glue`); TVM then copies fp16 rather than casting fp32 twice.
            """
            call = binding.value
            only_taken_apart = all(kind == "TupleGetItem" for kind in consumers.get(binding.var, []))
            if _dtype(call.args[0]) != "float32" or not only_taken_apart:
                return False
            shape = _static_shape(call.args[0])
            source = self._source(self.visit_expr(call.args[0]))
            if shape is None or source is None or _dtype(source) != "float16":
                return False
            if _static_shape(source) != shape:
                source = self._emit(relax.op.reshape(source, shape))
            sections = call.attrs.indices_or_sections
            sections = [int(i) for i in sections] if not isinstance(sections, int) and \
                hasattr(sections, "__len__") else int(sections)
            halved[binding.var] = self._emit(relax.op.split(source, sections, int(call.attrs.axis)))
            return True

        def _split_item(self, binding) -> bool:
            item = self._emit(relax.TupleGetItem(halved[binding.value.tuple_value], binding.value.index))
            self.set_var_remap(binding.var, self._emit(relax.op.astype(item, "float32")))
            return True

        # ---- helpers on the rewritten bindings
        def _bound(self, expr):
            """What ``expr`` (a variable of the new function) is bound to, or ``expr``."""
            if isinstance(expr, relax.Var):
                value = self.lookup_binding(expr)
                return expr if value is None else value
            return expr

        def _source(self, expr):
            """A tensor with ``expr``'s elements in row-major order, 16-bit where ``expr`` is a widening cast.

            Follows ``reshape``s (which do not move data) down to a float16 tensor or ``astype(x16, f32)``;
            otherwise ``expr`` itself if it is float16 or float32, else None.
            """
            x = expr
            for _ in range(8):
                if _dtype(x) == "float16":
                    return x
                value = self._bound(x)
                if _op_name(value) == "relax.reshape":
                    x = value.args[0]
                elif _op_name(value) == "relax.astype" and _dtype(value.args[0]) == "float16":
                    return value.args[0]
                else:
                    break
            return expr if _dtype(expr) in NORM_DTYPES else None

        def _emit(self, expr):
            return self.builder_.emit(expr)

        def _finish(self, binding, out, dtype: str, shape: List[int]) -> bool:
            """Bind ``out`` (reshaped and cast to the original's shape and dtype) in place of ``binding``'s variable."""
            if _static_shape(out) != shape:
                out = self._emit(relax.op.reshape(out, shape))
            if _dtype(out) != dtype:
                out = self._emit(relax.op.astype(out, dtype))
            self.set_var_remap(binding.var, out)
            return True

        # ---- LayerNorm
        def _layer_norm(self, binding) -> bool:
            call = binding.value
            shape, dtype = _static_shape(call), _dtype(call)
            if not shape or dtype not in NORM_DTYPES:
                return False
            hidden, attrs = shape[-1], call.attrs
            axes = [int(a) for a in attrs.axes]
            if axes not in ([-1], [len(shape) - 1]) or not attrs.center or not attrs.scale or \
                    hidden % 8 or hidden > MAX_NORM_HIDDEN:
                return False
            x, gamma, beta = (self.visit_expr(arg) for arg in call.args)
            if any(_static_shape(t) != [hidden] or _dtype(t) not in NORM_DTYPES for t in (gamma, beta)):
                return False
            eps = relax.prim_value(tvm_float(float(attrs.epsilon)))
            half = dtype == "float16" or all(kind in HALF_FRIENDLY_CONSUMERS for kind in consumers.get(binding.var, []))
            out_ty = relax.TensorType(shape, "float16" if half else "float32")
            added = self._bound(x)
            operands = None
            if _op_name(added) == "relax.add" and all(_static_shape(a) == shape for a in added.args):
                operands = [self._source(a) for a in added.args]
                operands = None if None in operands else operands
            if operands is None:
                source = self._source(x)
                if source is None:
                    return False
                out = self._emit(relax.op.call_dps_packed(LAYER_NORM, [source, gamma, beta, eps], out_ty=out_ty))
                return self._finish(binding, out, dtype, shape)
            summed = call.args[0]  # the add's variable in the original function
            if uses.get(summed, 0) <= 1:
                out = self._emit(relax.op.call_dps_packed(ADD_LAYER_NORM, [*operands, gamma, beta, eps], out_ty=out_ty))
                return self._finish(binding, out, dtype, shape)
            # the sum is read again (pre-LN): the kernel writes it too, and its later readers take that
            both = self._emit(relax.op.call_dps_packed(
                ADD_LAYER_NORM_SUM, [*operands, gamma, beta, eps], out_ty=[out_ty, relax.TensorType(shape, "float16")]))
            total = self._emit(relax.TupleGetItem(both, 1))
            if _dtype(added) != "float16":
                total = self._emit(relax.op.astype(total, _dtype(added)))
            self.set_var_remap(summed, total)
            return self._finish(binding, self._emit(relax.TupleGetItem(both, 0)), dtype, shape)

        # ---- GELU
        def _gelu(self, binding, function: str, x) -> bool:
            shape, dtype = _static_shape(binding.value), _dtype(binding.value)
            if shape is None or dtype not in NORM_DTYPES:
                return False
            source = self._source(self.visit_expr(x))
            if source is None or _dtype(source) != "float16" or _static_shape(source) is None:
                return False
            out = self._emit(relax.op.call_dps_packed(function, [source],
                                                      out_ty=relax.TensorType(_static_shape(source), "float16")))
            return self._finish(binding, out, dtype, shape)

        def _tanh_gelu_input(self, call):
            """x where ``call`` is ``multiply(multiply(x, 0.5), add(tanh(multiply(add(x, multiply(x^3, 0.044715)),
            sqrt(2/pi))), 1))``, operands of each multiply and add in either order, x^3 as ``x * x * x`` or
            ``power(x, 3)``; else None."""
            lookup = self._bound
            args = [self.visit_expr(a) for a in call.args]
            for half_side, one_side in (args, args[::-1]):
                x = self._scaled(lookup(half_side), 0.5)
                shifted = self._other(lookup(one_side), "relax.add", 1.0)
                tanh = lookup(shifted) if shifted is not None else None
                if x is None or _op_name(tanh) != "relax.tanh":
                    continue
                inner = self._scaled(lookup(tanh.args[0]), SQRT_2_OVER_PI)
                inner = lookup(inner) if inner is not None else None
                if _op_name(inner) != "relax.add":
                    continue
                for first, second in (inner.args, inner.args[::-1]):
                    cube = self._scaled(lookup(second), 0.044715) if first.same_as(x) else None
                    if cube is not None and self._is_cube(lookup(cube), x):
                        return x
            return None

        def _other(self, value, op: str, constant: float):
            """The non-constant operand of ``op(a, constant)`` or ``op(constant, a)``."""
            if _op_name(value) != op:
                return None
            a, b = value.args
            if _close(_scalar(b, self._bound), constant):
                return a
            if _close(_scalar(a, self._bound), constant):
                return b
            return None

        def _scaled(self, value, constant: float):
            return self._other(value, "relax.multiply", constant)

        def _is_cube(self, value, x) -> bool:
            if _op_name(value) == "relax.power":
                return value.args[0].same_as(x) and _close(_scalar(value.args[1], self._bound), 3.0)
            if _op_name(value) != "relax.multiply":
                return False
            for square, single in (value.args, value.args[::-1]):
                square = self._bound(square)
                if single.same_as(x) and _op_name(square) == "relax.multiply" and \
                        all(a.same_as(x) for a in square.args):
                    return True
            return False

    return NormAct()


# ------------------------------------------------------------ glue around the calls
LAYOUT_OPS = ("relax.reshape", "relax.permute_dims")


def simplify_layout_glue(func, rounds: int = 4):
    """Drop the copies the import leaves around attention and GEMMs, exactly:

    - ``permute_dims(permute_dims(x, p), q)`` becomes one permutation, or ``x``;
    - ``astype(x, t)`` with ``x`` already ``t`` becomes ``x``;
    - ``astype(layout ops(astype(x16, float32)), float16)`` becomes ``layout ops(x16)``
      (fp16 -> fp32 -> fp16 is lossless, and reshapes and permutations commute with casts).
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.astype")(wildcard()) | is_op("relax.permute_dims")(wildcard())
    for _ in range(rounds):
        values = relax.analysis.get_var2val(func)
        simpler = rewrite_call(pattern, lambda expr, _m: _simpler(expr, values), func)
        if simpler.same_as(func):
            break
        func = relax.analysis.remove_all_unused(simpler)
    return func


def _value(expr, values):
    """What a variable is bound to (dpl hands over calls whose arguments are variables)."""
    from tvm import relax

    return values.get(expr, expr) if isinstance(expr, relax.Var) else expr


def _op_name(expr) -> Optional[str]:
    op = getattr(expr, "op", None)
    return getattr(op, "name", None)


def _simpler(expr, values):
    if _op_name(expr) == "relax.permute_dims":
        return _composed_permutation(expr, values)
    target = str(expr.attrs.dtype)
    source = expr.args[0]
    if _dtype(source) == target:
        return source
    chain, inner = [], _value(source, values)
    while _op_name(inner) in LAYOUT_OPS:
        chain.append(inner)
        inner = _value(inner.args[0], values)
    if _op_name(inner) != "relax.astype" or _dtype(inner) != "float32" or _dtype(inner.args[0]) != target or \
            target not in HALF_DTYPES:
        return expr
    return _replay(inner.args[0], chain)


def _composed_permutation(expr, values):
    from tvm import relax

    inner = _value(expr.args[0], values)
    if _op_name(inner) != "relax.permute_dims" or expr.attrs.axes is None or inner.attrs.axes is None:
        return expr
    first, second = [int(a) for a in inner.attrs.axes], [int(a) for a in expr.attrs.axes]
    composed = [first[i] for i in second]
    if composed == list(range(len(composed))):
        return inner.args[0]
    return relax.op.permute_dims(inner.args[0], composed)


def _replay(x, chain):
    """Apply the layout ops of ``chain`` (outermost first) to ``x``, innermost first."""
    from tvm import relax

    for op in reversed(chain):
        if _op_name(op) == "relax.reshape":
            x = relax.op.reshape(x, op.args[1])
        else:
            x = relax.op.permute_dims(x, op.attrs.axes)
    return x
