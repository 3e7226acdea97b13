"""The rooms and what each may import: the layers depend downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved to distill.*)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root).with_suffix("").parts
    package = ["distill", *parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _violations(room: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((REPO / room).rglob("*.py"))
    assert files, f"no Python files under {room}/"
    bad = []
    for path in files:
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_shared_never_imports_the_broker_the_workers_or_the_tui() -> None:
    assert _violations("shared", ("distill.broker", "distill.workers", "distill.tui")) == []


def test_broker_policy_never_imports_the_socket_loop() -> None:
    loop = ("distill.broker.loop", "distill.broker.main")
    assert _violations("broker/services", loop) == []
    assert _violations("broker/store", loop) == []


def test_worker_services_never_import_the_broker() -> None:
    assert _violations("workers", ("distill.broker", "distill.tui")) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    # The rules above are only as good as _imports: a lazy import must count too.
    (tmp_path / "shared").mkdir()
    probe = tmp_path / "shared" / "probe.py"
    probe.write_text("def f():\n    from distill.broker.loop import Broker\n    import distill.tui\n"
                     "    from ..broker import hub\n")
    found = _imports(probe, root=tmp_path)
    assert {"distill.broker.loop", "distill.tui", "distill.broker.hub"} <= found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A folder with an __init__.py that pyproject.toml does not list is left out of a normal
    (non-editable) install: its modules then exist only in a developer's checkout."""
    text = (REPO / "pyproject.toml").read_text()
    missing = []
    for room in ("broker", "workers", "tui", "shared"):
        for init in sorted((REPO / room).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO)
            name = "distill." + ".".join(rel.parts)
            if f'"{name}",' not in text or f'"{name}" = "{rel.as_posix()}"' not in text:
                missing.append(name)
    assert not missing, f"add to [tool.setuptools] packages and package-dir: {missing}"
