"""What keeps the code readable as it grows: lines of at most 120 characters, scripts that import libraries, a core
that reaches its layers only where it hands over to them."""
import ast
import glob
import os

from conftest import ROOT

LAYERS = ("scale", "decoding", "variants")  # the layers' packages
CORE = ("model", "soft", "data", "sorted_train", "generate", "load_llama", "one_process", "sampling", "tokenizer",
        "checkpoints", "tasks", "flags")
READ = ("model", "soft", "data", "sorted_train", "generate", "load_llama")  # at least these in the README's order
SCRIPTS = ("sorted_train", "analyze", "bench")  # command-line programs: nothing imports them
MODULES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + [p for layer in LAYERS
                                                          for p in glob.glob(os.path.join(ROOT, layer, "*.py"))])
SOURCES = MODULES + sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")) +
                           [p for p in glob.glob(os.path.join(ROOT, "scripts", "*")) if os.path.isfile(p)])


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
    assert {name for name, _ in ranges} >= {f"{name}.py" for name in READ}, ranges
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


def test_no_import_circle():
    """No file reaches itself through imports, a function's own imports included: a lower module owns what two
    files share (sampling.py, say, rather than generate.py and decoding/ importing each other)."""
    files = {os.path.relpath(p, ROOT) for p in MODULES}

    def target(module: str):
        path = module.replace(".", "/")
        return next((f for f in (path + ".py", path + "/__init__.py") if f in files), None)

    graph = {}
    for f in files:
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[f] = {t for t in map(target, names) if t and t != f}

    def reach(start: str) -> set:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen
    circles = sorted(f for f in files if f in reach(f))
    assert not circles, f"files that import themselves through others: {circles}"


def test_the_training_doc_lists_every_flag_of_the_trainer():
    import argparse
    import re
    from unittest import mock

    from sorted_train import get_args
    parsers = []
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, *_: parsers.append(self)):
        get_args([])
    flags = {s for action in parsers[0]._actions for s in action.option_strings if s.startswith("--")} - {"--help"}
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        table = f.read().split("## Every flag", 1)[1]
    documented = {flag for row in table.splitlines() if row.startswith("| `")
                  for flag in re.findall(r"`(--\w+)", row.split("|")[1])}
    assert documented == flags, f"undocumented: {sorted(flags - documented)}, not flags: {sorted(documented - flags)}"
