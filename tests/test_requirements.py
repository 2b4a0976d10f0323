"""Every third-party import is declared in setup.cfg, so a fresh `pip install -e '.[test]'` can run the tests.

The package folders (ssl_bench/, tasks/, pretrain/) are checked against ``install_requires``; tests/ against
``install_requires`` plus the ``test`` extra. A module is declared when one of the distributions that provide
it (``importlib.metadata.packages_distributions``) is a declared requirement or one of their dependencies,
recursively (``importlib.metadata.requires``). Standard-library and local modules need no declaration.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata as metadata
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("ssl_bench", "tasks", "pretrain")
LOCAL_PACKAGES = frozenset({"ssl_bench"})  # tasks and pretrain are only ever imported as ssl_bench.tasks / .pretrain


def normalize(name: str) -> str:
    """PEP 503 name, so 'PyYAML', 'pyyaml' and 'scikit_learn' / 'scikit-learn' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_imports(source: str) -> set[str]:
    """Top-level module names of every absolute import in ``source``, also those inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def declared_requirements(setup_cfg: Path, extras: Iterable[str] = ()) -> set[str]:
    """Normalized names of ``install_requires`` plus the given extras of ``setup_cfg``."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config.get("options", "install_requires", fallback="").splitlines()
    for extra in extras:
        lines += config.get("options.extras_require", extra).splitlines()
    return {normalize(Requirement(line).name) for line in (s.strip() for s in lines) if line and not line.startswith("#")}


def requirement_closure(names: Iterable[str]) -> set[str]:
    """The named distributions and, recursively, the installed requirements they declare (no extras)."""
    closure: set[str] = set()
    todo = [normalize(n) for n in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # declared but not installed: its own imports then fail as undeclared
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return closure


def undeclared_imports(
    sources: Mapping[str, str],
    allowed: set[str],
    local: Iterable[str],
    providers: Mapping[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Third-party modules imported by ``sources`` (file name -> text) that no distribution in ``allowed``
    provides, each with the files that import it. ``providers`` maps module -> distributions (default: what is
    installed); a module no installed distribution provides is undeclared as well."""
    providers = metadata.packages_distributions() if providers is None else providers
    ignored = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | set(local) | {"__future__"}
    missing: dict[str, list[str]] = {}
    for filename, text in sorted(sources.items()):
        for module in sorted(top_level_imports(text) - ignored):
            if not {normalize(d) for d in providers.get(module, [])} & allowed:
                missing.setdefault(module, []).append(filename)
    return missing


def _sources(folders: Iterable[str]) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def _describe(missing: dict[str, list[str]], providers: Mapping[str, list[str]]) -> str:
    def what(module: str) -> str:
        if module in PACKAGE_DIRS:  # the repo folder, importable only from a checkout's root
            return f"the package folder {module}/: import it as ssl_bench.{module}"
        return f"distribution {', '.join(providers.get(module, ['not installed']))}"

    return "; ".join(f"{module} ({what(module)}) in {', '.join(files[:3])}" for module, files in missing.items())


# --------------------------------------------------------------------------- the checker itself


def test_an_undeclared_import_is_named():
    sources = {
        "pkg/a.py": "import os\nimport numpy as np\nfrom skimage.data import astronaut\nfrom . import sibling\n",
        "pkg/b.py": "def f():\n    import skimage\n    from helpers import x\n    import threadpoolctl\n",
    }
    providers = {"numpy": ["numpy"], "skimage": ["scikit-image"], "threadpoolctl": ["threadpoolctl"]}
    missing = undeclared_imports(sources, {"numpy", "threadpoolctl"}, local={"helpers"}, providers=providers)
    assert missing == {"skimage": ["pkg/a.py", "pkg/b.py"]}
    assert undeclared_imports(sources, {"numpy", "threadpoolctl", "scikit-image"}, {"helpers"}, providers) == {}
    # a module that no installed distribution provides is reported too
    assert undeclared_imports({"c.py": "import nowhere_to_be_found\n"}, {"numpy"}, (), providers) == {
        "nowhere_to_be_found": ["c.py"]}


def test_declared_requirements_and_closure(tmp_path):
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options]\ninstall_requires =\n    scikit-learn>=1.3\n    PyYAML>=6.0\n"
                   "[options.extras_require]\ntest =\n    pytest>=7.4\n")
    assert declared_requirements(cfg) == {"scikit-learn", "pyyaml"}
    assert declared_requirements(cfg, ["test"]) == {"scikit-learn", "pyyaml", "pytest"}
    closure = requirement_closure(["scikit-learn"])
    assert {"scikit-learn", "numpy", "scipy", "threadpoolctl"} <= closure  # transitive requirements count
    assert "pytest" not in closure


# --------------------------------------------------------------------------- this project


def test_package_imports_are_in_install_requires():
    providers = metadata.packages_distributions()
    allowed = requirement_closure(declared_requirements(ROOT / "setup.cfg"))
    missing = undeclared_imports(_sources(PACKAGE_DIRS), allowed, LOCAL_PACKAGES, providers)
    assert not missing, f"imports not declared in setup.cfg install_requires: {_describe(missing, providers)}"


def test_test_imports_are_in_the_test_extra():
    providers = metadata.packages_distributions()
    allowed = requirement_closure(declared_requirements(ROOT / "setup.cfg", ["test"]))
    local = LOCAL_PACKAGES | {p.stem for p in (ROOT / "tests").glob("*.py")}
    missing = undeclared_imports(_sources(["tests"]), allowed, local, providers)
    assert not missing, f"imports of tests/ not declared in setup.cfg (install_requires + test): {_describe(missing, providers)}"
