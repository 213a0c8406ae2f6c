"""Handlers of the ops that move, split and join axes: views, permutes, expand, slice, split, cat.

``relate(an, node)`` unifies the node's output axes with its input axes (``analysis.Analysis``);
``fix(node, sizes)`` rewrites the node's size arguments once groups are pruned, from the new sizes
``sizes`` predicts (``apply.Sizes``). A reshape is one unification of the flat products of the input
and output axes: ``[b, s, 32] -> [b, s, 4, 8]`` refines the 32 into ``4 x 8``; a merge of heads
back into features composes them again.
"""
from __future__ import annotations

from typing import List

import torch.fx as fx

from fxopt.passes.prune import terms as T
from fxopt.passes.prune.analysis import Analysis

INT64_MAX = 2 ** 63 - 1


def _arg(node: fx.Node, index: int, name: str, default=None):
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ------------------------------------------------------------------ reshape
def relate_reshape(an: Analysis, node: fx.Node) -> None:
    source = an.axes(node.args[0])
    out = an.fresh(an.shape(node))
    an.unify(T.product(source) if source else T.Atom(1), T.product(out) if out else T.Atom(1), node)
    an.set_axes(node, out)


def fix_size_list(index: int, name: str):
    """Rewrite a size list argument (``view``'s shape, ``expand``'s sizes) from the new output shape."""

    def fix(node: fx.Node, sizes) -> None:
        old, new = sizes.old_shape(node), sizes.shape(node)
        if old == new:
            return
        given = list(_arg(node, index, name))
        offset = len(old) - len(given)
        for i, value in enumerate(given):
            if isinstance(value, int) and value != -1 and old[i + offset] != new[i + offset]:
                given[i] = new[i + offset]
        _set_arg(node, index, name, given)

    return fix


# ------------------------------------------------------------------ permute
def relate_permute(an: Analysis, node: fx.Node) -> None:
    source = an.axes(node.args[0])
    dims = [_dim(d, len(source)) for d in node.args[1]]
    an.set_axes(node, [source[d] for d in dims])


def relate_transpose(an: Analysis, node: fx.Node) -> None:
    source = list(an.axes(node.args[0]))
    rank = len(source)
    a, b = (_dim(d, rank) for d in (_arg(node, 1, "dim0", 0), _arg(node, 2, "dim1", 1)))
    source[a], source[b] = source[b], source[a]
    an.set_axes(node, source)


def relate_t(an: Analysis, node: fx.Node) -> None:
    an.set_axes(node, list(reversed(an.axes(node.args[0]))))


def relate_unsqueeze(an: Analysis, node: fx.Node) -> None:
    source = list(an.axes(node.args[0]))
    dim = _dim(node.args[1], len(source) + 1)
    an.set_axes(node, source[:dim] + [T.Atom(1)] + source[dim:])


def relate_squeeze(an: Analysis, node: fx.Node) -> None:
    source, shape = an.axes(node.args[0]), an.shape(node.args[0])
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        dims = [i for i, d in enumerate(shape) if d == 1]
    dims = {_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    an.set_axes(node, [t for i, t in enumerate(source) if not (i in dims and shape[i] == 1)])


def relate_expand(an: Analysis, node: fx.Node) -> None:
    source, in_shape = an.axes(node.args[0]), an.shape(node.args[0])
    out_shape = an.shape(node)
    out = an.fresh(out_shape)
    offset = len(out_shape) - len(in_shape)
    for i, term in enumerate(source):
        if in_shape[i] == out_shape[i + offset]:
            an.unify(term, out[i + offset], node)
    an.set_axes(node, out)


# ------------------------------------------------------------ slice, select
def _bounds(start, end, length: int):
    start = 0 if start is None else start
    end = length if end is None or end >= INT64_MAX else end
    start, end = (v + length if v < 0 else v for v in (start, end))
    start, end = max(0, min(start, length)), max(0, min(end, length))
    return start, max(start, end)


def relate_slice(an: Analysis, node: fx.Node) -> None:
    source, shape = list(an.axes(node.args[0])), an.shape(node.args[0])
    dim = _dim(_arg(node, 1, "dim", 0), len(shape))
    start, end = _bounds(_arg(node, 2, "start"), _arg(node, 3, "end"), shape[dim])
    step = _arg(node, 4, "step", 1)
    out = list(source)
    if (start, end) != (0, shape[dim]) or step != 1:
        out[dim] = T.Atom(an.shape(node)[dim])
        if step == 1:
            before, after = T.Atom(start), T.Atom(shape[dim] - end)
            an.unify(source[dim], T.Cat((before, out[dim], after)), node)
            an.extra[node] = {"before": before}
        else:
            an.block(source[dim], f"%{node.name} slices it with step {step}")
            an.block(out[dim], f"%{node.name} slices it with step {step}")
    an.set_axes(node, out)


def fix_slice(node: fx.Node, sizes) -> None:
    bounds = sizes.extra(node)
    if not bounds:
        return
    dim = _dim(_arg(node, 1, "dim", 0), len(sizes.shape(node)))
    start, length = sizes.size(bounds["before"]), sizes.shape(node)[dim]
    if (start, length) != (sizes.old_size(bounds["before"]), sizes.old_shape(node)[dim]):
        _set_arg(node, 2, "start", start)
        _set_arg(node, 3, "end", start + length)


def relate_select(an: Analysis, node: fx.Node) -> None:
    source, shape = list(an.axes(node.args[0])), an.shape(node.args[0])
    dim = _dim(node.args[1], len(shape))
    index = node.args[2] + shape[dim] if node.args[2] < 0 else node.args[2]
    before, after = T.Atom(index), T.Atom(shape[dim] - index - 1)
    an.unify(source[dim], T.Cat((before, T.Atom(1), after)), node)
    an.extra[node] = {"before": before}
    an.set_axes(node, source[:dim] + source[dim + 1:])


def fix_select(node: fx.Node, sizes) -> None:
    before = sizes.extra(node)["before"]
    if sizes.size(before) != sizes.old_size(before):
        node.update_arg(2, sizes.size(before))


# --------------------------------------------------------------- split, cat
def relate_split(an: Analysis, node: fx.Node) -> None:
    source, shape = an.axes(node.args[0]), an.shape(node.args[0])
    dim = _dim(_arg(node, 2, "dim", 0), len(shape))
    pieces = an.fresh_output(node)
    an.unify(source[dim], T.Cat(tuple(p[dim] for p in pieces)), node)
    for piece in pieces:
        an.unify_all([t for i, t in enumerate(source) if i != dim], [t for i, t in enumerate(piece) if i != dim],
                     node)


def fix_split(node: fx.Node, sizes) -> None:
    """New piece sizes; ``split.Tensor`` becomes ``split_with_sizes`` when they are no longer equal."""
    import torch

    rank = len(sizes.old_shape(node.args[0]))
    dim = _dim(_arg(node, 2, "dim", 0), rank)
    old = [s[dim] for s in sizes.old_shape(node)]
    new = [s[dim] for s in sizes.shape(node)]
    if old == new:
        return
    if node.target == torch.ops.aten.split.Tensor and all(n == new[0] for n in new[:-1]) and new[-1] <= new[0]:
        node.update_arg(1, new[0])
        return
    node.target = torch.ops.aten.split_with_sizes.default
    node.args = (node.args[0], new, dim)
    node.kwargs = {}


def relate_cat(an: Analysis, node: fx.Node) -> None:
    out = an.fresh(an.shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), len(out))
    pieces = [t for t in node.args[0] if an.info(t) is not None and len(an.shape(t)) == len(out)]
    for piece in pieces:
        axes = an.axes(piece)
        an.unify_all(axes[:dim] + axes[dim + 1:], out[:dim] + out[dim + 1:], node)
    an.unify(out[dim], T.Cat(tuple(an.axes(p)[dim] for p in pieces)), node)
    an.set_axes(node, out)


def relate_getitem(an: Analysis, node: fx.Node) -> None:
    source, index = node.args
    axes = an.axes(source, index)
    if axes is None:
        an.fresh_output(node)
        an.block_value(node, f"%{node.name} takes an item of a value the analysis does not follow")
    else:
        an.set_axes(node, axes)


# -------------------------------------------------------- spatial and misc
def relate_spatial(spatial_dims: int):
    """Pooling and resampling: batch and channel axes pass through, the spatial ones are new."""

    def relate(an: Analysis, node: fx.Node) -> None:
        source = an.axes(node.args[0])
        outputs = an.fresh_output(node)
        for out in (outputs if isinstance(outputs, tuple) else (outputs,)):
            if out is not None:
                keep = len(out) - spatial_dims
                an.unify_all(source[:keep], out[:keep], node)

    return relate


def relate_pad(an: Analysis, node: fx.Node) -> None:
    source = an.axes(node.args[0])
    out = an.fresh(an.shape(node))
    pads: List[int] = list(node.args[1])
    padded = {len(source) - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
    for i, (a, b) in enumerate(zip(source, out)):
        if i in padded:
            an.block(a, f"%{node.name} pads it")
            an.block(b, f"%{node.name} pads it")
        else:
            an.unify(a, b, node)
    an.set_axes(node, out)

