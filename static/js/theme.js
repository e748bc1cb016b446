// The colour theme: "light", "dark", or none (follow the system's prefers-color-scheme).
// Loaded blocking in <head> (an external file, as the Content-Security-Policy forbids inline
// scripts) so the remembered choice is on <html data-theme> before the first paint: no flash.
(function () {
  "use strict";
  const KEY = "mlxweb-theme";
  const ORDER = ["", "light", "dark"];
  const LABELS = {
    "": ["◐", "Theme: follows the system. Switch to light"],
    light: ["☀", "Theme: light. Switch to dark"],
    dark: ["☾", "Theme: dark. Switch to following the system"],
  };

  function stored() {
    try {
      const value = localStorage.getItem(KEY) || "";
      return ORDER.indexOf(value) >= 0 ? value : "";
    } catch (e) {
      return "";  // storage blocked: follow the system
    }
  }

  function apply(theme) {
    if (theme) document.documentElement.setAttribute("data-theme", theme);
    else document.documentElement.removeAttribute("data-theme");
    document.querySelectorAll(".theme-toggle").forEach(function (button) {
      button.textContent = LABELS[theme][0];
      button.setAttribute("aria-label", LABELS[theme][1]);
      button.title = LABELS[theme][1];
    });
  }

  apply(stored());

  document.addEventListener("DOMContentLoaded", function () {
    apply(stored());
    document.addEventListener("click", function (event) {
      const button = event.target.closest && event.target.closest(".theme-toggle");
      if (!button) return;
      const next = ORDER[(ORDER.indexOf(stored()) + 1) % ORDER.length];
      try {
        if (next) localStorage.setItem(KEY, next);
        else localStorage.removeItem(KEY);
      } catch (e) { /* not remembered; still applied */ }
      apply(next);
    });
  });
})();
