"""The package's layering rules, checked on the source with ``ast`` (nothing is imported).

- ``pollinate/common/`` knows no method and no side: it imports nothing from ``pollinate.methods``,
  ``pollinate.client``, ``pollinate.server`` or ``pollinate.deploy``.
- Client-side code never loads server-side code: no module reachable from a method's client half
  (``pollinate/methods/*/client.py``) or from ``pollinate/client/`` imports ``pollinate.server``, a method's
  ``server`` module, SFPrompt's split service or the deployment coordinator. Every import statement counts,
  at any depth (function-local ones too); importing ``a.b.c`` also runs ``a`` and ``a.b``, so parent packages
  are followed as well (``pollinate/__init__`` loads the registry and each method's ``__init__`` and config).
- Every folder in ``pollinate/methods/`` is a package whose ``__init__.py`` calls ``register_method``.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "pollinate"

SERVER_SIDE = re.compile(
    r"^pollinate\.(server|methods\.\w+\.server|methods\.sfprompt\.service\w*|deploy\.coordinator)(\.|$)")
METHOD_OR_SIDE = re.compile(r"^pollinate\.(methods|client|server|deploy)(\.|$)")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file for every ``.py`` under ``root`` (a package directory)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def direct_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that the import statements in ``path`` name (any depth, relative ones resolved)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return {name for name in found if name in known}


def with_parents(name: str, known: set[str]) -> list[str]:
    """``a.b.c`` and the packages Python runs before it (``a``, ``a.b``), as far as they are ours."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in known]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> every module of ours that importing it runs directly (its imports and their parents)."""
    files = module_files(root)
    known = set(files)
    return {module: {m for name in direct_imports(module, path, known) for m in with_parents(name, known)} - {module}
            for module, path in files.items()}


def forbidden_paths(graph: dict[str, set[str]], roots: list[str], forbidden: re.Pattern[str]) -> list[str]:
    """One import chain ``root -> ... -> module`` for every forbidden module reachable from ``roots``."""
    parent: dict[str, str | None] = {root: None for root in roots}
    queue = deque(roots)
    chains = []
    while queue:
        module = queue.popleft()
        if forbidden.match(module):
            chain, step = [], module
            while step is not None:
                chain.append(step)
                step = parent[step]
            chains.append(" -> ".join(reversed(chain)))
            continue
        for child in sorted(graph.get(module, ())):
            if child not in parent:
                parent[child] = module
                queue.append(child)
    return chains


def client_side_roots(graph: dict[str, set[str]]) -> list[str]:
    halves = [m for m in graph if re.match(r"^pollinate\.methods\.\w+\.client$", m)]
    runtime = [m for m in graph if m == "pollinate.client" or m.startswith("pollinate.client.")]
    return sorted(halves + runtime)


def calls_register_method(init: Path) -> bool:
    if not init.is_file():
        return False
    calls = [node.func for node in ast.walk(ast.parse(init.read_text())) if isinstance(node, ast.Call)]
    return any(getattr(func, "id", getattr(func, "attr", "")) == "register_method" for func in calls)


# --- the rules on pollinate/ ---------------------------------------------------------------------------------
def test_common_imports_no_method_and_no_side() -> None:
    files = module_files(PACKAGE_ROOT)
    known = set(files)
    offending = [f"{module} imports {name}" for module, path in files.items() if module.startswith("pollinate.common")
                 for name in sorted(direct_imports(module, path, known)) if METHOD_OR_SIDE.match(name)]
    assert not offending, "pollinate/common/ must know no method, client, server or deploy module:\n" + "\n".join(
        offending)


def test_client_side_never_reaches_server_side_modules() -> None:
    graph = import_graph(PACKAGE_ROOT)
    roots = client_side_roots(graph)
    assert "pollinate.client.app" in roots and any(r.endswith(".fedavg_lora.client") for r in roots)
    chains = forbidden_paths(graph, roots, SERVER_SIDE)
    assert not chains, "client-side code reaches server-side modules:\n" + "\n".join(chains)


def test_every_method_folder_registers_itself() -> None:
    folders = [p for p in sorted((PACKAGE_ROOT / "methods").iterdir()) if p.is_dir() and p.name != "__pycache__"]
    assert folders, "no method folders found"
    missing = [str(folder.relative_to(PACKAGE_ROOT.parent)) for folder in folders
               if not calls_register_method(folder / "__init__.py")]
    assert not missing, f"method folders without an __init__.py that calls register_method: {missing}"


# --- the checker itself, on a small package made for the test -------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pollinate"


def test_checker_finds_function_local_relative_and_parent_package_imports(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "pollinate/__init__.py": "",
        "pollinate/server/__init__.py": "",
        "pollinate/server/strategy.py": "",
        "pollinate/methods/__init__.py": "",
        "pollinate/methods/a/__init__.py": "",
        "pollinate/methods/a/client.py": "from . import channel\n",
        "pollinate/methods/a/channel.py": "def f():\n    from pollinate.server import strategy\n",
        "pollinate/methods/b/__init__.py": "import pollinate.methods.b.server\n",
        "pollinate/methods/b/server.py": "",
        "pollinate/methods/b/client.py": "from pollinate.methods.b.codec import x\n",
        "pollinate/methods/b/codec.py": "",
    })
    chains = forbidden_paths(import_graph(pkg), client_side_roots(import_graph(pkg)), SERVER_SIDE)
    assert "pollinate.methods.a.client -> pollinate.methods.a.channel -> pollinate.server" in chains
    # b's client imports b.codec, which first runs b/__init__, which imports b.server
    assert "pollinate.methods.b.client -> pollinate.methods.b -> pollinate.methods.b.server" in chains


def test_checker_accepts_a_clean_client_half(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "pollinate/__init__.py": "import pollinate.methods\n",
        "pollinate/methods/__init__.py": "from pollinate.methods import a\n",
        "pollinate/methods/a/__init__.py": "from pollinate.methods.a.config import C\n",
        "pollinate/methods/a/config.py": "",
        "pollinate/methods/a/client.py": "from pollinate.methods.a.config import C\n",
        "pollinate/methods/a/server.py": "from pollinate.methods.a.client import helper\n",
    })
    graph = import_graph(pkg)
    assert forbidden_paths(graph, client_side_roots(graph), SERVER_SIDE) == []
