"""fuse-attention: decomposed softmax(Q·Kᵀ·scale + mask)·V becomes ``aten.scaled_dot_product_attention``.

What HF BERT/MiniLM, GPT-2 and ViT export (after ``cleanup``)::

    %kt = aten.transpose.int(%k, 2, 3)              # or (-1, -2), or a permute
    %qk = aten.matmul.default(%q, %kt)
    %mul = aten.mul.Tensor(%qk, 0.35355339059327373) # or div by sqrt(d), or the scale on Q / K
    %add = aten.add.Tensor(%mul, %mask)              # optional additive mask
    %softmax = aten.softmax.int(%add, -1)            # ViT: softmax.int(%add, -1, torch.float32)
    %y = aten.matmul.default(%softmax, %v)
becomes
    %y = aten.scaled_dot_product_attention.default(%q, %k, %v, %mask, 0.0, False, scale=0.35355339059327373)

- The scale may sit on the scores (``*`` or ``/``), on Q or on K, or be absent;
  the factors multiply into SDPA's ``scale``.
- Masks: an additive float mask (BERT's ``where(mask, 0, finfo.min)``) is
  passed as ``attn_mask``. A constant mask (a weight) is inspected: all zeros
  (ViT) is dropped; a causal one (GPT-2's ``0`` / ``finfo.min`` triangle, or
  ``masked_fill(~tril, -inf)``) becomes ``is_causal=True``; another constant
  ``masked_fill`` mask becomes a boolean ``attn_mask`` if no row is fully masked.
  A hard mask value is ``-inf`` or at most ``-1e4``: ``exp`` of it is 0 in every float dtype.
- Dropout between the softmax and the value matmul blocks the rewrite: in
  eval mode ``remove-noop`` has removed it; in training mode it is real and
  SDPA would not reproduce it. ``strict=true`` turns every attention left
  unfused into an error that says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.passes.fusion.common import is_number, is_weight, scalar_value, single_user, static_shape, \
    tensor_info_of
from fxopt.passes.infra.base import PassResult
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import Match, Op, OpPattern, PatternBase, Var
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten

SOFTMAX_TARGETS = (aten.softmax.int, aten._softmax.default)
HARD_MASK_VALUE = -1e4  # exp(-1e4 - max) underflows to 0 in fp16, bf16, fp32 and fp64
_SCALE_TARGETS = {aten.mul.Tensor: lambda c: c, aten.div.Tensor: lambda c: 1.0 / c}


# ------------------------------------------------------------------ patterns
def score_patterns() -> List[Tuple[str, Op]]:
    """(variant name, scores pattern) for each scale placement on the scores × each mask form."""
    qk = Op(aten.matmul.default, Var("q"), Var("kt"), name="qk")
    scaled = [("", qk), ("scaled-", Op(aten.mul.Tensor, qk, Var("scale"))),
              ("scaled-", Op(aten.div.Tensor, qk, Var("divisor")))]
    variants = []
    for prefix, s in scaled:
        variants += [
            (f"{prefix}attention", s),
            (f"{prefix}masked-attention", Op(aten.add.Tensor, s, Var("mask"), alpha=1)),
            (f"{prefix}masked-attention", Op(aten.add.Tensor, Var("mask"), s, alpha=1)),
            (f"{prefix}masked-attention", Op(aten.masked_fill.Scalar, s, Var("fill_where"), Var("fill_value"))),
        ]
    return variants


def attention_root(scores: Op) -> Op:
    softmax = Op(SOFTMAX_TARGETS, scores, Var("dim"), Var("softmax_option"), name="softmax")
    return Op(aten.matmul.default, softmax, Var("v"), name="out")


class AttentionPattern(OpPattern):
    """The declarative attention core, plus the Q and K operands peeled procedurally:
    a scale by a number on Q or K (``q * c``, ``k / c``) and the transpose that makes Kᵀ."""

    def matches(self, graph: fx.Graph) -> Iterator[Match]:
        for match in super().matches(graph):
            query, q_factor, q_nodes = peel_scale(match.captures["q"])
            kt, kt_factor, kt_nodes = peel_scale(match.captures["kt"])
            key, k_factor, k_nodes = peel_transpose(kt)
            match.nodes.extend(q_nodes + kt_nodes + k_nodes)
            match.captures.update(query=query, key=key, key_is_transposed=not k_nodes,
                                  operand_scale=q_factor * kt_factor * k_factor)
            yield match


def peel_scale(node: Any) -> Tuple[Any, float, List[fx.Node]]:
    """(value, factor, nodes): ``node == value * factor`` where node multiplies or divides by a number."""
    if isinstance(node, fx.Node) and node.target in _SCALE_TARGETS and single_user(node):
        base, factor = node.args[0], node.args[1]
        if isinstance(base, fx.Node) and is_number(factor) and factor != 0 and not node.kwargs:
            return base, _SCALE_TARGETS[node.target](float(factor)), [node]
    return node, 1.0, []


def peel_transpose(kt: Any) -> Tuple[Any, float, List[fx.Node]]:
    """(k, factor, nodes) with ``kt == (k * factor)ᵀ`` over the last two dims; ``(kt, 1, [])`` when
    ``kt`` is not a transpose we may remove (then the rewrite transposes it back)."""
    shape = static_shape(kt)
    if shape is None or len(shape) < 2 or not single_user(kt) or not _swaps_last_two(kt, len(shape)):
        return kt, 1.0, []
    k, factor, scale_nodes = peel_scale(kt.args[0])
    return k, factor, [kt] + scale_nodes


def _swaps_last_two(node: fx.Node, rank: int) -> bool:
    last_two = [rank - 2, rank - 1]
    if node.target == aten.transpose.int:
        return sorted(d % rank for d in node.args[1:3]) == last_two
    if node.target == aten.permute.default:
        return [d % rank for d in node.args[1]] == list(range(rank - 2)) + last_two[::-1]
    return False


# --------------------------------------------------------------------- masks
DECLINE = object()


def sdpa_mask(rw, mask, fill_where, fill_value, scores: fx.Node):
    """(attn_mask, is_causal) for SDPA, or DECLINE."""
    if mask is None and fill_where is None:
        return None, False
    scores_info = tensor_info_of(scores)
    length, source = scores_info.shape[-2], scores_info.shape[-1]
    if mask is not None:
        info = tensor_info_of(mask)
        if info is None or info.dtype != scores_info.dtype or not _broadcasts_into(info.shape, scores_info.shape):
            return DECLINE
        if not is_weight(mask):
            return mask, False
        value = rw.graph.param(mask)
        if not bool(value.any()):
            return None, False
        return (None, True) if is_causal_additive(value, length, source) else (mask, False)
    return _fill_mask(rw, fill_where, fill_value, length, source)


def _fill_mask(rw, fill_where, fill_value, length: int, source: int):
    """``masked_fill(scores, where, value)`` with a constant ``where`` and a hard ``value``."""
    if not is_weight(fill_where) or not is_number(fill_value) or fill_value > HARD_MASK_VALUE:
        return DECLINE
    masked = rw.graph.param(fill_where)
    if masked.dtype != torch.bool or masked.dim() < 2 or tuple(masked.shape[-2:]) != (length, source):
        return DECLINE
    allowed = ~masked
    if not bool(allowed.any(dim=-1).all()):
        return DECLINE  # a fully masked row: masked_fill gives NaN or uniform weights, SDPA need not
    if torch.equal(allowed, _causal(length, source).expand_as(allowed)):
        return None, True
    return rw.param("attention_mask", allowed), False


def _broadcasts_into(shape, target) -> bool:
    """Adding a ``shape`` tensor to a ``target`` tensor leaves the target's shape (SDPA's attn_mask rule)."""
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def is_causal_additive(value: torch.Tensor, length: int, source: int) -> bool:
    """An additive mask that is 0 on and below the diagonal and hard-masked above it."""
    if value.dim() < 2 or tuple(value.shape[-2:]) != (length, source):
        return False
    allowed = _causal(length, source).expand_as(value)
    return bool((value[allowed] == 0).all()) and bool((value[~allowed] <= HARD_MASK_VALUE).all())


def _causal(length: int, source: int) -> torch.Tensor:
    return torch.ones(length, source, dtype=torch.bool).tril()


# ------------------------------------------------------------------- rewrite
def attention_rewrite(rw, qk, out, softmax, query, key, key_is_transposed, v, dim, softmax_option, operand_scale,
                      scale=None, divisor=None, mask=None, fill_where=None, fill_value=None, **_):
    if not _operands_fit(query, key, v, key_is_transposed) or not _is_last_dim_softmax(softmax, dim, softmax_option):
        return None
    factor = _score_factor(rw, scale, divisor)
    attn_mask = sdpa_mask(rw, mask, fill_where, fill_value, qk)
    if factor is None or attn_mask is DECLINE:
        return None
    if key_is_transposed:  # Kᵀ was not a transpose we could peel: transpose it back
        key = rw.call(aten.transpose.int, key, -2, -1)
    return rw.call(aten.scaled_dot_product_attention.default, query, key, v, attn_mask[0], 0.0, attn_mask[1],
                   scale=factor * operand_scale)


def _score_factor(rw, scale, divisor) -> Optional[float]:
    if scale is not None:
        return scalar_value(rw.graph, scale)
    if divisor is not None:
        value = scalar_value(rw.graph, divisor)
        return 1.0 / value if value else None
    return 1.0


def _operands_fit(query, key, value, key_is_transposed: bool) -> bool:
    """Q [..., L, E], K [..., S, E], V [..., S, Ev] with the same batch dims, dtype and a float dtype."""
    infos = [tensor_info_of(t) for t in (query, key, value)]
    if any(i is None or not i.is_static for i in infos) or len({i.dtype for i in infos}) != 1:
        return False
    q, k, v = (tuple(i.shape) for i in infos)
    if key_is_transposed:
        k = k[:-2] + (k[-1], k[-2])
    return (infos[0].dtype.is_floating_point and len(q) >= 3 and len(q) == len(k) == len(v)
            and q[:-2] == k[:-2] == v[:-2] and q[-1] == k[-1] and k[-2] == v[-2])


def _is_last_dim_softmax(softmax: fx.Node, dim, option) -> bool:
    rank = len(tensor_info_of(softmax).shape)
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return False
    if softmax.target == aten._softmax.default:
        return option is False
    return option is None or option == tensor_info_of(softmax).dtype


# ---------------------------------------------------------------------- pass
@register_pass
@dataclass(frozen=True)
class FuseAttention(RewritePass):
    name = "fuse-attention"
    summary = "decomposed softmax(Q·Kᵀ·scale + mask)·V -> aten.scaled_dot_product_attention"
    strict: bool = False

    def patterns(self) -> List[PatternBase]:
        return [AttentionPattern(attention_root(scores), attention_rewrite, name=name)
                for name, scores in score_patterns()]

    def run(self, graph) -> PassResult:
        result = super().run(graph)
        left = next(unfused_attention(graph), None) if self.strict else None
        if left is not None:
            softmax, reason, hint = left
            raise self.error(reason, softmax, hint)
        return result


def unfused_attention(graph) -> Iterator[Tuple[fx.Node, str, str]]:
    """(softmax node, why, hint) for each softmax(...)·V left in the graph."""
    for softmax in graph.fx_graph.nodes:
        if softmax.op != "call_function" or softmax.target not in SOFTMAX_TARGETS:
            continue
        for user in softmax.users:
            if user.target == aten.matmul.default and user.args[0] is softmax:
                yield (softmax, "attention scores are not softmax(Q·Kᵀ·scale + mask) in a form fuse-attention "
                       "recognises", "see the fuse-attention docstring for the accepted forms")
            elif user.target in (aten.native_dropout.default, aten.dropout.default) and _is_training(user):
                yield (softmax, "training-mode dropout sits between softmax and the value matmul; SDPA would "
                       "drop nothing", "capture the model in eval mode (fxopt.capture(..., eval_mode=True))")
            elif user.target == aten.clone.default:
                yield softmax, "a copy sits between softmax and the value matmul", "run remove-noop first"


def _is_training(dropout: fx.Node) -> bool:
    train = dropout.args[2] if len(dropout.args) > 2 else dropout.kwargs.get("train", True)
    return train is not False and dropout.args[1] != 0
