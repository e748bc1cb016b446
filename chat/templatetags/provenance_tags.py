"""Template helpers of a reply's details popover (chat.provenance)."""

from __future__ import annotations

from django import template

from chat.provenance import ProvenanceRow, provenance_rows
from inference.models import Generation

register = template.Library()


@register.filter(name="provenance_rows")
def provenance_rows_filter(generation: Generation) -> list[ProvenanceRow]:
    return provenance_rows(generation)


@register.filter(name="percent")
def percent(probability: float) -> str:
    """A probability as a short percentage: 97%, 3.2%, 0.04%, <0.01%."""
    value = 100 * float(probability)
    if value >= 10:
        return f"{value:.0f}%"
    if value >= 1:
        return f"{value:.1f}%"
    if value >= 0.01:
        return f"{value:.2f}%"
    return "<0.01%"
