"""The import graph of llama/ and training/, read from the source with ast (nothing is imported): no import cycle, and
ColossalAI imported only inside training/engine/, the one door to it. Imports inside functions count too: a lazy
import still ties the two modules together."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llama", "training")
ENGINE_PACKAGE = "training.engine"

# The tokenizer circle that issue 20 item 3 removes on another branch (tokdata); delete this constant when that lands.
def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported_names(path: Path, name: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved; for `from X import Y`, both
    X and X.Y (Y may be a submodule)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = repo_modules()
    return {name: {target for target, _ in imported_names(path, name) if target in modules and target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycle_finder_finds_a_circle_and_passes_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_llama_and_training():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_colossalai_is_imported_only_inside_the_engine_package():
    outside = [f"{path.relative_to(REPO)}:{line} imports {target}"
               for name, path in repo_modules().items()
               if not (name == ENGINE_PACKAGE or name.startswith(ENGINE_PACKAGE + "."))
               for target, line in imported_names(path, name) if target.split(".")[0] == "colossalai"]
    assert not outside, "\n".join(outside)
    inside = [target for name, path in repo_modules().items() if name.startswith(ENGINE_PACKAGE + ".")
              for target, _ in imported_names(path, name) if target.split(".")[0] == "colossalai"]
    assert inside  # the walk sees the engine's own imports of it
