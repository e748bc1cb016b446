// The sidebar's search box (templates/chat/parts/search_box.html): the results arrive through
// htmx as you type; here only the keyboard inside it: ArrowDown/ArrowUp move between the box and
// the results, Esc empties the results and returns to the box. (Ctrl+K and "/" focus the box:
// static/js/chat.js, with the other shortcuts.)
(function () {
  "use strict";

  function box() { return document.getElementById("sidebar-search"); }
  function links() {
    var results = document.getElementById("search-results");
    return results ? Array.prototype.slice.call(results.querySelectorAll("a")) : [];
  }

  document.addEventListener("keydown", function (event) {
    var input = box();
    if (!input) { return; }
    var active = document.activeElement;
    var items = links();
    var index = items.indexOf(active);
    if (active !== input && index === -1) { return; }
    if (event.key === "ArrowDown" && items.length) {
      event.preventDefault();
      items[Math.min(index + 1, items.length - 1)].focus();
    } else if (event.key === "ArrowUp" && index !== -1) {
      event.preventDefault();
      if (index === 0) { input.focus(); } else { items[index - 1].focus(); }
    } else if (event.key === "Escape") {
      var results = document.getElementById("search-results");
      if (results && results.closest(".search-box")) { results.textContent = ""; }
      input.focus();
    }
  });
})();
