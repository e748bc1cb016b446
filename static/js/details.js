// A reply's details (chat.views_provenance): the token view marks the token whose
// alternatives show, and Escape closes an open details popover. Links and forms work
// without this file; htmx loads the panels into the popover when it runs.
(function () {
  "use strict";

  document.addEventListener("click", function (event) {
    var token = event.target.closest ? event.target.closest(".token-trace .token") : null;
    if (!token) return;
    var trace = token.closest(".token-trace");
    trace.querySelectorAll(".token.selected").forEach(function (other) {
      other.classList.remove("selected");
      other.removeAttribute("aria-current");
    });
    token.classList.add("selected");
    token.setAttribute("aria-current", "true");
  });

  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    var open = document.querySelector("details.reply-details[open]");
    if (!open) return;
    open.removeAttribute("open");
    var summary = open.querySelector("summary");
    if (summary) summary.focus();
  });
})();
