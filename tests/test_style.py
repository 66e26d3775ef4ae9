"""What keeps the code readable as it grows: lines of at most 120 characters, scripts that import libraries."""
import ast
import glob
import os

from conftest import ROOT

SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
                 + glob.glob(os.path.join(ROOT, "scripts", "*")))
SCRIPTS = ("sorted_train", "analyze", "bench")  # command-line programs: nothing imports them


def test_lines_are_at_most_120_characters():
    long = []
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        long += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {', '.join(long)}"


def test_no_module_imports_a_script():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{os.path.basename(path)} imports {n}" for n in names if n in SCRIPTS]
    assert not offenders, offenders
