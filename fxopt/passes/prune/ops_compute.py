"""Handlers of the ops that compute: elementwise, reductions, linear, matmul, conv, attention.

Each ``relate_*`` unifies axes (see ``ops_shape.py``) and records roles, which name a group's kind:
``out``/``in`` (a weight's output/input features), ``conv`` (conv channels), ``attention`` (a batch
axis of a matmul between two activations: the heads), ``contract``/``attn-free`` (the other axes of
such a matmul: head dims), ``norm`` (a normalized axis), ``residual`` (an axis two activations add
along).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxopt.passes.prune import terms as T
from fxopt.passes.prune.analysis import Analysis, is_param
from fxopt.passes.prune.ops_shape import _arg, _dim, _set_arg


# ------------------------------------------------------------- elementwise
def relate_broadcast(an: Analysis, node: fx.Node) -> None:
    """Elementwise with broadcasting: equal-sized axes (aligned from the right) are one axis."""
    out_shape = an.shape(node)
    out = an.fresh(out_shape)
    tensors = [v for v in [*node.args, *node.kwargs.values()] if an.info(v) is not None]
    joined = {}  # output axis -> the distinct axis classes of activations added along it
    for value in tensors:
        shape, axes = an.shape(value), an.axes(value)
        offset = len(out_shape) - len(shape)
        for i, term in enumerate(axes):
            if shape[i] == out_shape[i + offset]:
                if not is_param(value) and shape[i] > 1:
                    classes = joined.setdefault(i + offset, [])
                    if not any(T.simplify(term) is T.simplify(c) for c in classes):
                        classes.append(T.simplify(term))
                an.unify(term, out[i + offset], node)
    if node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor):
        for axis, classes in joined.items():
            if len(classes) >= 2:  # x + f(x): two producers meet (not x + x**3 inside one activation)
                an.role(out[axis], "residual")
    an.set_axes(node, out)


def relate_same_shape(an: Analysis, node: fx.Node) -> None:
    """Ops whose output has their first input's shape, axis for axis (softmax, casts, ``*_like``)."""
    source = an.axes(node.args[0])
    out = an.fresh(an.shape(node))
    an.unify_all(source, out, node)
    an.set_axes(node, out)


def relate_reduction(dim_index: int, keepdim_index: int):
    """``op(x, dim, ..., keepdim)``: reduced axes are new (size 1 or gone), the others pass through."""

    def relate(an: Analysis, node: fx.Node) -> None:
        source = an.axes(node.args[0])
        rank = len(source)
        dims = _arg(node, dim_index, "dim", None)
        dims = range(rank) if dims is None or dims == [] else (dims if isinstance(dims, (list, tuple)) else [dims])
        reduced = {_dim(d, rank) for d in dims}
        keepdim = bool(_arg(node, keepdim_index, "keepdim", False))
        passing = [t for i, t in enumerate(source) if i not in reduced]
        outputs = an.fresh_output(node)
        for out in (outputs if isinstance(outputs, tuple) else (outputs,)):
            out_passing = [o for i, o in enumerate(out) if i not in reduced] if keepdim else out
            an.unify_all(passing, out_passing, node)

    return relate


# ------------------------------------------------------------ linear, matmul
def relate_linear(an: Analysis, node: fx.Node) -> None:
    """``linear(x, W[m, k], b[m])``: x's last axis is W's input axis, the output's is W's output axis."""
    x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    xs, ws = an.axes(x), an.axes(weight)
    out = an.fresh(an.shape(node))
    an.unify_all(xs[:-1], out[:-1], node)
    an.unify(xs[-1], ws[1], node)
    an.unify(out[-1], ws[0], node)
    if an.info(bias) is not None:
        an.unify(an.axes(bias)[-1], ws[0], node)
        an.param_role(bias, -1, "out")
    an.role(ws[0], "out")
    an.role(ws[1], "in")
    an.param_role(weight, 0, "out")
    an.param_role(weight, 1, "in")
    an.set_axes(node, out)


def relate_addmm(an: Analysis, node: fx.Node) -> None:
    """``addmm(bias, x[n, k], W[k, m])`` (GPT-2's Conv1D) and ``baddbmm`` likewise, batched."""
    bias = node.args[0]
    _relate_matmul(an, node, node.args[1], node.args[2], an.shape(node))
    out = an.axes(node)
    shape, axes = an.shape(bias), an.axes(bias)
    offset = len(out) - len(shape)
    for i, term in enumerate(axes):
        if shape[i] == an.shape(node)[i + offset]:
            an.unify(term, out[i + offset], node)
            if i + offset == len(out) - 1:
                an.param_role(bias, i, "out")


def relate_matmul(an: Analysis, node: fx.Node) -> None:
    _relate_matmul(an, node, node.args[0], node.args[1], an.shape(node))


def _relate_matmul(an: Analysis, node: fx.Node, a, b, out_shape) -> None:
    a_axes, b_axes = list(an.axes(a)), list(an.axes(b))
    a_vector, b_vector = len(a_axes) == 1, len(b_axes) == 1
    if a_vector:
        a_axes = [T.Atom(1)] + a_axes
    if b_vector:
        b_axes = b_axes + [T.Atom(1)]
    out = an.fresh(out_shape)
    full = list(out)
    if a_vector:
        full.insert(len(full) - (0 if b_vector else 1), T.Atom(1))
    if b_vector:
        full.append(T.Atom(1))
    an.unify(a_axes[-1], b_axes[-2], node)  # the contraction
    an.unify(a_axes[-2], full[-2], node)
    an.unify(b_axes[-1], full[-1], node)
    batch = full[:-2]
    for axes, value in ((a_axes[:-2], a), (b_axes[:-2], b)):
        offset = len(batch) - len(axes)
        shape = an.shape(value)
        for i, term in enumerate(axes):
            if shape[i] == out_shape[i + offset]:
                an.unify(term, batch[i + offset], node)
    _matmul_roles(an, a, b, a_axes, b_axes, batch)
    an.set_axes(node, out)


def _matmul_roles(an: Analysis, a, b, a_axes, b_axes, batch) -> None:
    if is_param(b):
        an.role(b_axes[-1], "out")
        an.role(b_axes[-2], "in")
        an.param_role(b, -1, "out")
        an.param_role(b, -2, "in")
    elif is_param(a):
        an.role(a_axes[-2], "out")
        an.role(a_axes[-1], "in")
        an.param_role(a, -2, "out")
        an.param_role(a, -1, "in")
    else:  # two activations: attention scores or context
        for term in batch:
            an.role(term, "attention")
        an.role(a_axes[-1], "contract")
        an.role(a_axes[-2], "attn-free")
        an.role(b_axes[-1], "attn-free")


def relate_sdpa(an: Analysis, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, mask, ..., enable_gqa)``: q [.., Hq, L, E], k/v [.., Hk, S, E/Ev]."""
    q, k, v = (an.axes(node.args[i]) for i in range(3))
    out = an.fresh(an.shape(node))
    for axes in (q, k, v):
        an.unify_all(axes[:-3], out[:-3], node)
    heads = q[-3]
    an.unify(k[-3], v[-3], node)
    if an.shape(node.args[0])[-3] == an.shape(node.args[1])[-3]:
        an.unify(heads, k[-3], node)
    else:  # GQA: query head j reads key/value head j // (Hq / Hk)
        repeats = an.shape(node.args[0])[-3] // an.shape(node.args[1])[-3]
        an.unify(heads, T.Prod((k[-3], T.Atom(repeats))), node)
    an.unify(heads, out[-3], node)
    an.unify(q[-2], out[-2], node)
    an.unify(q[-1], k[-1], node)
    an.unify(k[-2], v[-2], node)
    an.unify(v[-1], out[-1], node)
    mask = _arg(node, 3, "attn_mask")
    if an.info(mask) is not None:
        scores = out[:-3] + [heads, q[-2], k[-2]]
        shape = an.shape(mask)
        for i, term in enumerate(an.axes(mask)):
            if shape[i] != 1:
                an.unify(term, scores[len(scores) - len(shape) + i], node)
    for term in (heads, k[-3]):
        an.role(term, "attention")
    an.role(q[-1], "contract")
    an.role(v[-1], "attn-free")
    an.extra[node] = {"head_dim": q[-1]}
    an.set_axes(node, out)


def fix_sdpa(node: fx.Node, sizes) -> None:
    """Pruned query/key dims would change the default scale ``1/sqrt(E)``: pin it."""
    head_dim = sizes.extra(node)["head_dim"]
    if sizes.size(head_dim) != sizes.old_size(head_dim) and _arg(node, 6, "scale") is None:
        _set_arg(node, 6, "scale", 1.0 / math.sqrt(sizes.old_size(head_dim)))


# ------------------------------------------------------------- convolution
def relate_conv(groups_index: int, transposed_index=None):
    """Conv: input channels ``Prod(groups, in/group)``, weight ``[Prod(groups, out/group), in/group, ...]``."""

    def relate(an: Analysis, node: fx.Node) -> None:
        x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
        xs, ws = an.axes(x), an.axes(weight)
        out = an.fresh(an.shape(node))
        groups = int(_arg(node, groups_index, "groups", 1))
        transposed = transposed_index is not None and bool(_arg(node, transposed_index, "transposed", False))
        channels_in, channels_out = an.shape(x)[1], an.shape(node)[1]
        group = T.Atom(groups)
        per_in, per_out = T.Atom(channels_in // groups), T.Atom(channels_out // groups)
        an.unify(xs[1], T.Prod((group, per_in)), node)
        an.unify(out[1], T.Prod((group, per_out)), node)
        an.unify(out[0], xs[0], node)
        w_in, w_out = (0, 1) if transposed else (1, 0)
        an.unify(ws[w_in], T.Prod((group, per_in)) if transposed else per_in, node)
        an.unify(ws[w_out], per_out if transposed else T.Prod((group, per_out)), node)
        if an.info(bias) is not None:
            an.unify(an.axes(bias)[0], out[1], node)
            an.param_role(bias, 0, "out")
        an.param_role(weight, w_out, "out")
        an.param_role(weight, w_in, "in")
        for term in (xs[1], out[1]):
            an.role(term, "conv")
        an.role(out[1], "out")
        an.role(xs[1], "in")
        an.extra[node] = {"groups": group}
        an.set_axes(node, out)

    return relate


def fix_conv(groups_index: int):
    def fix(node: fx.Node, sizes) -> None:
        group = sizes.extra(node)["groups"]
        if sizes.size(group) != sizes.old_size(group):
            _set_arg(node, groups_index, "groups", sizes.size(group))

    return fix


# ------------------------------------------------------- blocked, ignored
def relate_fixed_size(reason: str):
    """Ops whose output size is fixed by their arguments (factories) or by data (indexing)."""

    def relate(an: Analysis, node: fx.Node) -> None:
        an.fresh_output(node)
        text = f"%{node.name} ({node.target}) {reason}"
        an.block_value(node, text)
        for value in node.all_input_nodes:
            if reason.startswith("indexes"):
                an.block_value(value, text)

    return relate


def relate_assert_metadata(an: Analysis, node: fx.Node) -> None:
    if _arg(node, 1, "size") is not None:
        an.block_value(node.args[0], f"%{node.name} asserts its size")


def relate_nothing(an: Analysis, node: fx.Node) -> None:
    """Ops without a tensor result (assertions, symbolic sizes)."""
    an.set_axes(node, None)
