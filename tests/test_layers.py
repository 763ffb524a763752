"""The shape of the code, read from the sources (ast), nothing imported: the package's modules import only
modules of lower layers (so no cycle can form), first-party imports sit at the top of a module (an import
inside a function is how a cycle hides), the library raises ditlab.errors instead of exiting, scripts never
import one another and nothing edits the interpreter's import path."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The package's layers, bottom first. A module imports only modules of lower layers; modules of one layer do
# not import each other. "ditlab.toy.*" is the whole subpackage as one layer: its modules also import one
# another, which test_no_import_cycles keeps acyclic. Every module of the package must be placed here: a new
# module fails test_every_module_has_a_layer until it is.
LAYERS = [
    ["ditlab", "ditlab.errors", "ditlab.constants"],  # imports nothing from the package
    ["ditlab.files", "ditlab.cli"],  # atomic files and output paths; flag types and the command wrapper
    ["ditlab.checkpoint_io", "ditlab.distributed", "ditlab.preemption", "ditlab.outliers"],
    ["ditlab.data"],  # images, latent shards, the VAE
    ["ditlab.diffusers_interop"],  # diffusers folders and solvers
    ["ditlab.checkpoints"],  # models from official files, runs, diffusers folders, the Hub
    ["ditlab.sampling", "ditlab.features", "ditlab.trainer", "ditlab.probe"],
    ["ditlab.evaluation", "ditlab.memorisation"],
    ["ditlab.analysis", "ditlab.monitoring"],
    ["ditlab.run"],
    ["ditlab.config"],  # a run's settings, resolved (reads run directories and checkpoints)
    ["ditlab.toy.*"],
    ["ditlab.edits"],  # interventions on any DiT; the toy's sampler by default
    ["ditlab.studies.*"],
]

# Modules still being converted from SystemExit to ditlab.errors. This list should shrink to nothing.
STILL_EXITING = []
# The one module whose job is to exit: cli.command turns a library error into its message and exit code.
EXITS_BY_DESIGN = ["ditlab/cli.py"]

FIRST_PARTY = ("ditlab", "models", "diffusion", "benchmarks")


#################################################################################
#                               Reading imports                                 #
#################################################################################


def module_name(path):
    """The dotted name of a source file under ROOT: ditlab/toy/task.py -> ditlab.toy.task, ditlab/__init__.py
    -> ditlab."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name):
    """Whether a dotted name is a module or package of this repository."""
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def imports(source, name, package):
    """(imported module, line, at module level) for every import in `source`, the module `name` (a package
    when `package`). `from a import b` names a.b when that is a module, else a; relative imports resolved."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if is_module(full) else base, node.lineno, id(node) in top))
    return found


def sources(*patterns):
    """{path: source} of the files under ROOT matching the glob patterns."""
    paths = sorted({p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)})
    return {p: open(p).read() for p in paths}


def package_imports():
    """{module: [(imported ditlab module, line, at module level)]} for every module of the package."""
    graph = {}
    for path, source in sources("ditlab/**/*.py").items():
        name = module_name(path)
        found = imports(source, name, path.endswith("__init__.py"))
        graph[name] = [(m, line, top) for m, line, top in found if m == "ditlab" or m.startswith("ditlab.")]
    return graph


#################################################################################
#                                   Checks                                      #
#################################################################################


def layer_of(module, layers=LAYERS):
    """(layer index, the entry that placed it) of a module, or None when no entry does."""
    for index, entries in enumerate(layers):
        for entry in entries:
            if module == entry or (entry.endswith(".*") and (module + ".").startswith(entry[:-1])):
                return index, entry
    return None


def upward_imports(graph, layers=LAYERS):
    """The imports that break the layer order: 'importer (layer) imports imported (layer) at line N'."""
    bad = []
    for module, found in graph.items():
        for imported, line, _ in found:
            here, there = layer_of(module, layers), layer_of(imported, layers)
            if imported == module or here is None or there is None:
                continue
            same_package = here[1] == there[1] and here[1].endswith(".*")
            if there[0] >= here[0] and not same_package:
                bad.append(f"{module} (layer {here[0]}) imports {imported} (layer {there[0]}) at line {line}")
    return bad


def find_cycle(graph):
    """One import cycle of the graph as a list of modules (first == last), or None."""
    edges = {module: sorted({m for m, _, _ in found if m in graph and m != module}) for module, found in graph.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for nxt in edges[module]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def exits(source):
    """Line numbers where `source` exits the process itself: SystemExit, sys.exit, os._exit, exit(), quit().
    Catching SystemExit (an `except` clause, e.g. to log why a run stopped) is not exiting."""
    tree = ast.parse(source)
    caught = {id(n) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type is not None
              for n in ast.walk(h.type)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "SystemExit" and id(node) not in caught:
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in (("sys", "exit"), ("os", "_exit")):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "exit" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exit", "quit"):
            lines.append(node.lineno)
    return sorted(set(lines))


def edits_sys_path(source):
    """Line numbers where `source` touches the import path (the `path` attribute of `sys`)."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
            and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def is_script(source):
    """Whether a file is a script: it has an `if __name__ == "__main__":` block."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return True
    return False


#################################################################################
#                                   Tests                                       #
#################################################################################


def test_every_module_has_a_layer():
    missing = sorted(module for module in package_imports() if layer_of(module) is None)
    assert not missing, f"place these modules in LAYERS (tests/test_layers.py): {missing}"


def test_imports_only_go_down():
    bad = upward_imports(package_imports())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(package_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_first_party_imports_are_at_module_level():
    """An import of the package, models or diffusion inside a function is how a cycle hides from the reader
    and the layer test alike; only heavy optional third-party packages (diffusers, scipy, ...) are imported
    where they are used."""
    bad = []
    for path, source in sources("ditlab/**/*.py", "*.py", "benchmarks/*.py").items():
        name = module_name(path)
        for imported, line, top in imports(source, name, path.endswith("__init__.py")):
            if not top and imported.split(".")[0] in FIRST_PARTY:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {imported} inside a function")
    assert not bad, "\n".join(sorted(set(bad)))


def test_models_and_diffusion_are_below_the_package_and_the_package_below_the_benchmarks():
    below = [f"{os.path.relpath(path, ROOT)}:{line} imports {imported}"
             for path, source in sources("models.py", "diffusion/*.py").items()
             for imported, line, _ in imports(source, module_name(path), path.endswith("__init__.py"))
             if imported.split(".")[0] in ("ditlab", "benchmarks")]
    above = [f"{os.path.relpath(path, ROOT)}:{line} imports {imported}"
             for path, source in sources("ditlab/**/*.py").items()
             for imported, line, _ in imports(source, module_name(path), path.endswith("__init__.py"))
             if imported.split(".")[0] == "benchmarks"]
    assert not below + above, "\n".join(below + above)


def test_the_library_raises_instead_of_exiting():
    allowed = STILL_EXITING + EXITS_BY_DESIGN
    bad = []
    for path, source in sources("ditlab/**/*.py").items():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if any(rel == entry or (entry.endswith("/") and rel.startswith(entry)) for entry in allowed):
            continue
        bad += [f"{rel}:{line}" for line in exits(source)]
    assert not bad, "the library exits instead of raising a ditlab.errors exception at:\n" + "\n".join(bad)


def test_scripts_never_import_one_another_and_the_library_never_imports_a_script():
    files = sources("*.py", "benchmarks/*.py", "ditlab/**/*.py", "diffusion/*.py")
    scripts = {module_name(path) for path, source in files.items()
               if is_script(source) and not path.startswith(os.path.join(ROOT, "ditlab"))}
    assert {"sample", "train", "benchmarks.bench"} <= scripts  # the detector finds scripts
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports the script {imported}"
           for path, source in files.items()
           for imported, line, _ in imports(source, module_name(path), path.endswith("__init__.py"))
           if imported in scripts]
    assert not bad, "\n".join(bad)


def test_nothing_edits_sys_path():
    bad = [f"{os.path.relpath(path, ROOT)}:{line}"
           for path, source in sources("*.py", "ditlab/**/*.py", "benchmarks/*.py", "diffusion/*.py",
                                       "tests/*.py").items()
           for line in edits_sys_path(source)]
    assert not bad, "the import path is edited at:\n" + "\n".join(bad)


#################################################################################
#                           The checks can fail                                 #
#################################################################################


def test_the_checks_catch_what_they_are_for():
    layers = [["ditlab.low"], ["ditlab.mid"], ["ditlab.top.*"]]
    graph = {"ditlab.low": [("ditlab.mid", 3, False)], "ditlab.mid": [("ditlab.low", 1, True)],
             "ditlab.top.a": [("ditlab.top.b", 1, True), ("ditlab.mid", 2, True)],
             "ditlab.top.b": [("ditlab.top.a", 1, True)]}
    assert upward_imports(graph, layers) == ["ditlab.low (layer 0) imports ditlab.mid (layer 1) at line 3"]
    assert find_cycle(graph) == ["ditlab.low", "ditlab.mid", "ditlab.low"]
    del graph["ditlab.low"]
    assert find_cycle(graph) == ["ditlab.top.a", "ditlab.top.b", "ditlab.top.a"]
    assert find_cycle({"a": [("b", 1, True)], "b": []}) is None
    assert layer_of("ditlab.toy.task") == (LAYERS.index(["ditlab.toy.*"]), "ditlab.toy.*")
    assert layer_of("ditlab.toys") is None
    source = "import sys\ndef f():\n    from ditlab import checkpoints\n    sys.exit(2)\n\nraise SystemExit('x')\n"
    assert exits(source) == [4, 6]
    assert exits("from sys import exit\n") == [1] and exits("print('SystemExit')\n") == []
    assert exits("try:\n    f()\nexcept (SystemExit, KeyboardInterrupt):\n    raise SystemExit(3)\n") == [4]
    assert imports(source, "ditlab.data", False) == [("sys", 1, True), ("ditlab.checkpoints", 3, False)]
    assert imports("from . import files\nfrom .errors import UsageError\n", "ditlab.data", False) == \
        [("ditlab.files", 1, True), ("ditlab.errors", 2, True)]
    assert edits_sys_path("import sys\nsys." + "path.insert(0, '..')\n") == [2]  # (split: no line here edits it)
    assert is_script("def main():\n    pass\n\nif __name__ == '__main__':\n    main()\n")


@pytest.mark.parametrize("module", ["ditlab.data", "ditlab.diffusers_interop", "ditlab.checkpoints"])
def test_the_modules_of_the_old_cycle_import_nothing_above_them(module):
    """data, diffusers_interop and checkpoints once imported one another (the imports hidden in functions);
    now each imports only layers below it."""
    found = {m for m, _, _ in package_imports()[module]}
    above = {m for m in found if layer_of(m)[0] >= layer_of(module)[0]}
    assert not above, above


def test_no_module_outside_diffusion_is_over_500_lines():
    """Modules stay small enough to read: none outside diffusion/ over 500 lines, models.py at most 600."""
    long = {}
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel.startswith(("diffusion/", "tests/", ".venv/")) or "/." in "/" + rel:
            continue
        limit = 600 if rel == "models.py" else 500
        with open(path) as f:
            count = sum(1 for _ in f)
        if count > limit:
            long[rel] = count
    assert not long, f"over the line limit: {long}"
