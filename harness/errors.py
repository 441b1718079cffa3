"""User-facing errors: each one says what is wrong and what to do, and the CLI prints it without a trace."""


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
