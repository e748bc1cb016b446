// The streaming reply's markdown, rendered in the browser as it grows: markdown-it (vendored)
// set up exactly like the server's renderer (chat/markdown.py): raw HTML off, the same link,
// image and table-alignment rules, the same math and task-list rules. The final frame from the
// database row replaces this render when the reply ends (with pygments highlighting).
(function () {
  "use strict";
  if (!window.markdownit) return;

  const md = window.markdownit("commonmark", { html: false, linkify: false });
  md.enable(["table", "strikethrough"]);
  const escapeHtml = md.utils.escapeHtml;
  const SPACE = /\s/;
  const DIGIT = /[0-9]/;

  // `$tex$` (no space inside either dollar, no digit after the closing one) and `$$tex$$`.
  function mathInline(state, silent) {
    const src = state.src;
    const start = state.pos;
    if (src[start] !== "$") return false;
    if (src.startsWith("$$", start)) {
      const end = src.indexOf("$$", start + 2);
      if (end < 0 || !src.slice(start + 2, end).trim()) return false;
      if (!silent) state.push("math_inline_double", "", 0).content = src.slice(start + 2, end);
      state.pos = end + 2;
      return true;
    }
    if (start + 1 >= state.posMax || SPACE.test(src[start + 1])) return false;
    let end = start + 1;
    for (;;) {
      end = src.indexOf("$", end);
      if (end < 0 || end >= state.posMax) return false;
      if (src[end - 1] === "\\") { end += 1; continue; }
      if (SPACE.test(src[end - 1]) || (end + 1 < src.length && DIGIT.test(src[end + 1]))) {
        end += 1;
        continue;
      }
      break;
    }
    if (!silent) state.push("math_inline", "", 0).content = src.slice(start + 1, end);
    state.pos = end + 1;
    return true;
  }

  // LaTeX's `\(tex\)` and `\[tex\]`, read before markdown's backslash escapes.
  const BRACKETS = { "\\(": ["\\)", "math_inline"], "\\[": ["\\]", "math_inline_double"] };
  function mathBrackets(state, silent) {
    const opener = state.src.slice(state.pos, state.pos + 2);
    if (!Object.prototype.hasOwnProperty.call(BRACKETS, opener)) return false;
    const closer = BRACKETS[opener][0];
    const end = state.src.indexOf(closer, state.pos + 2);
    if (end < 0 || end >= state.posMax || !state.src.slice(state.pos + 2, end).trim()) return false;
    if (!silent) state.push(BRACKETS[opener][1], "", 0).content = state.src.slice(state.pos + 2, end).trim();
    state.pos = end + 2;
    return true;
  }

  // A `$$` line opens display math that a line ending in `$$` closes; unclosed stays text.
  function mathBlock(state, startLine, endLine, silent) {
    if (state.sCount[startLine] - state.blkIndent >= 4) return false;
    const begin = state.bMarks[startLine] + state.tShift[startLine];
    const first = state.src.slice(begin, state.eMarks[startLine]).trimEnd();
    if (!first.startsWith("$$")) return false;
    let content;
    let last = startLine;
    if (first.length > 4 && first.endsWith("$$")) {
      content = first.slice(2, -2);
    } else {
      if (first.slice(2).trim().endsWith("$$")) return false;
      const lines = [first.slice(2)];
      last = startLine + 1;
      let closed = false;
      while (last < endLine) {
        const line = state.src.slice(state.bMarks[last] + state.tShift[last], state.eMarks[last]);
        if (line.trimEnd().endsWith("$$")) {
          lines.push(line.trimEnd().slice(0, -2));
          closed = true;
          break;
        }
        lines.push(line);
        last += 1;
      }
      if (!closed) return false;
      content = lines.join("\n");
    }
    if (!content.trim()) return false;
    if (silent) return true;
    state.line = last + 1;
    const token = state.push("math_block", "div", 0);
    token.block = true;
    token.content = content.trim();
    token.map = [startLine, state.line];
    return true;
  }

  const TASK = ["[ ] ", "[x] ", "[X] "];
  function taskLists(state) {
    const tokens = state.tokens;
    for (let i = 2; i < tokens.length; i++) {
      const inline = tokens[i];
      if (inline.type !== "inline" || tokens[i - 1].type !== "paragraph_open" ||
          tokens[i - 2].type !== "list_item_open" || !inline.children || !inline.children.length ||
          inline.children[0].type !== "text" ||
          TASK.indexOf(inline.children[0].content.slice(0, 4)) < 0) continue;
      const first = inline.children[0];
      const checkbox = new state.Token("task_checkbox", "input", 0);
      checkbox.meta = { checked: first.content[1] !== " " };
      first.content = first.content.slice(4);
      inline.children.unshift(checkbox);
      const item = tokens[i - 2];
      item.attrJoin("class", "task-list-item");
      for (let j = i - 3; j >= 0; j--) {
        const t = tokens[j];
        if ((t.type === "bullet_list_open" || t.type === "ordered_list_open") && t.level === item.level - 1) {
          if (String(t.attrGet("class") || "").indexOf("contains-task-list") < 0) t.attrJoin("class", "contains-task-list");
          break;
        }
      }
    }
  }

  md.inline.ruler.before("escape", "math_brackets", mathBrackets);
  md.inline.ruler.before("backticks", "math_inline", mathInline);
  md.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
  md.core.ruler.push("task_lists", taskLists);

  const rules = md.renderer.rules;
  rules.math_inline = function (tokens, idx) {
    return '<span class="math math-inline">' + escapeHtml(tokens[idx].content) + "</span>";
  };
  rules.math_inline_double = function (tokens, idx) {
    return '<span class="math math-display">' + escapeHtml(tokens[idx].content) + "</span>";
  };
  rules.math_block = function (tokens, idx) {
    return '<div class="math math-display">' + escapeHtml(tokens[idx].content) + "</div>\n";
  };
  rules.task_checkbox = function (tokens, idx) {
    return '<input type="checkbox" class="task-list-item-checkbox" disabled' +
      (tokens[idx].meta.checked ? ' checked aria-label="Done"' : ' aria-label="Not done"') + "> ";
  };
  rules.link_open = function (tokens, idx, options, env, self) {
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow");
    tokens[idx].attrSet("target", "_blank");
    return self.renderToken(tokens, idx, options);
  };

  // Images load only from this app or data: (chat.markdown.is_local_image); others are links.
  function isLocalImage(src) {
    if (src.startsWith("data:image/")) return true;
    if (src.replace(/\\/g, "/").startsWith("//")) return false;
    return !/^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(src);
  }
  const defaultImage = rules.image;
  rules.image = function (tokens, idx, options, env, self) {
    const token = tokens[idx];
    const src = String(token.attrGet("src") || "");
    if (isLocalImage(src)) return defaultImage(tokens, idx, options, env, self);
    const alt = self.renderInlineAsText(token.children || [], options, env);
    return '<a class="remote-image" href="' + escapeHtml(src) + '" rel="noopener noreferrer nofollow" ' +
      'target="_blank" title="Not loaded: opens ' + escapeHtml(src) + '">Image: ' + escapeHtml(alt || src) + "</a>";
  };

  // Table alignment as classes: the Content-Security-Policy forbids style attributes.
  const ALIGN = { "text-align:left": "align-left", "text-align:center": "align-center", "text-align:right": "align-right" };
  function cellOpen(tokens, idx, options, env, self) {
    const token = tokens[idx];
    const style = token.attrGet("style");
    if (style !== null) {
      token.attrs = token.attrs.filter(function (attr) { return attr[0] !== "style"; });
      if (ALIGN[style]) token.attrJoin("class", ALIGN[style]);
    }
    return self.renderToken(tokens, idx, options);
  }
  rules.th_open = cellOpen;
  rules.td_open = cellOpen;

  window.mlxwebMarkdown = { render: function (text) { return md.render(text); } };
})();
