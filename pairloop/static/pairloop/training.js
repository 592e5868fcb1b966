// Round page: one small plotly.js chart per metric of each job, drawn from the points stored on the
// Job row (embedded in the page) and extended by the "points" messages of the round's WebSocket.
// htmx's ws extension swaps the HTML fragments; JSON messages are taken here before it sees them.
(function () {
  "use strict";

  var jobs = {}; // job id -> {container, points: [{step, key: value}], divs: {key: div}}

  function slug(key) { return key.replace(/[^A-Za-z0-9]+/g, "-"); }

  function state(jobId) {
    if (!jobs[jobId]) {
      var container = document.getElementById("job-" + jobId + "-charts");
      if (!container) return null;
      jobs[jobId] = { id: jobId, container: container, points: [], divs: {} };
    }
    return jobs[jobId];
  }

  function series(points, key) {
    var x = [], y = [];
    points.forEach(function (p) { if (key in p) { x.push(p.step); y.push(p[key]); } });
    return { x: x, y: y };
  }

  function chartFor(job, key) {
    if (job.divs[key]) return job.divs[key];
    var div = document.createElement("div");
    div.className = "chart-small";
    div.id = "job-" + job.id + "-chart-" + slug(key);
    div.dataset.key = key;
    div.dataset.points = "0";
    job.container.appendChild(div);
    job.divs[key] = div;
    return div;
  }

  function plot(div, key, s) {
    if (!window.Plotly) { div.textContent = key + ": " + s.y.slice(-1)[0]; return; }
    Plotly.react(div, [{ x: s.x, y: s.y, mode: "lines+markers", line: { width: 2 }, marker: { size: 4 }, name: key }], {
      title: { text: key, font: { size: 13 } }, height: 190, margin: { l: 48, r: 12, t: 30, b: 32 },
      xaxis: { title: { text: "step" } }, showlegend: false
    }, { displayModeBar: false, responsive: true });
  }

  function keysOf(points) {
    var keys = [];
    points.forEach(function (p) { Object.keys(p).forEach(function (k) { if (k !== "step" && keys.indexOf(k) < 0) keys.push(k); }); });
    return keys;
  }

  function redraw(job) {
    keysOf(job.points).forEach(function (key) {
      var div = chartFor(job, key), s = series(job.points, key);
      plot(div, key, s);
      div.dataset.points = s.x.length;
    });
    job.container.dataset.points = job.points.length;
  }

  function extend(job, added) {
    keysOf(added).forEach(function (key) {
      var div = chartFor(job, key), s = series(added, key);
      if (window.Plotly && div.data) Plotly.extendTraces(div, { x: [s.x], y: [s.y] }, [0]);
      else plot(div, key, series(job.points, key));
      div.dataset.points = series(job.points, key).x.length;
    });
    job.container.dataset.points = job.points.length;
  }

  // The server sends its latest points; from their first step on, the server's are the truth (a
  // resumed job reports steps again from its checkpoint). Append what is new; redraw on a rewind.
  function merge(jobId, incoming) {
    var job = state(jobId);
    if (!job || !incoming || !incoming.length) return;
    var first = incoming[0].step;
    var kept = job.points.filter(function (p) { return p.step < first; });
    var ours = job.points.slice(kept.length);
    var same = ours.length <= incoming.length && ours.every(function (p, i) {
      return JSON.stringify(p) === JSON.stringify(incoming[i]);
    });
    if (same) {
      var added = incoming.slice(ours.length);
      if (!added.length) return;
      job.points = job.points.concat(added);
      extend(job, added);
    } else {
      job.points = kept.concat(incoming);
      redraw(job);
    }
  }

  function scrollLogs() {
    document.querySelectorAll("pre.log").forEach(function (el) { el.scrollTop = el.scrollHeight; });
  }

  // The evaluation across rounds: per judge and pair of roles, the win rate (95% interval as error bars) and
  // the length-controlled win rate (dashed), by round.
  var ROLE_NAMES = { "new": "this round", "previous": "previous round", "sft": "SFT" };

  function evaluationChart() {
    var div = document.getElementById("evaluation-chart");
    var script = document.getElementById("evaluation-rounds");
    if (!div || !script || !window.Plotly) return;
    var rounds = JSON.parse(script.textContent), lines = {};
    rounds.forEach(function (r) {
      r.table.forEach(function (row) {
        var key = row.judge + ": " + ROLE_NAMES[row.a] + " vs " + ROLE_NAMES[row.b];
        var line = lines[key] || (lines[key] = { x: [], y: [], lc: [], plus: [], minus: [] });
        line.x.push(r.round); line.y.push(row.win_rate); line.lc.push(row.lc_win_rate);
        line.plus.push(row.ci_high === null ? 0 : row.ci_high - row.win_rate);
        line.minus.push(row.ci_low === null ? 0 : row.win_rate - row.ci_low);
      });
    });
    var traces = [];
    Object.keys(lines).forEach(function (key) {
      var l = lines[key];
      traces.push({ x: l.x, y: l.y, name: key, mode: "lines+markers",
                    error_y: { type: "data", symmetric: false, array: l.plus, arrayminus: l.minus } });
      traces.push({ x: l.x, y: l.lc, name: key + " (length-controlled)", mode: "lines", line: { dash: "dash" } });
    });
    Plotly.react(div, traces, {
      title: { text: "win rate by round", font: { size: 13 } }, height: 260, margin: { l: 48, r: 12, t: 30, b: 32 },
      xaxis: { title: { text: "round" }, dtick: 1 }, yaxis: { range: [0, 1] }
    }, { displayModeBar: false, responsive: true });
  }

  function init() {
    evaluationChart();
    document.querySelectorAll(".charts[data-job]").forEach(function (container) {
      var job = state(container.dataset.job);
      var script = container.querySelector('script[type="application/json"]');
      job.points = script ? JSON.parse(script.textContent) : [];
      redraw(job);
    });
    scrollLogs();
  }

  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    var message = event.detail.message;
    if (typeof message !== "string" || message.charAt(0) !== "{") return;
    event.preventDefault(); // JSON is ours, not a fragment for htmx to swap
    var data;
    try { data = JSON.parse(message); } catch (err) { console.error("bad message", err); return; }
    if (data.type === "points") merge(String(data.job), data.points);
  });
  document.addEventListener("htmx:wsAfterMessage", scrollLogs);
  document.addEventListener("htmx:afterSwap", scrollLogs);

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
