"""The package's shape, enforced: the layers (import-linter's contract in pyproject.toml, which ``make test``
also runs as ``lint-imports``), no import cycle between modules, no private name imported across packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src"


def test_layer_contract_is_kept():
    run = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-logo"], cwd=SRC.parent,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def _graph():
    return grimp.build_graph("quantaudit", exclude_type_checking_imports=True)


def test_no_import_cycle():
    graph = _graph()
    cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                     if graph.find_shortest_chain(importer=b, imported=a)})
    assert not cycles, cycles


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def test_no_private_name_is_imported_from_another_package():
    found = []
    for path in sorted((SRC / "quantaudit").rglob("*.py")):
        is_package = path.name == "__init__.py"
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        here = _package_of(module, is_package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = here.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            target_is_package = (SRC / target.replace(".", "/")).is_dir()
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and _package_of(target, target_is_package) != here:
                    found.append(f"{module} imports {alias.name} from {target}")
    assert not found, found
