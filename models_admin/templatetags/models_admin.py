"""Display helpers for the Models page: amounts, durations, parameter counts."""

from __future__ import annotations

from django import template
from django.template.defaultfilters import filesizeformat

register = template.Library()


@register.filter
def amount(value: int | float | None, unit: str) -> str:
    """Bytes as "1.2 GB", steps as "3"."""
    if value is None:
        return "?"
    return filesizeformat(value) if unit == "bytes" else f"{int(value):,}"


@register.filter
def rate(value: float | None, unit: str) -> str:
    """A speed in the job's unit: "12.5 MB/s" or "1.3 steps/s"."""
    if not value:
        return ""
    return f"{filesizeformat(value)}/s" if unit == "bytes" else f"{value:.1f} steps/s"


@register.filter
def duration(seconds: float | None) -> str:
    """Seconds as "42 s", "3 min 5 s" or "2 h 10 min"."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@register.filter
def params(count: int | None) -> str:
    """A parameter count as "135M" or "1.1B"."""
    if not count:
        return ""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            value = count / size
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(count)


@register.filter
def share(value: float | None) -> str:
    """A fraction as a percentage: 0.973 as "97%" (never 100% unless it is 1)."""
    if value is None:
        return "?"
    percent = 100 * float(value)
    if 99 < percent < 100:
        return f"{percent:.1f}%"
    return f"{percent:.0f}%"


@register.filter
def change(ratio: float | None) -> str:
    """A ratio to a reference as a signed change: 1.017 as "+1.7%"."""
    if ratio is None:
        return ""
    return f"{100 * (float(ratio) - 1):+.1f}%"
