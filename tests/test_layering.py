"""The package's imports point one way, down: each module may import only modules of its own layer or below.

Layers, bottom first (README, "How it fits together"). A module not listed fails the test, so a new file must
be placed in a layer on purpose.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmedit_jax"

LAYERS = [
    # 0: values and names every layer shares
    ["tree", "sites", "patch", "edit_patch", "case", "sharding", "integrity"],
    # 1: the networks, and their converted files on disk
    ["models", "checkpoint"],
    # 2: one example's forward, and the losses on its logits
    ["forward", "losses"],
    # 3: records -> token arrays and images
    ["data"],
    # 4: edit functions, their networks and files
    ["editors"],
    # 5: scoring and the evaluation harness
    ["eval"],
    # 6: meta-training
    ["training"],
    # 7: weights from elsewhere
    ["convert", "loading"],
    # 8: the built-in world and the user-facing assembly
    ["world", "pipeline", "demo", "api"],
    # 9: command-line shells (report: reads a run's files and writes a page)
    ["flags", "bench", "evaluate", "train", "report", "__init__"],
]
# Command-line entry points inside lower packages: shells, allowed to reach up.
SHELLS = {"convert/__main__", "world/build", "world/generate"}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"mmedit_jax.{module} is in no layer of tests/test_layering.py: place it")


def package_imports(path: pathlib.Path):
    """`(line, module under mmedit_jax, inside a function)` for every import of the package in `path`."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("mmedit_jax"):
                base = child.module.removeprefix("mmedit_jax").lstrip(".")
                names = [a.name for a in child.names] if not base else [base]
                out.extend((child.lineno, n if not base else base, inner) for n in names)
            elif isinstance(child, ast.Import):
                out.extend((child.lineno, a.name.removeprefix("mmedit_jax."), inner)
                           for a in child.names if a.name.startswith("mmedit_jax."))
            visit(child, inner)

    visit(tree, False)
    return out


FILES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    rel = path.relative_to(PACKAGE).with_suffix("").as_posix()
    if rel in SHELLS:
        return
    mine = layer_of(rel.replace("/", "."))
    for line, module, _ in package_imports(path):
        assert layer_of(module) <= mine, (f"{rel}.py:{line} imports mmedit_jax.{module} (layer {layer_of(module)}) "
                                          f"from layer {mine}")


def test_few_function_local_imports_of_the_package():
    """Lazy imports of the package's own modules stay a handful, each with its reason in a comment just above."""
    lazy = []
    for path in FILES:
        lines = path.read_text().splitlines()
        for line, module, nested in package_imports(path):
            if nested:
                before = " ".join(lines[max(0, line - 6) : line])
                assert "#" in before, f"{path.relative_to(PACKAGE)}:{line}: a lazy import of {module} without a reason"
                lazy.append((path.name, module))
    assert len(lazy) <= 6, lazy
