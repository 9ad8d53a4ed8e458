"""The mutation check's list (``benchmarks/mutations.py``) stays well formed: at least 25 mutations across
every stage, each old text found exactly once in its file, each guarding test present. A refactor that
moves a guarded line makes this fail until the list is updated. (Running the mutations themselves takes
minutes: ``python benchmarks/mutations.py``.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutations() -> ModuleType:
    path = REPO / "benchmarks" / "mutations.py"
    spec = importlib.util.spec_from_file_location("graphscale_mutations", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_at_least_25_mutations_across_every_stage(mutations: ModuleType) -> None:
    entries = mutations.MUTATIONS
    assert len(entries) >= 25
    areas = {m.name.split("-")[0] for m in entries}
    assert {"capture", "rules", "infer", "derive", "widen", "train", "verify", "cli"} <= areas
    assert all(m.why for m in entries)


def test_every_old_text_occurs_once_and_every_guard_exists(mutations: ModuleType) -> None:
    assert mutations.check_list(mutations.MUTATIONS) == []


def test_the_check_reports_a_moved_line(mutations: ModuleType) -> None:
    """The check itself can fail: an old text that is gone, or a guard that does not exist, is reported."""
    m = mutations.MUTATIONS[0]
    gone = mutations.Mutation("gone", m.file, m.old + "  # not in the file", m.new, m.tests, "x")
    no_guard = mutations.Mutation("no-guard", m.file, m.old, m.new, ("tests/test_no_such_file.py",), "x")
    problems = mutations.check_list([gone, no_guard])
    assert any("gone: old text occurs 0 times" in p for p in problems)
    assert any("no-guard: no test file tests/test_no_such_file.py" in p for p in problems)
