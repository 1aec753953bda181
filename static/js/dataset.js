// The dataset page: live progress while a step runs, and the delete confirmation.
(function () {
  // Poll the small JSON endpoint while the dataset is busy; reload once the step ends so the
  // tables and pictures show the finished result.
  var card = document.getElementById("progress-card");
  if (!card || card.dataset.busy !== "1") return;
  var url = card.dataset.url;
  function eta(seconds) {
    if (seconds === null) return "";
    if (seconds < 90) return "about " + seconds + " s left";
    return "about " + Math.round(seconds / 60) + " min left";
  }
  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) {
        if (!d) return setTimeout(tick, 5000);
        if (!d.busy) { window.location.reload(); return; }
        var pct = Math.round(d.progress * 100);
        document.getElementById("progress-bar").style.width = pct + "%";
        card.querySelector("[role=progressbar]").setAttribute("aria-valuenow", pct);
        document.getElementById("progress-percent").textContent = pct + "%";
        document.getElementById("progress-eta").textContent = eta(d.eta_seconds);
        document.getElementById("progress-message").textContent = d.message;
        document.getElementById("status-badge").textContent = d.status_display;
        document.getElementById("status-badge").className = "badge " + d.status;
        document.getElementById("stat-utterances").textContent = d.utterances;
        document.getElementById("stat-speakers").textContent = d.speakers;
        document.getElementById("stat-hours").textContent = d.hours.toFixed(2);
        setTimeout(tick, 1500);
      })
      .catch(function () { setTimeout(tick, 5000); });
  }
  setTimeout(tick, 1000);
})();

// Forms that ask before they act (no inline handlers: the Content-Security-Policy forbids them).
document.querySelectorAll("form[data-confirm]").forEach(function (form) {
  form.addEventListener("submit", function (event) {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
});
