/* The runs list: status, step and losses change in place as runs progress. */
(function () {
  "use strict";
  const table = document.getElementById("runs-table");
  if (!table) return;
  const fmt = (v) => (v === null || v === undefined ? "–" : (+v).toFixed(4));
  const state = document.getElementById("live-state");
  connectLive("/ws/runs/", {
    onState: (s, detail) => { state.textContent = s === "live" ? "live" : s === "reconnecting" ? "reconnecting…" : detail; },
    onMessage: (msg) => {
      if (msg.type !== "run") return;
      const row = table.querySelector('tr[data-run-id="' + msg.id + '"]');
      if (!row) return; // a run started elsewhere: it shows on the next visit
      const badge = row.querySelector('[data-field="status"]');
      badge.className = "badge " + msg.status;
      badge.textContent = msg.status_display;
      row.querySelector('[data-field="step"]').textContent = msg.step + (msg.total_steps ? " / " + msg.total_steps : "");
      row.querySelector('[data-field="last_loss"]').textContent = fmt(msg.last_loss);
      row.querySelector('[data-field="best_val_loss"]').textContent = fmt(msg.best_val_loss);
    },
  });
})();
