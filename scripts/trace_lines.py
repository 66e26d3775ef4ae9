"""How many lines of this project a reader must follow for one run: trace it and count what ran.

  python scripts/trace_lines.py                       # the demo path: a few training steps, then generate --layers 4
  python scripts/trace_lines.py -- generate.py --ckpt out --layers 4      # any one command

Counting: a function's (or method's) whole span, from its first decorator to its last line, once it is called;
a class body is a block of top-level statements, so a class counts the statements of its body that ran (its
methods' `def` lines are that, their bodies count when called); every other top-level statement that ran counts
its whole span (a module docstring, an import, a constant). Lines are counted once per file, however often they
ran. Files outside the project (torch, the standard library) and the tests are not counted.
"""
import argparse
import ast
import inspect
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spans(path: str):
    """(function spans by the line their code object starts at, the top-level statement span of every line)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    functions, statement_of = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            functions.setdefault(first, (first, node.end_lineno))
            functions.setdefault(node.lineno, (first, node.end_lineno))

    def statements(body):
        for stmt in body:
            if isinstance(stmt, ast.ClassDef):  # a class: the statements of its body, one by one
                first = min([stmt.lineno] + [d.lineno for d in stmt.decorator_list])
                for line in range(first, stmt.body[0].lineno):
                    statement_of[line] = (first, stmt.body[0].lineno - 1)
                statements(stmt.body)
                continue
            first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            header = stmt.lineno if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else stmt.end_lineno
            for line in range(first, stmt.end_lineno + 1):
                # a def statement runs its first line only; the body counts when the function is called
                statement_of[line] = (first, header) if header != stmt.end_lineno else (first, stmt.end_lineno)
    statements(tree.body)
    return functions, statement_of


def child(script: str, args: list[str], out: str):
    """Run script's main(args) in this process under a tracer; write {file: [lines]} to out."""
    sys.path.insert(0, ROOT)
    sys.argv = [script, *args]
    ran = {}  # file -> {"calls": set of first lines, "lines": set of module-level lines}

    def mine(filename: str) -> bool:
        return filename.startswith(ROOT + os.sep) and os.sep + "tests" + os.sep not in filename and \
            os.sep + ".venv" not in filename and not filename.endswith("trace_lines.py")

    def tracer(frame, event, arg):
        code = frame.f_code
        if not mine(code.co_filename):
            return None
        record = ran.setdefault(code.co_filename, {"calls": set(), "lines": set()})
        if not code.co_flags & inspect.CO_OPTIMIZED:  # a module or a class body: statement by statement
            def lines(frame, event, arg):
                if event == "line":
                    record["lines"].add(frame.f_lineno)
                return lines
            return lines
        record["calls"].add(code.co_firstlineno)
        return None

    sys.settrace(tracer)
    import runpy
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.settrace(None)
    with open(out, "w") as f:
        json.dump({k: {"calls": sorted(v["calls"]), "lines": sorted(v["lines"])} for k, v in ran.items()}, f)


def count(records: list[dict]) -> dict:
    """{relative file: set of counted lines} over several runs."""
    counted = {}
    for record in records:
        for path, r in record.items():
            functions, statement_of = spans(path)
            lines = counted.setdefault(os.path.relpath(path, ROOT), set())
            for first in r["calls"]:
                if first in functions:
                    a, b = functions[first]
                    lines.update(range(a, b + 1))
            for line in r["lines"]:
                if line in statement_of:
                    a, b = statement_of[line]
                    lines.update(range(a, b + 1))
    return counted


def run(command: list[str], cwd: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", out.name, "--", *command], cwd=cwd,
                       check=True, stdout=subprocess.DEVNULL)
        with open(out.name) as f:
            return json.load(f)


def report(title: str, counted: dict):
    total = sum(len(v) for v in counted.values())
    print(f"{title}: {total} lines in {len(counted)} files")
    for path, lines in sorted(counted.items(), key=lambda kv: -len(kv[1])):
        print(f"  {path:<28}{len(lines):>6}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help="training steps of the demo path")
    p.add_argument("command", nargs="*", help="script and its arguments (default: the demo path)")
    a = p.parse_args()
    if a.child:
        return child(a.command[0], a.command[1:], a.child)
    if a.command:
        return report(" ".join(a.command), count([run(a.command, ROOT)]))
    with tempfile.TemporaryDirectory() as tmp:
        train = run(["sorted_train.py", "--max_steps", str(a.steps), "--out", os.path.join(tmp, "out")], ROOT)
        sample = run(["generate.py", "--ckpt", os.path.join(tmp, "out"), "--layers", "4"], ROOT)
    report(f"training ({a.steps} steps of python sorted_train.py)", count([train]))
    report("sampling (python generate.py --layers 4)", count([sample]))
    report("together", count([train, sample]))


if __name__ == "__main__":
    main()
