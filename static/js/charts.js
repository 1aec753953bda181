/* Metric series for uPlot: a column store keyed by step, and charts that pick their series by
 * name. Points may arrive twice (history + live) or out of order (a gap filled after a
 * reconnect): a step already present is overwritten, a missing one inserted in order. */
(function () {
  "use strict";
  const COLORS = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777", "#475569"];
  const MAX_STEPS = 20000; // beyond this the older half is thinned, so a week-long tab stays light

  function MetricStore() { this.steps = []; this.cols = new Map(); this.version = 0; }
  MetricStore.prototype.indexOf = function (step) {
    let lo = 0, hi = this.steps.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (this.steps[mid] < step) lo = mid + 1; else hi = mid; }
    return lo;
  };
  MetricStore.prototype.add = function (points) {
    for (const p of points) {
      let i = this.steps.length;
      if (i === 0 || p.step > this.steps[i - 1]) {
        this.steps.push(p.step);
        for (const col of this.cols.values()) col.push(null);
      } else {
        i = this.indexOf(p.step);
        if (this.steps[i] !== p.step) {
          this.steps.splice(i, 0, p.step);
          for (const col of this.cols.values()) col.splice(i, 0, null);
        }
      }
      for (const name in p.m) {
        let col = this.cols.get(name);
        if (!col) { col = new Array(this.steps.length).fill(null); this.cols.set(name, col); }
        col[i] = p.m[name];
      }
    }
    if (this.steps.length > MAX_STEPS) this.thin();
    if (points.length) this.version += 1;
  };
  MetricStore.prototype.thin = function () {
    const half = this.steps.length >> 1;
    const keep = (i) => i >= half || i % 2 === 0;
    this.steps = this.steps.filter((_, i) => keep(i));
    for (const [name, col] of this.cols) this.cols.set(name, col.filter((_, i) => keep(i)));
  };
  MetricStore.prototype.last = function () { return this.steps.length ? this.steps[this.steps.length - 1] : null; };
  MetricStore.prototype.names = function () { return Array.from(this.cols.keys()).sort(); };
  MetricStore.prototype.lastValue = function (name) {
    const col = this.cols.get(name);
    if (!col) return null;
    for (let i = col.length - 1; i >= 0; i--) if (col[i] !== null) return col[i];
    return null;
  };

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : (+v.toPrecision(4)).toString();
  }

  /* One uPlot in `el` showing the store's columns whose names satisfy `match`. */
  function MetricChart(el, store, match, opts) {
    this.el = el; this.store = store; this.match = match; this.opts = opts || {};
    this.names = []; this.plot = null; this.version = -1;
  }
  MetricChart.prototype.size = function () {
    return { width: Math.max(200, this.el.clientWidth || 400), height: this.opts.height || 200 };
  };
  MetricChart.prototype.build = function () {
    if (this.plot) this.plot.destroy();
    const series = [{ label: "step" }].concat(this.names.map((name, k) => ({
      label: name, stroke: COLORS[k % COLORS.length], width: 1.5, spanGaps: true,
      points: { show: name.indexOf("val/") === 0 || name.indexOf("score/") === 0 }, // sparse series value: (u, v) => fmt(v),
    })));
    const s = this.size();
    this.plot = new uPlot({
      width: s.width, height: s.height, series: series,
      scales: { x: { time: false }, y: this.opts.log ? { distr: 3 } : {} },
      axes: [{ label: "step" }, { values: (u, vals) => vals.map(fmt), size: 60 }],
      legend: { live: true },
    }, this.data(), this.el);
  };
  MetricChart.prototype.data = function () {
    return [this.store.steps].concat(this.names.map((n) => this.store.cols.get(n)));
  };
  MetricChart.prototype.render = function () {
    if (this.version === this.store.version && this.plot) return;
    this.version = this.store.version;
    const names = this.store.names().filter(this.match);
    if (!names.length) return;
    if (names.join("|") !== this.names.join("|") || !this.plot) { this.names = names; this.build(); }
    else this.plot.setData(this.data());
    const first = this.store.cols.get(this.names[0]);
    let n = 0;
    for (const v of first) if (v !== null) n++;
    this.el.dataset.points = String(n);
  };
  MetricChart.prototype.resize = function () { if (this.plot) this.plot.setSize(this.size()); };

  window.StudioCharts = { MetricStore: MetricStore, MetricChart: MetricChart, fmt: fmt, COLORS: COLORS };
})();
