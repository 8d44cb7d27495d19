"""Rank rules and the greedy solver: exact values, the solver's guarantees on both paths, a rule from outside."""

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sadra.allocate import RULES, Values, Weights, allocate_ranks, lora_cost, register_rule, uniform_budget
from sadra.errors import BudgetError

from test_allocate import check_invariants, dims


@dataclass
class FakeReport:
    """What a gradient-signal SensitivityReport offers a rule (duck-typed)."""

    scores: dict
    shapes: dict
    spectra: dict
    estimator: str = "gradient"
    stderr: dict = field(default_factory=dict)


def test_spectral_greedy_takes_steps_by_value_per_parameter():
    shapes = {"a": (10, 10), "b": (10, 10), "c": (30, 10)}   # a step costs 20, 20, 40 parameters
    spectra = {"a": [8.0, 4.0, 1.0], "b": [6.0, 5.0, 0.5], "c": [20.0, 2.0, 0.1]}
    report = FakeReport({"a": 1.0, "b": 1.0, "c": 1.0}, shapes, spectra)
    # Values per parameter: a 0.4, 0.2, 0.05; b 0.3, 0.25, 0.025; c 0.5, 0.05, 0.0025.
    # Budget 120 = 6 steps of 20: c1 (40), a1, b1, b2, a2 -> 120; nothing else fits.
    alloc = allocate_ranks(report, rule="spectral", budget=120, min_rank=0, max_rank=3)
    assert alloc.ranks == {"a": 2, "b": 2, "c": 1}
    assert alloc.params == 120 and alloc.rule == "spectral"


def test_spectral_newton_divides_by_fisher_curvature_per_weight():
    shapes = {"a": (10, 10), "b": (10, 10)}
    spectra = {"a": [4.0, 4.0], "b": [1.0, 1.0]}
    # h_a = 400 / 100 = 4, h_b = 25 / 100 = 0.25: values a 1, 1; b 4, 4 -> b first.
    report = FakeReport({"a": 400.0, "b": 25.0}, shapes, spectra)
    assert allocate_ranks(report, rule="spectral", budget=40, min_rank=0, max_rank=2).ranks == {"a": 2, "b": 0}
    assert allocate_ranks(report, rule="spectral-newton", budget=40, min_rank=0, max_rank=2).ranks == {"a": 0, "b": 2}


def test_spectral_rules_need_a_gradient_report():
    with pytest.raises(BudgetError, match="needs the gradient spectrum"):
        allocate_ranks({"a": 1.0}, shapes={"a": (8, 8)}, rule="spectral")
    with pytest.raises(BudgetError, match="unknown rule"):
        allocate_ranks({"a": 1.0}, shapes={"a": (8, 8)}, rule="nope")


def test_a_rule_is_one_function_registered_from_outside():
    @register_rule("by-width")
    def by_width(signal, **_):
        return Weights({n: float(signal.shapes[n][0]) for n in signal.scores})

    try:
        shapes = {"a": (16, 16), "b": (48, 16)}
        alloc = allocate_ranks({"a": 5.0, "b": 1.0}, shapes=shapes, rule="by-width", budget=uniform_budget(shapes, 4),
                               min_rank=0, max_rank=16)
        # Proportional to d_out: r_b = 3 r_a, cost 32 r_a + 64 r_b = 224 r_a = 4 * 96 -> r_a = 1.71.
        assert alloc.ranks == {"a": 2, "b": 5} and alloc.rule == "by-width"
    finally:
        RULES.pop("by-width")


@st.composite
def spectral_problems(draw):
    n = draw(st.integers(1, 10))
    shapes = {f"m{i}": (draw(dims), draw(dims)) for i in range(n)}
    value = st.one_of(st.floats(0, 1e6, allow_nan=False), st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    spectra = {f"m{i}": sorted(draw(st.lists(value, min_size=0, max_size=40)), key=lambda v: -v if v == v else 0)
               for i in range(n)}
    scores = {f"m{i}": draw(st.one_of(st.floats(1e-6, 1e6), st.sampled_from([0.0, -2.0, float("nan")])))
              for i in range(n)}
    min_rank = draw(st.integers(0, 4))
    max_rank = draw(st.integers(max(min_rank, 1), 40))
    low = sum(lora_cost(s, min_rank) for s in shapes.values())
    high = sum(lora_cost(s, max_rank) for s in shapes.values())
    return FakeReport(scores, shapes, spectra), draw(st.integers(low, high)), min_rank, max_rank, draw(st.booleans())


@pytest.mark.parametrize("rule", ["spectral", "spectral-newton"])
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=spectral_problems())
def test_greedy_path_keeps_budget_clamps_leftover_and_determinism(rule, problem):
    report, budget, lo, hi, prune = problem
    try:
        alloc = allocate_ranks(report, rule=rule, budget=budget, min_rank=lo, max_rank=hi, prune=prune)
    except BudgetError:
        assert prune  # pruning the modules the rule cannot value can leave the budget unreachable
        return
    check_invariants(alloc, report.shapes, budget, lo, hi)
    again = allocate_ranks(report, rule=rule, budget=budget, min_rank=lo, max_rank=hi, prune=prune)
    assert again.ranks == alloc.ranks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1e3), min_size=2, max_size=10), dims, dims)
def test_greedy_is_monotone_in_dominating_spectra(tops, d_out, d_in):
    # Module i's spectrum is tops[i] * (1, 1/2, 1/3, ...): a larger top dominates element-wise.
    shapes = {f"m{i}": (d_out, d_in) for i in range(len(tops))}
    spectra = {f"m{i}": [t / (j + 1) for j in range(32)] for i, t in enumerate(tops)}
    report = FakeReport({n: 1.0 for n in shapes}, shapes, spectra)
    alloc = allocate_ranks(report, rule="spectral", min_rank=1, max_rank=32)
    for a in shapes:
        for b in shapes:
            if spectra[a][0] > spectra[b][0]:
                assert alloc.ranks[a] >= alloc.ranks[b]


def test_values_and_weights_are_the_two_forms():
    assert isinstance(RULES["proportional"](FakeReport({"a": 1.0}, {"a": (2, 2)}, {}), normalize="none", power=1.0),
                      Weights)
    assert isinstance(RULES["spectral"](FakeReport({"a": 1.0}, {"a": (2, 2)}, {"a": [1.0]})), Values)
