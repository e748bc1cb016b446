// Small behaviours htmx doesn't cover: Enter sends, the thread follows new text.
(function () {
  "use strict";

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  }

  document.addEventListener("keydown", function (event) {
    const target = event.target;
    if (!(target instanceof HTMLTextAreaElement) || target.name !== "text") return;
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    if (target.value.trim() === "") return;
    target.form.requestSubmit();
  });

  let follow = true;
  document.addEventListener("htmx:oobBeforeSwap", function () {
    const messages = document.getElementById("messages");
    follow = messages ? nearBottom(messages) : false;
  });
  document.addEventListener("htmx:oobAfterSwap", function (event) {
    const messages = document.getElementById("messages");
    if (messages && follow) messages.scrollTop = messages.scrollHeight;
    const target = event.detail && event.detail.target;
    if (target && target.id === "composer") {
      const box = target.querySelector("textarea[name=text]");
      if (box) box.focus();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    const messages = document.getElementById("messages");
    if (messages) messages.scrollTop = messages.scrollHeight;
  });
})();
