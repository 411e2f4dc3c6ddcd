"""Hypothesis properties that cannot pass without testing, and that a mutation run can afford.

A property that returns early where the code under test declines (a tactic that finds no
window gives None) passes just as well when that code declines everything. Such a property
calls `reached()` once a case gets to its assertions, and `@reaching(share)` fails it when
fewer than `share` of the cases Hypothesis generated did.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from hypothesis import Phase, settings

MUTATION = "mutation"


def register_mutation_profile() -> None:
    """The profile `make mutation` runs the properties under (`--hypothesis-profile=mutation` in
    pyproject's [tool.mutmut]): a mutant that changes behaviour fails within the first examples,
    and only the verdict counts (no shrinking); a survivor runs every example of every test
    that reaches it, so fewer keep the run within its 30 minutes."""
    settings.register_profile(MUTATION, max_examples=100, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def examples(n: int) -> int:
    """`n` examples, or the mutation profile's fewer when it is loaded."""
    if settings.get_current_profile_name() == MUTATION:
        return min(n, settings.default.max_examples)
    return n


@dataclass
class _Tally:
    cases: int = 0
    reached: int = 0


_running: list[_Tally] = []


def reached() -> None:
    """Count the running case as one that got to the property's assertions."""
    if not _running:
        raise RuntimeError("reached() outside a property decorated with @reaching")
    _running[-1].reached += 1


def reaching(share: float) -> Callable[[Callable], Callable]:
    """Fail a @given property unless at least `share` (0 < share <= 1) of its generated cases
    called `reached()`. The outermost decorator: a @settings above it would not reach @given."""
    assert 0 < share <= 1, share

    def decorate(test: Callable) -> Callable:
        if not hasattr(test, "hypothesis"):
            raise TypeError(f"@reaching goes above @given (and @settings) on {test.__name__}")
        inner = test.hypothesis.inner_test

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            _running[-1].cases += 1
            return inner(*args, **kwargs)

        test.hypothesis.inner_test = counted

        @functools.wraps(test)
        def run(*args, **kwargs):
            tally = _Tally()
            _running.append(tally)
            try:
                test(*args, **kwargs)
            finally:
                _running.pop()
            assert tally.cases and tally.reached >= share * tally.cases, (
                f"only {tally.reached} of {tally.cases} generated cases reached the assertions of "
                f"{test.__name__} (at least {share:.0%} must): the code under test declined the rest")

        return run

    return decorate
