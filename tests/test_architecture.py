"""The import rules of the design: planner never imports runtime, app, torch or streamlit;
runtime imports only the planner's data types; app only the planner (never runtime).  Checked
on the source of every module (imports inside functions included)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the planner modules that are data types (what crosses into runtime/)
PLANNER_DATA_TYPES = {"planner.plan", "planner.spec", "planner.job", "planner.hardware",
                      "planner.schema", "planner.limits", "planner.engines", "planner.rules",
                      "planner.measured", "planner.units", "planner.topology",
                      "planner.cost.pipeline", "planner"}


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _modules(package: str) -> list:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


# --trace-activations' tracer runs transformers on the meta device: it imports torch inside its
# functions, and only the flag imports it (tests/test_traced.py checks the planner without it)
TORCH_TRACER = ROOT / "planner" / "traced.py"


@pytest.mark.parametrize("path", _modules("planner"), ids=lambda p: str(p.relative_to(ROOT)))
def test_planner_imports_no_runtime_app_torch_or_streamlit(path):
    banned = ("runtime", "app", "streamlit") if path == TORCH_TRACER else (
        "runtime", "app", "torch", "streamlit")
    bad = {m for m in _imports(path) if _top(m) in banned}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("runtime"), ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_imports_only_planner_data_types(path):
    bad = {m for m in _imports(path) if _top(m) == "planner" and m not in PLANNER_DATA_TYPES}
    bad |= {m for m in _imports(path) if _top(m) in ("app", "streamlit")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("app"), ids=lambda p: str(p.relative_to(ROOT)))
def test_app_imports_the_planner_only(path):
    bad = {m for m in _imports(path) if _top(m) in ("runtime", "torch")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
