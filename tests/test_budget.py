"""One budget type for every entry point (methods.budget.Budget): a cell count, or a ratio of the
cells it is applied to; parsed from a user's text, including sizes in bytes."""

import math

import pytest
from hypothesis import given, strategies as st

from flowmm_edge.methods.budget import Budget, BudgetError


@given(ratio=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(1, 10 ** 6))
def test_a_ratio_keeps_the_ceiling_of_its_share_of_what_it_is_applied_to(ratio, n):
    assert Budget.of(ratio).keep(n) == max(1, math.ceil(ratio * n))
    assert Budget.parse(repr(ratio)).keep(n) == max(1, math.ceil(float(repr(ratio)) * n))


@given(cells=st.integers(1, 10 ** 6), n=st.integers(1, 10 ** 6))
def test_a_count_keeps_itself_and_a_plan_refuses_one_larger_than_the_context(cells, n):
    assert Budget.of(cells).keep(n) == cells and Budget.parse(str(cells)) == Budget(cells=cells)
    if cells <= n:
        assert Budget.of(cells).slots(n, protected=1) == cells
    else:
        with pytest.raises(BudgetError, match=f"outside \\[1, {n}\\]"):
            Budget.of(cells).slots(n, protected=1)


def test_sizes_are_whole_cells_of_the_cache():
    assert Budget.parse("24MiB", bytes_per_cell=12288) == Budget(cells=24 * 2 ** 20 // 12288)
    assert Budget.parse("1 KiB", bytes_per_cell=100) == Budget(cells=10)
    assert Budget.parse("1KB", bytes_per_cell=4096) == Budget(cells=1)  # never 0
    with pytest.raises(BudgetError, match="bytes per cell are unknown"):
        Budget.parse("24MiB")


@pytest.mark.parametrize("bad", ["lots", "0", "1.5", "-3", "nan", "", True, None, "0.0"])
def test_bad_budgets_are_refused_by_name(bad):
    with pytest.raises(BudgetError, match="budget"):
        Budget.parse(bad, bytes_per_cell=1)


def test_a_plan_never_keeps_fewer_than_its_protected_cells():
    with pytest.raises(BudgetError, match="smaller than the 36 always kept"):
        Budget.of(0.01).slots(1000, protected=36)
    assert Budget.of(1.0).slots(10, protected=36) == 10  # a context shorter than what is protected keeps it all
