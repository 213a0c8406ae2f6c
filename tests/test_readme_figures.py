"""README figures equal the result files they cite, and every repo path cited in the README or code exists.

The annotation format and the rounding rule are in tests/readme_figures.py.
"""
from pathlib import Path

import pytest

from tests.readme_figures import check_figures, dead_citations, matches

ROOT = Path(__file__).resolve().parent.parent


def test_readme_figures_match_their_result_files():
    problems, checked = check_figures((ROOT / "README.md").read_text(), ROOT)
    assert not problems, "README figures that differ from their source:\n" + "\n".join(problems)
    assert checked >= 200  # the annotations were read, not skipped (235 figures when written)


def test_no_dead_citations():
    dead = dead_citations(ROOT)
    assert not dead, "cited paths that do not exist:\n" + "\n".join(dead)


@pytest.mark.parametrize("figure, value, ok", [
    ("0.998", 0.9975, True), ("0.998", 0.9986, False), ("4.08", 4.0849, True), ("4.08", 4.09, False),
    ("2.3e-4", 2.34e-4, True), ("2.3e-4", 2.36e-4, False), ("87", 86.6, True), ("87", 88, False),
    ("0.24", 0.235, True), ("2,000", 2000, True), ("1.000", 1.0001599788665771, True),
])
def test_a_figure_matches_a_value_that_rounds_to_it(figure, value, ok):
    assert matches(figure, value) is ok


def write_sources(root):
    results = root / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "r.md").write_text("| BERT | 0.8034 ms | 4.081x | 2.31e-04 | 90.852 MB | 87 s |\n"
                                  "Parameters: 22,714,240\n")
    (results / "r.json").write_text('{"minilm": {"batch32": [{"speedup": 4.0849}]}, "err": 0.00015}')


def test_checker_reports_a_wrong_figure_and_passes_the_right_ones(tmp_path):
    write_sources(tmp_path)
    md, js = "benchmarks/results/r.md", "benchmarks/results/r.json"
    readme = "\n".join([
        f"BERT-base 1.19 ms<!-- fig {md} /BERT \\| ([\\d.]+)/ -->",                                  # wrong
        f"4.08×, 2.3e-4, 90.9 MB in 87 s<!-- fig {md} /\\| ([\\d.]+)x \\| (\\S+) \\| ([\\d.]+) MB \\| (\\d+) s/ -->",
        f"| 4.08×<!-- fig {js} #/minilm/batch32/0/speedup --> | 1.5e-4<!-- fig {js} #/err --> |",
        f"22.7 M<!-- fig {md} /Parameters: ([\\d,]+)/ scale=1e-6 -->",
    ])
    problems, checked = check_figures(readme, tmp_path)
    assert problems == [f"README.md:1: README says 1.19, {md} says 0.8034 (/BERT \\| ([\\d.]+)/)"]
    assert checked == 8


def test_checker_reports_missing_files_selectors_that_find_nothing_and_unreadable_comments(tmp_path):
    write_sources(tmp_path)
    readme = "\n".join([
        "0.5<!-- fig benchmarks/results/gone.md /x ([\\d.]+)/ -->",
        "0.5<!-- fig benchmarks/results/r.md /GPT-2 \\| ([\\d.]+)/ -->",
        "0.5<!-- fig benchmarks/results/r.json #/minilm/batch1/0/speedup -->",
        "0.5<!-- fig benchmarks/results/r.md /BERT \\| ([\\d.]+) ms \\| ([\\d.]+)x/ -->",
        "0.5<!-- fig benchmarks/results/r.md /a--b ([\\d.]+)/ -->",
        "0.5<!-- fig benchmarks/results/r.md -->",
    ])
    problems, _ = check_figures(readme, tmp_path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"README.md:{n}" for n in range(1, 7)]
    assert "gone.md: no such file" in problems[0] and "finds nothing" in problems[1]
    assert "#/minilm/batch1/0/speedup not in the file" in problems[2]
    assert "2 values from benchmarks/results/r.md but only 1 numbers before the comment" in problems[3]
    assert "'--'" in problems[4] and "not of the form" in problems[5]


def test_dead_citations_are_found_in_the_readme_and_in_docstrings_and_comments(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    docstring_and_string = '"""Writes benchmarks/results/gone.md."""\nX = "tests/not_a_comment.py"\n'
    (tmp_path / "benchmarks" / "real.py").write_text(docstring_and_string)
    (tmp_path / "fxopt").mkdir()
    (tmp_path / "fxopt" / "m.py").write_text("def f():\n    # measured by benchmarks/x86_int8_kernels.py\n    pass\n")
    (tmp_path / "README.md").write_text("See `benchmarks/real.py`, `examples/missing.py`; fxopt/torch/TVM versions.\n")
    assert dead_citations(tmp_path) == ["README.md: examples/missing.py",
                                        "benchmarks/real.py: benchmarks/results/gone.md",
                                        "fxopt/m.py: benchmarks/x86_int8_kernels.py"]
