"""The cuda target's precision options (fxopt/targets/cuda.py, cuda_quantize.py): their validation, the pass
specs they make, and keep_float's measured mixed precision, on small models without building (no TVM).

The builds themselves are in tests/backends/test_cuda_low_precision.py; the real all-MiniLM-L6-v2 against issue
22's bars in tests/targets/test_cuda_fidelity_minilm.py (slow).
"""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.errors import InputError
from fxopt.targets.cuda import CudaTarget
from fxopt.targets.cuda_quantize import plan_keep_float, precision_spec, quantize

FP8 = torch.ops.fxopt.linear_fp8.default
INT8 = torch.ops.fxopt.linear_int8.default
INT4 = torch.ops.fxopt.linear_int4.default


class LoudAndQuiet(torch.nn.Module):
    """Three linears whose errors reach the output at very different strengths: ``loud`` (node ``linear``)
    dominates, then ``middle`` (``linear_1``); ``quiet`` (``linear_2``) is scaled down by 1e-4."""

    def __init__(self):
        super().__init__()
        self.loud, self.middle, self.quiet = (torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x):
        return self.loud(x) + 0.1 * self.middle(x) + 1e-4 * self.quiet(x)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = LoudAndQuiet().eval()
    batches = [(torch.randn(8, 64),) for _ in range(3)]
    return fxopt.capture(model, batches[0]), batches


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp16", "keep_float": 2}, r"option keep_float= applies to precision 'fp8' or 'int8' or "
                                             r"'int4-weight', not 'fp16'"),
    ({"precision": "fp8", "keep_float": -1}, r"keep_float=-1 is not valid; use one of 'auto', or a number of "
                                             r"linears \(an int >= 0\)"),
    ({"precision": "fp8", "keep_float": True}, r"keep_float=True is not valid"),
    ({"precision": "fp8", "keep_float": "all"}, r"keep_float='all' is not valid"),
    ({"precision": "int8", "fidelity": 1.5}, r"fidelity=1.5 is not valid; use one of None, or an output cosine"),
    ({"precision": "int8", "fidelity": 0.99, "keep_float": 3}, r"fidelity=0.99 is the target of "
                                                               r"keep_float='auto'; with keep_float=3"),
    ({"precision": "fp8", "smooth_alpha": 0.8}, r"smooth_alpha= applies to precision 'int8', not 'fp8'"),
    ({"precision": "int8", "smooth_alpha": 2.0}, r"smooth_alpha=2.0 is not valid; .* a float in \[0, 1\]"),
    ({"precision": "int4-weight", "int4_group": 16}, r"int4_group=16 is not valid; use one of 32, 64, 128"),
    ({"precision": "int8", "int4_group": 64}, r"int4_group= applies to precision 'int4-weight', not 'int8'"),
    ({"precision": "int4-weight", "int4_rounding": "awq"}, r"int4_rounding='awq' is not valid; use one of "
                                                           r"'gptq', 'rtn'"),
])
def test_bad_precision_options_raise_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        CudaTarget(**options)
    with pytest.raises(InputError, match=message):  # the same through optimize, before anything is captured
        fxopt.optimize(torch.nn.Linear(4, 4), (torch.randn(2, 4),), target="cuda", progress=False,
                       precision=options["precision"], options={k: v for k, v in options.items() if k != "precision"})


def test_defaults_and_what_reads_calibration_data():
    defaults = CudaTarget(precision="int4-weight").settings
    assert {k: defaults[k] for k in ("keep_float", "fidelity", "int4_group", "int4_zero_point", "int4_rounding")} \
        == {"keep_float": "auto", "fidelity": None, "int4_group": 32, "int4_zero_point": True, "int4_rounding": "gptq"}
    assert CudaTarget(precision="fp8").calibrates and not CudaTarget(precision="fp8", keep_float=0).calibrates
    assert CudaTarget(precision="int8", keep_float=0).calibrates  # smooth-quant reads activation ranges
    assert not CudaTarget(precision="int4-weight", keep_float=0, int4_rounding="rtn").calibrates
    assert not CudaTarget().calibrates  # fp16
    assert CudaTarget(**dict(defaults, precision="fp16")).settings["precision"] == "fp16"  # defaults are no request
    # the quantization options never reach the TVM build
    assert set(CudaTarget(precision="int8").build_options()) == {"matmul", "dtype"}


def test_precision_specs():
    settings = CudaTarget(precision="int4-weight").settings
    assert precision_spec("fp8", settings) == "quantize-fp8"
    assert precision_spec("fp8", settings, ("linear_3", "linear")) == "quantize-fp8{skip=linear_3;linear}"
    assert precision_spec("int8", {"smooth_alpha": 0.65}, ("linear",)) == \
        "smooth-quant{alpha=0.65},quantize-int8{skip=linear}"
    assert precision_spec("int4-weight", settings, ("linear",)) == \
        "insert-qdq{scheme=weight-only,bits=4,group-size=32,symmetric=false,method=gptq,skip=linear},int4-linear"
    rtn = dict(settings, int4_group=128, int4_zero_point=False, int4_rounding="rtn")
    assert precision_spec("int4-weight", rtn) == "insert-qdq{scheme=weight-only,bits=4,group-size=128,method=rtn}," \
                                                 "int4-linear"


def test_keep_float_n_keeps_the_n_most_sensitive_linears_in_order(small):
    graph, batches = small
    settings = CudaTarget(precision="fp8", keep_float=2).settings
    plan = plan_keep_float(graph, "fp8", settings, batches)
    assert [name for name, _ in plan.sensitivity] == ["linear", "linear_1", "linear_2"]
    assert plan.keep == ("linear", "linear_1")
    quantized, spec, stats = quantize(graph, "fp8", settings, plan.keep, batches)
    assert spec == "quantize-fp8{skip=linear;linear_1}"
    assert [n.target for n in quantized.call_nodes() if "linear" in str(n.target)] == \
        [torch.ops.aten.linear.default, torch.ops.aten.linear.default, FP8]
    assert plan.fidelity > plan.sensitivity[0][1]  # better than with the loudest linear quantized alone


@pytest.mark.parametrize("precision, op", [("fp8", FP8), ("int8", INT8), ("int4-weight", INT4)])
def test_auto_keeps_as_many_as_the_fidelity_target_needs(small, precision, op):
    graph, batches = small
    if precision == "int8":
        graph = fxopt.calibrate(graph, batches, progress=False)

    def plan_for(fidelity):
        return plan_keep_float(graph, precision, CudaTarget(precision=precision, fidelity=fidelity).settings, batches)

    everything = plan_for(0.5)  # met with every linear quantized
    assert everything.keep == () and everything.tried == [(0, everything.fidelity)]
    assert everything.fidelity < 1.0
    between = (everything.fidelity + everything.sensitivity[1][1]) / 2  # met once the loud linear is float
    one = plan_for(min(between, 1 - 1e-9))
    assert one.keep == ("linear",) and one.fidelity >= one.target
    assert one.as_dict()["kept"] == 1 and one.as_dict()["of"] == 3
    assert plan_for(1.0).keep == ("linear", "linear_1", "linear_2")  # only float meets 1.0
    quantized = quantize(graph, precision, CudaTarget(precision=precision).settings, one.keep, batches)[0]
    assert sum(1 for _ in quantized.call_nodes(op)) == 2


def test_fidelity_ignores_padded_tokens():
    """Where the graph takes an attention_mask, padded tokens' outputs (never read) do not count."""
    from fxopt.targets.cuda_quantize import FidelityMeter

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 32)

        def forward(self, x, attention_mask):
            return self.linear(x) * attention_mask.unsqueeze(-1).float() ** 0  # reads the mask, changes nothing

    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, 3:] = 0
    x = torch.randn(2, 6, 32)
    x[:, 3:] *= 1e4  # padded tokens: huge, so their (ignored) fp8 error would dominate
    model = Encoder().eval()
    graph = fxopt.capture(model, (x, mask))
    settings = CudaTarget(precision="fp8").settings
    masked = FidelityMeter(graph, "fp8", settings, [(x, mask)])(())
    real = (x[:, :3].clone(), torch.ones(2, 3, dtype=torch.long))
    assert masked == pytest.approx(FidelityMeter(fxopt.capture(model, real), "fp8", settings, [real])(()),
                                   abs=1e-6)
    assert masked > 0.999
