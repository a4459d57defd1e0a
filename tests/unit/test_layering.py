"""The package layering, read from the source with ``ast`` (nothing is imported).

Layers, bottom to top::

    accelgen            the pure core (accelgen/core), the wire converters (accelgen/wire), the
                        generated stubs (accelgen/v1), profiles and the gRPC/logging helpers
    scheduler_service   the three services: none imports another
    worker_service
    gateway
    launcher            the CLI and stack launcher
    bench, scripts      research tools (not installed)

Every ``import`` and ``from ... import`` counts: at module level, inside functions and under
``if TYPE_CHECKING:`` (a lazy import still ties the two modules together). Relative imports are
resolved against the importing file's package, and ``from pkg import name`` counts as an import
of ``pkg.name`` when that is a module of this repository. Generated ``*_pb2*.py`` files are not
read. Each rule is one test whose failure lists every violation as ``file -> imported module``.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = ("accelgen", "scheduler_service", "worker_service", "gateway", "launcher")
SERVICES = ("scheduler_service", "worker_service", "gateway")
TOOLS = ("launcher", "bench", "scripts")  # the top: nothing below the CLI imports these
MAX_LINES = 500

# Stdlib modules the pure core and the converters must not import: processes, threads, sockets and
# event loops, the OS and the interpreter, logging and the clock (the simulator drives the core
# with its own clock). The core's one file access is a profile's JSON through pathlib
# (DeviceProfile.load/save), which this list leaves alone.
IO_STDLIB = frozenset({
    "os", "sys", "io", "shutil", "tempfile", "glob", "fcntl", "mmap", "socket", "socketserver", "ssl", "select",
    "selectors", "asyncio", "subprocess", "multiprocessing", "threading", "_thread", "concurrent", "signal",
    "http", "urllib", "ftplib", "smtplib", "sqlite3", "logging", "time",
})  # fmt: skip
CORE_THIRD_PARTY = frozenset({"numpy", "sortedcontainers"})  # what the core uses today


class Import(NamedTuple):
    file: str  # path relative to the repo root
    module: str  # the imported module, absolute and resolved

    def __str__(self) -> str:
        return f"{self.file} -> {self.module}"


# -- reading the source ----------------------------------------------------------------------
def _is_generated(path: Path) -> bool:
    return "_pb2" in path.name


IGNORED_ROOTS = ("build", "bench/out", "shared")  # ignored build outputs (.gitignore) and the data checkout


def _skipped(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    return (any(d.startswith(".") or d.endswith(".egg-info") or d == "__pycache__" for d in dirs)
            or any(rel.is_relative_to(root) for root in IGNORED_ROOTS))


def python_files(*roots: str) -> list[Path]:
    """The ``.py`` files under ``roots`` (relative to the repo; all of it when none), generated
    stubs, hidden folders (``.venv``, ``.cache``) and ignored outputs (``build``, ``bench/out``,
    ``*.egg-info``) left out."""
    tops = [REPO / r for r in roots] if roots else [REPO]
    out = []
    for top in tops:
        files = [top] if top.suffix == ".py" else top.rglob("*.py")
        for path in files:
            rel = path.relative_to(REPO)
            if not _is_generated(path) and not _skipped(rel):
                out.append(path)
    return sorted(out)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_repo_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def module_file(name: str) -> Path | None:
    """The file executed for ``import name`` when it is one of this repo's modules."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_relative(package: list[str], level: int, module: str | None) -> str:
    if level - 1 > len(package):
        raise ValueError(f"relative import beyond the top-level package {'.'.join(package)!r}")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_in(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every module ``source`` imports, resolved as if it were the repo module ``module``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):  # every node: functions, classes, ``if TYPE_CHECKING:``
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(package, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.append(sub if alias.name != "*" and is_repo_module(sub) else base)
    return list(dict.fromkeys(found))


@lru_cache(maxsize=None)
def imports_of(path: Path) -> tuple[Import, ...]:
    rel = str(path.relative_to(REPO))
    modules = imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")
    return tuple(Import(rel, m) for m in modules)


def all_imports(*roots: str) -> Iterator[Import]:
    for path in python_files(*roots):
        yield from imports_of(path)


def top(module: str) -> str:
    return module.split(".")[0]


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_stdlib(module: str) -> bool:
    return top(module) in sys.stdlib_module_names


def report(rule: str, violations: Iterable[object]) -> str:
    lines = sorted({str(v) for v in violations})
    return f"{rule}: {len(lines)} violation(s)\n  " + "\n  ".join(lines)


# -- the rules -------------------------------------------------------------------------------
def test_every_source_package_is_read() -> None:
    """The reader finds each package's files and resolves every import in them (a relative import
    past the top-level package would raise)."""
    for package in SOURCE_PACKAGES:
        files = python_files(package)
        assert files, f"no Python files under {package}/"
        assert all(imp.module for path in files for imp in imports_of(path)), package


def test_accelgen_imports_nothing_above_it() -> None:
    upper = ("scheduler_service", "worker_service", "gateway", *TOOLS)
    bad = [i for i in all_imports("accelgen") if within(i.module, *upper)]
    assert not bad, report(f"accelgen (the bottom layer) must not import {', '.join(upper)}", bad)


def test_core_imports_only_the_stdlib_without_io_and_itself() -> None:
    """accelgen/core is the pure scheduling core: stdlib (no processes, threads, network, clock or
    interpreter state), numpy and sortedcontainers, and accelgen.core itself; no gRPC, no Redis,
    no stubs, no wire converters."""

    def allowed(module: str) -> bool:
        if within(module, "accelgen.core"):
            return True
        if is_stdlib(module):
            return top(module) not in IO_STDLIB
        return top(module) in CORE_THIRD_PARTY

    bad = [i for i in all_imports("accelgen/core") if not allowed(i.module)]
    assert not bad, report("accelgen/core may import only accelgen.core, the stdlib without "
                           f"{', '.join(sorted(IO_STDLIB))}, and {', '.join(sorted(CORE_THIRD_PARTY))}", bad)


def test_wire_imports_only_the_core_and_the_messages() -> None:
    """accelgen/wire converts between core types and proto messages: the core, the generated
    messages (``*_pb2``, not the ``*_pb2_grpc`` service code) and the stdlib without I/O; no gRPC,
    no server helpers (accelgen.common)."""

    def allowed(module: str) -> bool:
        if within(module, "accelgen.core", "accelgen.wire"):
            return True
        if within(module, "accelgen.v1"):
            return not module.endswith("_pb2_grpc")
        if is_stdlib(module):
            return top(module) not in IO_STDLIB
        return within(module, "google.protobuf")  # the messages' runtime

    bad = [i for i in all_imports("accelgen/wire") if not allowed(i.module)]
    assert not bad, report("accelgen/wire may import only accelgen.core, accelgen.wire, the accelgen.v1 "
                           "messages (no *_pb2_grpc), google.protobuf and the stdlib without I/O", bad)


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = [s for s in SERVICES if s != service]
    bad = [i for i in all_imports(service) if within(i.module, *others)]
    assert not bad, report(f"{service} must not import {' or '.join(others)}", bad)


def test_nothing_below_the_cli_imports_launcher_bench_or_scripts() -> None:
    bad = [i for i in all_imports("accelgen", *SERVICES) if within(i.module, *TOOLS)]
    assert not bad, report(f"accelgen and the services must not import {', '.join(TOOLS)}", bad)


def import_graph(*packages: str) -> dict[str, set[str]]:
    """File -> the files it imports, for the files of ``packages`` (edges leaving them dropped)."""
    files = python_files(*packages)
    graph: dict[str, set[str]] = {str(p.relative_to(REPO)): set() for p in files}
    for path in files:
        for imp in imports_of(path):
            target = module_file(imp.module)
            if target is not None and str(target.relative_to(REPO)) in graph:
                graph[imp.file].add(str(target.relative_to(REPO)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first node repeated at the end) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graphs are a few dozen files
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    out = []
    for comp in components:
        members, start = set(comp), comp[0]
        # the shortest way back to ``start`` inside the component (breadth first)
        prev: dict[str, str] = {}
        frontier, path = [start], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        path = [v]
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path is not None:
                    break
            frontier = nxt
        assert path is not None
        while path[-1] != start:
            path.append(prev[path[-1]])
        out.append([start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start])
    return out


def test_cycles_finds_each_cycle() -> None:
    """The cycle finder itself, on a made-up graph: a 3-cycle, a self-import, a DAG part."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles_in_the_service_shell() -> None:
    """Files of scheduler_service, worker_service and gateway (within and across them) import
    each other without cycles."""
    found = cycles(import_graph(*SERVICES))
    assert not found, report("import cycles between the services' files", (" -> ".join(c) for c in found))


def test_no_python_file_is_over_500_lines() -> None:
    counts = {p: len(p.read_text().splitlines()) for p in python_files()}
    bad = [f"{p.relative_to(REPO)}: {n} lines" for p, n in counts.items() if n > MAX_LINES]
    assert not bad, report(f"Python files over {MAX_LINES} lines (split them by job)", bad)


def test_the_reader_sees_lazy_type_checking_and_relative_imports() -> None:
    """The import reader itself, on made-up source read as a module of the gateway package."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import convert\n"
        "from .errors import GatewayError\n"
        "from .. import launcher\n"
        "if TYPE_CHECKING:\n"
        "    from gateway.config import GatewayConfig\n"
        "def f():\n"
        "    import scheduler_service.app\n"
        "    from accelgen.v1 import common_pb2\n"
        "    from accelgen.core.slo import SLO\n"
    )
    assert imports_in(source, "gateway.probe") == [
        "typing", "gateway.convert", "gateway.errors", "launcher", "gateway.config", "scheduler_service.app",
        "accelgen.v1.common_pb2", "accelgen.core.slo"]
    assert imports_in("from . import errors\n", "gateway", is_package=True) == ["gateway.errors"]
