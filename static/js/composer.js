// The composer's settings (issue 9): the meter refreshes when a reply ends and after the
// settings panel saves; the new chat's preset picker copies the model and tools it sets into
// the composer; the side panel's model follows a preset that chose one.
(function () {
  "use strict";

  function refreshMeter() {
    const meter = document.getElementById("composer-meter");
    if (meter && window.htmx) window.htmx.trigger(document.body, "meter-refresh");
  }

  // The panel shows what a send saved (the composer's options stick): fetched again, kept
  // open if it was.
  function refreshPanel() {
    const panel = document.getElementById("settings-panel");
    const form = panel && panel.querySelector("form.settings-form");
    if (!form || !window.htmx) return;
    const wasOpen = panel.querySelector("details[open]") !== null;
    window.htmx.ajax("GET", form.getAttribute("action"), {target: "#settings-panel", swap: "outerHTML"})
      .then(function () {
        const details = document.querySelector("#settings-panel details");
        if (details && wasOpen) details.open = true;
      });
  }

  document.addEventListener("htmx:oobAfterSwap", function (event) {
    const target = event.detail && event.detail.target;
    if (!target || !target.classList) return;
    // A reply's final render (no live text left in it): its token counts are in the row.
    if (target.classList.contains("assistant") && !target.querySelector(".streaming")) {
      refreshMeter();
    }
    if (target.id === "composer") refreshPanel();
  });

  document.addEventListener("htmx:afterSwap", function (event) {
    const target = event.detail && event.detail.target;
    if (!target || target.id !== "settings-panel") return;
    // The swapped-in panel is a new element: read it again by its id.
    const panel = document.getElementById("settings-panel");
    const picker = document.getElementById("composer-model");
    if (panel && picker && panel.dataset.model && picker.value !== panel.dataset.model) {
      picker.value = panel.dataset.model;
    }
    refreshMeter();
  });

  document.addEventListener("change", function (event) {
    const select = event.target;
    if (!(select instanceof HTMLSelectElement) || select.id !== "composer-preset") return;
    const option = select.selectedOptions[0];
    if (!option) return;
    const form = select.form;
    const model = form && form.querySelector("select[name=model]");
    if (model && option.dataset.model) {
      const wanted = model.querySelector('option[value="' + CSS.escape(option.dataset.model) + '"]');
      if (wanted && !wanted.disabled) model.value = option.dataset.model;
    }
    const tools = form && form.querySelector("select[name=tools]");
    if (tools && option.dataset.tools) tools.value = option.dataset.tools;
  });

  // The composer's Settings link opens the side panel instead of leaving the page.
  document.addEventListener("click", function (event) {
    const link = event.target instanceof Element ? event.target.closest("a[data-opens]") : null;
    if (!link) return;
    const panel = document.getElementById(link.dataset.opens);
    const details = panel && panel.querySelector("details");
    if (!details) return;
    event.preventDefault();
    details.open = true;
    const first = details.querySelector("select, input, textarea");
    if (first) first.focus();
  });
})();
