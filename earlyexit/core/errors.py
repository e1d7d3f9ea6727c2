"""Typed errors: what went wrong and what to do about it, in one sentence a user can act on.

Every error the package raises on purpose for a bad input is an :class:`EarlyexitError`; each class also
subclasses the builtin it replaces (``BadInput`` is a ``ValueError``, ``DataNotFound`` a
``FileNotFoundError``, …), so ``except ValueError`` and ``pytest.raises(ValueError)`` keep working. The
command line (:func:`earlyexit.cli.main`) prints an ``EarlyexitError`` as one line on stderr and exits
with code 2, never with a traceback.

>>> try:
...     raise BadInput("top_k must be an integer ≥ 1, got -3")
... except ValueError as err:
...     print(type(err).__name__, "|", err)
BadInput | top_k must be an integer ≥ 1, got -3
>>> issubclass(OutOfRange, IndexError), issubclass(BadType, TypeError), issubclass(BadType, ValueError)
(True, True, True)
"""
from __future__ import annotations

__all__ = ["EarlyexitError", "BadInput", "BadType", "OutOfRange", "DataError", "DataNotFound",
           "OutputPathError", "ResultsError", "ModelError", "ModelCacheError", "MissingDependency"]


class EarlyexitError(Exception):
    """Base of the package's own errors: the message names the input (option, file, row) and says what to do."""

    exit_code = 2


class BadInput(EarlyexitError, ValueError):
    """An argument of the wrong value: a range, a choice, an empty list."""


class BadType(BadInput, TypeError):
    """An argument of the wrong type (``layers=[1.5]``, ``stop="xs"`` where a list is wanted)."""


class OutOfRange(BadInput, IndexError):
    """An index outside what the model or the data has (a layer entry beyond L)."""


class DataError(EarlyexitError, ValueError):
    """A data file that is unreadable or has the wrong schema (the message names the file and the row)."""


class DataNotFound(EarlyexitError, FileNotFoundError):
    """A data file that is not where it is looked for (the message says where to get it)."""


class OutputPathError(EarlyexitError, ValueError, OSError):
    """An output path that cannot be written as asked (a folder given as a file, a path under a file,
    not writable, the command's own input): checked before any work is done; also a write that failed
    (the message names the user's path, never a temporary file). Both a ``ValueError`` and an ``OSError``."""


class ResultsError(EarlyexitError, ValueError):
    """A results file that cannot be read or written as asked (the message names the file)."""


class ModelError(EarlyexitError, ValueError):
    """A model that cannot be found or loaded (unknown name, empty folder, a Hub id while offline)."""


class ModelCacheError(ModelError):
    """A damaged entry of the converted-model cache (the message names the folder to delete)."""


class MissingDependency(EarlyexitError, ModuleNotFoundError):
    """An optional package that is not installed (the message gives the ``pip install`` line)."""
