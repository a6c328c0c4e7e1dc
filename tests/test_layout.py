"""The layout's one rule: the core (everything in tinycnn/ outside tinycnn/workflow/) never imports the workflow's
tools; they build on the core."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinycnn"
CORE = sorted(p for p in PACKAGE.rglob("*.py") if "workflow" not in p.relative_to(PACKAGE).parts)


def _imported_modules(path: Path):
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    package = ".".join(("tinycnn", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_the_core_never_imports_the_workflow():
    assert len(CORE) > 20 and PACKAGE / "train.py" in CORE
    offenders = {str(p.relative_to(PACKAGE)): m for p in CORE for m in _imported_modules(p)
                 if m == "tinycnn.workflow" or m.startswith("tinycnn.workflow.")}
    assert offenders == {}


def test_the_resolver_sees_relative_imports():
    # the check above would pass vacuously if relative imports were misread: grid.py's are seen as the core's
    names = set(_imported_modules(PACKAGE / "workflow" / "grid.py"))
    assert "tinycnn.config" in names


def test_importing_the_core_loads_no_workflow_module():
    code = ("import sys, tinycnn, tinycnn.train, tinycnn.evaluation, tinycnn.cli, tinycnn.prepare, tinycnn.hub; "
            "print(sorted(m for m in sys.modules if m.startswith('tinycnn.workflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
