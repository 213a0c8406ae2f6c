"""README figures against the result files they quote, and dead path citations.

A measured figure in README.md is followed by an HTML comment (Markdown hides it) naming its source:

    4.08×<!-- fig benchmarks/results/x86_int8_xeon_inductor.md /x86-int8 \\| [\\d.]+ \\| [\\d.]+ \\| ([\\d.]+)/ -->
    0.998 / 0.961<!-- fig benchmarks/results/x86_int8_xeon_fidelity512_inductor.json #/cosine #/nn_agreement -->
    22.7 M<!-- fig benchmarks/results/prune_minilm.md /Parameters: ([\\d,]+)/ scale=1e-6 -->

A `/regex/` (searched with re.MULTILINE; one capture group per figure) or JSON pointers (`#/key/0/key`) give
the values, multiplied by the optional `scale`. They are compared with the figures just before the comment:
the last N numbers between the previous comment on the line (or its start) and this one, units ignored. A
figure matches when the value rounds to it at the figure's last shown digit (0.998 is 0.9975 to 0.9985, 2.3e-4
is 2.25e-4 to 2.35e-4, 87 is 86.5 to 87.5). In a table row write `\\|` for a literal `|` (GFM splits cells on
bare pipes, even in comments), and no `--` (GFM does not hide a comment holding one).
"""
import ast
import json
import re
import tokenize
from decimal import Decimal

ANNOTATION = re.compile(r"<!-- fig (?P<path>\S+) (?P<selector>.*?)(?: scale=(?P<scale>\S+))? -->")
NUMBER = re.compile(r"(?<![\w.\-])\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)")
CITATION = re.compile(r"(?<![\w./\-])(?:benchmarks|examples|tests|fxopt)/[\w./*\-]*")


def source_values(root, path, selector, scale):
    """The numbers `selector` picks from the file at `path`, or a problem (a string)."""
    file = root / path
    if not file.is_file():
        return f"{path}: no such file"
    text = file.read_text()
    if selector.startswith("/") and selector.endswith("/") and len(selector) > 1:
        match = re.search(selector[1:-1], text, re.MULTILINE)
        if match is None or not match.groups():
            return f"{path}: {selector} finds nothing"
        raw = match.groups()
    elif selector.startswith("#/"):
        data, raw = json.loads(text), []
        for pointer in re.split(r"\s+(?=#/)", selector):
            value = data
            for key in pointer[2:].split("/"):
                try:
                    value = value[int(key)] if isinstance(value, list) else value[key]
                except (KeyError, IndexError, ValueError, TypeError):
                    return f"{path}: {pointer} not in the file"
            raw.append(value)
    else:
        return f"{path}: selector {selector!r} is neither /regex/ nor #/json/pointer"
    try:
        return [float(str(v).replace(",", "")) * float(scale or 1) for v in raw]
    except ValueError:
        return f"{path}: {selector} gives {raw!r}, not numbers"


def matches(figure, value):
    """True when `value` rounded at the figure's last shown digit is the figure."""
    shown = Decimal(figure.replace(",", ""))
    half_step = 0.5 * 10.0 ** shown.as_tuple().exponent
    return abs(value - float(shown)) <= half_step * (1 + 1e-9)


def check_annotation(where, numbers, note, root):
    """(problems, figures compared) for one annotation, given the numbers before it on its line."""
    path, selector = note["path"], note["selector"]
    if "--" in selector:
        return [f"{where}: {selector} holds '--': GFM would not hide the comment"], 0
    values = source_values(root, path, selector, note["scale"])
    if isinstance(values, str):
        return [f"{where}: {values}"], 0
    if len(numbers) < len(values):
        return [f"{where}: {len(values)} values from {path} but only {len(numbers)} numbers before the comment"], 0
    figures = numbers[len(numbers) - len(values):]
    return [f"{where}: README says {figure}, {path} says {value:.6g} ({selector})"
            for figure, value in zip(figures, values) if not matches(figure, value)], len(values)


def check_figures(readme_text, root):
    """(problems, figures compared): a problem names the README line, the file and both values."""
    problems, compared = [], 0
    for lineno, line in enumerate(readme_text.splitlines(), 1):
        where, start = f"README.md:{lineno}", 0
        if line.count("<!-- fig") != len(ANNOTATION.findall(line)):
            problems.append(f"{where}: a `<!-- fig` comment not of the form <!-- fig PATH SELECTOR [scale=X] -->")
        for note in ANNOTATION.finditer(line):
            found, n = check_annotation(where, NUMBER.findall(line[start:note.start()]), note, root)
            problems, compared, start = problems + found, compared + n, note.end()
    return problems, compared


def cited_paths(text):
    """Repo paths cited in `text`: with an extension or a trailing slash (bare words like fxopt/torch are prose)."""
    for match in CITATION.finditer(text):
        path = match.group().rstrip(".,:;")
        if path.endswith("/") or re.search(r"\.\w+$", path):
            yield path


def docstrings_and_comments(file):
    tree = ast.parse(file.read_text())
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    yield from filter(None, (ast.get_docstring(n, clean=False) for n in ast.walk(tree) if isinstance(n, scopes)))
    with file.open("rb") as f:
        yield from (t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.COMMENT)


def dead_citations(root):
    """'where: path' for each cited path that does not exist under `root`."""
    files = [*root.glob("fxopt/**/*.py"), *root.glob("tests/**/*.py"), *root.glob("examples/**/*.py"),
             *root.glob("benchmarks/*.py")]
    texts = [("README.md", (root / "README.md").read_text())]
    texts += [(str(f.relative_to(root)), text) for f in sorted(files) for text in docstrings_and_comments(f)]
    dead = []
    for where, text in texts:
        for path in cited_paths(text):
            exists = any(root.glob(path)) if "*" in path else (root / path).exists()
            if not exists:
                dead.append(f"{where}: {path}")
    return sorted(set(dead))
