"""The option codes have one source (prefrank/_options.py); the C++ header is generated from it."""

from pathlib import Path

import pytest

from prefrank import _options

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "options.h"


def test_generated_header_is_current():
    assert HEADER.read_text() == _options.header(), (
        "csrc/options.h is stale: run `python -m prefrank._options > csrc/options.h`")


def test_codes_are_dense_and_named():
    for enum_class in _options.ENUMS:
        assert [int(m) for m in enum_class] == list(range(len(enum_class)))
        for member in enum_class:
            assert _options.code(enum_class, "x", member.name) == int(member)


def test_unknown_option_names_the_argument():
    with pytest.raises(ValueError, match="relaxation must be one of"):
        _options.code(_options.Relaxation, "relaxation", "sigmoid")
