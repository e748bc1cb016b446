from __future__ import annotations

from django import template
from django.utils.safestring import SafeString

from chat.markdown import render_markdown

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> SafeString:
    """Render model output as safe HTML (raw HTML off, links made safe, code highlighted)."""
    return render_markdown(text or "")
