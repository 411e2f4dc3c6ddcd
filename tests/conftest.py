"""Fixtures and hooks for jprobe's tests; the helpers test files import live in support/.

Fixtures (C/C++ sources in tests/fixtures/) are compiled at test time into a per-session
(per xdist worker) temporary directory, once per distinct set of flags.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.build import ALL_VARIANTS, SOME_VARIANTS, Builder, Variant
from support.kernel import TRACEFS, tracefs_status
from support.properties import register_mutation_profile

register_mutation_profile()       # before the hypothesis plugin loads --hypothesis-profile


@pytest.fixture(params=ALL_VARIANTS, ids=str)
def variant(request) -> Variant:
    return request.param


@pytest.fixture(params=SOME_VARIANTS, ids=str)
def some_variant(request) -> Variant:
    return request.param


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Builder:
    for tool in ("gcc",):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build the test fixtures")
    return Builder(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def tracefs() -> Path:
    """Kernel uprobes for a cross-check; the test is skipped, with the reason, without them."""
    reason = tracefs_status()
    if reason:
        pytest.skip(reason)
    return TRACEFS
