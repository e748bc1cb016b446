"""Model output as HTML: markdown-it-py with raw HTML off, safe links, pygments code blocks.

Images load only from this app (or `data:`): a remote image becomes a link the reader may follow,
so a reply cannot make the browser fetch a URL by itself (a prompt injection's way to leak the
conversation). The Content-Security-Policy (img-src 'self' data:) enforces the same in the browser.
The output carries no style attributes either (table alignment is a class), as the policy forbids
inline styles.

Math (`$...$`, `$$...$$`, and LaTeX's `\\(...\\)`, `\\[...\\]`) becomes `math-inline` /
`math-display` elements that hold the escaped TeX source; the browser typesets them with the
vendored KaTeX (static/js/chat.js).
Task list items (`- [ ]`, `- [x]`) get a disabled checkbox. static/js/live-markdown.js renders the
streaming reply with markdown-it (JavaScript) and the same rules, so a reply looks the same while
it streams and after the final render replaces it.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.rules_block import StateBlock
from markdown_it.rules_core import StateCore
from markdown_it.rules_inline import StateInline
from markdown_it.token import Token
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from inference.parsing import OutputFormat, parse_output

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


def _math_inline(state: StateInline, silent: bool) -> bool:
    """`$tex$` (no space inside either dollar, no digit right after the closing one, so that
    "$5 and $6" stays text) and `$$tex$$` inside a paragraph."""
    src, start = state.src, state.pos
    if src[start] != "$":
        return False
    if src.startswith("$$", start):
        end = src.find("$$", start + 2)
        if end < 0 or not src[start + 2 : end].strip():
            return False
        if not silent:
            token = state.push("math_inline_double", "", 0)
            token.content = src[start + 2 : end]
        state.pos = end + 2
        return True
    if start + 1 >= state.posMax or src[start + 1].isspace():
        return False
    end = start + 1
    while True:
        end = src.find("$", end)
        if end < 0 or end >= state.posMax:
            return False
        if src[end - 1] == "\\":  # an escaped dollar inside the formula
            end += 1
            continue
        if src[end - 1].isspace() or (end + 1 < len(src) and src[end + 1].isdigit()):
            end += 1
            continue
        break
    if not silent:
        token = state.push("math_inline", "", 0)
        token.content = src[start + 1 : end]
    state.pos = end + 1
    return True


_BRACKETS = {"\\(": ("\\)", "math_inline"), "\\[": ("\\]", "math_inline_double")}


def _math_brackets(state: StateInline, silent: bool) -> bool:
    """LaTeX's `\\(tex\\)` and `\\[tex\\]`, which many models write instead of dollars (without
    this rule the backslashes would be read as escapes and the formula lost)."""
    opener = state.src[state.pos : state.pos + 2]
    if opener not in _BRACKETS:
        return False
    closer, kind = _BRACKETS[opener]
    end = state.src.find(closer, state.pos + 2)
    if end < 0 or end >= state.posMax or not state.src[state.pos + 2 : end].strip():
        return False
    if not silent:
        token = state.push(kind, "", 0)
        token.content = state.src[state.pos + 2 : end].strip()
    state.pos = end + 2
    return True


def _math_block(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
    """A `$$` line opens display math that a line ending in `$$` closes (or one line
    `$$tex$$`). An unclosed block stays text, so a reply mid-stream shows its source."""
    if state.sCount[start_line] - state.blkIndent >= 4:
        return False
    begin = state.bMarks[start_line] + state.tShift[start_line]
    first = state.src[begin : state.eMarks[start_line]].rstrip()
    if not first.startswith("$$"):
        return False
    if len(first) > 4 and first.endswith("$$"):
        content, last = first[2:-2], start_line
    else:
        if first[2:].strip().endswith("$$"):
            return False
        lines = [first[2:]]
        last = start_line + 1
        while last < end_line:
            line = state.src[state.bMarks[last] + state.tShift[last] : state.eMarks[last]]
            if line.rstrip().endswith("$$"):
                lines.append(line.rstrip()[:-2])
                break
            lines.append(line)
            last += 1
        else:
            return False
        content = "\n".join(lines)
    if not content.strip():
        return False
    if silent:
        return True
    state.line = last + 1
    token = state.push("math_block", "div", 0)
    token.block = True
    token.content = content.strip()
    token.map = [start_line, state.line]
    return True


_TASK = ("[ ] ", "[x] ", "[X] ")
_CHECKBOX = '<input type="checkbox" class="task-list-item-checkbox" disabled{}> '


def _task_lists(state: StateCore) -> None:
    """`- [ ] item` / `- [x] item`: a disabled checkbox in place of the brackets."""
    tokens = state.tokens
    for i in range(2, len(tokens)):
        inline = tokens[i]
        if (
            inline.type != "inline"
            or tokens[i - 1].type != "paragraph_open"
            or tokens[i - 2].type != "list_item_open"
            or not inline.children
            or inline.children[0].type != "text"
            or inline.children[0].content[:4] not in _TASK
        ):
            continue
        first = inline.children[0]
        checkbox = Token("task_checkbox", "input", 0)
        checkbox.meta = {"checked": first.content[1] != " "}
        first.content = first.content[4:]
        inline.children.insert(0, checkbox)
        item = tokens[i - 2]
        item.attrJoin("class", "task-list-item")
        for j in range(i - 3, -1, -1):
            if tokens[j].type in ("bullet_list_open", "ordered_list_open") and (
                tokens[j].level == item.level - 1
            ):
                if "contains-task-list" not in str(tokens[j].attrGet("class") or ""):
                    tokens[j].attrJoin("class", "contains-task-list")
                break


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

    def math_inline(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        return format_html('<span class="math math-inline">{}</span>', tokens[idx].content)

    def math_display(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        return format_html('<span class="math math-display">{}</span>', tokens[idx].content)

    def math_block(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        return format_html('<div class="math math-display">{}</div>\n', tokens[idx].content)

    def task_checkbox(renderer, tokens, idx, options, env):  # type: ignore[no-untyped-def]
        if tokens[idx].meta.get("checked"):
            return _CHECKBOX.format(' checked aria-label="Done"')
        return _CHECKBOX.format(' aria-label="Not done"')

    md.inline.ruler.before("escape", "math_brackets", _math_brackets)
    md.inline.ruler.before("backticks", "math_inline", _math_inline)
    md.block.ruler.before(
        "fence",
        "math_block",
        _math_block,
        {"alt": ["paragraph", "reference", "blockquote", "list"]},
    )
    md.core.ruler.push("task_lists", _task_lists)
    md.add_render_rule("math_inline", math_inline)
    md.add_render_rule("math_inline_double", math_display)
    md.add_render_rule("math_block", math_block)
    md.add_render_rule("task_checkbox", task_checkbox)
    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    md.add_render_rule("th_open", cell_open)
    md.add_render_rule("td_open", cell_open)
    return md


def render_markdown(text: str) -> SafeString:
    """Safe HTML for a reply. Nothing in `text` can inject markup or scripts."""
    return mark_safe(_render_cached(text))


# A finished reply renders the same every time: a long conversation opened again, or the earlier
# messages it loads as they scroll into view, reuse the HTML (markdown and highlighting are most of
# a reply's render time). Keyed by the text itself; a few thousand replies of a few KB.
@lru_cache(maxsize=4096)
def _render_cached(text: str) -> str:
    return _renderer().render(text)


# What the live view assumes a reply's reasoning looks like. The worker splits with the model's
# own markers as it streams; the raw text (a page load mid-reply, the worker's snapshot, a reply
# the worker never finished) only says which format it is in by the markers it contains.
_THINK = OutputFormat(reasoning="think", think_start="<think>", think_end="</think>")
_THINK_OPEN = OutputFormat(
    reasoning="think", think_start="<think>", think_end="</think>", starts_in_reasoning=True
)
_HARMONY = OutputFormat(reasoning="harmony")


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a raw reply: `<think>` blocks (also one the prompt opened, when
    the text only closes it) and GPT-OSS harmony analysis messages go to the reasoning. Tool-call
    markup is held back as the worker does."""
    if "<|channel|>" in text or "<|message|>" in text:
        output = _HARMONY
    elif "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        output = _THINK_OPEN
    elif "<think>" in text:
        output = _THINK
    else:
        return "", text
    parsed = parse_output(text, output, tools_enabled=True)
    return parsed.reasoning, parsed.content
