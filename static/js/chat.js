// What htmx doesn't cover on the chat page: Enter sends, the thread follows new text, the live
// reply renders as markdown while it streams (throttled, only that reply), math is typeset with
// KaTeX, the conversation drawer, keyboard shortcuts and their help dialog, and one polite
// announcement when a reply ends.
(function () {
  "use strict";

  const RENDER_INTERVAL_MS = 120;

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  }

  function messagesEl() {
    return document.getElementById("messages");
  }

  // --- math ---------------------------------------------------------------------------------

  // KaTeX builds DOM nodes and sets their styles through the CSSOM, which the CSP allows
  // (renderToString + innerHTML would put style attributes in markup, which it forbids).
  function typeset(root) {
    if (!window.katex || !root || !root.querySelectorAll) return;
    root.querySelectorAll(".math:not(.typeset)").forEach(function (el) {
      const tex = el.textContent;
      try {
        window.katex.render(tex, el, {
          displayMode: el.classList.contains("math-display"),
          throwOnError: false,
          output: "htmlAndMathml",
        });
        el.classList.add("typeset");
      } catch (e) {
        el.textContent = tex;  // leave the source readable
      }
    });
  }

  // --- the live reply -------------------------------------------------------------------------

  const lastRender = new Map();  // source id -> time of its last render
  const timers = new Map();      // source id -> pending timeout

  function renderSource(id) {
    timers.delete(id);
    const source = document.getElementById(id);
    if (!source || !window.mlxwebMarkdown) return;
    const target = source.nextElementSibling;
    if (!target) return;
    const messages = messagesEl();
    const follow = messages ? nearBottom(messages) : false;
    target.innerHTML = window.mlxwebMarkdown.render(source.textContent);
    typeset(target);
    noteThinking(source);
    lastRender.set(id, performance.now());
    if (messages && follow) messages.scrollTop = messages.scrollHeight;
  }

  // The Thinking section shows as soon as reasoning arrives, and says how long it took once
  // the answer starts (measured here; after the end the row's render says it).
  function noteThinking(source) {
    const live = source.closest(".live");
    const details = live && live.querySelector("details.thinking");
    if (!details || !source.textContent.trim()) return;
    if (source.id.endsWith("-reasoning")) {
      details.hidden = false;
      if (!live.dataset.thinkingSince) live.dataset.thinkingSince = String(Date.now());
    } else if (!details.hidden && !live.dataset.thoughtFor) {
      const since = Number(live.dataset.thinkingSince || 0);
      const seconds = since ? Math.max(1, Math.round((Date.now() - since) / 1000)) : 0;
      live.dataset.thoughtFor = String(seconds);
      details.querySelector("summary").textContent = seconds ? "Thought for " + seconds + " s" : "Thought";
    }
  }

  function scheduleRender(source) {
    const id = source.id;
    if (!id || timers.has(id)) return;
    const wait = Math.max(0, RENDER_INTERVAL_MS - (performance.now() - (lastRender.get(id) || -1e9)));
    timers.set(id, setTimeout(function () { renderSource(id); }, wait));
  }

  // --- announcing the end of a reply ----------------------------------------------------------

  let liveReplies = new Set();

  function currentLiveReplies() {
    const ids = new Set();
    document.querySelectorAll("article.message .live").forEach(function (live) {
      const article = live.closest("article.message");
      if (article && article.id) ids.add(article.id);
    });
    return ids;
  }

  function announce(text) {
    const region = document.getElementById("announcer");
    if (!region) return;
    region.textContent = "";
    // A new text node in a second task, so the same words are announced again next time.
    setTimeout(function () { region.textContent = text; }, 50);
  }

  function checkEndedReplies() {
    const now = currentLiveReplies();
    liveReplies.forEach(function (id) {
      if (now.has(id)) return;
      const article = document.getElementById(id);
      if (!article) return;
      let text = "Reply finished.";
      if (article.querySelector(".badge.stopped")) text = "Reply stopped.";
      else if (article.querySelector(".badge.error")) text = "The reply failed.";
      else if (article.querySelector(".badge.interrupted")) text = "The reply was interrupted.";
      announce(text);
    });
    liveReplies = now;
  }

  function observeMessages() {
    const messages = messagesEl();
    if (!messages) return;
    liveReplies = currentLiveReplies();
    new MutationObserver(function (mutations) {
      let structural = false;
      mutations.forEach(function (m) {
        const node = m.target.nodeType === Node.ELEMENT_NODE ? m.target : m.target.parentElement;
        const source = node && node.closest(".stream-source");
        if (source) {
          scheduleRender(source);
          return;
        }
        if (node && node.closest(".md-live")) return;  // our own render
        m.addedNodes.forEach(function (added) {
          if (added.nodeType === Node.ELEMENT_NODE) {
            structural = true;
            typeset(added);
          }
        });
        if (m.removedNodes.length) structural = true;
      });
      if (structural) checkEndedReplies();
    }).observe(messages, { childList: true, subtree: true, characterData: true });
  }

  // --- the conversation drawer (below 768 px) -------------------------------------------------

  function chatEl() {
    return document.querySelector(".chat");
  }

  function setDrawer(open, focus) {
    const chat = chatEl();
    const toggle = document.querySelector(".drawer-toggle");
    const backdrop = document.querySelector(".drawer-backdrop");
    if (!chat || !toggle) return;
    chat.classList.toggle("drawer-open", open);
    toggle.setAttribute("aria-expanded", open ? "true" : "false");
    toggle.setAttribute("aria-label", open ? "Hide conversations" : "Show conversations");
    if (backdrop) backdrop.hidden = !open;
    if (open && focus) {
      const first = document.querySelector("#sidebar input[type=search], #sidebar a, #sidebar button");
      if (first) first.focus();
    } else if (!open && focus) {
      toggle.focus();
    }
  }

  function drawerMode() {
    const toggle = document.querySelector(".drawer-toggle");
    return !!toggle && toggle.offsetParent !== null;
  }

  function drawerOpen() {
    const chat = chatEl();
    return !!chat && chat.classList.contains("drawer-open");
  }

  // --- shortcuts ------------------------------------------------------------------------------

  function typingIn(target) {
    return target instanceof HTMLElement &&
      (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function focusSearch() {
    const box = document.querySelector("#sidebar input[type=search]") ||
      document.querySelector("input[type=search]");
    if (drawerMode()) setDrawer(true, !box);
    if (box) {
      box.focus();
      box.select();
    }
  }

  function focusComposer() {
    const box = document.querySelector("#composer textarea[name=text]");
    if (drawerOpen()) setDrawer(false, false);
    if (box) box.focus();
  }

  function stopReply() {
    const forms = document.querySelectorAll("#messages article.assistant form.stop");
    if (!forms.length) return false;
    forms[forms.length - 1].requestSubmit();
    return true;
  }

  function openHelp() {
    const dialog = document.getElementById("shortcuts");
    if (dialog && !dialog.open) dialog.showModal();
  }

  document.addEventListener("keydown", function (event) {
    const target = event.target;
    // Enter sends the message; Shift+Enter makes a new line.
    if (target instanceof HTMLTextAreaElement && target.name === "text" &&
        event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (target.value.trim() !== "") target.form.requestSubmit();
      return;
    }
    if (event.isComposing || event.altKey) return;
    const mod = event.ctrlKey || event.metaKey;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const dialogOpen = !!document.querySelector("dialog[open]");
    if (mod && event.shiftKey && key === "o") {
      event.preventDefault();
      const link = document.querySelector("#sidebar .new-chat");
      window.location.href = link ? link.getAttribute("href") : "/";
    } else if (!dialogOpen && ((mod && !event.shiftKey && key === "k") ||
               (!mod && key === "/" && !typingIn(target)))) {
      event.preventDefault();
      focusSearch();
    } else if (!dialogOpen && mod && event.shiftKey && key === "e") {
      event.preventDefault();
      focusComposer();
    } else if (!mod && key === "?" && !typingIn(target) && !dialogOpen) {
      event.preventDefault();
      openHelp();
    } else if (key === "Escape" && !dialogOpen) {  // an open dialog closes itself on Esc
      if (drawerOpen()) {
        setDrawer(false, true);
      } else if (!(target instanceof HTMLInputElement && target.type === "search") && stopReply()) {
        event.preventDefault();
      }
    }
  });

  document.addEventListener("click", function (event) {
    const el = event.target instanceof Element ? event.target : null;
    if (!el) return;
    if (el.closest(".drawer-toggle")) {
      setDrawer(!drawerOpen(), true);
    } else if (el.closest(".drawer-backdrop")) {
      setDrawer(false, true);
    } else if (el.closest(".help-open")) {
      openHelp();
    } else if (drawerOpen() && el.closest("#sidebar a")) {
      setDrawer(false, false);
    }
  });

  // --- following the thread -----------------------------------------------------------------

  let follow = true;
  document.addEventListener("htmx:oobBeforeSwap", function () {
    const messages = messagesEl();
    follow = messages ? nearBottom(messages) : false;
  });
  document.addEventListener("htmx:oobAfterSwap", function (event) {
    const messages = messagesEl();
    if (messages && follow) messages.scrollTop = messages.scrollHeight;
    const target = event.detail && event.detail.target;
    if (target && target.id === "composer") {
      const box = target.querySelector("textarea[name=text]");
      if (box) box.focus();
    }
  });
  // --- earlier messages ----------------------------------------------------------------------
  // A long branch opens with its newest messages; scrolling near the top loads the ones before
  // (#earlier-messages asks the server), and the reader stays where they were.

  let keepFromBottom = null;
  function loadEarlierNearTop() {
    const messages = messagesEl();
    const marker = document.getElementById("earlier-messages");
    if (!messages || !marker || marker.dataset.loading || messages.scrollTop > 200) return;
    marker.dataset.loading = "1";
    window.htmx.trigger(marker, "load-earlier");
  }
  document.addEventListener(
    "scroll",
    function (event) {
      if (event.target === messagesEl()) loadEarlierNearTop();
    },
    true
  );
  document.addEventListener("htmx:beforeSwap", function (event) {
    const target = event.detail && event.detail.target;
    const messages = messagesEl();
    if (target && target.id === "earlier-messages" && messages) {
      keepFromBottom = messages.scrollHeight - messages.scrollTop;
    }
  });
  document.addEventListener("htmx:afterSettle", function () {
    const messages = messagesEl();
    if (keepFromBottom === null || !messages) return;
    messages.scrollTop = messages.scrollHeight - keepFromBottom;
    keepFromBottom = null;
  });

  // Math in anything htmx puts on the page outside the thread (search results, panels).
  document.addEventListener("htmx:afterSwap", function (event) {
    typeset(event.detail && event.detail.elt);
  });

  document.addEventListener("DOMContentLoaded", function () {
    const messages = messagesEl();
    typeset(document.body);
    observeMessages();
    if (messages) messages.scrollTop = messages.scrollHeight;
  });
})();
