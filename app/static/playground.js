// The playground: submit a comparison, follow each variant's job by Server-Sent Events (read
// with fetch, so an API key can be sent), then show the images and numbers side by side.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];

function headers(json) {
  const h = {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = body.error ? body.error.message : response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  try {
    models = (await api("/v1/models")).data;
  } catch (error) {
    showError(`cannot list the models (${error.message}); an API key may be needed`);
    return;
  }
  showError("");
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  showModel();
}

function showModel() {
  const model = models.find((m) => m.id === $("model").value);
  if (!model) return;
  const boxes = model.variants.map((v) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = v.id;
    box.checked = true;
    box.name = "variant";
    label.append(box, ` ${v.id}`);
    return label;
  });
  const legend = document.createElement("legend");
  legend.textContent = "Variants";
  $("variants").replaceChildren(legend, ...boxes);
  $("steps").value = model.default_steps;
  $("steps").max = model.max_steps;
  const can = model.capabilities;
  const own = new Option(`its own (${can.default_scheduler || "folder's"})`, "");
  $("scheduler").replaceChildren(own, ...can.schedulers.map((s) => new Option(s, s)));
  $("negative-label").hidden = !can.negative_prompt;
  const adapters = model.adapters || [];
  $("lora").replaceChildren(new Option("none", ""), ...adapters.map((a) => new Option(a.name, a.name)));
  $("lora-label").hidden = $("lora-scale-label").hidden = adapters.length === 0;
  $("previews").max = can.max_partial_images;
  $("image").disabled = !can.edits;
  $("hint").textContent = model.classes
    ? `${model.id} is class-conditional: the prompt names a class, e.g. ${model.classes.slice(0, 4).join(", ")}`
    : `${model.id} is text-to-image, e.g. "a red seven on a black background"`;
  if (!$("prompt").value) $("prompt").value = model.classes ? "seven" : "a red seven on a black background";
}

function card(row) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.variant = row.variant;
  const title = document.createElement("h2");
  title.textContent = row.variant + (row.quantized ? "" : " (reference)");
  const img = document.createElement("img");
  img.alt = `${row.variant} image`;
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  const step = document.createElement("p");
  step.className = "step";
  const numbers = document.createElement("dl");
  const parameters = document.createElement("details");
  parameters.className = "parameters";
  parameters.hidden = true;
  div.append(title, img, bar, step, numbers, parameters);
  return div;
}

// A preview (the variant's prediction of the clean image at a step) shown in its card.
async function showPreview(div, event) {
  const response = await fetch(event.url, { headers: headers(false) });
  if (!response.ok) return;
  const img = div.querySelector("img");
  img.src = URL.createObjectURL(await response.blob());
  img.dataset.preview = String(event.index);
  div.querySelector(".step").textContent = `preview ${event.index + 1} at step ${event.step}`;
}

// Reads the job's event stream and updates the card's progress bar and preview until the job
// ends.
async function follow(jobId, div) {
  const bar = div.querySelector("progress");
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers(false) });
  if (!response.ok) throw new Error(`events of ${jobId}: ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").find((line) => line.startsWith("data:"));
      if (!data) continue;
      const event = JSON.parse(data.slice(5));
      if (typeof event.progress === "number") bar.value = event.progress;
      if (event.url) await showPreview(div, event);
      if (["completed", "failed", "cancelled"].includes(event.status)) return;
    }
  }
}

const FORMATS = {
  latency_s: ["latency", (v) => `${(v * 1000).toFixed(0)} ms`],
  step_ms_median: ["per step", (v) => `${v.toFixed(1)} ms`],
  peak_memory_bytes: ["peak memory", (v) => `${(v / 2 ** 20).toFixed(0)} MiB`],
  denoiser_weight_bytes: ["denoiser weights", (v) => `${(v / 2 ** 20).toFixed(2)} MiB`],
  psnr_db: ["PSNR vs FP", (v) => `${v.toFixed(2)} dB`],
  ssim: ["SSIM vs FP", (v) => v.toFixed(3)],
  sqnr_latent_db: ["SQNR latents", (v) => `${v.toFixed(2)} dB`],
};

// The parameters the image carries (what made it: enough to make it again).
function showParameters(div, parameters) {
  const box = div.querySelector(".parameters");
  box.hidden = !parameters;
  if (!parameters) return;
  const summary = document.createElement("summary");
  summary.textContent = "parameters";
  const list = document.createElement("dl");
  for (const [key, value] of Object.entries(parameters)) {
    if (value === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    dd.dataset.parameter = key;
    list.append(dt, dd);
  }
  box.replaceChildren(summary, list);
}

function fill(div, row) {
  if (row.b64_png) {
    const img = div.querySelector("img");
    img.src = `data:image/png;base64,${row.b64_png}`;
    delete img.dataset.preview;
    div.querySelector(".step").textContent = "";
  }
  showParameters(div, row.parameters);
  div.querySelector("progress").value = row.status === "completed" ? 100 : row.progress;
  const items = [];
  for (const [key, [name, format]] of Object.entries(FORMATS)) {
    if (row[key] === null || row[key] === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = format(row[key]);
    dd.dataset.metric = key;
    items.push(dt, dd);
  }
  if (row.error) {
    const dd = document.createElement("dd");
    dd.textContent = row.error;
    items.push(document.createElement("dt"), dd);
  }
  div.querySelector("dl").replaceChildren(...items);
}

async function compare(event) {
  event.preventDefault();
  showError("");
  const variants = [...document.querySelectorAll("#variants input:checked")].map((b) => b.value);
  const body = { model: $("model").value, prompt: $("prompt").value, variants };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("steps").value !== "") body.steps = Number($("steps").value);
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if (!$("negative-label").hidden && $("negative-prompt").value.trim()) {
    body.negative_prompt = $("negative-prompt").value;
  }
  if (!$("lora-label").hidden && $("lora").value) {
    body.lora = [{ name: $("lora").value, scale: Number($("lora-scale").value) }];
  }
  if ($("previews").value !== "") body.partial_images = Number($("previews").value);
  const file = $("image").files[0];
  $("run").disabled = true;
  try {
    if (file && !$("image").disabled) {
      body.image = await dataUrl(file);
      body.strength = Number($("strength").value);
    }
    const started = await api("/v1/comparisons", { method: "POST", body: JSON.stringify(body) });
    const cards = started.variants.map(card);
    $("results").replaceChildren(...cards);
    await Promise.all(started.variants.map((row, i) => follow(row.job_id, cards[i])));
    const result = await api(`/v1/comparisons/${started.id}`);
    result.variants.forEach((row, i) => fill(cards[i], row));
    $("results").dataset.status = result.status;
  } catch (error) {
    showError(error.message);
  } finally {
    $("run").disabled = false;
  }
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

$("model").addEventListener("change", showModel);
// an adapter's own scale, as the registry sets it, when it is chosen
$("lora").addEventListener("change", () => {
  const model = models.find((m) => m.id === $("model").value);
  const adapter = (model?.adapters || []).find((a) => a.name === $("lora").value);
  if (adapter) $("lora-scale").value = adapter.scale;
});
$("api-key").addEventListener("change", loadModels);
$("compare-form").addEventListener("submit", compare);
loadModels();
