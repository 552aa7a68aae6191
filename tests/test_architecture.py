"""The layering of ARCHITECTURE.md, checked: which module may import which, and how many
hand-written derivative rules the package has."""

import ast
import pathlib

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "adjoint"

FOUNDATION = {"_misc", "_results", "_stage"}
CORE = FOUNDATION | {"_multistage", "_parallel_costates", "_lagrangian", "_check"}

# module -> the package modules it may import (control.* counts as "control")
ALLOWED = {
    "_misc": set(),
    "_results": set(),
    "_stage": {"_misc"},
    "_multistage": FOUNDATION,
    "_parallel_costates": FOUNDATION | {"_multistage"},
    "_lagrangian": FOUNDATION | {"_multistage"},
    "_check": FOUNDATION | {"_multistage", "_lagrangian"},
    # systems built on the one recursion
    "_sharing": CORE,
    "_skip": CORE,
    "_recurrent": CORE,
    # solvers with their own implicit / reversible derivative
    "_ctrnn": FOUNDATION,
    "_reversible": FOUNDATION,
    "_continuous": FOUNDATION | {"_reversible"},
    # optimal control: the core plus its own modules
    "control": CORE | {"control"},
    # training and its tooling
    "_checkpoint": FOUNDATION,
    "_data_parallel": FOUNDATION,
    "_fit": FOUNDATION | {"_checkpoint", "_data_parallel"},
}


def _module_name(path: pathlib.Path) -> str:
    """The layer name of a file: `_stage`, ..., `control` for `control/_*.py`."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.parts[0] == "control":
        return "control" if rel.parts[-1].startswith("_") else "control." + rel.parts[-1]
    return rel.parts[0]


def _layer(dotted: str) -> str | None:
    """`adjoint.control._solve` -> `control`, `adjoint._stage` -> `_stage`."""
    parts = dotted.split(".")
    if parts[0] != "adjoint" or len(parts) < 2:
        return None
    if parts[1] == "control":
        return "control" if len(parts) == 2 or parts[2].startswith("_") else "control." + parts[2]
    return parts[1]


def _imports(path: pathlib.Path) -> set[str]:
    """The layers of the package modules `path` imports (at any depth in the file)."""
    package = ["adjoint"] + list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            targets = [module] if node.module else [module + [a.name] for a in node.names]
            found.update(_layer(".".join(t)) for t in targets)
        elif isinstance(node, ast.Import):
            found.update(_layer(alias.name) for alias in node.names)
    return found - {None}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in PACKAGE.rglob("*.py") if _module_name(p) in ALLOWED),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_layering(path):
    name = _module_name(path)
    extra = _imports(path) - ALLOWED[name] - {name}
    assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)} (ARCHITECTURE.md)"


def test_every_module_has_a_layer():
    applications = {"__init__", "__main__", "cli", "tasks", "problems", "imitation", "datasets"}
    applications |= {"control.__init__", "control.cli"}
    names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert names - applications <= set(ALLOWED), sorted(names - applications - set(ALLOWED))


def test_hand_written_derivative_rules():
    """One custom VJP for the recursion, one for the CTRNN fixed point, one for the
    reversible ODE adjoint, one custom JVP for the implicit derivative of a control
    solve (`control._implicit`)."""
    rules = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        count = text.count("@eqx.filter_custom_vjp") + text.count("@jax.custom_vjp")
        count += text.count("@eqx.filter_custom_jvp") + text.count("@jax.custom_jvp")
        if count:
            rules[str(path.relative_to(PACKAGE))] = count
    assert sum(rules.values()) <= 4, rules
