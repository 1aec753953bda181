/* Two or more runs, one metric, one chart: each run's points are fetched from its
 * metrics.json and lined up on the union of their steps. */
(function () {
  "use strict";
  const holder = document.getElementById("compare-chart");
  const source = document.getElementById("compare-series");
  if (!holder || !source || !window.uPlot) return;
  const runs = JSON.parse(source.textContent);
  const select = document.getElementById("compare-metric");
  const C = window.StudioCharts;
  let plot = null;

  async function load(metric) {
    const results = await Promise.all(runs.map((r) =>
      fetch(r.url + "?name=" + encodeURIComponent(metric), { credentials: "same-origin" })
        .then((res) => (res.ok ? res.json() : { points: [] }))));
    const steps = Array.from(new Set(results.flatMap((d) => d.points.map((p) => p.step)))).sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const cols = results.map((d) => {
      const col = new Array(steps.length).fill(null);
      for (const p of d.points) if (metric in p.m) col[index.get(p.step)] = p.m[metric];
      return col;
    });
    if (plot) plot.destroy();
    plot = new uPlot({
      width: Math.max(300, holder.clientWidth), height: 360,
      scales: { x: { time: false } },
      series: [{ label: "step" }].concat(runs.map((r, k) => ({
        label: r.name, stroke: C.COLORS[k % C.COLORS.length], width: 1.5, spanGaps: true,
        points: { show: metric.indexOf("val/") === 0 }, value: (u, v) => C.fmt(v),
      }))),
      axes: [{ label: "step" }, { values: (u, vals) => vals.map(C.fmt), size: 60 }],
    }, [steps].concat(cols), holder);
    holder.dataset.points = String(steps.length);
    document.getElementById("compare-title").textContent = metric;
  }
  select.addEventListener("change", () => load(select.value));
  window.addEventListener("resize", () => plot && plot.setSize({ width: Math.max(300, holder.clientWidth), height: 360 }));
  load(select.value);
})();
