// Progress bars take their width from data-percent: the Content-Security-Policy forbids style
// attributes in markup, but not setting a style from a script. htmx:load fires for the page and
// for every swapped-in fragment (the job rows poll every second).
(function () {
  "use strict";

  function applyWidths(root) {
    const bars = root.querySelectorAll ? root.querySelectorAll("[data-percent]") : [];
    for (const bar of bars) bar.style.width = bar.dataset.percent + "%";
    if (root.dataset && root.dataset.percent !== undefined) root.style.width = root.dataset.percent + "%";
  }

  document.addEventListener("htmx:load", function (event) {
    applyWidths(event.detail.elt);
  });
  document.addEventListener("DOMContentLoaded", function () {
    applyWidths(document);
  });
})();
