/* The run page: history on connect, then live updates, drawn without reloading. */
(function () {
  "use strict";
  const page = document.getElementById("run-page");
  if (!page || !window.uPlot) return;
  const C = window.StudioCharts;
  const store = new C.MetricStore();
  const $ = (id) => document.getElementById(id);

  const CHARTS = {
    "chart-loss": (n) => n === "loss/total" || n === "val/total",
    "chart-components": (n) => n.indexOf("loss/") === 0 && n !== "loss/total",
    "chart-val": (n) => n.indexOf("val/") === 0 && n !== "val/total",
    // Checkpoint scores (studio.runs.tasks.SCORE_METRICS), the 0-1 ones together.
    "chart-quality": (n) => ["score/quality", "score/secs_seen", "score/normalised_secs_unseen",
      "score/wer_output", "score/speaker_secs"].indexOf(n) >= 0,
    "chart-mcd": (n) => n === "score/mcd_db",
    "chart-weights": (n) => n.indexOf("weight/") === 0,
    "chart-grad": (n) => n === "grad_norm",
    "chart-lr": (n) => n === "lr",
    "chart-throughput": (n) => n === "samples_per_s",
    "chart-datawait": (n) => n === "data_wait_share",
  };
  const charts = Object.keys(CHARTS).map((id) => new C.MetricChart($(id), store, CHARTS[id]));
  let frame = null;
  function redraw() {
    if (frame) return;
    frame = requestAnimationFrame(() => { frame = null; charts.forEach((c) => c.render()); });
  }
  if (window.ResizeObserver) {
    new ResizeObserver(() => charts.forEach((c) => c.resize())).observe($("charts"));
  }

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k]; else if (k === "cls") e.className = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach((c) => c && e.appendChild(c));
    return e;
  }

  function setStatus(s) {
    const badge = $("run-status");
    badge.className = "badge " + s.status;
    badge.textContent = s.status_display;
    $("run-step").textContent = s.step;
    $("run-total").textContent = s.total_steps;
    $("run-attempts").textContent = s.attempts;
    $("run-progress").style.width = (s.total_steps ? Math.min(100, 100 * s.step / s.total_steps) : 0) + "%";
    if (s.last_loss !== null) $("run-last-loss").textContent = C.fmt(s.last_loss);
    if (s.best_val_loss !== null) $("run-best").textContent = C.fmt(s.best_val_loss);
    $("run-error").hidden = !s.error;
    $("run-error").textContent = s.error || "";
    $("cancel-form").hidden = !s.is_active || s.cancel_requested;
    $("resume-form").hidden = !s.can_resume;
    page.dataset.status = s.status;
  }

  function progressFromPoints(points) {
    if (!points.length) return;
    const last = points[points.length - 1];
    $("run-step").textContent = Math.max(+$("run-step").textContent || 0, last.step);
    const total = +$("run-total").textContent || 0;
    if (total) $("run-progress").style.width = Math.min(100, 100 * (+$("run-step").textContent) / total) + "%";
    const loss = store.lastValue("loss/total");
    if (loss !== null) $("run-last-loss").textContent = C.fmt(loss);
    const best = store.lastValue("val/best_mel");
    if (best !== null) $("run-best").textContent = C.fmt(best);
  }

  const seenEvents = new Set();
  function addEvents(events, replace) {
    const body = $("events");
    if (replace) { body.textContent = ""; seenEvents.clear(); }
    for (const e of events) {
      const key = e.id !== null ? e.id : e.step + e.kind + e.message;
      if (seenEvents.has(key)) continue;
      seenEvents.add(key);
      if (e.kind === "diagnosis") { addDiagnosis(e); continue; }
      const row = el("tr", { cls: "event " + e.kind }, [
        el("td", { text: String(e.step) }),
        el("td", {}, [el("span", { cls: "badge", text: e.kind })]),
        el("td", { text: e.message }),
      ]);
      body.insertBefore(row, body.firstChild);
    }
    while (body.children.length > 300) body.removeChild(body.lastChild);
  }

  function addDiagnosis(e) {
    const d = e.data || {};
    const list = $("diagnoses");
    const old = list.querySelector('[data-code="' + CSS.escape(d.code || "") + '"]');
    const item = el("li", { cls: "diagnosis " + (d.severity || ""), "data-code": d.code || "" }, [
      el("strong", { text: d.title || e.message }), document.createTextNode(" "),
      el("span", { cls: "muted small", text: "at step " + e.step }),
      el("div", { text: d.evidence || "" }),
      el("ul", { cls: "small" }, (d.advice || []).map((a) => el("li", { text: a }))),
    ]);
    if (old) list.replaceChild(item, old); else list.appendChild(item);
    $("no-diagnoses").hidden = true;
  }

  function addSamples(samples, replace) {
    const box = $("samples");
    if (replace) box.textContent = "";
    // Newest first: samples arrive oldest first within a message, so each goes to the top.
    const sorted = samples.slice().sort((a, b) => a.step - b.step);
    for (const s of sorted) {
      if (box.querySelector('[data-sample-id="' + s.id + '"]')) continue;
      const fig = el("figure", { cls: "sample", "data-sample-id": String(s.id), "data-step": String(s.step) }, [
        el("figcaption", {}, [el("strong", { text: "step " + s.step }), document.createTextNode(" · " + s.speaker + " · "),
          el("span", { cls: "muted", text: s.text.length > 120 ? s.text.slice(0, 119) + "…" : s.text })]),
        el("audio", { controls: "", preload: "none", src: s.audio_url }),
        s.mel_url ? el("img", { cls: "picture", loading: "lazy", alt: "mel spectrogram, step " + s.step, src: s.mel_url }) : null,
      ]);
      box.insertBefore(fig, box.firstChild);
    }
    while (box.children.length > 40) box.removeChild(box.lastChild);
    $("no-samples").hidden = box.children.length > 0;
  }

  // Mirrors templates/runs/_scores.html.
  function scoreCells(s) {
    const num = (v, digits, unit) => (v === null || v === undefined ? "–" : v.toFixed(digits) + (unit || ""));
    const pct = (v) => (v === null || v === undefined ? "–" : Math.round(100 * v) + " %");
    const line = (text, title) => el("span", { cls: "score", text: text, title: title });
    if (s.pending) return [el("span", { cls: "muted", text: "scoring…" })];
    if (s.state === "error") return [el("span", { cls: "error small", text: "Not scored: " + s.error })];
    if (s.state === "done") {
      const skipped = Object.keys(s.skipped || {}).map((name) =>
        el("span", { cls: "muted small skipped", "data-score": name, text: name + " skipped: " + s.skipped[name] }));
      return [
        line("Q " + num(s.quality, 3), page.dataset.qualityFormula || ""),
        line("SECS " + num(s.secs_seen, 2), "Speaker similarity of the output and the real recording; two real clips of one speaker: " +
          num(s.secs_real_same_speaker, 2) + ", of two speakers: " + num(s.secs_real_different_speakers, 2)),
        line("unseen " + num(s.normalised_secs_unseen, 2), "Voices it never heard (" + (s.unseen_speakers || []).join(", ") +
          "), cloned from 3 clips and compared with their other clips: SECS " + num(s.secs_unseen, 2) + ", ceiling " +
          num(s.secs_unseen_ceiling, 2) + ", floor " + num(s.secs_unseen_floor, 2) + "; normalised (SECS − floor) / (ceiling − floor)"),
        line("MCD " + num(s.mcd_db, 2, " dB"), "Mel cepstral distortion against the ground truth, DTW-aligned"),
        line("WER " + pct(s.wer_output) + " vs " + pct(s.wer_ground_truth) + " GT", "Word error rate of pocketsphinx on the output, and on the ground truth"),
        line("MOS " + num(s.dnsmos_ovrl, 2) + " vs " + num(s.dnsmos_ovrl_ground_truth, 2) + " GT",
          "DNSMOS P.835 overall: predicted naturalness (1-5) of the output, and of the ground truth's own mel through the same vocoder"),
        line("RTF " + num(s.rtf, 3), "Synthesis seconds per second of audio (CPU, one thread)"),
        el("span", { cls: "muted small", text: "on " + s.n_utterances + " utterance" + (s.n_utterances === 1 ? "" : "s") +
          (s.vocoder ? ", vocoder " + s.vocoder : "") }),
      ].concat(skipped);
    }
    if (s.state === "queued") return [el("span", { cls: "muted small", text: "queued, but no worker took it" })];
    return [el("span", { cls: "muted", text: "–" })];
  }

  function scoreForm(c, token) {
    return el("form", { method: "post", action: c.score_url, cls: "inline score-form" }, [
      el("input", { type: "hidden", name: "csrfmiddlewaretoken", value: token }),
      el("button", { cls: "secondary small", type: "submit", text: "Score" }),
    ]);
  }

  function setCheckpoints(list) {
    const body = $("checkpoints");
    const token = body.dataset.csrfToken;
    body.textContent = "";
    for (const c of list) {
      const first = el("td", { text: String(c.step) });
      if (c.is_best) { first.appendChild(document.createTextNode(" ")); first.appendChild(el("span", { cls: "badge succeeded", text: "best" })); }
      const scores = c.scores || {};
      body.appendChild(el("tr", { "data-checkpoint-id": String(c.id) }, [
        first,
        el("td", { text: c.val_loss === null ? "–" : C.fmt(c.val_loss) }),
        el("td", { cls: "scores" }, scoreCells(scores)),
        el("td", {}, [el("a", { href: c.download_url, text: "Download" }), document.createTextNode(" · "),
          el("a", { href: c.synthesize_url, text: "Synthesize" }), document.createTextNode(" "),
          scores.pending || !c.score_url ? null : scoreForm(c, token)]),
      ]));
    }
  }

  function onMessage(msg) {
    if (msg.type === "history" || msg.type === "gap") {
      const full = msg.type === "history";
      store.add(msg.points);
      setStatus(msg.run);
      addEvents(msg.events, full);
      addSamples(msg.samples, full);
      setCheckpoints(msg.checkpoints);
      progressFromPoints(msg.points);
      if (full && msg.downsampled) page.dataset.stride = msg.stride;
    } else if (msg.type === "update") {
      store.add(msg.points || []);
      progressFromPoints(msg.points || []);
      if (msg.events) addEvents(msg.events, false);
      if (msg.samples) addSamples(msg.samples, false);
      if (msg.checkpoints) setCheckpoints(msg.checkpoints);
      if (msg.status) setStatus(msg.status);
    }
    redraw();
  }

  const state = $("conn-state");
  function onState(s, detail) {
    state.className = "conn " + s;
    state.textContent = s === "live" ? "live" : s === "reconnecting" ? "reconnecting in " + detail + " s…" : detail;
  }

  window.studioRun = {
    store: store,
    socket: connectLive(page.dataset.wsPath, {
      onMessage: onMessage, onState: onState, since: () => store.last(),
    }),
  };
})();
