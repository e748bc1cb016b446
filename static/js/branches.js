// Branch features in the browser (issue 9): copy buttons on messages and code blocks, the
// forked conversation opening in the tab that asked for it, and scrolling to a message linked
// with ?m=. Everything else (regenerate, versions, edit, delete, fork, pin) is plain forms that
// htmx sends over the socket, or posts without it. No inline script: the CSP forbids it.
(function () {
  "use strict";

  function flash(button, label) {
    if (!button.dataset.label) button.dataset.label = button.textContent;
    button.textContent = label;
    window.setTimeout(function () {
      button.textContent = button.dataset.label;
    }, 1500);
  }

  function copyWithSelection(text) {
    // Pages served over plain HTTP to another machine have no navigator.clipboard.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "copy-buffer";
    document.body.appendChild(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (error) {
      copied = false;
    }
    area.remove();
    return copied;
  }

  function copyText(text, button) {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { flash(button, "Copied"); },
        function () { flash(button, copyWithSelection(text) ? "Copied" : "Copy failed"); }
      );
      return;
    }
    flash(button, copyWithSelection(text) ? "Copied" : "Copy failed");
  }

  document.addEventListener("click", function (event) {
    const target = event.target;
    if (!(target instanceof Element)) return;
    const messageButton = target.closest("button.copy-message");
    if (messageButton) {
      const source = document.getElementById(messageButton.dataset.copySource || "");
      if (source instanceof HTMLTemplateElement) {
        copyText(source.content.textContent || "", messageButton);
      }
      return;
    }
    const codeButton = target.closest("button.copy-code");
    if (codeButton) {
      const block = codeButton.parentElement && codeButton.parentElement.querySelector("pre");
      if (block) copyText(block.innerText.replace(/\n$/, ""), codeButton);
    }
  });

  // Finished messages only: a streaming reply's markdown is re-rendered on every token.
  function enhance(root) {
    root.querySelectorAll("article.message button.copy-message[hidden]").forEach(function (b) {
      b.hidden = false;
    });
    root.querySelectorAll("article.message .body.md pre").forEach(function (block) {
      if (block.closest(".md-live") || block.parentElement.classList.contains("code-block")) return;
      const wrapper = document.createElement("div");
      wrapper.className = "code-block";
      block.parentElement.insertBefore(wrapper, block);
      wrapper.appendChild(block);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "small copy-code";
      button.textContent = "Copy code";
      wrapper.insertBefore(button, block);
    });
    root.querySelectorAll("p.socket-navigate[data-location]").forEach(function (link) {
      const location = link.dataset.location || "";
      link.remove();
      // Only a path of this site (the server renders it; "//host" would leave the site).
      if (location.startsWith("/") && !location.startsWith("//")) window.location.assign(location);
    });
  }

  function scrollToTarget() {
    const marker = document.querySelector("[data-scroll-target]");
    if (!marker) return;
    const article = marker.closest("article.message");
    if (!article) return;
    article.classList.add("is-target");
    article.scrollIntoView({ block: "center" });
  }

  let pending = false;
  const observer = new MutationObserver(function (mutations) {
    // Streamed tokens land in the live reply, which has nothing to enhance.
    const relevant = mutations.some(function (m) {
      return !(m.target instanceof Element && m.target.closest(".live"));
    });
    if (pending || !relevant) return;
    pending = true;
    window.requestAnimationFrame(function () {
      pending = false;
      enhance(document);
    });
  });

  document.addEventListener("DOMContentLoaded", function () {
    enhance(document);
    observer.observe(document.body, { childList: true, subtree: true });
  });
  // After chat.js's scroll to the bottom (DOMContentLoaded), so a linked message wins.
  window.addEventListener("load", scrollToTarget);
})();
