"""Model references and adapter names (docs/http-api.md#model-references, docs/registry.md#names)."""

from __future__ import annotations

import pytest

from adapters.manifest import is_valid_name, parse_model_ref


@pytest.mark.parametrize(
    "ref, expected",
    [("sentiment", ("sentiment", None)), ("sentiment@3", ("sentiment", 3)), ("a.b-c_d@12", ("a.b-c_d", 12))],
)
def test_refs_parse(ref, expected):
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["fe@", "fe@0", "fe@-1", "fe@1.0", "fe@x", "fe@\u0661", "fe@\uff11"])
def test_bad_versions_are_refused(ref):
    # non-ASCII digits (Arabic-Indic, full-width) would pass int() but are not versions
    with pytest.raises(ValueError):
        parse_model_ref(ref)


@pytest.mark.parametrize(
    "name, ok",
    [("a", True), ("A0._-z", True), ("x" * 128, True), ("x" * 129, False), (".hidden", False),
     ("../etc", False), ("caf\u00e9", False), ("a b", False), ("", False)],
)
def test_names(name, ok):
    assert is_valid_name(name) is ok
