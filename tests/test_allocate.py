"""Allocation properties (hypothesis) and its contract: budget, clamps, leftover, monotonicity."""

import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sadra.allocate import RankAllocation, allocate_ranks, lora_cost, uniform_budget
from sadra.errors import BudgetError, DataError

dims = st.sampled_from([4, 8, 16, 32, 64, 96, 384, 1536])
shape = st.tuples(dims, dims)
finite_score = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False)
any_score = st.one_of(finite_score, st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([0.0, -1.0, 1e300, -1e300, float("nan"), float("inf")]))


@st.composite
def problems(draw, score=finite_score):
    n = draw(st.integers(1, 12))
    shapes = {f"m{i}": draw(shape) for i in range(n)}
    scores = {f"m{i}": draw(score) for i in range(n)}
    min_rank = draw(st.integers(0, 4))
    max_rank = draw(st.integers(max(min_rank, 1), 40))
    low = sum(lora_cost(s, min_rank) for s in shapes.values())
    high = sum(lora_cost(s, max_rank) for s in shapes.values())
    budget = draw(st.integers(low, high))
    prune = draw(st.booleans())
    return scores, shapes, budget, min_rank, max_rank, prune


def check_invariants(alloc, shapes, budget, min_rank, max_rank):
    assert alloc.params == sum(lora_cost(shapes[n], r) for n, r in alloc.ranks.items())
    assert alloc.params <= budget
    for n, r in alloc.ranks.items():
        if n in alloc.pruned:
            assert r == 0
        else:
            assert min_rank <= r <= max_rank
    # Leftover is smaller than one more rank step on any module that could still grow.
    growable = [lora_cost(shapes[n]) for n, r in alloc.ranks.items() if n not in alloc.pruned and r < max_rank]
    if growable:
        assert alloc.leftover < min(growable)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_budget_clamps_leftover_and_determinism(problem):
    scores, shapes, budget, lo, hi, prune = problem
    alloc = allocate_ranks(scores, shapes=shapes, budget=budget, min_rank=lo, max_rank=hi, prune=prune)
    check_invariants(alloc, shapes, budget, lo, hi)
    again = allocate_ranks(dict(scores), shapes=dict(shapes), budget=budget, min_rank=lo, max_rank=hi, prune=prune)
    assert again.ranks == alloc.ranks


@settings(max_examples=300, deadline=None)
@given(problems(score=any_score))
def test_arbitrary_scores_never_crash(problem):
    scores, shapes, budget, lo, hi, prune = problem
    try:
        alloc = allocate_ranks(scores, shapes=shapes, budget=budget, min_rank=lo, max_rank=hi, prune=prune)
    except BudgetError:
        # Only when pruning removed modules the budget then cannot fit, or all were pruned.
        assert prune
        return
    check_invariants(alloc, shapes, budget, lo, hi)
    bad = [n for n, s in scores.items() if not (math.isfinite(s) and s > 0)]
    if prune:
        assert set(bad) <= set(alloc.pruned)
    else:
        assert set(alloc.floored) == set(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite_score, min_size=2, max_size=16), dims, dims, st.integers(2, 12), st.booleans())
def test_monotone_in_score_for_equal_shapes(scores, d_out, d_in, base, prune):
    shapes = {f"m{i}": (d_out, d_in) for i in range(len(scores))}
    named = {f"m{i}": s for i, s in enumerate(scores)}
    alloc = allocate_ranks(named, shapes=shapes, base_rank=base, min_rank=2, max_rank=32, prune=prune)
    for a in named:
        for b in named:
            if named[a] > named[b]:
                assert alloc.ranks[a] >= alloc.ranks[b], (named[a], named[b], alloc.ranks)


def test_proportional_when_unclamped():
    shapes = {f"m{i}": (64, 64) for i in range(4)}
    scores = {"m0": 1.0, "m1": 2.0, "m2": 3.0, "m3": 4.0}
    alloc = allocate_ranks(scores, shapes=shapes, budget=uniform_budget(shapes, 10), min_rank=1, max_rank=64)
    assert alloc.ranks == {"m0": 4, "m1": 8, "m2": 12, "m3": 16}
    assert alloc.params == alloc.budget


def test_water_filling_redistributes_clamped_excess():
    shapes = {f"m{i}": (32, 32) for i in range(3)}
    alloc = allocate_ranks({"m0": 100.0, "m1": 1.0, "m2": 1.0}, shapes=shapes, budget=uniform_budget(shapes, 8),
                           min_rank=2, max_rank=12)
    # m0 wants ~23.5 but is capped at 12; the other two share the rest equally.
    assert alloc.ranks == {"m0": 12, "m1": 6, "m2": 6}


def test_default_budget_is_uniform_base_rank_and_lora_r_strings():
    shapes = {"a": (384, 384), "b": (1536, 384)}
    alloc = allocate_ranks({"a": 1.0, "b": 3.0}, shapes=shapes)
    assert alloc.budget == 8 * (768 + 1920)
    assert allocate_ranks({"a": 1.0, "b": 3.0}, shapes=shapes, budget="lora-r4").budget == 4 * (768 + 1920)


def test_prune_gives_rank_zero_to_flat_modules_and_frees_budget():
    shapes = {f"m{i}": (64, 64) for i in range(5)}
    scores = {"m0": 1e-6, "m1": -3.0, "m2": 5.0, "m3": 5.0, "m4": 5.0}
    kept = allocate_ranks(scores, shapes=shapes, min_rank=2, max_rank=32)
    pruned = allocate_ranks(scores, shapes=shapes, min_rank=2, max_rank=32, prune=True)
    assert kept.ranks["m0"] == 2 and kept.ranks["m1"] == 2 and kept.floored == ["m1"]
    assert pruned.ranks["m0"] == 0 and pruned.ranks["m1"] == 0 and set(pruned.pruned) == {"m0", "m1"}
    assert pruned.ranks["m2"] > kept.ranks["m2"]
    assert pruned.params == pruned.budget


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_rank=33, max_rank=32), "min_rank 33 is above max_rank 32"),
    (dict(budget=10), "below"),
    (dict(budget=10**9), "above"),
    (dict(budget="lots"), "not understood"),
    (dict(normalize="l2"), "normalize"),
    (dict(power=-1.0), "power"),
    (dict(max_rank=0, min_rank=0), "max_rank is 0"),
])
def test_infeasible_or_invalid_constraints_raise(kwargs, message):
    shapes = {"a": (64, 64), "b": (64, 64)}
    with pytest.raises(BudgetError, match=message):
        allocate_ranks({"a": 1.0, "b": 2.0}, shapes=shapes, **kwargs)


def test_unknown_module_and_missing_shapes_raise():
    with pytest.raises(BudgetError, match="has a score but no shape"):
        allocate_ranks({"a": 1.0, "ghost": 2.0}, shapes={"a": (8, 8)})
    with pytest.raises(BudgetError, match="without shapes"):
        allocate_ranks({"a": 1.0})


def test_json_round_trip_and_table():
    shapes = {"layer.0.q": (64, 64), "layer.0.ffn": (256, 64)}
    alloc = allocate_ranks({"layer.0.q": 2.0, "layer.0.ffn": 1.0}, shapes=shapes)
    again = RankAllocation.from_json(alloc.to_json())
    assert again.ranks == alloc.ranks and again.budget == alloc.budget and again.params == alloc.params
    data = json.loads(alloc.to_json())
    assert {"ranks", "budget", "params"} <= set(data)
    table = alloc.table()
    assert "layer.0.q" in table and str(alloc.ranks["layer.0.q"]) in table and "budget" in table
    with pytest.raises(DataError):
        RankAllocation.from_json('{"ranks": {"a": 1}}')
    with pytest.raises(DataError):
        RankAllocation.from_json("{not json")


def test_allocation_module_imports_no_torch():
    code = "import sys, sadra.allocate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
