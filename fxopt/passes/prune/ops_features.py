"""Handlers of the ops with per-feature parameters: LayerNorm, RMSNorm, BatchNorm, embedding, per-channel dequantize.

Their parameters follow the feature axis they act on (see ``ops_compute.py`` for the conventions). A
normalized axis gets the role ``norm``: pruning it changes the statistics the norm computes, which is
why such groups are of kind ``hidden`` and are not pruned unless asked for.
"""
from __future__ import annotations

import torch.fx as fx

from fxopt.passes.prune.analysis import Analysis
from fxopt.passes.prune.ops_compute import relate_same_shape
from fxopt.passes.prune.ops_shape import _arg, _dim


def relate_layer_norm(*params):
    """``layer_norm(x, normalized_shape, weight, bias)`` and ``rms_norm``: the last axes are normalized.

    ``params``: the ``(index, name)`` of each per-feature parameter argument.
    """

    def relate(an: Analysis, node: fx.Node) -> None:
        xs = an.axes(node.args[0])
        count = len(node.args[1])
        outputs = an.fresh_output(node)
        an.unify_all(xs, outputs[0] if isinstance(outputs, tuple) else outputs, node)
        for index, name in params:
            param = _arg(node, index, name)
            if an.info(param) is not None:
                an.unify_all(an.axes(param), xs[-count:], node)
        for stat in (outputs[1:] if isinstance(outputs, tuple) else ()):  # native_layer_norm's mean, rstd
            if stat is not None:
                an.unify_all(stat[:-count], xs[:-count], node)
        for term in xs[-count:]:
            an.role(term, "norm")

    return relate


def fix_normalized_shape(node: fx.Node, sizes) -> None:
    shape = sizes.shape(node.args[0])
    count = len(node.args[1])
    if list(node.args[1]) != list(shape[-count:]):
        node.update_arg(1, list(shape[-count:]))


def relate_batch_norm(an: Analysis, node: fx.Node) -> None:
    """Batch norm (inference or training form): weight, bias and running statistics along axis 1."""
    xs = an.axes(node.args[0])
    outputs = an.fresh_output(node)
    main = outputs[0] if isinstance(outputs, tuple) else outputs
    an.unify_all(xs, main, node)
    for param in node.args[1:5]:
        if an.info(param) is not None and len(an.shape(param)) == 1:
            an.unify(an.axes(param)[0], xs[1], node)


def relate_embedding(an: Analysis, node: fx.Node) -> None:
    weight, indices = node.args[0], node.args[1]
    out = an.fresh(an.shape(node))
    an.unify_all(an.axes(indices), out[:-1], node)
    an.unify(an.axes(weight)[1], out[-1], node)
    an.role(out[-1], "embedding")
    an.set_axes(node, out)


def relate_per_channel_dequantize(an: Analysis, node: fx.Node) -> None:
    """``dequantize_per_channel(codes, scale, zero_point, axis, ...)``: scales follow the channel axis."""
    relate_same_shape(an, node)
    codes = an.axes(node.args[0])
    axis = _dim(node.args[3], len(codes))
    for param in node.args[1:3]:
        if an.info(param) is not None:
            an.unify(an.axes(param)[0], codes[axis], node)


