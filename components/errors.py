"""Stemma's exception hierarchy.

Every error a user can cause derives from :class:`StemmaError`. The CLI turns any of them
into a one-screen message and the exit code the class names; a traceback is printed only
with ``--debug``.
"""

from __future__ import annotations

from collections.abc import Iterable


class StemmaError(Exception):
    """Base of every error Stemma reports to its users.

    Attributes:
        headline: one line that says what went wrong.
        details: further lines (one problem each), shown under the headline.
        exit_code: the process exit code the CLI uses for this kind of error.
    """

    exit_code = 1

    def __init__(self, headline: str, details: Iterable[str] = ()) -> None:
        self.headline = headline
        self.details = list(details)
        super().__init__(self.render())

    def render(self) -> str:
        """The error as the CLI prints it: headline, then one indented line per detail."""
        lines = [self.headline, *(f"  {line}" for line in self.details)]
        return "\n".join(lines)

    def __reduce__(self):  # keep errors picklable across process and Prefect boundaries
        return (self.__class__, (self.headline, self.details))


class SpecError(StemmaError):
    """The pipeline spec (YAML plus overrides) is invalid."""

    exit_code = 2


class DataError(StemmaError):
    """The data cannot be used: missing, unreadable, wrong schema or unusable content."""

    exit_code = 3


class DataVersionError(DataError):
    """The data on disk differs from the version DVC recorded."""


class DataCheckError(DataError):
    """The data failed the spec's Great Expectations suite."""


class TrainingError(StemmaError):
    """Training could not produce a usable model."""

    exit_code = 4


class RegistryError(StemmaError):
    """The model registry refused an operation or is in an unexpected state."""

    exit_code = 5


class LineageError(StemmaError):
    """A lineage reference cannot be resolved, or its records cannot be read or exported."""

    exit_code = 6


class CompressionError(TrainingError):
    """A compressed variant cannot be built: a pruning that would empty a layer, a network
    with nothing to prune, a student that cannot be built, or a parent that may not be
    compressed. Nothing is registered."""
