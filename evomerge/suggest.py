"""The "did you mean" hint every unknown-name message ends with, built in one place."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(
    value: object,
    options: Iterable[str],
    *,
    parenthesised: bool = False,
    same_as: Callable[[str], str] | None = None,
) -> str:
    """The hint for the option closest to `value`: "; did you mean 'x'?", or "" when none is close.

    `parenthesised` gives " (did you mean 'x'?)" for messages that end with a list. `same_as`
    maps an option to a name that, when equal to `value`, wins over spelling similarity (a
    metric named without its filter: "acc" for "acc,none"); the first such option in sorted
    order is suggested.
    """
    choices = sorted(options)
    exact = [option for option in choices if same_as(option) == value] if same_as else []
    close = exact or difflib.get_close_matches(str(value), choices, n=1)
    if not close:
        return ""
    return f" (did you mean '{close[0]}'?)" if parenthesised else f"; did you mean '{close[0]}'?"
