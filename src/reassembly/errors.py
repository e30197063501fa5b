"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class ReassemblyError(Exception):
    """A problem the user can fix: the message names what is at fault and what to do next."""


class UnknownModelError(ReassemblyError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ReassemblyError):
    """A checkpoint that is missing, unsafe to read, or does not fit the model."""


class DatasetError(ReassemblyError):
    """A dataset that cannot be found or a dataset spec that cannot be parsed."""


def did_you_mean(name: str, candidates, n: int = 3, cutoff: float = 0.5) -> str:
    """'; did you mean a, b?' for the candidates closest to a misspelled ``name`` (empty when none is close)."""
    import difflib

    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(close)}?" if close else ""


def validation_message(error) -> str:
    """``field: message`` of the first problem a pydantic ``ValidationError`` reports, on one line."""
    first = error.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
