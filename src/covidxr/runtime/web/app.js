// covidxr's page: send the chosen X-ray to /api/explain, show the answer, its certainty and the heat map.
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file");
const dropzone = $("dropzone");
const statusLine = $("status");
const preview = $("preview");
const heatmap = $("heatmap");
const opacity = $("opacity");

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showBars(probabilities, label) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "bar" + (name === label ? " top" : "");
    row.setAttribute("role", "meter");
    row.setAttribute("aria-label", name);
    row.setAttribute("aria-valuemin", "0");
    row.setAttribute("aria-valuemax", "100");
    row.setAttribute("aria-valuenow", (100 * p).toFixed(1));
    const title = document.createElement("span");
    title.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(title, track, value);
    bars.append(row);
  }
}

// Nothing of an earlier answer may stay on screen: before each upload and after a failed one.
function clearResult() {
  $("answer").hidden = true;
  $("ood").hidden = true;
  $("viewer").hidden = true;
  $("heat-controls").hidden = true;
  $("empty").hidden = false;
  $("label").textContent = "";
  $("covid-note").textContent = "";
  $("site-calibration").textContent = "";
  $("site-calibration").hidden = true;
  for (const id of ["decision-note", "weakness"]) {
    $(id).textContent = "";
    $(id).hidden = true;
  }
  $("seen-badge").hidden = true;
  $("empty-map").hidden = true;
  $("bars").replaceChildren();
  for (const image of [preview, heatmap]) {
    image.hidden = true;
    image.removeAttribute("src");
  }
  opacity.disabled = true;
}

function showResult(result) {
  $("empty").hidden = true;
  preview.src = "data:image/png;base64," + result.image.preview_png;
  preview.hidden = false;
  $("viewer").hidden = false;
  $("model-id").textContent = result.model;
  if (result.label === null) {
    // No diagnosis: the reason instead of a class, bars and heat map.
    const reason = result.no_answer_reason || "not a chest X-ray like the training images";
    $("ood-reason").textContent = reason.charAt(0).toUpperCase() + reason.slice(1);
    $("ood").hidden = false;
    document.body.dataset.state = "done";
    return;
  }
  if (result.explanation && result.explanation.empty) {
    // An all-zero map drawn under a "weak → strong" legend would read as an even spread of attention.
    $("empty-map").hidden = false;
  } else if (result.explanation) {
    heatmap.src = "data:image/png;base64," + result.explanation.heatmap_png;
    heatmap.hidden = false;
    $("heat-controls").hidden = false;
    opacity.disabled = false;
  }
  $("label").textContent = result.label;
  $("seen-badge").hidden = result.seen_in_training !== true;
  if (result.decision_note) {
    // The label goes against the larger bar: say why, in words, right under it.
    $("decision-note").textContent = result.decision_note + ".";
    $("decision-note").hidden = false;
  }
  if (result.weakness) {
    // The model's held-out weakness beside every answer, not only in the footer.
    const weakness = result.weakness.charAt(0).toUpperCase() + result.weakness.slice(1);
    $("weakness").textContent = `Weakness: ${weakness}.`;
    $("weakness").hidden = false;
  }
  const covid = result.probabilities["COVID-19"];
  const threshold = result.covid_threshold === null ? null : (100 * result.covid_threshold).toFixed(1);
  // With a site file (serve --site) the threshold is the site's, and its local figures replace the model's.
  const site = result.site_calibration;
  const point = site
    ? `this site's operating threshold (${threshold}%)`
    : `the model's operating threshold (${threshold}%, chosen on validation data)`;
  // A foreign model whose spec sets no threshold answers with its most probable class.
  $("covid-note").textContent = threshold === null
    ? `COVID-19 probability ${(100 * covid).toFixed(1)}%; this model has no operating threshold, so the answer ` +
      "is its most probable class."
    : result.covid_positive
    ? `COVID-19 probability ${(100 * covid).toFixed(1)}% reaches ${point}, so the answer is COVID-19.`
    : `COVID-19 probability ${(100 * covid).toFixed(1)}% is below ${point}, so the answer is the more probable ` +
      "of the other classes.";
  if (site) {
    $("site-calibration").textContent = `Threshold ${site}.`;
    $("site-calibration").hidden = false;
  }
  showBars(result.probabilities, result.label);
  $("answer").hidden = false;
  document.body.dataset.state = "done";
}

async function analyse(file) {
  if (!file) return;
  document.body.dataset.state = "busy";
  clearResult();
  // Show the file at once where the browser can (not DICOM or TIFF); the server's preview replaces it.
  if (/^image\/(png|jpeg|bmp|gif|webp)$/.test(file.type)) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    $("viewer").hidden = false;
    $("empty").hidden = true;
  }
  setStatus(`Analysing ${file.name} …`);
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("/api/explain", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      setStatus(`${file.name}: ${body.error || response.statusText}${retry ? ` (retry in ${retry} s)` : ""}`, true);
      clearResult();
      document.body.dataset.state = "error";
      return;
    }
    setStatus(`${file.name}: done.`);
    showResult(body);
  } catch (error) {
    setStatus(`The server could not be reached (${error.message}).`, true);
    clearResult();
    document.body.dataset.state = "error";
  }
}

// Name the model before any upload (the card link beside it is always there).
fetch("/healthz")
  .then((response) => response.json())
  .then((health) => { $("model-id").textContent = health.model; })
  .catch(() => {});

fileInput.addEventListener("change", () => analyse(fileInput.files[0]));
for (const name of ["dragenter", "dragover"]) {
  dropzone.addEventListener(name, (event) => {
    event.preventDefault();
    dropzone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  dropzone.addEventListener(name, () => dropzone.classList.remove("dragging"));
}
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  analyse(event.dataTransfer.files[0]);
});
opacity.addEventListener("input", () => {
  heatmap.style.opacity = String(opacity.value / 100);
  $("opacity-value").textContent = `${opacity.value}%`;
});
