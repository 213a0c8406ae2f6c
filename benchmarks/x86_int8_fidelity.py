"""MiniLM fidelity of an x86-int8 artifact on the machine that runs it (e.g. the GPU host's Xeon).

    python benchmarks/x86_int8_fidelity.py build --out build/x86_fidelity      # here: optimize, save, reference
    python benchmarks/x86_int8_fidelity.py check --dir build/x86_fidelity      # there: load, run, compare

``build`` optimizes the real all-MiniLM-L6-v2 for x86-int8 (activations in full
8-bit codes, as a VNNI/AMX CPU runs them: FXOPT_X86_ISA=avx512-vnni) on the
first 128 real sentences, saves the artifact, and stores the next 128 (or
``--evaluation-sentences``) sentences' token ids and the fp32 model's pooled embeddings. ``check`` needs
neither the model nor its weights: it loads the artifact with ``fxopt.load``
(checksums, no pickle), lowers it for the local CPU's ISA, and reports mean
cosine and nearest-neighbour agreement against the stored fp32 embeddings
(issue bar: >= 0.99 and >= 0.95).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxopt  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, sentence_embeddings  # noqa: E402

BATCH, MAX_LENGTH, CALIBRATION_SENTENCES = 32, 64, 128


def build(out: str, evaluation_sentences: int = 128) -> None:
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import sentence_batches
    model, tokenizer = minilm()
    sentences = real_sentences(CALIBRATION_SENTENCES + evaluation_sentences)
    calibration = sentence_batches(tokenizer, sentences[:CALIBRATION_SENTENCES], BATCH, MAX_LENGTH)
    evaluation = sentence_batches(tokenizer, sentences[CALIBRATION_SENTENCES:], BATCH, MAX_LENGTH)
    optimized = fxopt.optimize(model, calibration[0], target="x86-int8", calibration_data=calibration)
    optimized.save(os.path.join(out, "artifact"))
    reference = sentence_embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    tensors = {"reference": reference.contiguous()}
    for i, (ids, mask) in enumerate(evaluation):
        tensors[f"ids_{i}"], tensors[f"mask_{i}"] = ids.contiguous(), mask.contiguous()
    save_file(tensors, os.path.join(out, "evaluation.safetensors"))
    here = embedding_agreement(reference, sentence_embeddings(optimized.graph, evaluation))
    print(json.dumps({"graph_cosine": here[0], "graph_nn": here[1], "isa": optimized.stats["lowering"]["isa"]}))


def check(directory: str, allow_torch_mismatch: bool = False) -> dict:
    tensors = load_file(os.path.join(directory, "evaluation.safetensors"))
    batches = [(tensors[f"ids_{i}"].clone(), tensors[f"mask_{i}"].clone())
               for i in range(sum(k.startswith("ids_") for k in tensors))]
    loaded = fxopt.load(os.path.join(directory, "artifact"), allow_torch_mismatch=allow_torch_mismatch)
    cosine, nn = embedding_agreement(tensors["reference"], sentence_embeddings(loaded, batches))
    result = {"isa": loaded.stats["lowering"]["isa"], "torch": torch.__version__, "cosine": round(cosine, 4), "nn_agreement": round(nn, 4),
              "sentences": sum(b[0].shape[0] for b in batches), "artifact_bytes": _bytes(directory),
              "kernel_path": loaded.stats["lowering"].get("kernel_path")}
    print(json.dumps(result))
    return result


def _bytes(directory: str) -> int:
    path = os.path.join(directory, "artifact")
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("build", "check"))
    parser.add_argument("--out", default="build/x86_fidelity")
    parser.add_argument("--dir", default="build/x86_fidelity")
    parser.add_argument("--allow-torch-mismatch", action="store_true",
                        help="check: load an artifact saved under another torch major.minor (with a warning)")
    parser.add_argument("--evaluation-sentences", type=int, default=128,
                        help="build: held-out sentences to compare on (a multiple of 32; default 128)")
    args = parser.parse_args(argv)
    if args.mode == "build":
        build(args.out, args.evaluation_sentences)
    else:
        check(args.dir, args.allow_torch_mismatch)


if __name__ == "__main__":
    main()
