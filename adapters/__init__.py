"""CapaBoost adapters: the `capaboost.v1` bundle format (`adapters.bundle`), its validation
(`adapters.validation`), the merge math (`adapters.merge`), importers (`adapters.importers`),
training (`adapters.training`) and the registry stores (`adapters.registry`). Nothing here
imports Ray. The package itself re-exports nothing: import from the module that defines a
name, so no module is imported back by what it imports.
"""

#: capaserve-adapters (serving/__init__.py checks for this line: AdapterHub's PyPI package is also named `adapters`)
