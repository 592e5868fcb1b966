// Keyboard-first labeling: 1/2/3/4 choose, then 1-4 strength when asked; s skip, u undo,
// r raw text / formatted, i instructions, ? keys. Buttons do the same for mouse users. htmx posts the form and swaps in
// the next pair (one round trip per judgment). A campaign with several axes asks them in turn on the same pair
// (Backspace goes back one); the last axis's choice posts them all at once.
(function () {
  "use strict";
  const CHOICE_KEYS = { "1": "a", "2": "b", "3": "tie", "4": "both_bad" };
  let stage = "choice";
  let shownAt = performance.now();
  let showRaw = false; // responses as raw text instead of rendered Markdown (r), kept across pairs

  const $ = (id) => document.getElementById(id);
  const card = () => $("pair");
  const form = () => $("judge-form");
  const offered = () => (card()?.dataset.choices || "").split(",").filter(Boolean);
  const asksStrength = () => card()?.dataset.strength === "1";

  // Several axes: one fieldset each, shown one at a time; `axis` is the one shown.
  let axis = 0;
  const axisSets = () => Array.from(document.querySelectorAll("#judge-form fieldset.axis"));

  function showAxis(index) {
    axis = index;
    stage = "choice";
    axisSets().forEach((set, i) => {
      set.hidden = i !== index;
      const row = set.querySelector(".strength-row");
      if (row) row.hidden = true;
      if (i >= index) {
        set.querySelector(".axis-choice").value = "";
        set.querySelector(".axis-strength").value = "";
      }
    });
  }

  function nextAxis() {
    const sets = axisSets();
    if (axis + 1 < sets.length) { showAxis(axis + 1); return; }
    $("ms-input").value = Math.round(performance.now() - shownAt);
    form().requestSubmit();
  }

  function chooseOnAxis(choice) {
    const set = axisSets()[axis];
    if (!set || !set.dataset.choices.split(",").includes(choice)) return;
    set.querySelector(".axis-choice").value = choice;
    if ((choice === "a" || choice === "b") && set.dataset.strength === "1") {
      stage = "strength";
      set.querySelector(".strength-side").textContent = choice.toUpperCase();
      set.querySelector(".strength-row").hidden = false;
      return;
    }
    nextAxis();
  }

  function strengthOnAxis(value) {
    const set = axisSets()[axis];
    if (!set || stage !== "strength") return;
    set.querySelector(".axis-strength").value = value;
    nextAxis();
  }

  function backOnAxis() {
    if (stage === "strength") { showAxis(axis); return; }
    if (axis > 0) showAxis(axis - 1);
  }

  function reset() {
    stage = "choice";
    shownAt = performance.now();
    if (axisSets().length) showAxis(0);
    const row = $("strength-row");
    if (row) row.hidden = true;
    const choices = $("choice-row");
    if (choices) choices.classList.remove("chosen");
    applyRaw();
  }

  function applyRaw() {
    const c = card();
    if (c) c.classList.toggle("show-raw", showRaw);
    const toggle = $("raw-toggle");
    if (toggle) {
      toggle.setAttribute("aria-pressed", String(showRaw));
      toggle.firstChild.textContent = showRaw ? "Show formatted " : "Show raw text ";
    }
  }

  function fill(choice) {
    $("choice-input").value = choice;
    $("ms-input").value = Math.round(performance.now() - shownAt);
  }

  function choose(choice) {
    const f = form();
    if (!f || !offered().includes(choice)) return;
    fill(choice);
    if ((choice === "a" || choice === "b") && asksStrength()) {
      stage = "strength";
      $("strength-side").textContent = choice.toUpperCase();
      $("strength-row").hidden = false;
      $("choice-row").classList.add("chosen");
      return;
    }
    f.requestSubmit();
  }

  function chooseStrength(value) {
    const f = form();
    const button = f && f.querySelector(`button[name="strength"][value="${value}"]`);
    if (!button) return;
    $("ms-input").value = Math.round(performance.now() - shownAt);
    // A click, not requestSubmit(button): htmx 2 takes the submitter's name/value only from the
    // button it saw clicked, so requestSubmit(button) would post no strength.
    button.click();
  }

  function click(id) {
    const el = $(id);
    if (el) el.click();
  }

  document.addEventListener("click", (event) => {
    if (axisSets().length && event.target.closest("fieldset.axis")) {
      const on = event.target.closest("button");
      if (!on) return;
      if (on.classList.contains("choice")) chooseOnAxis(on.dataset.choice);
      else if (on.classList.contains("strength")) strengthOnAxis(on.dataset.strength);
      else if (on.classList.contains("strength-cancel") || on.classList.contains("axis-back")) backOnAxis();
      return;
    }
    const button = event.target.closest("button.choice");
    if (button) { choose(button.dataset.choice); return; }
    if (event.target.closest("#strength-cancel")) reset();
    if (event.target.closest("#raw-toggle")) { showRaw = !showRaw; applyRaw(); }
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")) {
      if (event.key === "Escape") target.blur();
      return;
    }
    const openDialog = document.querySelector("dialog[open]");
    if (openDialog) {
      if (event.key === "?" || event.key === "Escape") { openDialog.close(); event.preventDefault(); }
      return;
    }
    const key = event.key;
    if (key === "?") { $("keys").showModal(); event.preventDefault(); return; }
    if (key === "i") { click("show-instructions"); event.preventDefault(); return; }
    if (key === "u") { click("undo-button"); event.preventDefault(); return; }
    if (key === "s") { click("skip-button"); event.preventDefault(); return; }
    if (key === "r") { showRaw = !showRaw; applyRaw(); event.preventDefault(); return; }
    if (axisSets().length) {
      if (key === "Backspace" || (key === "Escape" && stage === "strength")) { backOnAxis(); event.preventDefault(); return; }
      if (stage === "strength" && ["1", "2", "3", "4"].includes(key)) { strengthOnAxis(key); event.preventDefault(); return; }
      if (stage === "choice" && CHOICE_KEYS[key]) { chooseOnAxis(CHOICE_KEYS[key]); event.preventDefault(); }
      return;
    }
    if (stage === "strength") {
      if (key === "Escape") { reset(); event.preventDefault(); return; }
      if (["1", "2", "3", "4"].includes(key)) { chooseStrength(key); event.preventDefault(); }
      return;
    }
    if (CHOICE_KEYS[key]) { choose(CHOICE_KEYS[key]); event.preventDefault(); }
  });

  document.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail.target && event.detail.target.id === "pair") reset();
  });
  document.addEventListener("htmx:oobAfterSwap", () => { if (!form()) reset(); });
  // A socket that opens again (Redis or the server restarted) may have missed a push: look for pairs now.
  document.addEventListener("htmx:wsOpen", (event) => {
    const waiting = event.target.closest("[data-refresh-url]");
    if (!waiting) return;
    if (waiting.dataset.opened === "1") {
      htmx.ajax("GET", waiting.dataset.refreshUrl, { target: "#pair", swap: "outerHTML" });
    }
    waiting.dataset.opened = "1";
  });
  // htmx settles a swapped card's attributes (its class too) after the swap: show the raw text again then.
  document.addEventListener("htmx:afterSettle", applyRaw);
  document.addEventListener("DOMContentLoaded", reset);
})();
