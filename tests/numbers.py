"""Figures the reliability tests report (faults injected, bad inputs tried, runs completed,
resources before and after), printed in a section of pytest's summary so CI output shows them
whether or not output capture is on."""

from __future__ import annotations

from collections import defaultdict

REPORTED: defaultdict[str, list[str]] = defaultdict(list)


def report(section: str, line: str) -> None:
    REPORTED[section].append(line)
