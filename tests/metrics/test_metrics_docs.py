"""Every public function has a numpydoc docstring whose Example runs."""

import doctest
import importlib
import inspect

import numpy as np
import pytest

import compbias.metrics as metrics

MODULES = ["confusion", "rates", "grouped", "bias", "exemplars", "cca", "similarity", "stats", "welch"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"compbias.metrics.{name}")
    result = doctest.testmod(module, extraglobs={"np": np, **{k: getattr(metrics, k) for k in metrics.__all__}},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("name", [n for n in metrics.__all__ if inspect.isfunction(getattr(metrics, n))])
def test_public_functions_have_numpydoc_sections(name):
    doc = inspect.getdoc(getattr(metrics, name))
    for section in ("Parameters", "Returns", "Examples"):
        assert f"{section}\n---" in doc, f"{name} lacks a {section} section"
