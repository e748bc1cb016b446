// The API reference page: Swagger UI over /v1/openapi.json, set up from a script file (the
// Content-Security-Policy allows no inline script). Settings come from a data attribute.
(function () {
  "use strict";
  var settings = JSON.parse(document.getElementById("swagger-ui").dataset.settings);
  settings.dom_id = "#swagger-ui";
  settings.presets = [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset];
  window.ui = SwaggerUIBundle(settings);
})();
