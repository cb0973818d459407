"""The layers of `studio/`, enforced on the source: every import (function-level ones included) goes down
the stack, never up, and no two packages import each other. docs/ARCHITECTURE.md draws the picture."""

import ast
from pathlib import Path

STUDIO = Path(__file__).resolve().parents[2] / "studio"

# Bottom first. A package may import its own modules and any package below it, nothing above.
LAYERS = ("core", "data", "model", "training", "reports", "runs", "services", "ui", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}


def package_of(module: str) -> str | None:
    """'studio.model.loading' -> 'model'; None for modules outside the studio and for `studio` itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "studio" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    rel = path.relative_to(STUDIO.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, anywhere in it; relative imports made absolute."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((node.lineno, module))
            # a name may be a module of its own: `from studio import data`, `from . import errors`
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def package_edges() -> list[tuple[str, str, str]]:
    """(importing package, imported package, where) for every import that crosses packages."""
    edges = []
    for path in sorted(STUDIO.rglob("*.py")):
        source = package_of(module_name(path))
        for line, module in imported_modules(path):
            target = package_of(module)
            if source and target and target != source and target in RANK | {source: 0}:
                edges.append((source, target, f"{path.relative_to(STUDIO.parent)}:{line} imports {module}"))
    return edges


def test_every_package_has_a_layer():
    packages = {p.name for p in STUDIO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), "place a new package in LAYERS (and in docs/ARCHITECTURE.md)"
    loose = [p.name for p in STUDIO.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "every module lives in a layer's package"


def test_imports_only_go_down():
    upward = [where for source, target, where in package_edges() if RANK[target] > RANK[source]]
    assert upward == [], "imports that go up a layer:\n" + "\n".join(upward)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {name: set() for name in LAYERS}
    for source, target, _ in package_edges():
        graph[source].add(target)
    state: dict[str, str] = {}

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*trail, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*trail, node])):
                return found
        state[node] = "done"
        return None

    cycles = [c for name in LAYERS if name not in state and (c := cycle_from(name, []))]
    assert cycles == [], f"packages import each other: {' -> '.join(cycles[0])}"


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    # The checks above are only as good as this reader: prove it on a file with the hidden kinds of import.
    pkg = tmp_path / "studio" / "data"
    pkg.mkdir(parents=True)
    (tmp_path / "studio" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    sample = pkg / "sample.py"
    sample.write_text(
        "def f():\n    from studio.ui.app import launch\n\nfrom . import errors\nfrom ..training import loop\n"
        "from studio import runs\n"
    )
    monkeypatch.setattr(f"{__name__}.STUDIO", tmp_path / "studio")
    modules = [m for _, m in imported_modules(sample)]
    assert "studio.ui.app" in modules
    assert "studio.data.errors" in modules
    assert "studio.training.loop" in modules
    assert "studio.runs" in modules
