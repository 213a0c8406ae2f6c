"""Pipeline fuzzing (issue 11): random models through random valid pipelines of every registered pass.

Each example draws a generated model (``tests/harness.py``) and a pipeline of 1-4 of fxopt's registered passes
with random valid options (one test per pass, whose pipelines all hold it), calibrates the graph when a drawn
pass needs it, and runs ``Pipeline(spec, debug=True, calibration=[example inputs])``, which runs the verifier
after every pass. It proves
that the spec round-trips and either
- a pass refuses the model: an FxoptError raised by the pass itself (not by the verifier, and no other
  exception type), in the pipeline's context, whose message names a node or an option; or
- the result runs on fresh inputs of the example's shape, with the original's output shapes and dtypes,
  finite where the original is finite; and
- it is equivalent to the original on the example inputs within the sum of the drawn passes' bounds
  (``TOLERANCES``): exact passes (and lossy ones that report no change) at the harness's per-dtype
  tolerance, also on the fresh inputs; fp16/bf16 and int8 passes at a factor of the model's own measured
  sensitivity to that rounding (a LayerNorm over two values amplifies any error); mixed-precision at its own
  ``tolerance``. Pruning, sparsifying, low-rank below full rank and near-equal weight sharing change the
  function by design: their lossy options are checked as above without the bound, and they are also drawn
  with options that must be exact (ratio 0, sparsity 0, full rank), which are held to it.

The CI profile runs 100 examples in all (4 for each of the 25 passes), ``HYPOTHESIS_PROFILE=slow pytest -m slow``
500 (20 each). They are not derandomized: each run draws from a new seed, which pytest's header prints
("fxopt fuzz seed: N"); ``FXOPT_FUZZ_SEED=N`` replays that run's cases.
``--hypothesis-show-statistics`` lists how often each pass was drawn, refused, and how each example was
checked (``benchmarks/results/fuzz_pipelines.md`` has a slow run). The bugs the fuzzing found have a
reproducer each at the end of this file.
"""
import dataclasses
import math
import re
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.fx as fx
from hypothesis import event, given, seed, settings, target
from hypothesis import strategies as st

import fxopt
from fxopt.errors import FxoptError, PatternError
from fxopt.passes.quantize.calibrate import quantizable_ops
from tests.harness import TOLERANCE, ModelCase, assert_equivalent, model_cases, outputs_of, relative_error
from tests.conftest import FUZZ_SEED
from tests.pass_options import FULL_RANK, FXOPT_PASSES, OPTIONS, NodeNames, needs_calibration, pipelines

#: How many times a model's measured sensitivity to a rounding an fp16/bf16/int8 pass may cost (see Probe).
SENSITIVITY_FACTOR = 4


# ------------------------------------------------------------ sensitivity probes
class Probe:
    """How far the original graph's output moves on the example inputs under rounding of a kind (cached)."""

    def __init__(self, graph: fxopt.Graph, inputs: Sequence[torch.Tensor]):
        self.graph, self.inputs = graph, tuple(inputs)
        self.reference = outputs_of(graph, inputs)
        self.cache: Dict[tuple, float] = {}

    def measured(self, key: tuple, measure: Callable[[], float]) -> float:
        if key not in self.cache:
            self.cache[key] = measure()
        return self.cache[key]

    def _error(self, outputs: List[torch.Tensor]) -> float:
        return max(relative_error(a, b) for a, b in zip(self.reference, outputs))

    def rounding(self, dtype: torch.dtype) -> float:
        """How far rounding float32 weights and inputs to ``dtype`` (what to-half, to-bfloat16 and half-weights
        round) moves the output: the larger of that one rounding's error and the RMS error of 8 draws of
        random relative perturbations of up to the dtype's unit roundoff. One rounding alone is one sample of
        errors that can cancel (seen: a 1-channel BatchNorm bottleneck where half-weights' own rounding, of
        fewer values, moved the output 6x as far), and the search steers towards such models."""
        return self.measured(("rounding", dtype), lambda: max(self._rounding(dtype), self._jitter(dtype)))

    def _rounded(self, change: Callable[[torch.Tensor], torch.Tensor]) -> float:
        changed = self.graph.copy()
        for node in changed.nodes:
            if node.op == "get_attr" and changed.param(node).dtype == torch.float32:
                changed.replace_param(node, change(changed.param(node)))
        inputs = [change(x) if x.dtype == torch.float32 else x for x in self.inputs]
        return self._error(outputs_of(changed, inputs))

    def _rounding(self, dtype: torch.dtype) -> float:
        return self._rounded(lambda t: t.to(dtype).float())

    def perturbation(self, dtype: torch.dtype) -> float:
        """The RMS output error of random relative perturbations of weights and inputs at ``dtype``'s unit
        roundoff (quantize-fp8: e4m3 scales each row, so its rounding is relative, like this)."""
        return self.measured(("perturbation", dtype), lambda: self._jitter(dtype))

    def _jitter(self, dtype: torch.dtype) -> float:
        unit = torch.finfo(dtype).eps / 2
        errors = []
        for draw in range(8):
            gen = torch.Generator().manual_seed(draw)
            errors.append(self._rounded(lambda t: t * (1 + unit * (2 * torch.rand(t.shape, generator=gen) - 1))))
        return (sum(e * e for e in errors) / len(errors)) ** 0.5

    def quantization_noise(self, weight_levels: int, activations: bool) -> float:
        """Linear/matmul/conv inputs plus uniform noise of half a quantization step (NoisyRun), RMS of 4 draws."""
        return self.measured(("noise", weight_levels, activations),
                             lambda: self._quantization_noise(weight_levels, activations))

    def _quantization_noise(self, weight_levels: int, activations: bool) -> float:
        errors = [self._error(outputs_of(NoisyRun(self.graph, weight_levels, activations, seed), self.inputs))
                  for seed in range(4)]
        return (sum(e * e for e in errors) / len(errors)) ** 0.5


class NoisyRun(fx.Interpreter):
    """The graph, with the inputs of the ops insert-qdq quantizes perturbed as int8 rounding would perturb them.

    Weights (get_attr) get ``U(-s/2, s/2)`` with ``s = max|w| / weight_levels`` (symmetric, one scale per tensor:
    no smaller than insert-qdq's per-channel or per-group scales); activations, with ``activations``, get it with
    ``s = (max(x, 0) - min(x, 0)) / 255`` (asymmetric per tensor, what calibration and dynamic ranges give). ``s``
    is at least two of the element's ulps in the model's dtype, so 16-bit models see the rounding Q/DQ's result gets.
    """

    def __init__(self, graph: fxopt.Graph, weight_levels: int, activations: bool, seed: int):
        super().__init__(graph.module)
        self.weight_levels, self.activations = weight_levels, activations
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *inputs):
        return self.run(*inputs)

    def run_node(self, n):
        if n.op != "call_function" or n.target not in quantizable_ops():
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return n.target(*(self._noisy(a, source) for a, source in zip(args, n.args)), **kwargs)

    def _noisy(self, value, source):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1):
            return value
        is_weight = isinstance(source, fx.Node) and source.op == "get_attr"
        if is_weight:
            step = value.abs().max() / self.weight_levels
        elif self.activations:
            step = (value.max().clamp(min=0) - value.min().clamp(max=0)) / 255
        else:
            return value
        # Q/DQ's result is rounded to the model's dtype: in bfloat16 (8 bits) half an int8 step is about half an ulp,
        # so a dequantized value can land a whole ulp away, and noise within half an ulp would round away (seed
        # 2878591539: a bound of 0 against a real error). So the noise spans at least one ulp each side.
        two_ulps = 2 * torch.finfo(value.dtype).eps * value.detach().abs().double()
        noise = torch.rand(value.shape, generator=self.generator, dtype=torch.float64) - 0.5
        return (value.double() + noise * torch.maximum(step.double(), two_ulps)).to(value.dtype)


# --------------------------------------------------------------- the bounds
@dataclass(frozen=True)
class Bound:
    """A pass's allowed relative output error, given its options, what it reported and the model's probe.

    ``kind``: ``exact`` (the harness's per-dtype tolerance), ``rounding`` (fp16/bf16), ``perturbation`` (fp8:
    relative noise at the dtype's unit roundoff), ``int8`` (Q/DQ noise),
    ``own`` (the pass's ``tolerance`` option), ``unbounded`` (no bound: runnable/shape/finite only).
    ``exact_if(pass, stats)`` names the options or outcomes under which a lossy pass must be exact.
    """

    kind: str
    dtype: Optional[torch.dtype] = None
    exact_if: Callable = lambda p, stats: False
    #: rounding: at least the harness tolerance of ``dtype`` (computing in it rounds every intermediate too).
    floor: bool = True

    def is_exact(self, pass_, step) -> bool:
        """Whether this step must keep the numbers on any input (a lossy step's bound holds on the probed ones)."""
        return not step.modified or self.kind == "exact" or self.exact_if(pass_, step.stats)

    def limit(self, pass_, step, probe: Probe, model_dtype: torch.dtype) -> Optional[float]:
        exact = TOLERANCE[model_dtype]
        if self.is_exact(pass_, step):
            return exact
        if self.kind == "rounding":
            return max(TOLERANCE[self.dtype] if self.floor else exact, SENSITIVITY_FACTOR * probe.rounding(self.dtype))
        if self.kind == "perturbation":
            return exact + SENSITIVITY_FACTOR * probe.perturbation(self.dtype)
        if self.kind == "int8":
            levels, activations = quantization_levels(pass_)
            return exact + SENSITIVITY_FACTOR * probe.quantization_noise(levels, activations)
        if self.kind == "own":
            return exact + pass_.tolerance * 1.001
        return None


def quantization_levels(pass_) -> tuple:
    """insert-qdq, quantize-int8 (8 bits, dynamic): (weight code levels, are activations quantized)."""
    bits = getattr(pass_, "bits", 8)
    return {8: 127, 7: 63, 4: 7}[bits], getattr(pass_, "scheme", "dynamic") != "weight-only"


def prunes_nothing(p) -> bool:
    return p.ratio == 0.0 and not p.ratios


EXACT = Bound("exact")
TOLERANCES: Dict[str, Bound] = {
    # Rewrites that compute the same function: the harness tolerance (fp32 1e-5, bf16 1e-2, fp64 1e-10), which
    # covers a changed summation order (folded BN, merged GEMMs, fused kernels) and nothing more.
    "remove-noop": EXACT,  # drops ops that compute nothing (clones, identity views, eval dropout)
    "fold-constants": EXACT,  # the same ops on the same weights, ahead of time
    "eliminate-common-subexpressions": EXACT,  # merges identical pure ops
    "eliminate-dead-code": EXACT,  # removes unused ops
    "fold-conv-bn": EXACT,  # BN's affine map folded into the conv's weights: reassociation only
    "fold-linear-bn": EXACT,  # likewise for linear + BatchNorm1d
    "fuse-attention": EXACT,  # softmax(QK^T s + mask) V -> SDPA: the same math in one kernel
    "fuse-epilogue": EXACT,  # linear/conv + activation -> one op computing the same ATen ops
    "fuse-layernorm": EXACT,  # decomposed norms -> aten.layer_norm / rms_norm
    "merge-siblings": EXACT,  # one wider GEMM + split: each output column computed as before
    "smooth-quant": EXACT,  # power-of-two factors: x / s and W * s are exact in every float dtype
    # share-params: exact by default (bit-identical weights); atol/rtol/across-layers merge near-equal weights,
    # a change of the function bounded by no output tolerance: exact unless its stats say it used them.
    "share-params": Bound("unbounded", exact_if=lambda p, s: s["within_tolerance"] + s["across_layers"] == 0),
    # fp16/bf16: each value rounded at 2^-11 / 2^-8 relative; allowed SENSITIVITY_FACTOR x the error of rounding
    # the weights and inputs (what half-weights rounds, and less: it leaves the inputs); computing in the low
    # dtype rounds every intermediate too, so to-half/to-bfloat16 get at least the harness tolerance of the low
    # dtype (fp16 2e-3, bf16 1e-2).
    "half-weights": Bound("rounding", torch.float16, floor=False),
    "to-half": Bound("rounding", torch.float16),
    # e4m3 codes of rows scaled to their absmax: relative rounding at 2^-4 of linear inputs and weights
    "quantize-fp8": Bound("perturbation", torch.float8_e4m3fn),
    # int8 rows scaled to their absmax (activations per token, weights per channel): at most the Q/DQ noise
    # bound's per-tensor steps for weights; per-token activation steps (absmax / 127) reach twice the per-tensor
    # asymmetric step (range / 255) only for one-signed activations, inside SENSITIVITY_FACTOR
    "quantize-int8": Bound("int8"),
    "int4-linear": Bound("exact"),  # the same dequantize and linear, as one op
    "to-bfloat16": Bound("rounding", torch.bfloat16),
    # int8 (and int7/int4) Q/DQ: SENSITIVITY_FACTOR x the error of NoisyRun, which adds half a quantization step
    # of uniform noise wherever insert-qdq rounds. Calibrated on the very inputs checked, nothing is clipped.
    # Measured: errors reach 0.1-0.2 of this bound; static activations with the zero point's sign flipped
    # exceed it on a third of the models (benchmarks/results/fuzz_pipelines.md).
    "insert-qdq": Bound("int8"),
    # mixed-precision promises its own tolerance on the calibration sample (the example inputs here).
    "mixed-precision": Bound("own"),
    # Changes the function by design: exact only at full rank (rank >= every dim, force=true factors anyway).
    "low-rank": Bound("unbounded", exact_if=lambda p, s: p.rank == FULL_RANK and p.force and not p.ranks),
    # Magnitude pruning: exact only at sparsity 0 (with CSR the same products in another order).
    "sparsify": Bound("unbounded", exact_if=lambda p, s: p.sparsity == 0.0 and p.pattern == "unstructured"),
    # Structured pruning: exact at ratio 0 without per-group ratios, and whenever it reports nothing removed.
    "prune-channels": Bound("unbounded", exact_if=lambda p, s: prunes_nothing(p) or s["params_removed"] == 0),
    "prune-heads": Bound("unbounded", exact_if=lambda p, s: prunes_nothing(p) or s["params_removed"] == 0),
    "prune-ffn": Bound("unbounded", exact_if=lambda p, s: prunes_nothing(p) or s["params_removed"] == 0),
}
#: Passes marked lossless (``lossy=False``) that options make lossy.
LOSSY_BY_OPTION = {"share-params"}
#: Refusals about the graph as a whole, with no node or option to name (none now: a pass missing calibration
#: data names the option that needs it and ``calibration``).
GRAPH_LEVEL_REFUSALS = ()


# ------------------------------------------------------------------ checks
def calibrated_if_needed(graph: fxopt.Graph, case: ModelCase, passes) -> fxopt.Graph:
    if not any(needs_calibration(p) for p in passes):
        return graph
    try:
        return fxopt.calibrate(graph, [case.inputs], progress=False)
    except FxoptError as exc:  # a graph without linear/matmul/conv: the passes must refuse it themselves
        assert "nothing to calibrate" in str(exc)
        event("calibrate: nothing to calibrate")
        return graph


def assert_is_a_refusal(exc: Exception, spec: str, passes) -> None:
    """The pipeline re-raises what a pass raised, in context: it must be an FxoptError naming a node or option."""
    cause = exc.__cause__
    detail = "".join(traceback.format_exception(cause or exc))
    assert isinstance(exc, FxoptError) and re.match(r"pipeline step \d+/\d+ '[^']+' failed", str(exc)), detail
    assert isinstance(cause, FxoptError), f"{spec}: a pass raised {type(cause).__name__}, not an FxoptError\n{detail}"
    assert not isinstance(cause, PatternError), f"{spec}: a rewrite did not converge\n{detail}"
    assert not raised_by_verifier(cause), f"{spec}: a pass produced a graph the verifier rejects\n{detail}"
    assert names_what_it_refuses(str(cause), failing_pass(str(exc), passes)), (
        f"{spec}: the error is not '<pass>: <problem naming a node or option>; <hint>': {cause}")
    event("refused: " + refusal_kind(cause))


def refusal_kind(exc: Exception) -> str:
    """The problem part of an error message, node names and numbers blanked, to count refusals by kind."""
    return re.sub(r"%[\w.]+|\b\d[\d.e-]*", "#", str(exc).split(";")[0])[:100]


def failing_pass(message: str, passes) -> fxopt.Pass:
    step = int(re.match(r"pipeline step (\d+)/", message).group(1))
    return passes[step - 1]


def names_what_it_refuses(message: str, failing: fxopt.Pass) -> bool:
    """``"<pass>: <problem>; <hint>"``, the problem naming a ``%node`` or an option of the pass (spec or Python
    form), or being one of GRAPH_LEVEL_REFUSALS. The pass named may be one the failing pass runs inside it."""
    problem = message.split("; ")[0]
    named = re.match(r"([a-z][a-z0-9-]*): ", problem)
    if named is None or named.group(1) not in FXOPT_PASSES:
        return False
    if any(refusal in problem for refusal in GRAPH_LEVEL_REFUSALS):
        return True
    fields = [*failing.options(), *(f.name for f in dataclasses.fields(FXOPT_PASSES[named.group(1)]))]
    options = {name for field in fields for name in (field, field.replace("_", "-"))}
    return bool(re.search(r"%\w+", problem)) or any(re.search(rf"\b{o}\b", problem) for o in options)


def raised_by_verifier(exc: BaseException) -> bool:
    return any(frame.filename.endswith("fxopt/ir/verify.py") for frame in traceback.extract_tb(exc.__traceback__))


def fresh_inputs(inputs: Sequence[torch.Tensor]) -> tuple:
    generator = torch.Generator().manual_seed(1234)
    return tuple(torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)
                 if x.is_floating_point() else x for x in inputs)


def assert_runs_like(original: fxopt.Graph, result: fxopt.Graph, inputs) -> None:
    """Runnable on ``inputs``, with the original's output shapes and dtypes, finite where it is finite."""
    expected, actual = outputs_of(original, inputs), outputs_of(result, inputs)
    assert [(t.shape, t.dtype) for t in actual] == [(t.shape, t.dtype) for t in expected]
    for a, b in zip(expected, actual):
        assert bool(torch.isfinite(b).all()) or not bool(torch.isfinite(a).all()), "non-finite outputs"


def largest_error(reference: fxopt.Graph, transformed: fxopt.Graph, inputs) -> float:
    return max(relative_error(a, b) for a, b in zip(outputs_of(reference, inputs), outputs_of(transformed, inputs)))


def step_limits(passes, result, probe: Probe, dtype: torch.dtype) -> List[Optional[float]]:
    return [TOLERANCES[p.name].limit(p, step, probe, dtype) for p, step in zip(passes, result.results)]


def check_random_pipeline(anchor: str, case: ModelCase, data) -> None:
    graph = fxopt.capture(case.model, case.inputs)
    passes = data.draw(pipelines(anchor, NodeNames.of(graph)), label="passes")
    spec = ",".join(p.spec() for p in passes)
    pipeline = fxopt.Pipeline(spec, debug=True, calibration=[case.inputs])  # for the passes that read data
    assert pipeline.passes == passes, f"the spec {spec!r} does not round-trip"
    for p in passes:
        event(f"pass: {p.name}")
    try:
        result = pipeline(calibrated_if_needed(graph, case, passes))
    except Exception as exc:
        assert_is_a_refusal(exc, spec, passes)
        return
    check_result(graph, result, passes, case)


def check_result(graph: fxopt.Graph, result, passes, case: ModelCase) -> None:
    fresh = fresh_inputs(case.inputs)
    assert_runs_like(graph, result.graph, fresh)
    limits = step_limits(passes, result, Probe(graph, case.inputs), case.dtype)
    if None in limits:
        event("checked: runnable, shapes, finite (an unbounded lossy pass)")
        return
    limit = sum(limits)  # each step's error is relative to its input's output: a triangle inequality
    assert_equivalent(graph, result.graph, case.inputs, tol=limit)
    # by kind, not by value: a lossy step whose probe measured no error (a 2-wide LayerNorm at the output maps every
    # perturbation to +-1) has the exact limit on these inputs, and no claim on others (seed 2878591539)
    exact = all(TOLERANCES[p.name].is_exact(p, step) for p, step in zip(passes, result.results))
    loosest = "exact" if exact else TOLERANCES[passes[limits.index(max(limits))].name].kind
    # steer generation towards models whose error comes close to the bound (shown by --hypothesis-show-statistics)
    target(largest_error(graph, result.graph, case.inputs) / limit, label=f"error / bound ({loosest})")
    if exact:  # exact rewrites hold on any inputs
        assert_equivalent(graph, result.graph, fresh, tol=limit)
    event(f"checked: within the bound ({loosest})" + (", also on fresh inputs" if exact else ""))


# ------------------------------------------------------------------- tests
def test_every_registered_pass_has_a_bound_and_options_matching_its_lossy_flag():
    assert set(TOLERANCES) == set(FXOPT_PASSES) == set(OPTIONS)
    for name, cls in FXOPT_PASSES.items():
        exact = TOLERANCES[name].kind == "exact"
        assert exact != cls.lossy or name in LOSSY_BY_OPTION, f"{name}: lossy={cls.lossy}, {TOLERANCES[name]}"


def examples_in_all(total: int) -> settings:
    """``total`` examples (or the profile's count, if larger) shared by the tests of every pass. Not
    derandomized, unlike the rest of the CI profile: each run draws other cases from FUZZ_SEED."""
    return settings(max_examples=math.ceil(max(total, settings.default.max_examples) / len(FXOPT_PASSES)),
                    derandomize=False)


# One test per pass, each pipeline holding that pass among random others: every pass is fuzzed in every run
# (hypothesis draws an unbalanced mix from one list of passes: in 100 derandomized examples, some passes never came up).
@pytest.mark.parametrize("anchor", sorted(FXOPT_PASSES))
@examples_in_all(100)
@seed(FUZZ_SEED)
@given(case=model_cases(), data=st.data())
def test_random_pipelines_refuse_cleanly_or_stay_equivalent(anchor, case, data):
    check_random_pipeline(anchor, case, data)


@pytest.mark.slow
@pytest.mark.parametrize("anchor", sorted(FXOPT_PASSES))
@examples_in_all(500)
@seed(FUZZ_SEED)
@given(case=model_cases(), data=st.data())
def test_random_pipelines_refuse_cleanly_or_stay_equivalent_long(anchor, case, data):
    check_random_pipeline(anchor, case, data)


# ------------------------------------------- reproducers of what the fuzzing found (fixed)
class WithUnusedWeight(torch.nn.Module):
    """A layer, and a parameter the forward never reads: capture keeps a get_attr nobody uses."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer, self.unused = layer, torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("spec, layer, x", [
    ("insert-qdq{scheme=dynamic}", torch.nn.Linear(4, 4).double(), torch.randn(2, 4, dtype=torch.float64)),
    ("half-weights{max-abs=0.0001}", torch.nn.Linear(4, 4), torch.randn(2, 4)),
    ("smooth-quant", torch.nn.Conv1d(4, 4, 1), torch.randn(2, 4, 5)),
])
def test_a_pass_that_changes_nothing_leaves_a_runnable_graph(spec, layer, x):
    """These passes dropped the unused weight but, reporting no change, left the module's code reading it."""
    graph = fxopt.capture(WithUnusedWeight(layer).eval(), (x,))
    result = fxopt.Pipeline(spec, debug=True)(graph)
    assert not result.modified
    assert torch.equal(result.graph(x), graph(x))


def test_quantized_embeddings_alone_count_as_a_change():
    ids = torch.tensor([[1, 2, 3]])
    graph = fxopt.capture(torch.nn.Sequential(torch.nn.Embedding(10, 4)).eval(), (ids,))
    result = fxopt.Pipeline("insert-qdq{scheme=weight-only,embeddings=true}", debug=True)(graph)
    assert result.modified and result.stats["0:insert-qdq"]["embeddings"] == 1
    assert relative_error(graph(ids), result.graph(ids)) < 1e-2


def conv_bn(fresh_statistics: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1))
    if not fresh_statistics:
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval(), (torch.randn(2, 3, 6, 6),)


@pytest.mark.parametrize("criterion", ["taylor", "head"])
def test_gradient_criteria_prune_convs_followed_by_batch_norm(criterion):
    """Autograd refuses to differentiate BatchNorm's running statistics: they are scored without gradients."""
    model, inputs = conv_bn(fresh_statistics=False)
    graph = fxopt.capture(model, inputs)
    result = fxopt.Pipeline(f"prune-channels{{ratio=0.5,criterion={criterion}}}", debug=True,
                            calibration=[inputs])(graph)
    assert result.stats["0:prune-channels"]["pruned"] == {"channels:0": [4, 8]}


def test_share_params_never_points_batch_norm_statistics_at_a_parameter():
    """A fresh BatchNorm's weight equals its running_var, its bias its running_mean: they stay apart."""
    model, inputs = conv_bn(fresh_statistics=True)
    graph = fxopt.capture(model, inputs)
    result = fxopt.Pipeline("share-params", debug=True)(graph)
    assert result.stats["0:share-params"]["shared"] == 0
    assert torch.equal(result.graph(*inputs), graph(*inputs))


def test_smooth_quant_after_pruning_asks_for_fresh_statistics():
    """prune-channels removed FFN channels after calibration: smooth-quant divided 9 recorded maxima by 5 weight
    columns and raised a bare RuntimeError (CI seed 2142248943). It now names the input and what to do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.GELU(), torch.nn.Linear(9, 4)).eval()
    x = torch.randn(8, 4)
    graph = fxopt.calibrate(fxopt.capture(model, (x,)), [(x,)], progress=False)
    with pytest.raises(fxopt.PassError, match=r"'smooth-quant' failed") as raised:
        fxopt.Pipeline("prune-channels{ratio=0.5},smooth-quant", calibration=[(x,)])(graph)
    cause = str(raised.value.__cause__)
    assert "per-channel statistics for 9 channels, but the weight reads" in cause and "calibrate again" in cause
