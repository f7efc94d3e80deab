"""The package's architecture, checked: no import cycle, a runtime that needs nothing of the
compiler, `show` printing the graph the build lowers, one metadata schema read strictly, CPU
kernels shaped only for SIMD units we know, and every backend behind the same interface.

The import graph is read from the source (every `import` and `from ... import`, at module level
or inside a function), not from what happens to be imported at run time, so a lazy import of
the compiler from the runtime side fails here even if no test calls the function holding it.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest
import tvm

from mixer_compile import runtime
from mixer_compile.artifact.format import METADATA, SCHEMA_VERSION, Metadata, read_metadata
from mixer_compile.backend import backend_for
from mixer_compile.backend.gemm_space import vector_unit
from mixer_compile.backend.target import TargetInfo, get_target
from mixer_compile.cli import main
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.compose import compose
from mixer_compile.errors import ArtifactError, TargetError
from mixer_compile.ir import to_text
from mixer_compile.model.spec import load_spec
from mixer_compile.passes.context import PassContext
from mixer_compile.util.progress import Progress
from tests.helpers import REPO, edit_metadata

PACKAGE = "mixer_compile"

# --- the import graph -----------------------------------------------------------------------


def package_modules(root: Path = REPO / PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package by the name of its __init__."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _within(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` stands for in the package: itself, else its nearest existing parent
    (`import mixer_compile.x.y` of a missing y still runs mixer_compile.x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _executed_on_import(tree: ast.Module) -> list[ast.AST]:
    """The nodes that run when the module is imported: all but function bodies."""
    nodes, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def imported_modules(name: str, path: Path, modules: dict[str, Path], on_import: bool = False) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source (`on_import`: only
    where importing it runs them, outside functions). `from P import n` is module P.n when that
    is a module, else P (n is a name defined in P)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in _executed_on_import(tree) if on_import else ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, `level - 1` packages up
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                module = _within(target, modules)
                if module is not None and module != name:
                    found.add(module)
    return found


def import_graph(on_import: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules its source imports (explicit imports only: that importing
    a.b.c also runs a/__init__.py is no dependency of a.b.c's code; see `loaded_with`).
    `on_import`: only the imports that run when the module is imported (outside functions)."""
    modules = package_modules()
    return {name: imported_modules(name, path, modules, on_import) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules caught in import cycles: every strongly connected component of more than one
    module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest cycle from the component's first module back to it, for a message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is no strongly connected component")


def loaded_with(module: str, graph: dict[str, set[str]], on_import: dict[str, set[str]] | None = None) -> set[str]:
    """Every package module that importing `module` can run: its imports (anywhere in its code),
    transitively, and the __init__ of every package on the way (importing a.b.c runs
    a/__init__.py and a/b/__init__.py), of which only what runs on import counts (`on_import`:
    a package's lazy `__getattr__` entry points run when someone asks for them, and then the
    asker has imported them)."""
    on_import = graph if on_import is None else on_import
    seen: set[tuple[str, bool]] = set()
    todo = [(module, False)]
    while todo:
        m, as_parent = todo.pop()
        if (m, as_parent) in seen:
            continue
        seen.add((m, as_parent))
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        todo += [(p, True) for p in parents if p in graph]
        todo += [(d, False) for d in sorted((on_import if as_parent else graph).get(m, ()))]
    return {m for m, _ in seen}


RUNTIME_SIDE = {"mixer_compile", "mixer_compile.runtime", "mixer_compile.errors", "mixer_compile.machine",
                "mixer_compile.artifact", "mixer_compile.artifact.format", "mixer_compile.artifact.place",
                "mixer_compile.util", "mixer_compile.util.locking", "mixer_compile.util.stderr", "mixer_compile.util.temps",
                "mixer_compile.version"}


def test_the_walker_sees_function_level_and_from_imports():
    graph = import_graph()
    assert "mixer_compile.backend.cpu" in graph["mixer_compile.backend"]  # inside backend_for
    assert "mixer_compile.tune.tasks" in graph["mixer_compile.compose"]  # inside model_tasks
    assert "mixer_compile.passes.tokens_major" in graph["mixer_compile.passes.pipeline"]  # from P import module
    assert "mixer_compile.errors" in graph["mixer_compile.runtime"]  # from P.m import name
    assert "mixer_compile.ir" not in graph["mixer_compile.ir.build"]  # a package is not its modules' dependency
    toy = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert import_cycles(toy) == [["a", "b", "c"], ["d", "e"]]
    assert a_cycle(["a", "b", "c"], toy) == ["a", "b", "c", "a"]
    assert import_cycles({**toy, "c": set(), "e": set()}) == []
    assert loaded_with("a.b", {"a": {"c"}, "a.b": set(), "c": set(), "d": set()}) == {"a", "a.b", "c"}
    lazy = {"a": {"c", "d"}, "a.b": set(), "c": set(), "d": set()}  # a/__init__ imports d in a function
    assert loaded_with("a.b", lazy, {**lazy, "a": {"c"}}) == {"a", "a.b", "c"}


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(f"{' -> '.join(a_cycle(c, graph))}" for c in cycles)


def test_runtime_imports_nothing_from_the_compile_side():
    compile_side = loaded_with("mixer_compile.runtime", import_graph(), import_graph(on_import=True)) - RUNTIME_SIDE
    assert not compile_side, f"importing mixer_compile.runtime can run compile-side modules: {sorted(compile_side)}"
    # the package's compiler entry point is there, lazily: asking for it loads the compiler
    assert "mixer_compile.api" in import_graph()["mixer_compile"]
    assert "mixer_compile.api" not in import_graph(on_import=True)["mixer_compile"]


# --- `show` prints the graph the build lowers -------------------------------------------------


def _shown(capsys, *args: str) -> str:
    assert main(["show", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_show_prints_exactly_the_graph_that_is_built(tiny_toml, capsys, dtype):
    out = _shown(capsys, "--spec", str(tiny_toml), "--target", "llvm", "--dtype", dtype)
    built = compose(load_spec(tiny_toml), get_target("llvm"), "matmul", dtype)
    expected = [f"// {r.summary()}" for r in built.reports] + [to_text(built.graph)]
    assert out == "\n".join(expected) + "\n"


def test_kernels_are_packed_for_cpus_not_for_gpus(tiny_toml, capsys):
    cpu = _shown(capsys, "--spec", str(tiny_toml), "--target", "llvm")
    gpu = _shown(capsys, "--spec", str(tiny_toml), "--target", "sm_90")  # resolves without a GPU
    assert "kernel_layout=NKn" in cpu and "stored as" in cpu.split("// pack_kernels:")[1].splitlines()[0]
    assert "kernel_layout=NKn" not in gpu and "(no change)" in gpu.split("// pack_kernels:")[1].splitlines()[0]
    assert to_text(compose(load_spec(tiny_toml), get_target("sm_90")).graph) in gpu


# --- the metadata schema ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_spec) -> Path:
    out = tmp_path_factory.mktemp("arch") / "art"
    compile_model(CompileOptions(spec=tiny_spec, out_dir=out), Progress(6, quiet=True))
    return out


def _newer(artifact: Path, where: Path) -> Path:
    art = shutil.copytree(artifact, where)
    edit_metadata(art, lambda meta: meta.update(format_version=SCHEMA_VERSION + 1))
    return art


def test_an_artifact_written_now_reads_back_and_loads(artifact):
    raw = json.loads((artifact / METADATA).read_text())
    assert raw["format_version"] == SCHEMA_VERSION == 1 and next(iter(raw)) == "format_version"
    meta = read_metadata(artifact)
    assert isinstance(meta, Metadata) and meta.to_json() == raw
    model = runtime.load(artifact)
    assert isinstance(model.metadata, Metadata) and model.metadata.form == "matmul"


def test_a_newer_schema_is_refused_in_one_line(artifact, tmp_path):
    art = _newer(artifact, tmp_path / "art")
    message = (f"'{art / METADATA}' has metadata schema 2, newer than this mixer-compile reads (1); "
               "upgrade mixer-compile or rebuild the artifact with this one")
    with pytest.raises(ArtifactError) as err:
        runtime.load(art)
    assert str(err.value) == message


def test_a_newer_schema_is_refused_by_the_report_command(artifact, tmp_path, capsys):
    art = _newer(artifact, tmp_path / "art")
    assert main(["report", str(art), "-o", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"error: '{art / METADATA}' has metadata schema 2, newer than this mixer-compile reads (1); "
        "upgrade mixer-compile or rebuild the artifact with this one"]
    assert not (tmp_path / "rep").exists()


# --- CPU SIMD units ---------------------------------------------------------------------------


@pytest.mark.parametrize("mcpu, lanes", [("znver4", 16), ("haswell", 8), ("x86-64", 4)])
def test_vector_unit_of_known_cpus(mcpu, lanes):
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    assert vector_unit(target).lanes == lanes


def test_vector_unit_refuses_an_unknown_isa():
    with pytest.raises(TargetError, match="no SIMD unit known for the CPU of target .*riscv64"):
        vector_unit(tvm.target.Target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"}))


# --- backends ---------------------------------------------------------------------------------

INTERFACE = ("pass_context", "build", "runner", "describe")
TUNING_INTERFACE = ("prepare", "default_schedule")  # what tune/ needs of a TUNABLE backend


def test_every_backend_has_the_same_interface():
    backends = {name: backend_for(get_target(name)) for name in ("llvm", "sm_90")}
    assert len({b.__name__ for b in backends.values()}) == 2  # one module per kind
    signatures = {}
    for name, backend in backends.items():
        assert isinstance(backend.TUNABLE, bool) and isinstance(backend.CHOOSES_FORM, bool), name
        functions = INTERFACE + (TUNING_INTERFACE if backend.TUNABLE else ())
        signatures[name] = {f: list(inspect.signature(getattr(backend, f)).parameters) for f in functions}
        assert isinstance(backend.pass_context(get_target(name), "float16"), PassContext)
    assert signatures["llvm"] == signatures["sm_90"], signatures
    assert backends["llvm"].TUNABLE and backends["sm_90"].TUNABLE  # MetaSchedule on CPUs and GPUs
    with pytest.raises(TargetError, match="has kind 'c'; mixer-compile builds for llvm, cuda"):
        backend_for(TargetInfo("c", "", {"kind": "c"}))
