"""The package's error types and the one place a command line turns them into a message.

A research run is fed with files people edit by hand and flags people type. When
one of them is wrong, the run should stop with one line that names the file and
line (or the flag and its valid values) and what is wrong there - not a traceback
whose last line is a parser's internals. Every error the package raises about its
*input* derives from :class:`InputError`; the command-line entry points wrap their
``main`` in :func:`cli_errors`, which prints ``error: <message>`` on one line and
returns exit status 2 (a usage error, as argparse's own), or 1 for what is not the
user's input (out of memory, a full disk). Finished stages are never touched on
the way out: a stage is finished only once its ``DONE.json`` exists, and an error
raised inside a stage leaves that stage unfinished, to be recomputed by the next run.

``EPS_TRACEBACK=1`` re-raises instead, for debugging.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

USAGE = 2  # bad input: a flag, a data file, a stage record, an unwritable --out
FAILURE = 1  # the run failed for another reason it can name (memory, disk space)


class EPSError(Exception):
    """An error the package can explain in one line; ``exit_code`` is what a CLI returns for it."""

    exit_code = FAILURE

    def __str__(self) -> str:  # a KeyError subclass would repr() its message, quotes and all
        return str(self.args[0]) if self.args else type(self).__name__


class InputError(EPSError, ValueError):
    """Bad input: the message names the file and line, the record, or the flag and its valid values."""

    exit_code = USAGE


class MissingFileError(InputError, FileNotFoundError):
    """A file the user named does not exist (still a FileNotFoundError for callers that catch that)."""


class StageOutOfMemoryError(EPSError, RuntimeError):
    """A stage ran out of accelerator memory; the message names the stage, the batch and the knob."""


# OS errors that say the user pointed us at a path we cannot use: a usage error, not a crash.
_USAGE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line a CLI prints for ``exc``, and the exit status that goes with it."""
    if isinstance(exc, EPSError) and exc.args:
        return _one_line(str(exc)), exc.exit_code
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        code = USAGE if exc.errno in _USAGE_ERRNOS else FAILURE
        return _one_line(f"{where}{what}"), code
    if isinstance(exc, KeyError) and exc.args:
        return _one_line(str(exc.args[0])), USAGE
    return _one_line(f"{type(exc).__name__}: {exc}"), FAILURE


def _one_line(text: str) -> str:
    return " ".join(text.split())


F = TypeVar("F", bound=Callable[..., int])


def cli_errors(main: F) -> F:
    """Wrap a CLI ``main``: an EPSError or OSError becomes one ``error:`` line and an exit status.

    Any other exception still propagates with its traceback: it is a bug, and the
    traceback is what fixes it.
    """

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except (EPSError, OSError) as exc:
            if os.environ.get("EPS_TRACEBACK"):
                raise
            line, code = error_line(exc)
            log.debug("error details", exc_info=exc)
            sys.stderr.write(f"error: {line}\n")
            return code

    return wrapped  # type: ignore[return-value]
