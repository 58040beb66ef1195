"""The package's layers, read from the source with ``ast`` (docs/design.md, "Layers"):
components below models; infer blind to models and components; jobs on top, imported by
nothing in the library; and no import circle anywhere.

Every import counts, at module level or inside a function, under ``TYPE_CHECKING`` or not: a
lazy import still ties the layers together.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports: ``from pyro_vae.x import y`` is an import
    of ``pyro_vae.x.y`` when that is a module, else of ``pyro_vae.x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "pyro_vae")
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def in_layer(module: str, layer: str) -> bool:
    return module == f"pyro_vae.{layer}" or module.startswith(f"pyro_vae.{layer}.")


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a layer the wrong way, as 'importer -> imported'."""
    wrong = []
    for importer, imported in graph.items():
        for target in sorted(imported):
            if in_layer(target, "jobs") and not in_layer(importer, "jobs"):
                wrong.append(f"{importer} -> {target} (nothing outside jobs/ imports jobs)")
            if in_layer(importer, "infer") and (
                target == "pyro_vae" or in_layer(target, "models") or in_layer(target, "components")
            ):
                wrong.append(f"{importer} -> {target} (infer/ imports no model or component)")
            if (
                in_layer(importer, "components")
                and any(in_layer(target, layer) for layer in ("models", "infer", "jobs"))
            ) or (in_layer(importer, "components") and target == "pyro_vae"):
                wrong.append(f"{importer} -> {target} (components/ sit below models/ and infer/)")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (each as a path that returns to its start)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_folders_are_the_layers() -> None:
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert layers == {"components", "models", "infer", "jobs"}


def test_no_import_crosses_a_layer() -> None:
    assert crossings(import_graph()) == []


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("pyro_vae.explain", "pyro_vae.jobs.runs"),
        ("pyro_vae.infer.fit", "pyro_vae.models.vae"),
        ("pyro_vae.infer.estimators", "pyro_vae"),
        ("pyro_vae.components.kl", "pyro_vae.models.vae"),
    ],
)
def test_a_planted_crossing_is_caught(importer: str, target: str) -> None:
    graph = import_graph()
    graph[importer] = graph[importer] | {target}
    assert any(line.startswith(f"{importer} -> {target} ") for line in crossings(graph))


def test_a_planted_circle_is_caught() -> None:
    graph = import_graph()
    # data is imported by the jobs; make it import one of them back.
    assert "pyro_vae.data" in graph["pyro_vae.jobs.runs"]
    graph["pyro_vae.data"] = graph["pyro_vae.data"] | {"pyro_vae.jobs.runs"}
    assert circles(graph)


def test_the_graph_sees_the_imports_it_should() -> None:
    """The reader itself: known imports of each kind are found (a reader that found nothing
    would pass every test above)."""
    graph = import_graph()
    assert "pyro_vae.models.vae" in graph["pyro_vae.models.build"]  # from pyro_vae.x import y
    assert (
        "pyro_vae.infer.distributed" in graph["pyro_vae.jobs.runner"]
    )  # from pyro_vae.x import module
    assert "pyro_vae" in graph["pyro_vae.jobs.vae"]  # import pyro_vae as pv
