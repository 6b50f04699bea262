"""Errors a user can cause. The CLI turns each into one line and exit code 2."""


class DfkdError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class UnknownNameError(DfkdError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataAccessError(RuntimeError):
    """A synthesizer tried to read real data. This is a bug in the method, not user input."""


class NonFiniteError(RuntimeError):
    """A run diverged (a non-finite image, loss or weight); the runner ends it with status "failed"."""
