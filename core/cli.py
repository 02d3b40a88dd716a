"""Shared command-line behaviour: a user error is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from core.errors import RecipesError


def exit_on_user_error(main: Callable) -> Callable:
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RecipesError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
