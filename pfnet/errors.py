"""Exception types that the app and the CLI turn into plain messages."""


class PfnetError(Exception):
    """Base class for every error pfnet raises on purpose."""


class UnknownModelError(PfnetError, KeyError):
    """A model id that is not in the zoo."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


class CheckpointError(PfnetError):
    """A file that is not a usable checkpoint, or one that does not fit the requested model."""


class WeightsUnavailableError(PfnetError):
    """Weights that are neither bundled nor cached and cannot be downloaded now."""
