"""Random valid options for every pass fxopt registers, and random pipelines of them (hypothesis strategies).

``pipelines(anchor, NodeNames.of(graph))`` draws the pass ``anchor`` among 0-3 others, each with options drawn by
``OPTIONS[name]``: valid ones only (a pass's ``__post_init__`` refuses the rest), defaults left out at random, and
for lossy passes both options that must be exact (ratio 0, sparsity 0, full rank) and lossy ones. Options that
name nodes (``skip``, ``ranks``, ``layers``) name op nodes of the captured graph; after other passes those may be
gone, which the pass must refuse. ``needs_calibration(pass)`` says whether to run ``fxopt.calibrate`` first.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from hypothesis import strategies as st

import fxopt
from fxopt.passes.fusion.fuse_epilogue import ACTIVATIONS as EPILOGUE_ACTIVATIONS
from fxopt.passes.fusion.fuse_layernorm import KINDS as NORM_KINDS
from fxopt.passes.prune.groups import KINDS as PRUNE_KINDS
from fxopt.passes.prune.importance import CRITERIA
from fxopt.passes.quantize.calibrate import quantizable_ops
from fxopt.passes.quantize.int4 import GROUP_SIZES
from fxopt.passes.quantize.to_half import FP32_GROUPS

#: Every pass fxopt itself registers (test modules register passes of their own).
FXOPT_PASSES = {name: cls for name, cls in fxopt.registered_passes().items() if cls.__module__.startswith("fxopt.")}
FULL_RANK = 4096  # low-rank: above every dim of a generated model


def subsets(values, min_size=1):
    return st.lists(st.sampled_from(values), min_size=min_size, max_size=len(values), unique=True).map(tuple)


def options(required=None, **optional):
    """A strategy of option dicts: ``required`` always drawn, each of ``optional`` drawn or left at its default."""
    return st.fixed_dictionaries(required or {}, optional=optional)


def no_options(names):
    return st.just({})


def insert_qdq_options(names):
    int8 = options({"scheme": st.sampled_from(["static", "dynamic", "weight-only"])}, bits=st.sampled_from([8, 7]),
                   activation_matmuls=st.booleans(), method=st.sampled_from(["rtn", "gptq"]),
                   embeddings=st.booleans(), **skip_option(names.quantizable))
    int4 = options({"scheme": st.just("weight-only"), "bits": st.just(4)}, group_size=st.sampled_from(GROUP_SIZES),
                   symmetric=st.booleans(), method=st.sampled_from(["rtn", "gptq"]), **skip_option(names.quantizable))
    # int4 needs in_features divisible by its group size (32+), which generated models never have: it is a
    # refusal (or, with the linear skipped, no change) here, so it is drawn less often
    return st.one_of(int8, int8, int8, int4)


def skip_option(node_names):
    return {"skip": rarely([(name,) for name in node_names])} if node_names else {}


def low_rank_options(names):
    aware = st.one_of(st.just({}), options({"activation_aware": st.just(True)},
                                           statistic=st.sampled_from(["rms", "absmean"]),
                                           alpha=st.sampled_from([0.5, 1.0, 2.0])),
                      st.just({"activation_aware": True, "statistic": "covariance"}))
    full = st.just({"rank": FULL_RANK, "force": True})
    rule = st.one_of(st.just({}), options({"rank": st.integers(1, 6)}), options({"energy": st.floats(0.3, 1.0)}),
                     options({"ratio": st.floats(0.1, 1.0)}))
    lossy = st.tuples(rule, options(force=st.booleans())).map(lambda d: {**d[0], **d[1]})
    if names.factorable:
        ranks = st.lists(st.tuples(st.sampled_from(names.factorable), st.integers(1, 6)), min_size=1, max_size=2,
                         unique_by=lambda t: t[0]).map(lambda items: {"ranks": tuple(f"{n}:{r}" for n, r in items)})
        lossy = st.one_of(lossy, ranks, st.sampled_from(names.factorable).map(lambda n: {"layers": (f"^{n}$",)}))
    return st.tuples(st.one_of(full, lossy), aware).map(lambda d: {**d[0], **d[1]})


def sparsify_options(names):
    unstructured = options({"sparsity": st.sampled_from([0.0, 0.0, 0.3, 0.9])},
                           scope=st.sampled_from(["layer", "global"]), format=st.sampled_from(["auto", "csr", "dense"]))
    n_of_m = options({"pattern": st.sampled_from(["2:4", "1:4", "4:8", "1:2"])},
                     format=st.sampled_from(["auto", "dense"]))
    return st.one_of(unstructured, n_of_m, st.just({}))


def prune_options(kinds):
    def strategy(names):
        ratio = st.one_of(st.just(0.0), st.floats(0.05, 0.9), st.just(1.0))
        extra = {"kinds": subsets(PRUNE_KINDS)} if kinds else {}
        return options({"ratio": ratio}, criterion=st.sampled_from(CRITERIA),
                       scope=st.sampled_from(["group", "global"]),
                       ratios=rarely([(f"^{k}::0.5",) for k in PRUNE_KINDS]),
                       skip=rarely([(f"^{k}:",) for k in PRUNE_KINDS]), **extra)
    return strategy


def rarely(values, default=()):
    """Mostly ``default``: group-name options name groups a generated model often lacks (a refusal)."""
    return st.one_of(st.just(default), st.just(default), st.sampled_from(values))


OPTIONS: Dict[str, Callable] = {
    "remove-noop": no_options,
    "fold-constants": lambda n: options(max_growth=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
                                        small_bytes=st.sampled_from([0, 64, 65536])),
    "eliminate-common-subexpressions": no_options,
    "eliminate-dead-code": no_options,
    "fold-conv-bn": no_options,
    "fold-linear-bn": no_options,
    "fuse-attention": lambda n: options(strict=st.booleans()),
    "fuse-epilogue": lambda n: options(activations=subsets(EPILOGUE_ACTIVATIONS)),
    "fuse-layernorm": lambda n: options(kinds=subsets(NORM_KINDS)),
    "merge-siblings": lambda n: options(min_siblings=st.integers(2, 4)),
    "smooth-quant": lambda n: options(alpha=st.floats(0.0, 1.0)),
    "share-params": lambda n: st.one_of(st.just({}), options(atol=st.sampled_from([0.0, 1e-3, 0.1]),
                                                             rtol=st.sampled_from([0.0, 1e-2]),
                                                             across_layers=st.booleans(),
                                                             epsilon=st.sampled_from([1e-3, 0.5]))),
    "half-weights": lambda n: options(max_abs=st.sampled_from([60000.0, 1.0, 0.1])),
    "quantize-fp8": lambda n: options(**skip_option(n.quantizable)),
    "quantize-int8": lambda n: options(**skip_option(n.quantizable)),
    "int4-linear": no_options,
    "to-half": lambda n: options(keep_fp32=subsets(tuple(FP32_GROUPS), min_size=0)),
    "to-bfloat16": lambda n: options(keep_fp32=subsets(tuple(FP32_GROUPS), min_size=0)),
    "insert-qdq": insert_qdq_options,
    "mixed-precision": lambda n: options(tolerance=st.sampled_from([0.0, 1e-3, 1e-2, 0.1]),
                                         scheme=st.sampled_from(["static", "dynamic", "weight-only"]),
                                         activation_matmuls=st.booleans()),
    "low-rank": low_rank_options,
    "sparsify": sparsify_options,
    "prune-channels": prune_options(kinds=True),
    "prune-heads": prune_options(kinds=False),
    "prune-ffn": prune_options(kinds=False),
}


@dataclass(frozen=True)
class NodeNames:
    """Op node names of the captured graph that name-taking options (skip, ranks, layers) may use."""

    quantizable: tuple
    factorable: tuple

    @classmethod
    def of(cls, graph: fxopt.Graph) -> "NodeNames":
        quantizable = tuple(n.name for n in graph.call_nodes() if n.target in quantizable_ops())
        factorable = tuple(n.name for n in graph.call_nodes(torch.ops.aten.linear.default))
        return cls(quantizable, factorable)


@st.composite
def pipelines(draw, anchor: str, names: NodeNames) -> List[fxopt.Pass]:
    """``anchor`` and 0-3 other passes (repeats allowed) in a random order, each with random valid options.

    The others are picked among the first four of a permutation of all passes: hypothesis favours the first
    entries of a fixed list (``sampled_from`` drew the first pass ten times as often as the last).
    """
    order = draw(st.permutations(sorted(FXOPT_PASSES)))
    chosen = [order[i] for i in draw(st.lists(st.integers(0, 3), max_size=3))]
    chosen.insert(draw(st.integers(0, len(chosen))), anchor)
    return [FXOPT_PASSES[name](**draw(OPTIONS[name](names))) for name in chosen]


def needs_calibration(p: fxopt.Pass) -> bool:
    return (p.name in ("smooth-quant", "mixed-precision")
            or (p.name == "insert-qdq" and (p.scheme == "static" or p.method == "gptq"))
            or (p.name == "low-rank" and p.activation_aware)
            or (p.name.startswith("prune-") and p.criterion in ("taylor", "head")))
