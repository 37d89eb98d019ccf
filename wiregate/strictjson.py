"""JSON read strictly (pure): no key repeated in an object, no ``NaN`` or ``Infinity``.

Parsers disagree on which of two repeated keys wins, so a message that repeats one can
mean different things to a checker and a user; ``NaN`` and ``Infinity`` are not JSON.
Every reader of data from the wire uses :func:`loads`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["StrictJSONError", "loads"]


class StrictJSONError(ValueError):
    """Not strict JSON: the message says why in a few words; ``repeated_key`` when that
    was the reason (the text is JSON to a lenient parser)."""

    def __init__(self, message: str, *, repeated_key: bool = False) -> None:
        super().__init__(message)
        self.repeated_key = repeated_key


def loads(text: str | bytes) -> Any:
    """The JSON value of ``text``, or :class:`StrictJSONError`."""
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError("nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise StrictJSONError(f"malformed ({exc.__class__.__name__})") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise StrictJSONError(
                f"the key {key[:64]!r} appears twice in an object", repeated_key=True
            )
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")
