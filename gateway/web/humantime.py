"""Human timestamps for the pages: "3 min ago" (or "in 2 days"), with the exact UTC time
in the element's ``title`` and ``datetime``.

Pure: :func:`relative` takes the time and ``now``; :func:`time_tag` wraps it in an HTML
``<time>`` element (escaped, safe to put in a template).
"""

from __future__ import annotations

from markupsafe import Markup, escape

from gateway.api.common import rfc3339

__all__ = ["relative", "time_tag"]

_UNITS = ((86400 * 365, "year"), (86400 * 30, "month"), (86400, "day"), (3600, "h"), (60, "min"))


def _amount(seconds: float) -> str:
    for size, unit in _UNITS:
        if seconds >= size:
            count = int(seconds // size)
            plural = "s" if count > 1 and unit not in ("h", "min") else ""
            return f"{count} {unit}{plural}"
    return f"{int(seconds)} s"


def relative(at: float, now: float) -> str:
    """``at`` relative to ``now``: "just now", "5 min ago", "in 3 days"."""
    delta = now - at
    if abs(delta) < 5:
        return "just now"
    return f"{_amount(delta)} ago" if delta > 0 else f"in {_amount(-delta)}"


def time_tag(at: float | None, now: float, never: str = "never") -> Markup:
    """``<time datetime=… title=…>5 min ago</time>``; ``never`` (escaped) for None."""
    if at is None:
        return escape(never)
    exact = rfc3339(at)
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(exact, relative(at, now))
