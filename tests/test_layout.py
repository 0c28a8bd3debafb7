"""The package's rooms (issue 29): imports run down the floors, never back up, and never in a circle.

Every import of the project under lib/cxr_pipeline, at the top of a module, inside a function or under
``if TYPE_CHECKING:``, is read with ``ast`` (nothing is imported). A module may import its own room and the
rooms on the floors below it. Two exceptions, each for a reason: an entry point (a ``__main__`` module: nothing
imports it) may import any room, and the runner (``cli``) reaches up, inside its functions only, to the few
services it starts for every command (``RUNNER_STARTS``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = "cxr_pipeline"
GROUND = {PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.paths"}  # settings and paths: the only top-level modules
FLOORS = (  # lowest first; the rooms of one floor do not import each other
    ("ground",),  # config and paths: they import nothing of the project above them
    ("cli",),  # the runner every entry point starts through
    ("images",),  # images in: the tree layout, decoding, DICOM, splits; no storage of their own
    ("infra",),  # storage, the HDFS loader, run folders, the local stack, YARN, tables
    ("models",),  # the backbones, their runtimes, the weights
    ("evaluation",),  # metrics, the threshold rule, reports and plots both training paths share
    ("tracking",),  # MLflow: takes plain payloads from the paths, reads nothing of them
    ("spark", "cnn"),  # the two training paths, apart
    ("serving",),  # the service and the one-image command, over both paths
    ("notebook_support",),  # the notebooks' library and their runner
    ("datasets",),  # development data makers
)
RUNNER_STARTS = {  # what the runner may import lazily from above: the services it starts for a command
    f"{PACKAGE}.infra.storage": "one storage.configure per command",
    f"{PACKAGE}.infra.run_folder": "one run_folder.configure per command",
    f"{PACKAGE}.spark.session": "the Spark session of a command that has one",
}
MAX_LINES = 600  # issue 29: a module longer than this holds more than one job


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function (runs when called, not when the module is imported)
    type_only: bool  # under ``if TYPE_CHECKING:``: read by type checkers, never run


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((LIB / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(LIB).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project's modules ``node`` imports: ``from . import x`` names module ``x``, ``from .x import y``
    names ``x`` unless ``y`` is a module itself."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: None if _is_package(module) else -1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    found = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name.split(".")[0] == PACKAGE:
            found.append(name)
    return found


def project_imports() -> list[Import]:
    imports = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        lazy_lines = {line for f in functions for line in range(f.lineno, f.end_lineno + 1)}
        checks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
        type_lines = {line for c in checks for line in range(c.lineno, c.end_lineno + 1)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    if target != module:
                        line = node.lineno
                        imports.append(Import(module, target, line, line in lazy_lines, line in type_lines))
    return imports


IMPORTS = project_imports()


def room(module: str) -> str:
    """``cxr_pipeline.spark.classifier.training`` -> ``spark``; config and paths -> ``ground``."""
    return "ground" if module in GROUND else module.split(".")[1]


def floor(module: str) -> int:
    for level, rooms in enumerate(FLOORS):
        if room(module) in rooms:
            return level
    raise AssertionError(f"{module} is in no room of FLOORS: add its room to the floor it belongs on")


def _where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(LIB.parent)}:{imp.line} imports {imp.imported}"


def test_the_import_reader_sees_what_the_package_does():
    """The reader above must find known imports, top-level and lazy, relative and absolute, or the rules
    below check nothing."""
    pairs = {(i.importer, i.imported, i.lazy) for i in IMPORTS}
    assert (f"{PACKAGE}.images.decode", f"{PACKAGE}.images.dicom", False) in pairs  # from .dicom import ...
    assert (f"{PACKAGE}.images.decode", f"{PACKAGE}.config", False) in pairs  # from .. import config as cfg
    assert (f"{PACKAGE}.cnn.data", f"{PACKAGE}.infra.storage", True) in pairs  # inside _read_remote
    hdfs_load = f"{PACKAGE}.infra.hdfs_load"
    assert [
        i.type_only for i in IMPORTS if (i.importer, i.imported) == (f"{hdfs_load}.lock", f"{hdfs_load}.remote")
    ] == [True]
    assert len(MODULES) > 80 and len(IMPORTS) > 300


def test_every_module_is_in_a_room():
    for module in MODULES:
        floor(module)


def runs_up(imp: Import) -> bool:
    """Whether ``imp`` breaks the floors: it goes to a higher floor, or across one, and is not an exception."""
    if room(imp.importer) == room(imp.imported) or imp.importer.endswith(".__main__"):
        return False
    if floor(imp.imported) < floor(imp.importer):
        return False
    return not (room(imp.importer) == "cli" and imp.lazy and imp.imported in RUNNER_STARTS)


def test_the_rule_tells_down_from_up():
    def imp(importer: str, imported: str, lazy: bool = False) -> Import:
        return Import(f"{PACKAGE}.{importer}", f"{PACKAGE}.{imported}", 1, lazy, False)

    assert not runs_up(imp("spark.reader", "images.layout"))  # down
    assert runs_up(imp("infra.localstack.faults", "spark.session", lazy=True))  # up, even inside a function
    assert runs_up(imp("spark.featurizer", "cnn.predict"))  # across the floor of the two paths
    assert not runs_up(imp("cli", "spark.session", lazy=True)) and runs_up(imp("cli", "spark.session"))
    assert runs_up(imp("cli", "cnn.predict", lazy=True))  # the runner starts services, nothing else
    assert not runs_up(imp("tracking.__main__", "cnn.mlflow_run", lazy=True))  # an entry point


def test_no_import_runs_back_up():
    """A room imports its own room and the floors below; an entry point anything; the runner its services."""
    wrong = [_where(imp) for imp in IMPORTS if runs_up(imp)]
    assert wrong == [], "imports that run back up (or across one floor):\n" + "\n".join(wrong)


def test_nothing_imports_an_entry_point():
    assert [_where(i) for i in IMPORTS if i.imported.endswith(".__main__")] == []


def test_no_import_circle():
    """Tarjan's strongly connected components of the module graph: top-level and lazy imports alike, not the
    type-only ones (they never run)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if not imp.type_only:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_no_module_is_longer_than_one_job(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines: split it along its seams"
