"""The README's exit-status table and refusal list, as the tests check every message against them.

`assert_documented_refusal(reason)`: the text after `cannot analyse this study: ` is one of the README's
refusals (`<...>` in the README stands for any value).
"""

from __future__ import annotations

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
NO_USABLE_SERIES = "no usable axial CT series: "


def _pattern(text: str) -> str:
    return "".join(".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", text))


def _refusals() -> tuple[list[str], list[str]]:
    """(top-level refusal patterns, series reason patterns) from the README's list."""
    section = README[README.index("Every refusal (status 2)"):]
    section = section[:section.index("\n\n")]
    top, reasons = [], []
    for line in section.splitlines():
        match = re.match(r"( *)- `([^`]+)`", line)
        if match:
            (reasons if len(match.group(1)) >= 2 else top).append(match.group(2))
    return top, reasons


def status_table() -> dict[str, str]:
    """Exit status -> the stderr column of its row(s), from the README's table of the app (`python app`)."""
    section = README[README.index("Exit status and messages:"):README.index("Every refusal (status 2)")]
    rows = re.findall(r"^\| ([0-9, ]+) \| .+ \| (.+) \|$", section, re.MULTILINE)
    table: dict[str, str] = {}
    for statuses, stderr in rows:
        for status in statuses.split(", "):
            table[status] = table.get(status, "") + stderr
    return table


def assert_documented_refusal(reason: str) -> None:
    top, reasons = _refusals()
    if any(re.fullmatch(_pattern(r), reason) for r in top if "<series>: <reason>" not in r):
        return
    assert reason.startswith(NO_USABLE_SERIES), f"refusal not in the README's refusal list: {reason!r}"
    series_reason = "|".join(_pattern(r) for r in reasons)
    for part in reason[len(NO_USABLE_SERIES):].split("; "):
        assert re.fullmatch(rf"series .+ \(.+, \d+ files\): (?:{series_reason})", part), \
            f"series reason not in the README's refusal list: {part!r}"


def assert_documented_status(status: int, line: str) -> None:
    """The README's table has a row for `status` whose stderr column shows how `line` begins; a refusal's
    reason is in the refusal list."""
    table = status_table()
    assert str(status) in table, f"exit status {status} is not in the README's table"
    assert line.split(":")[0].split(" /")[0] in table[str(status)], f"{line!r} is not described for status {status}"
    if status == 2 and line.startswith("cannot analyse this study: "):
        assert_documented_refusal(line.removeprefix("cannot analyse this study: "))
