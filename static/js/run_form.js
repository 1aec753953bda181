/* The start-a-run form: show the fields of the chosen config source and start point, the
 * preset's numbers, and the size/batch warning as the choice changes. */
(function () {
  "use strict";
  const form = document.getElementById("run-form");
  if (!form) return;
  const ranges = JSON.parse(document.getElementById("batch-ranges").textContent);
  const presets = JSON.parse(document.getElementById("presets").textContent);
  const val = (name) => { const c = form.querySelector('[name="' + name + '"]:checked'); return c ? c.value : (form.elements[name] || {}).value; };

  function update() {
    const source = val("source");
    const vocoder = val("kind") === "vocoder";
    document.getElementById("acoustic-fields").hidden = vocoder;
    document.getElementById("vocoder-fields").hidden = !vocoder;
    document.getElementById("preset-fields").hidden = source !== "preset";
    document.getElementById("preset-summary").hidden = source !== "preset";
    document.getElementById("config-fields").hidden = source !== "config";
    document.getElementById("checkpoint-fields").hidden = val("start") === "scratch";
    const size = form.elements.model_size.value, level = form.elements.optimization_level.value;
    const p = presets[size] && presets[size][level];
    if (p) {
      document.getElementById("preset-summary").textContent =
        "Preset: learning rate " + p.learning_rate + ", batch " + p.batch_size + ", clip " + p.grad_clip_norm +
        ", adaptive weights " + (p.adaptive ? "on" : "off") + ", " + p.steps + " steps.";
    }
    let batch = parseInt(form.elements.batch_size.value, 10);
    if (!batch && source === "preset" && p) batch = p.batch_size;
    let warning = "";
    if (!vocoder && source === "preset" && ranges[size] && batch) {
      const r = ranges[size];
      if (batch < r[0] || batch > r[1]) warning = "⚠ batch size " + batch + " is outside the recommended " + r[0] + "-" + r[1] + " for the '" + size + "' model";
    }
    document.getElementById("batch-warning").textContent = warning;
  }
  form.addEventListener("change", update);
  form.addEventListener("input", update);
  update();
})();
