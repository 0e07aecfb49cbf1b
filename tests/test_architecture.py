"""The import graph of fastdec, its kernels and the benchmarks, read from the source (every import statement,
those inside functions included): no import cycles, and every import points down the layers of
docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the module names their files have: kernels/ is imported as fastdec.kernels (the symlink
# fastdec/kernels), bench/ holds scripts and pytest benchmarks, named bench.<file> here.
SOURCES = {"fastdec": ROOT / "fastdec", "fastdec.kernels": ROOT / "kernels", "bench": ROOT / "bench"}
COMPILED = {"fastdec._C"}  # built from csrc/ by setup.py: no Python source, imports nothing of fastdec

# Lowest first: a module imports modules of its own layer or of a layer above it in this list, never below. A
# module belongs to the layer of the longest name here that is it or its package ("fastdec": the package's
# __init__ only, which re-exports the API).
LAYERS = (
    ("leaf helpers", ("fastdec.files", "fastdec.pixels", "fastdec.read_errors", "fastdec.latents_io",
                      "fastdec.video", "fastdec.machine", "fastdec.wording")),
    ("kernels", ("fastdec.kernels", "fastdec._C")),
    ("ops", ("fastdec.ops",)),
    ("models", ("fastdec.models", "fastdec.validate")),
    ("tiling", ("fastdec.tiling",)),
    ("api", ("fastdec", "fastdec.api", "fastdec.diffusers", "fastdec.encoders")),
    ("applications", ("fastdec.cli", "fastdec.bench", "fastdec.batch", "fastdec.train", "fastdec.evaluation",
                      "fastdec.parallel", "bench")),
)

Edge = tuple[str, str]


def module_files(sources: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every .py file under the source folders (a package is its __init__)."""
    modules = {}
    for prefix, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            if path.is_relative_to(ROOT / "fastdec" / "kernels"):
                continue  # the symlink to kernels/, listed once as fastdec.kernels
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of every import in the tree; ``from a import b`` yields a.b (b: a module or a name in a)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph(sources: dict[str, Path] = SOURCES, compiled: set[str] = COMPILED
                 ) -> dict[Edge, tuple[Path, int]]:
    """Every import of one of our modules by another: (importer, imported) -> (file, line) of the first such import.
    A dotted name resolves to the longest prefix that is one of our modules (``from a import f``: a, when f is a
    function of a). Importing a.b.c also runs the __init__ of a and a.b: an edge to each such package that does not
    hold the importer (a package's own modules run after its __init__ has started)."""
    files = module_files(sources)
    known = set(files) | compiled
    edges: dict[Edge, tuple[Path, int]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            target = next((prefix for prefix in prefixes if prefix in known), None)
            if target is None:
                continue
            if target != module:
                edges.setdefault((module, target), (path, line))
            for n in range(1, target.count(".") + 1):
                package = ".".join(target.split(".")[:n])
                if package in known and not (module + ".").startswith(package + "."):
                    edges.setdefault((module, package), (path, line))
    return edges


def find_cycles(edges) -> list[list[str]]:
    """Every import cycle as [a, b, ..., a] (a imports b, ...), from its smallest name: graphlib finds one, its last
    import is set aside, and the search runs again until none is left."""
    remaining, cycles = set(edges), []
    while True:
        sorter = graphlib.TopologicalSorter()
        for importer, imported in sorted(remaining):
            sorter.add(importer, imported)
        try:
            sorter.prepare()
            return cycles
        except graphlib.CycleError as error:
            cycle = error.args[1][::-1]  # graphlib lists each module before the one that imports it
            start = cycle.index(min(cycle[:-1]))
            cycles.append(cycle[start:-1] + cycle[:start + 1])
            remaining.discard((cycles[-1][-2], cycles[-1][-1]))


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the module's layer (None: not placed)."""
    matches = [(len(name), rank) for rank, (_, names) in enumerate(LAYERS) for name in names
               if module == name or (name != "fastdec" and module.startswith(name + "."))]
    return max(matches)[1] if matches else None


def _where(edges, a: str, b: str) -> str:
    path, line = edges[a, b]
    return f"{path.relative_to(ROOT)}:{line}"


def test_no_import_cycles():
    edges = import_graph()
    cycles = find_cycles(edges)
    report = ["  " + " -> ".join(cycle) + "\n" + "\n".join(f"      {a} -> {b} at {_where(edges, a, b)}"
                                                           for a, b in pairwise(cycle)) for cycle in cycles]
    assert not cycles, "import cycles (each import listed with where it is):\n" + "\n".join(report)


def test_every_module_has_a_layer():
    unplaced = sorted(module for module in module_files(SOURCES) if layer_of(module) is None)
    assert not unplaced, f"modules in no layer: {unplaced}; add them to LAYERS here and to docs/ARCHITECTURE.md"


def test_imports_point_down_the_layers():
    edges = import_graph()
    upward = [f"  {a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}) at {_where(edges, a, b)}"
              for a, b in sorted(edges) if layer_of(b) is not None and layer_of(a) is not None
              and layer_of(b) > layer_of(a)]
    order = " -> ".join(name for name, _ in LAYERS)
    assert not upward, f"imports from a higher layer ({order}):\n" + "\n".join(upward)


def test_the_graph_sees_imports_inside_functions_relative_imports_and_package_inits(tmp_path):
    """The checks above are only as good as the graph: a cycle hidden in a function body is found and printed."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .c import helper\n")
    (package / "sub" / "c.py").write_text("from pkg import a\n\n\ndef helper():\n    pass\n")
    edges = import_graph({"pkg": package}, set())
    assert set(edges) == {("pkg.a", "pkg.sub"), ("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.sub.c"),
                          ("pkg.sub.c", "pkg.a")}  # pkg.sub: its __init__ runs first
    assert edges["pkg.a", "pkg.sub.b"] == (package / "a.py", 5)
    assert find_cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    assert layer_of("fastdec.models.taesd") < layer_of("fastdec.tiling.rules") < layer_of("fastdec.api")
    assert layer_of("fastdec") == layer_of("fastdec.api") and layer_of("fastdec.unplaced") is None


def test_kernel_files_stay_within_500_lines():
    """One op per kernels/ file, each readable in one sitting: an op that grows splits its planning or
    configuration into a helper in kernels/support/ (e.g. attention_config.py, group_norm_plan.py)."""
    long = {path.name: n for path in sorted((ROOT / "kernels").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}, f"kernels/ files over 500 lines: {long}"
