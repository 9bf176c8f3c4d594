"""The layer order of docs/ARCHITECTURE.md holds: no module imports one on a higher floor, and
the package's imports have no cycle. Every import counts, function-level ones included."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "microturn"
FLOOR_LINE = re.compile(r"^(\d+)\. \*\*([\w-]+)\*\*: (.*?) — ")


def floors() -> dict[str, int]:
    """Module prefix -> floor number, read from the "Layers" section of ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        if match := FLOOR_LINE.match(line):
            for prefix in re.findall(r"`(microturn[\w.]*)`", match.group(3)):
                out[prefix] = int(match.group(1))
    assert out, "no floors found in docs/ARCHITECTURE.md's Layers section"
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The microturn modules `path` imports (a `from a import b` names a.b if b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "microturn"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "microturn":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def floor_of(module: str, table: dict[str, int]) -> int:
    # the package root names its own __init__ only: a new subpackage must be given a floor
    best = max((p for p in table if module == p or (module.startswith(p + ".")
                                                    and p != "microturn")), key=len, default=None)
    assert best is not None, f"{module} is on no floor: add it to ARCHITECTURE.md's Layers"
    return table[best]


def upward(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    return [f"{module} (floor {floor_of(module, table)}) imports {target} "
            f"(floor {floor_of(target, table)})"
            for module, targets in graph.items() for target in sorted(targets)
            if floor_of(target, table) > floor_of(module, table)]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> the modules it imports), or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done or module not in graph:
            return None
        path.append(module)
        for target in sorted(graph[module] - {module}):
            if found := visit(target):
                return found
        path.pop()
        done.add(module)
        return None

    return next((found for module in graph if (found := visit(module))), None)


GRAPH = {module: imports(path) for module, path in MODULES.items()}


def test_no_module_imports_a_higher_floor():
    wrong = upward(GRAPH, floors())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = cycle(GRAPH)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_client_side_does_not_import_the_server():
    for module in ("microturn.client", "microturn.stream", "microturn.bench.server_bench"):
        server = {t for t in GRAPH[module] if t.startswith("microturn.server")}
        assert not server, f"{module} imports {sorted(server)}"


def test_the_checks_can_fail():
    """Negative controls: an upward import and a cycle are caught."""
    table = floors()
    assert upward({"microturn.sequence.timeline": {"microturn.engine.engine"}}, table)
    assert not upward({"microturn.engine.engine": {"microturn.sequence.timeline"}}, table)
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "microturn.sequence.markers" in GRAPH["microturn.sequence.timeline"]
