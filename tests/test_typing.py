"""The type stub of the compiled module (src/fastadam/_core.pyi) names exactly what the
module exposes, and the package ships its type information (py.typed).

The type checker itself runs in .ci/run (python -m mypy, configured in pyproject.toml)
over src/fastadam and tests/typing_usage.py."""

from __future__ import annotations

import ast
import inspect
import pathlib

import fastadam
from fastadam import _core

PKG = pathlib.Path(fastadam.__file__).parent
# imported by _core.pyx for its own use, not part of the module's interface
_NOT_INTERFACE = {"os", "sys"}


def _stub() -> ast.Module:
    return ast.parse((PKG / "_core.pyi").read_text())


def _stub_names(body: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _runtime_names(obj: object) -> set[str]:
    # dunders and Cython's own helpers (__pyx_unpickle_Enum) are no part of the interface
    return {
        n
        for n in vars(obj)
        if not (n.startswith("__") and n.endswith("__")) and not n.startswith("__pyx")
    }


def test_package_is_typed() -> None:
    assert (PKG / "py.typed").is_file()
    assert (PKG / "_core.pyi").is_file()


def test_stub_names_match_the_module() -> None:
    module = _runtime_names(_core) - _NOT_INTERFACE
    module -= {n for n in module if inspect.ismodule(getattr(_core, n))}
    stub = _stub_names(_stub().body)
    assert stub == module, (
        f"in _core, not in _core.pyi: {sorted(module - stub)}; "
        f"in _core.pyi, not in _core: {sorted(stub - module)}"
    )


def test_stub_plan_matches_the_class() -> None:
    cls = next(n for n in _stub().body if isinstance(n, ast.ClassDef) and n.name == "_Plan")
    stub = _stub_names(cls.body) - {"__init__", "__len__"}
    runtime = {n for n in dir(_core._Plan) if not n.startswith("_")}
    assert stub == runtime, (
        f"in _Plan, not in the stub: {sorted(runtime - stub)}; "
        f"in the stub, not in _Plan: {sorted(stub - runtime)}"
    )


def test_stub_signatures_match() -> None:
    # every function's parameter names, in order, as the compiled module reports them
    for node in _stub().body:
        if not isinstance(node, ast.FunctionDef):
            continue
        try:
            sig = inspect.signature(getattr(_core, node.name))
        except (ValueError, TypeError):  # no signature recorded (binding=False)
            continue
        assert [a.arg for a in node.args.args] == list(sig.parameters), node.name


def test_typing_usage_runs() -> None:
    # the type checker's sample of user code also runs (quickly), with torch if present
    import runpy

    runpy.run_path(str(pathlib.Path(__file__).with_name("typing_usage.py")), run_name="__test__")
