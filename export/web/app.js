// Draws faces from a distgan ONNX generator: input z [batch, z_dim] float32, output either
// float32 [batch, C, H, W] in [-1, 1] or uint8 [batch, H, W, C] (models exported with --uint8),
// C = 3 (RGB) or 1 (grayscale). Each face's z comes from its seed (latents.js), the same z as
// `python -m export generate --seeds`: ?seeds=3,7 (or the seeds field) shows those faces again.
// A conditional model (metadata "conditioning" and "classes") has a second input, `label`: int64
// class indices [batch] from the class picker, or float32 multi-hot attributes [batch, K] from
// its checkboxes; ?class=7 (?class=Smiling,Male) picks them, as `generate --class`.
"use strict";

const MAX_FACES = 64;
const NEW_FACES = 16;
const CANVAS_SIZE = 512; // target width; faces are scaled by a whole factor, pixels stay sharp
const params = new URLSearchParams(location.search);
const modelUrl = params.get("model") || "model.onnx";
const canvas = document.getElementById("faces");
const status = document.getElementById("status");
const newButton = document.getElementById("new");
const seedsField = document.getElementById("seeds");
const psiField = document.getElementById("psi");
const walk = document.getElementById("walk");
const classSelect = document.getElementById("class");
const attributeBoxes = document.getElementById("attributes");
const { latents, parseSeeds, MAX_SEED } = window.distganLatents;
const state = {
  session: null, zDim: 0, zDistribution: "normal", seeds: [], walkSeeds: [], psi: 1,
  from: null, to: null, renders: 0, conditioning: "none", classes: [], pickerNote: "",
};
window.distgan = state; // read by the browser test

function randomSeeds(count, avoid = []) {
  const seeds = new Set();
  while (seeds.size < count) {
    const seed = Math.floor(Math.random() * 100000); // short seeds: easy to read and type
    if (!avoid.includes(seed)) seeds.add(seed);
  }
  return [...seeds];
}

function readVarint(bytes, at) {
  let value = 0, scale = 1, byte;
  do {
    byte = bytes[at.offset++];
    value += (byte & 0x7f) * scale; // arithmetic, not shifts: lengths can pass 2**31
    scale *= 128;
  } while (byte & 0x80);
  return value;
}

function protobufFields(bytes, onField) {
  // Calls onField(number, bytes) for each length-delimited field of one protobuf message.
  const at = { offset: 0 };
  while (at.offset < bytes.length) {
    const tag = readVarint(bytes, at);
    const wire = tag % 8;
    if (wire === 0) readVarint(bytes, at);
    else if (wire === 1) at.offset += 8;
    else if (wire === 5) at.offset += 4;
    else if (wire === 2) {
      const length = readVarint(bytes, at);
      onField(Math.floor(tag / 8), bytes.subarray(at.offset, at.offset + length));
      at.offset += length;
    } else throw new Error(`unexpected protobuf wire type ${wire}`);
  }
}

function modelMetadata(bytes) {
  // ModelProto.metadata_props (field 14: key 1, value 2): onnxruntime-web does not expose them.
  const metadata = {};
  const text = new TextDecoder();
  protobufFields(bytes, (number, entry) => {
    if (number !== 14) return;
    const pair = {};
    protobufFields(entry, (field, value) => { pair[field] = text.decode(value); });
    metadata[pair[1]] = pair[2];
  });
  return metadata;
}

function slerp(a, b, t, zDim) {
  // Each face's latent along the great circle, as `python -m export generate` does.
  const out = new Float32Array(a.length);
  for (let f = 0; f < a.length / zDim; f++) {
    let dot = 0, na = 0, nb = 0;
    for (let i = f * zDim; i < (f + 1) * zDim; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
    const omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.sqrt(na * nb))));
    const s = Math.sin(omega);
    const wa = s < 1e-6 ? 1 - t : Math.sin((1 - t) * omega) / s;
    const wb = s < 1e-6 ? t : Math.sin(t * omega) / s;
    for (let i = f * zDim; i < (f + 1) * zDim; i++) out[i] = wa * a[i] + wb * b[i];
  }
  return out;
}

function interpolate(a, b, t) {
  // Normal latents go along the great circle; uniform ones in a straight line (inside their cube).
  if (t === 0) return a;
  if (state.zDistribution === "normal") return slerp(a, b, t, state.zDim);
  return a.map((value, i) => (1 - t) * value + t * b[i]);
}

function toRgba(output, face) {
  // One face of the output tensor as RGBA bytes, rounded as `generate` rounds (floor(x + 0.5)).
  const uint8 = output.type === "uint8";
  const [h, w] = uint8 ? output.dims.slice(1, 3) : output.dims.slice(2, 4);
  const channels = uint8 ? output.dims[3] : output.dims[1];
  const rgba = new Uint8ClampedArray(h * w * 4);
  const data = output.data, plane = h * w, base = face * plane * channels;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const k = channels === 1 ? 0 : c; // grayscale: the one channel in R, G and B
      rgba[p * 4 + c] = uint8 ? data[base + p * channels + k] : Math.floor((data[base + k * plane + p] + 1) * 127.5 + 0.5);
    }
    rgba[p * 4 + 3] = 255;
  }
  return new ImageData(rgba, w, h);
}

function findClass(name) {
  // A class by name first, then by index, as `generate --class` reads it; -1 if neither.
  const byName = state.classes.indexOf(name);
  if (byName >= 0) return byName;
  return /^\d+$/.test(name) && Number(name) < state.classes.length ? Number(name) : -1;
}

function setUpPicker(chosen) {
  // The class picker (a select) or the attribute checkboxes, from the metadata's class names;
  // `chosen` (?class=) preselects. Hidden for unconditional models.
  if (state.conditioning === "none") return;
  document.getElementById("conditioning").hidden = false;
  if (state.conditioning === "class") {
    document.getElementById("class-picker").hidden = false;
    state.classes.forEach((name, index) => classSelect.add(new Option(name, String(index))));
    const index = findClass((chosen || "").trim());
    if (chosen && index < 0) state.pickerNote = `?class=${chosen} is not a class of this model: showing the first`;
    classSelect.value = String(Math.max(0, index));
    classSelect.addEventListener("change", showClass);
    return;
  }
  const parts = (chosen || "").split(",").map((part) => part.trim()).filter((part) => part && part !== "none");
  const picked = parts.map(findClass);
  const unknown = parts.filter((_, i) => picked[i] < 0);
  if (unknown.length) state.pickerNote = `?class=: ${unknown.join(",")} not attributes of this model, left off`;
  attributeBoxes.hidden = false;
  state.classes.forEach((name, index) => {
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: String(index) });
    box.checked = picked.includes(index);
    box.addEventListener("change", showClass);
    const label = document.createElement("label");
    label.append(box, ` ${name}`);
    attributeBoxes.append(label);
  });
}

function showClass() {
  // The same faces (and walk) with the label the picker now says, kept in the URL.
  params.set("class", chosenLabel());
  history.replaceState(null, "", `?${params}`);
  return render();
}

function chosenAttributes() {
  return [...attributeBoxes.querySelectorAll("input")].map((box) => box.checked);
}

function chosenLabel() {
  // What the picker says, as `generate --class` takes it: a class name, or attribute names.
  if (state.conditioning === "class") return state.classes[Number(classSelect.value)];
  const on = state.classes.filter((_, index) => chosenAttributes()[index]);
  return on.length ? on.join(",") : "none";
}

function labelTensor(count) {
  // The `label` input for `count` faces of the chosen class (or attributes).
  if (state.conditioning === "class") {
    return new ort.Tensor("int64", new BigInt64Array(count).fill(BigInt(classSelect.value)), [count]);
  }
  const on = chosenAttributes().map((checked) => (checked ? 1 : 0));
  const data = new Float32Array(count * on.length);
  for (let f = 0; f < count; f++) data.set(on, f * on.length);
  return new ort.Tensor("float32", data, [count, on.length]);
}

async function render() {
  const count = state.seeds.length;
  const z = interpolate(state.from, state.to, Number(walk.value) / 100);
  const started = performance.now();
  const feeds = { [state.session.inputNames[0]]: new ort.Tensor("float32", z, [count, state.zDim]) };
  if (state.conditioning !== "none") feeds[state.session.inputNames[1]] = labelTensor(count);
  const output = (await state.session.run(feeds))[state.session.outputNames[0]];
  const images = Array.from({ length: count }, (_, f) => toRgba(output, f));
  const columns = Math.ceil(Math.sqrt(count)), rows = Math.ceil(count / columns);
  const size = images[0].width;
  const cell = size * Math.max(1, Math.floor(CANVAS_SIZE / (columns * size)));
  canvas.width = columns * cell;
  canvas.height = rows * cell;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false; // whole-factor nearest-neighbour scaling: each pixel a block
  const scratch = document.createElement("canvas");
  images.forEach((image, f) => {
    scratch.width = image.width;
    scratch.height = image.height;
    scratch.getContext("2d").putImageData(image, 0, 0);
    ctx.drawImage(scratch, (f % columns) * cell, Math.floor(f / columns) * cell, cell, cell);
  });
  state.renders += 1;
  const took = (performance.now() - started).toFixed(0);
  const label = state.conditioning === "none" ? "" : `, ${state.conditioning} ${chosenLabel()}`;
  const note = state.pickerNote ? `; ${state.pickerNote}` : "";
  status.textContent = `ready: ${count} faces in ${took} ms (z_dim ${state.zDim}, z ${state.zDistribution}${label})${note}`;
}

function showSeeds(seeds) {
  // The faces of `seeds` (and, on the slider, a walk to as many others), kept in the URL to share.
  state.seeds = seeds;
  state.walkSeeds = randomSeeds(seeds.length, seeds);
  state.from = latents(seeds, state.zDim, state.zDistribution, state.psi);
  state.to = latents(state.walkSeeds, state.zDim, state.zDistribution, state.psi);
  seedsField.value = seeds.join(",");
  walk.value = 0;
  params.set("seeds", seedsField.value);
  if (state.psi !== 1) params.set("psi", String(state.psi));
  else params.delete("psi");
  if (state.conditioning !== "none") params.set("class", chosenLabel());
  history.replaceState(null, "", `?${params}`);
  return render();
}

function showTyped() {
  // The seeds and psi typed in the fields; a mistake is shown in the status line, nothing drawn.
  try {
    const seeds = parseSeeds(seedsField.value, MAX_FACES);
    const psi = psiField.value.trim() === "" ? 1 : Number(psiField.value); // empty: no truncation
    if (!(psi >= 0 && psi <= 1)) throw new Error(`psi ${psiField.value} is not allowed: use 0 .. 1`);
    state.psi = psi;
    return showSeeds(seeds);
  } catch (err) {
    status.textContent = `${err.message} (seeds are 0 .. ${MAX_SEED}, at most ${MAX_FACES} faces)`;
    return Promise.resolve();
  }
}

async function main() {
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation headers a plain server lacks
  let metadata;
  try {
    const response = await fetch(modelUrl);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    metadata = modelMetadata(bytes);
    state.session = await ort.InferenceSession.create(bytes);
  } catch (err) {
    status.textContent = `could not load ${modelUrl}: ${err.message}`;
    throw err;
  }
  const meta = state.session.inputMetadata && state.session.inputMetadata[0];
  const declared = meta && meta.shape && meta.shape[1];
  state.zDim = Number.isInteger(declared) ? declared : Number(metadata.z_dim || params.get("z_dim") || 100);
  // Models from before the key was written, and foreign ones, were trained on N(0, 1).
  state.zDistribution = (metadata.z_distribution || "normal").startsWith("uniform") ? "uniform" : "normal";
  // Models from before conditioning, and foreign ones, are unconditional.
  state.conditioning = metadata.conditioning || "none";
  state.classes = state.conditioning === "none" ? [] : JSON.parse(metadata.classes || "[]");
  setUpPicker(params.get("class"));
  seedsField.value = params.get("seeds") || randomSeeds(NEW_FACES).join(",");
  psiField.value = params.get("psi") || "1";
  newButton.disabled = false;
  newButton.addEventListener("click", () => { seedsField.value = randomSeeds(NEW_FACES).join(","); showTyped(); });
  document.getElementById("show").addEventListener("click", showTyped);
  seedsField.addEventListener("change", showTyped);
  psiField.addEventListener("change", showTyped);
  walk.addEventListener("input", render);
  await showTyped();
}

main();
