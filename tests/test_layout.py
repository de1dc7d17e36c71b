"""The repository's shape: launch/ holds command lines only (none imports another, none puts a
script folder on sys.path), and the package has no import of a script."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {folder: sorted(n[:-3] for n in os.listdir(os.path.join(REPO, folder)) if n.endswith(".py"))
           for folder in ("launch", "tools")}


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module.split(".")[0]


def _sys_path_inserts(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
            yield ast.unparse(node)


@pytest.mark.parametrize("folder", ["launch", "tools"])
def test_no_script_imports_another_script(folder):
    scripts = set(SCRIPTS["launch"]) | set(SCRIPTS["tools"])
    offenders = []
    for name in SCRIPTS[folder]:
        path = os.path.join(REPO, folder, f"{name}.py")
        offenders += [f"{folder}/{name}.py imports {m}" for m in _imports(path) if m in scripts and m != name]
        # the only folder a script may put on sys.path is the repository root (the package, uninstalled)
        offenders += [f"{folder}/{name}.py: {call}" for call in _sys_path_inserts(path)
                      if "launch" in call or "tools" in call or "HERE" in call]
    assert SCRIPTS[folder] and not offenders, offenders


def test_the_package_imports_no_script():
    scripts = set(SCRIPTS["launch"]) | set(SCRIPTS["tools"])
    package = os.path.join(REPO, "ds_partitionsel")
    offenders = [f"{name}: {m}" for name in os.listdir(package) if name.endswith(".py")
                 for m in _imports(os.path.join(package, name)) if m in scripts]
    assert not offenders, offenders
