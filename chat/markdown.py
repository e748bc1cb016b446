"""Model output as HTML: markdown-it-py with raw HTML off, safe links, pygments code blocks.

Images load only from this app (or `data:`): a remote image becomes a link the reader may follow,
so a reply cannot make the browser fetch a URL by itself (a prompt injection's way to leak the
conversation). The Content-Security-Policy (img-src 'self' data:) enforces the same in the browser.
The output carries no style attributes either (table alignment is a class), as the policy forbids
inline styles.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_FORMATTER = HtmlFormatter(nowrap=True)


def _highlight(code: str, lang: str, attrs: str) -> str:
    """Pygments HTML for a fenced block; markdown-it escapes it itself when we return ''."""
    if not lang:
        return ""
    try:
        lexer = get_lexer_by_name(lang.split()[0])
    except ClassNotFound:
        return ""
    return highlight(code, lexer, _FORMATTER)


def is_local_image(src: str) -> bool:
    """Whether the browser would load `src` from this app (or from the data itself)."""
    if src.startswith("data:image/"):
        return True  # markdown-it's validateLink lets only gif/png/jpeg/webp data URLs through
    head = src.replace("\\", "/")
    if head.startswith("//"):
        return False  # protocol-relative: another host
    parts = urlsplit(src)
    return not parts.scheme and not parts.netloc


_ALIGN_CLASSES = {
    "text-align:left": "align-left",
    "text-align:center": "align-center",
    "text-align:right": "align-right",
}


@lru_cache(maxsize=1)
def _renderer() -> MarkdownIt:
    # "html": False escapes any raw HTML the model writes; markdown-it's validateLink already
    # refuses javascript:, vbscript:, file: and non-image data: URLs.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight})
    md.enable(["table", "strikethrough"])

    def link_open(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        tokens[idx].attrSet("target", "_blank")
        return renderer.renderToken(tokens, idx, options, env)

    def image(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if is_local_image(src):
            return renderer.image(tokens, idx, options, env)
        alt = renderer.renderInlineAsText(token.children or [], options, env)
        return format_html(
            '<a class="remote-image" href="{}" rel="noopener noreferrer nofollow" '
            'target="_blank" title="Not loaded: opens {}">Image: {}</a>',
            src,
            src,
            alt or src,
        )

    def cell_open(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        token = tokens[idx]
        style = token.attrGet("style")
        if style is not None:
            token.attrs.pop("style")
            if css_class := _ALIGN_CLASSES.get(str(style)):
                token.attrJoin("class", css_class)
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    md.add_render_rule("th_open", cell_open)
    md.add_render_rule("td_open", cell_open)
    return md


def render_markdown(text: str) -> SafeString:
    """Safe HTML for a reply. Nothing in `text` can inject markup or scripts."""
    return mark_safe(_renderer().render(text))
