"""What every command line of the project does with a user's mistake: ``error: ...`` on stderr and exit status 2,
or the full traceback with ``--debug``."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import AstCvError


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body; an AstCvError becomes one clear line and exit status 2 (raised again with ``debug``)."""
    try:
        return body()
    except AstCvError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_moved(old: str, new: str, main: Callable[[], int]) -> int:
    """An old ``python -m`` spelling: say the new one on stderr, then run it."""
    print(f"note: `python -m {old}` is now `python -m {new}`; running that.", file=sys.stderr)
    return main()
