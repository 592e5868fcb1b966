// Every page: a request htmx could not complete (server restarting, database briefly down, network gone)
// shows why in the #request-error banner instead of failing silently; the next good answer hides it.
(function () {
  "use strict";
  const banner = () => document.getElementById("request-error");

  function show(text) {
    const el = banner();
    if (!el) return;
    el.textContent = text;  // text, never HTML: nothing from a response runs
    el.hidden = false;
  }

  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    if (xhr.status === 503) {
      const parsed = new DOMParser().parseFromString(xhr.responseText, "text/html");
      const message = parsed.getElementById("unavailable");
      show(message ? message.textContent : "The server is unavailable for a moment. Try again in a few seconds.");
      return;
    }
    show(`The request failed (HTTP ${xhr.status}). Nothing you confirmed is lost; try again or reload the page.`);
  });
  document.addEventListener("htmx:sendError", () => {
    show("The server did not answer (network or restart). Nothing you confirmed is lost; try again in a few seconds.");
  });
  document.addEventListener("htmx:afterRequest", (event) => {
    const el = banner();
    if (el && event.detail.successful) el.hidden = true;
  });
})();
