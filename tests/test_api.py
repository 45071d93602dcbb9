"""The library API (issue 28, item 10): what ``pwself`` exports resolves, and the examples in the docstrings of
the building blocks run as written."""

import doctest

import pytest

import pwself

# Exports without an example, and why: containers and registries shown in the examples of the others.
NO_EXAMPLE = {"__version__", "load", "pretrain", "TrainConfig", "load_config", "MultiCropViews", "Objective",
              "OBJECTIVES", "register_objective", "EvalData", "EvalSettings", "PROTOCOLS", "register_protocol",
              "DATA_KINDS", "register_data_kind"}


def test_every_export_resolves_and_is_documented():
    for name in pwself.__all__:
        obj = getattr(pwself, name)
        assert obj is not None, name
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{name} has no docstring"
    assert set(dir(pwself)) >= set(pwself.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pwself.nope  # noqa: B018


@pytest.mark.parametrize("name", [n for n in pwself.__all__ if n not in NO_EXAMPLE] + ["__module__"])
def test_docstring_examples_run_as_written(name):
    obj = pwself if name == "__module__" else getattr(pwself, name)
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name) if t.examples]
    assert tests, f"pwself.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"pwself.{name}: {runner.failures} example(s) failed (run it with -s to see)"
