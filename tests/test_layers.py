"""The package's layers, read from its source (ast): no arrow from a lower layer to a higher one, no import
cycle among modules, torch only in nn and measure, and no file over ~400 lines without its reason given."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorabench"

# Lowest first. A module may import its own layer and the ones below, never one above (lazy imports in
# functions included: they are arrows all the same).
LAYERS = (
    ("errors", "spelling", "bounds", "extras", "methods", "gpus", "safety"),
    ("models",),
    ("estimator",),
    ("render",),
    ("nn",),
    ("measure",),
    ("api",),  # above measure: a traced answer (measure.answer) imports torch only when it traces
    ("report",),
    ("cli", "__main__", "__init__"),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
TORCH_LAYERS = ("nn", "measure")
LONG_FILE = 400


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(path: Path, top_level_only: bool):
    """The lorabench modules (and torch) a file imports: every import, or only those run at import time."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks run nothing
        nodes = [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lorabench":
                for alias in node.names:
                    yield f"lorabench.{alias.name}"
            else:
                yield node.module
                for alias in node.names:
                    yield f"{node.module}.{alias.name}"


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def known(module: str, names) -> str:
    """The longest prefix of module that is a lorabench module (an imported name may be a function)."""
    parts = module.split(".")
    while parts and ".".join(parts) not in names:
        parts.pop()
    return ".".join(parts)


def test_every_module_is_in_a_layer():
    assert {layer(m) for m, _ in modules()} <= set(LEVEL)


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    names = {m for m, _ in modules()}
    wrong = []
    for module, path in modules():
        for target in imports(path, top_level_only=False):
            # `from lorabench import __version__`: the package's root holds its version and loads nothing
            if target.startswith("lorabench.") and known(target, names) not in ("", "lorabench"):
                if LEVEL[layer(known(target, names))] > LEVEL[layer(module)]:
                    wrong.append(f"{module} -> {known(target, names)}")
    assert not wrong, wrong


def test_no_import_cycle():
    names = {m for m, _ in modules()}
    graph = {m: set() for m in names}
    for module, path in modules():
        for target in imports(path, top_level_only=True):
            t = known(target, names)
            if t and t != module and t != "lorabench":  # the package's own __init__ imports nothing at load
                graph[module].add(t)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_torch_only_in_nn_and_measure():
    outside = [module for module, path in modules() if layer(module) not in TORCH_LAYERS
               and any(t == "torch" or t.startswith("torch.") for t in imports(path, top_level_only=False))]
    assert not outside, outside


def test_long_files_say_why():
    long = []
    for module, path in modules():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > LONG_FILE and "lines" not in doc:  # the reason names its length: "... over 400 lines: ..."
            long.append(f"{module}: {lines}")
    assert not long, long
