"""capaserve serving: the engine (no Ray), the scheduler, the HTTP API and the Ray Serve app.

capaserve's `adapters` package shares its import name with AdapterHub's PyPI package
`adapters` (the library CapaBoost's reference code builds on). Installed in one
environment they cannot both work: with capaserve installed editable, AdapterHub's folder
wins and capaserve's modules are unreachable; installed normally, both write into one
`site-packages/adapters/` and the last one overwrites the other's `__init__.py`. So this
package checks, before anything imports `adapters`, that the name resolves to
capaserve's own package, and otherwise stops with the remedy instead of a confusing
ImportError deep inside the other library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: A line only capaserve's adapters/__init__.py holds.
ADAPTERS_MARKER = "#: capaserve-adapters"


def _check_adapters_package() -> None:
    spec = importlib.util.find_spec("adapters")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    try:
        ours = origin is not None and ADAPTERS_MARKER in origin.read_text(encoding="utf-8")
    except OSError:
        ours = False
    if not ours:
        raise ImportError(
            f"the package 'adapters' here is not capaserve's ({origin or 'not found'}): AdapterHub's "
            "PyPI package of the same name is installed in this environment. capaserve needs its own "
            "virtual environment: `pip uninstall adapters capaserve` there and reinstall capaserve, or "
            "install capaserve into a fresh venv (README: 'The adapters name')."
        )


_check_adapters_package()
