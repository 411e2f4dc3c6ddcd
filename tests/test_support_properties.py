"""support.properties can fail: a property whose code under test declines every case."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.properties import MUTATION, examples, reached, reaching


def test_a_property_that_never_reaches_its_assertions_fails():
    @reaching(0.5)
    @settings(max_examples=20, database=None)
    @given(st.integers())
    def declines_all(n):
        if n is not None:
            return
        reached()

    with pytest.raises(AssertionError, match="only 0 of 20 generated cases reached"):
        declines_all()


def test_a_property_that_reaches_enough_passes():
    @reaching(0.5)
    @settings(max_examples=20, database=None)
    @given(st.integers(0, 9))
    def mostly(n):
        if n == 0:
            return
        reached()

    mostly()


def test_reached_outside_a_property_is_an_error():
    with pytest.raises(RuntimeError, match="outside a property"):
        reached()


def test_the_mutation_profile_runs_fewer_examples():
    before = settings.get_current_profile_name()
    try:
        settings.load_profile(MUTATION)
        assert examples(400) == 100 and examples(30) == 30
    finally:
        settings.load_profile(before)
    assert examples(400) == (400 if before != MUTATION else 100)
