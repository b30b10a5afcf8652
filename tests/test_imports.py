"""Dependencies point one way: no import circle among the project's modules (trainer, datagen,
tools), counting the imports made inside functions too (a lazy import still ties the two
modules together; it only hides the circle from Python)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trainer", "datagen", "tools")


def project_modules() -> dict:
    """Dotted module name -> path, for every .py file of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported(path: str, modules: dict) -> set:
    """The project modules `path` imports, anywhere in the file. `from pkg import name` counts
    pkg.name when that is a module, else pkg."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return {name for name in found if name in modules}


def find_cycle(graph: dict) -> list | None:
    """One cycle of `graph` (module -> set of modules) as a list of modules, or None."""
    state = {}  # module -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_circles():
    modules = project_modules()
    assert "trainer.config" in modules and "trainer.models.build" in modules
    # A package's __init__ does not import its submodules here, so the edge pkg.sub -> pkg
    # (Python runs pkg/__init__.py first) is no circle; only the files' own imports count.
    graph = {name: imported(path, modules) - {name} for name, path in modules.items()}
    assert graph["trainer.config"], "the import scan found nothing"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
