"""eeruntime.names.lookup: the one "module:attr" lookup behind ee.load's factory, the CLI's
--model/--data and Ray's RuntimeSpec, checked against plain attribute access."""

from __future__ import annotations

import collections
import importlib

import pytest

import eeruntime.zoo
from eeruntime.bundle import resolve_factory
from eeruntime.names import FAILURES, lookup, split_name
from eeruntime.user_inputs import InputError, resolve

MESSAGES = {
    "syntax": "syntax|{spec!r}",
    "import": "import|{module}|{spec}|{error}",
    "attribute": "attribute|{module}|{attr}|{spec}",
}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("eeruntime.zoo:digits_cnn", eeruntime.zoo.digits_cnn),
        ("collections:OrderedDict.fromkeys", collections.OrderedDict.fromkeys),
        ("importlib:import_module", importlib.import_module),
    ],
)
def test_lookup_finds_what_attribute_access_finds(spec, expected):
    assert lookup(spec, MESSAGES) == expected


@pytest.mark.parametrize(
    "spec", [None, 3, "", "mod", "a:b:c", ":f", "mod:", "mod:a..b", "mod:.a", b"mod:f", eeruntime.zoo.digits_cnn]
)
def test_malformed_names_fail_as_syntax(spec):
    assert split_name(spec) is None
    with pytest.raises(ValueError, match=r"^syntax\|"):
        lookup(spec, MESSAGES)


def test_import_and_attribute_failures_carry_their_fields():
    with pytest.raises(ValueError) as e:
        lookup("no_such_module_eeruntime_x:f", MESSAGES)
    kind, module, spec, error = str(e.value).split("|")
    assert (kind, module, spec) == ("import", "no_such_module_eeruntime_x", "no_such_module_eeruntime_x:f")
    assert "no_such_module_eeruntime_x" in error
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(ValueError, match=r"^attribute\|eeruntime.zoo\|digits_cnn.nope\|eeruntime.zoo:digits_cnn.nope$"):
        lookup("eeruntime.zoo:digits_cnn.nope", MESSAGES)


def test_the_error_class_is_the_callers():
    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        lookup("x", MESSAGES, Mine)


def test_every_failure_needs_a_message():
    with pytest.raises(KeyError, match="attribute"):
        lookup("eeruntime.zoo:digits_cnn", {k: "" for k in FAILURES if k != "attribute"})


def test_callers_keep_their_own_wording():
    with pytest.raises(ValueError, match="model factory .* 'module:factory'"):
        resolve_factory("nocolon")
    with pytest.raises(ValueError, match="has no attribute 'nope' \\(model factory"):
        resolve_factory("eeruntime.zoo:nope")
    with pytest.raises(InputError, match="--model must be given as module:name"):
        resolve("nocolon", "--model")
    with pytest.raises(InputError, match="has no 'nope' \\(named by --data"):
        resolve("eeruntime.zoo:nope", "--data")
    assert resolve_factory("eeruntime.zoo:digits_cnn") is eeruntime.zoo.digits_cnn
    assert resolve("eeruntime.zoo:digits_cnn", "--model") is eeruntime.zoo.digits_cnn
