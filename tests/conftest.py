"""Session-wide pytest hooks: a summary of the tests that run outside clients.

Tests marked ``@pytest.mark.client("<name>")`` need something outside the project venv (napari or copick
in their own environments, a Chromium browser, SLURM, separate Dask processes). Where one is missing
they skip with the reason; the terminal summary then lists every such test as ran / skipped (why) /
deselected, so ``scripts/test.sh`` and ``.ci/run`` say plainly what they covered.
"""

from __future__ import annotations

import pytest

_RESULTS: dict[str, dict[str, str]] = {}


def _client(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("client")
    return str(mark.args[0]) if mark is not None and mark.args else None


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        name = _client(item)
        if name:
            _RESULTS[item.nodeid] = {"client": name, "outcome": "deselected", "why": "not selected (-m / -k)"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ARG001
    outcome = yield
    report = outcome.get_result()
    name = _client(item)
    if name is None:
        return
    rec = _RESULTS.setdefault(item.nodeid, {"client": name, "outcome": "ran", "why": ""})
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        rec.update(outcome="skipped", why=str(reason).removeprefix("Skipped: "))
    elif report.failed:
        rec.update(outcome="failed", why=f"failed in {report.when}")
    elif report.when == "call" and rec["outcome"] == "ran":
        rec.update(outcome="passed")


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", "client tests (outside clients: which ran, which were skipped and why)")
    for nodeid, rec in sorted(_RESULTS.items(), key=lambda kv: (kv[1]["client"], kv[0])):
        test = nodeid.split("::", 1)[-1]
        why = f"  -- {rec['why']}" if rec["why"] else ""
        tr.write_line(f"{rec['client']:15s} {rec['outcome']:10s} {test}{why}")
    counts: dict[str, int] = {}
    for rec in _RESULTS.values():
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
    tr.write_line("client tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
