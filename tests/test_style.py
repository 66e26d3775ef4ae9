"""What keeps the code readable as it grows: lines of at most 120 characters, scripts that import libraries, a core
that reaches its layers only where it hands over to them."""
import ast
import glob
import os

from conftest import ROOT

LAYERS = ("scale", "decoding", "variants")  # the layers' packages
CORE = ("model", "soft", "data", "sorted_train", "generate", "load_llama")
SCRIPTS = ("sorted_train", "analyze", "bench")  # command-line programs: nothing imports them
MODULES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + [p for layer in LAYERS
                                                          for p in glob.glob(os.path.join(ROOT, layer, "*.py"))])
SOURCES = MODULES + sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")) +
                           glob.glob(os.path.join(ROOT, "scripts", "*")))


def imports(path: str):
    """(the imported module, whether at the top level of the file) for every import in it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        yield from ((n, id(node) in top) for n in names)


def test_lines_are_at_most_120_characters():
    long = []
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        long += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {', '.join(long)}"


def test_no_module_imports_a_script():
    offenders = [f"{os.path.relpath(path, ROOT)} imports {n}" for path in MODULES for n, _ in imports(path)
                 if n in SCRIPTS]
    assert not offenders, offenders


def test_the_core_imports_a_layer_only_where_it_hands_over():
    """The core's files import no layer at their top: a layer is imported inside the one function that hands a
    job over to it, so that a reader of the core meets only the core."""
    offenders = [f"{name}.py imports {n} at the top" for name in CORE for n, top in imports(os.path.join(ROOT,
                 name + ".py")) if top and n.split(".")[0] in LAYERS]
    assert not offenders, offenders


def test_the_readme_reading_order_points_at_whole_definitions():
    """The README's reading order gives line ranges of the core: each must start where the file, a section ruler or
    a definition starts and end where one ends, so that the table follows the code when it moves."""
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        ranges = re.findall(r"\| `(\w+\.py)` ((?:\d+-\d+(?:, )?)+) \|", f.read())
    assert {name for name, _ in ranges} >= {f"{name}.py" for name in CORE}, ranges
    for name, spans in ranges:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        statements = ast.parse(text).body
        starts = {1} | {min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", [])]) for s in statements}
        starts |= {i for i, line in enumerate(text.splitlines(), 1) if line.startswith("# ---")}
        ends = {s.end_lineno for s in statements}
        for span in spans.split(", "):
            first, last = map(int, span.split("-"))
            assert first in starts and last in ends, f"{name} {span}: not the lines of whole definitions"
