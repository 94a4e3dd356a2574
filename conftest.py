"""pytest's reporting for test_ledger.py: the run ends with one line saying what skipped and why."""

import collections

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost, so after pytest's own summary
def pytest_terminal_summary(terminalreporter):
    yield
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ").split(":")[0]] += 1
    if not reasons:
        terminalreporter.write_line("skipped: nothing")
        return
    terminalreporter.write_line(f"skipped {sum(reasons.values())}: " + "; ".join(
        f"{count} because {what}" for what, count in reasons.most_common()) + " (see the skip reasons above)")
