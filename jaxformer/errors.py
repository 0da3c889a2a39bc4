"""The error a bad config value raises, and the checks that raise it.

At the bottom of the import graph (it imports nothing from the project), so every module that owns a registry of
choices can validate against it without importing jaxformer.config, which imports those registries.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from jaxformer.user_errors import UserError


class ConfigError(UserError, ValueError):
  """A config value that cannot work. The message names the key and the fix."""


def check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
  """Raises ConfigError unless `value` is one of `choices` (a registry's names, in its order)."""
  choices = tuple(choices)
  if value not in choices:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise ConfigError(f'{key}={value!r} is not a valid choice{hint}; use one of: {", ".join(choices)}.')


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(f'{key}={value!r} must be a {"non-negative" if allow_zero else "positive"} integer.')


def check_fraction(key: str, value: Any, upper_inclusive: bool = False) -> None:
  ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
  if not ok:
    raise ConfigError(f'{key}={value!r} must be in [0, 1{"]" if upper_inclusive else ")"}.')
