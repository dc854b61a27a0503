"""The examples in the package's docstrings run and print what they show.

STYLE.md asks for docstrings with runnable examples; an example nobody runs goes stale
unseen, so each module's are run here with :mod:`doctest` (those marked ``+SKIP`` need a
trained model or a store and are left out).
"""

import doctest
import importlib
import pkgutil

import pytest

import anomaly_flow

# Not importable for their examples: the command line runs on import of __main__, and
# MLflow runs model_code when a model loads (it registers the model object).
_NOT_IMPORTED = {"anomaly_flow.__main__", "anomaly_flow.cli.__main__",
                 "anomaly_flow.tracking.model_code"}

MODULES = sorted(info.name for info in pkgutil.walk_packages(anomaly_flow.__path__,
                                                             prefix="anomaly_flow.")
                 if info.name not in _NOT_IMPORTED)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)  # a failure's report is in the captured stdout
    assert result.failed == 0, f"{result.failed} of {result.attempted} example(s) in {name} " \
                               "failed (shown in the captured stdout)"


def test_the_examples_are_found() -> None:
    """A change of layout that hid every module from the search would pass above."""
    found = {name: doctest.DocTestFinder().find(importlib.import_module(name))
             for name in ("anomaly_flow.calibration", "anomaly_flow.glow")}
    assert all(any(test.examples for test in tests) for tests in found.values())
