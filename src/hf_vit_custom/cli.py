"""How every script ends: a user's mistake as one or two lines on stderr and exit status 2, a bug with its traceback.

The library names each mistake in a `ValueError` (a value, a flag, a file's content) or an `OSError` (a path that is
missing, unreadable or corrupt; a full disk). A script hands its `main` to `run`, which prints such an error as
`PROGRAM: error: MESSAGE` and exits with status 2, argparse's convention for usage errors; any other exception is a
bug and keeps its traceback. `HF_VIT_CUSTOM_DEBUG=1` shows the traceback of a mistake too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

DEBUG_VARIABLE = "HF_VIT_CUSTOM_DEBUG"
USER_MISTAKES = (ValueError, OSError)
USAGE_ERROR_STATUS = 2
MAX_MESSAGE_LINES = 2


class UsageError(ValueError):
    """A command line the parser refuses (an unknown flag, a value of the wrong type)."""


def raise_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` raise `UsageError` instead of printing its usage, which for `HfArgumentParser` (every
    `TrainingArguments` flag) runs to hundreds of lines, and exiting."""

    def error(message: str) -> NoReturn:
        raise UsageError(f"{message} (--help lists the flags)")

    parser.error = error
    return parser


def mistake_message(program: str, mistake: BaseException) -> str:
    """`PROGRAM: error: MESSAGE`, at most `MAX_MESSAGE_LINES` lines."""
    lines = [line.rstrip() for line in str(mistake).strip().splitlines() if line.strip()] or [type(mistake).__name__]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = [*lines[: MAX_MESSAGE_LINES - 1], f"{lines[MAX_MESSAGE_LINES - 1]} ... ({DEBUG_VARIABLE}=1: all)"]
    return "\n".join([f"{program}: error: {lines[0]}", *lines[1:]])


def run(main: Callable[[], Any]) -> NoReturn:
    """Run a script's `main()` and exit: 0, `main`'s own status when it returns an int, 2 for a user's mistake."""
    try:
        status = main()
    except USER_MISTAKES as mistake:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(mistake_message(Path(sys.argv[0]).name, mistake), file=sys.stderr)
        sys.exit(USAGE_ERROR_STATUS)
    sys.exit(status if isinstance(status, int) else 0)


__all__ = ["DEBUG_VARIABLE", "UsageError", "mistake_message", "raise_usage_errors", "run"]
