"""Every registered algorithm through the test kit, and the registry itself.

``scratchopt.algorithms.ALGORITHMS`` is found, not listed: a new module in ``scratchopt/algorithms/`` is
exported, and run here under every strategy beside the loop, with a state_dict round trip and a
scheduler, without touching this file.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import scratchopt
from scratchopt.algorithms import ALGORITHMS, torch_twins
from scratchopt.optimizer import Algorithm, ClosureOptimizer, ScratchOptimizer
from scratchopt.testing import check_optimizer

#: Where the algorithms the kit cannot drive (a closure, sparse gradients only) are proven instead.
DEDICATED_TESTS = {
    "closure": "tests/test_lbfgs.py and tests/test_closure_optimizers.py",
    "sparse gradients": "tests/test_sparse_adam.py",
}


def _kit_skip_reason(cls: type[Algorithm]) -> str | None:
    if cls.needs_closure:
        return f"{cls.__name__} needs a closure: {DEDICATED_TESTS['closure']} prove it"
    if cls.takes == "sparse gradients":
        return f"{cls.__name__} takes sparse gradients only: {DEDICATED_TESTS['sparse gradients']} proves it"
    return None


def test_registry_finds_every_algorithm_module_and_exports_it():
    modules = {info.name for info in __import__("pkgutil").iter_modules(scratchopt.algorithms.__path__)}
    defined_in = {inspect.getmodule(cls).__name__.rsplit(".", 1)[1] for cls in ALGORITHMS.values()}
    assert defined_in == modules, "a module of scratchopt/algorithms defines no algorithm"
    for name, cls in ALGORITHMS.items():
        assert getattr(scratchopt, name) is cls and name in scratchopt.__all__
        assert issubclass(cls, ScratchOptimizer) != issubclass(cls, ClosureOptimizer), name
        assert cls.needs_closure == issubclass(cls, ClosureOptimizer), name


def test_declared_torch_twins_exist_and_match_signatures():
    for twin, cls in torch_twins().items():
        torch_cls = getattr(torch.optim, twin)
        ours = inspect.signature(cls.__init__).parameters
        theirs = inspect.signature(torch_cls.__init__).parameters
        for name, parameter in theirs.items():
            assert name in ours, f"{cls.__name__} lacks torch's argument {name!r}"
            assert ours[name].default == parameter.default, f"{cls.__name__}.{name} default"


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_passes_the_kit(name):
    cls = ALGORITHMS[name]
    reason = _kit_skip_reason(cls)
    if reason is not None:
        pytest.skip(reason)
    ran = check_optimizer(cls, dict(cls.example_kwargs), dtypes=(torch.float64,), steps=6)
    assert "state_dict round trip (loop)" in ran and "scheduler (loop)" in ran
    if cls.elementwise:
        compared = {entry.split(" == ")[0] for entry in ran if " == loop" in entry}
        assert compared == set(scratchopt.strategies.NAMES) - {"loop"}
        # At the kit's default sizes the native kernel runs: no threshold hides it.
        assert "fused == loop (torch.float64; a kernel ran)" in ran
