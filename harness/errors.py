"""User-facing errors: each one says what is wrong and what to do, and the CLI prints it without a trace."""

import math
import operator


class HarnessError(Exception):
    """A problem with the user's request or environment, detected before expensive work."""


class UnknownNameError(HarnessError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedError(HarnessError):
    """A method cannot run on the requested device / dtype / model."""


class MissingWeightsError(HarnessError):
    """Model or metric weights are not where the user said, or not in the local cache."""


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``choices``: ``unknown <what> 'x'; choose one of a, b``."""
    if value not in choices:
        raise HarnessError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_number(
    what: str,
    value: float,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    hint: str = "",
) -> None:
    """Refuse ``value`` unless it is finite and within every bound given (``gt < value``, ``ge <= value``, ...).

    Every numeric range check of a config goes through here, so NaN, which fails no comparison, and infinity are
    refused with the range: ``<what> must be a finite number > 0 and <= 1 (<hint>), got nan``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):  # e.g. read from a JSON file
        raise HarnessError(f"{what} must be a number, got {value!r}")
    bounds = {">": gt, ">=": ge, "<": lt, "<=": le}
    if math.isfinite(value) and all(bound is None or COMPARE[op](value, bound) for op, bound in bounds.items()):
        return
    need = " and ".join(f"{op} {bound:g}" for op, bound in bounds.items() if bound is not None)
    if not isinstance(value, int):  # a count's bounds say enough; a float may also be NaN or infinite
        need = f"a finite number {need}".rstrip()
    detail = f" ({hint})" if hint else ""
    raise HarnessError(f"{what} must be {need}{detail}, got {value}")
