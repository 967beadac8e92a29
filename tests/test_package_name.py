"""capaserve's `adapters` package and AdapterHub's PyPI package of the same name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _import_serving(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`import serving` in a fresh interpreter whose first path entry is `cwd` (as `python -c` does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import serving, adapters; print(adapters.__file__)"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_capaserve_adapters_is_the_one_imported(tmp_path: Path) -> None:
    done = _import_serving(tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == Path(__file__).resolve().parents[1] / "adapters" / "__init__.py"


def test_a_foreign_adapters_package_stops_serving_with_the_remedy(tmp_path: Path) -> None:
    """Another `adapters` ahead on the path (as AdapterHub's is, next to an editable capaserve):
    importing serving fails at once, naming the other package and what to do."""
    foreign = tmp_path / "adapters"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise RuntimeError('AdapterHub stand-in must not be executed')\n")
    done = _import_serving(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "ImportError: the package 'adapters' here is not capaserve's" in done.stderr
    assert str(foreign / "__init__.py") in done.stderr and "AdapterHub" in done.stderr
    assert "must not be executed" not in done.stderr  # checked without running the other package
