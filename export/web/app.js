// Draws faces from a distgan ONNX generator: input z [batch, z_dim] float32, output either
// float32 [batch, 3, H, W] in [-1, 1] or uint8 [batch, H, W, 3] (models exported with --uint8).
"use strict";

const GRID = 4; // faces per side of the canvas
const params = new URLSearchParams(location.search);
const modelUrl = params.get("model") || "model.onnx";
let seed = Number(params.get("seed") || 1);
const canvas = document.getElementById("faces");
const status = document.getElementById("status");
const newButton = document.getElementById("new");
const walk = document.getElementById("walk");
const state = { session: null, zDim: 0, from: null, to: null, renders: 0 };
window.distgan = state; // read by the browser test

function random() {
  // mulberry32: a small seeded PRNG, so ?seed=N always shows the same faces
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

function gaussians(count) {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    const u = 1 - random(), v = random(); // Box-Muller
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
  return out;
}

function slerp(a, b, t, zDim) {
  // Interpolate each face's latent along the great circle, as `python -m export generate` does.
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

function toRgba(output, face) {
  // One face of the output tensor as RGBA bytes.
  const uint8 = output.type === "uint8";
  const [h, w] = uint8 ? output.dims.slice(1, 3) : output.dims.slice(2, 4);
  const rgba = new Uint8ClampedArray(h * w * 4);
  const data = output.data, plane = h * w, base = face * plane * 3;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      rgba[p * 4 + c] = uint8 ? data[base + p * 3 + c] : (data[base + c * plane + p] + 1) * 127.5 + 0.5;
    }
    rgba[p * 4 + 3] = 255;
  }
  return new ImageData(rgba, w, h);
}

async function render() {
  const t = Number(walk.value) / 100;
  const z = slerp(state.from, state.to, t, state.zDim);
  const started = performance.now();
  const feeds = { [state.session.inputNames[0]]: new ort.Tensor("float32", z, [GRID * GRID, state.zDim]) };
  const output = (await state.session.run(feeds))[state.session.outputNames[0]];
  const ctx = canvas.getContext("2d");
  const cell = canvas.width / GRID;
  const scratch = document.createElement("canvas");
  for (let f = 0; f < GRID * GRID; f++) {
    const image = toRgba(output, f);
    scratch.width = image.width;
    scratch.height = image.height;
    scratch.getContext("2d").putImageData(image, 0, 0);
    ctx.drawImage(scratch, (f % GRID) * cell, Math.floor(f / GRID) * cell, cell, cell);
  }
  state.renders += 1;
  status.textContent = `ready: ${GRID * GRID} faces in ${(performance.now() - started).toFixed(0)} ms (z_dim ${state.zDim})`;
}

function newFaces() {
  state.from = gaussians(GRID * GRID * state.zDim);
  state.to = gaussians(GRID * GRID * state.zDim);
  walk.value = 0;
  return render();
}

async function main() {
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation headers a plain server lacks
  try {
    state.session = await ort.InferenceSession.create(modelUrl);
  } catch (err) {
    status.textContent = `could not load ${modelUrl}: ${err.message}`;
    throw err;
  }
  const meta = state.session.inputMetadata && state.session.inputMetadata[0];
  const declared = meta && meta.shape && meta.shape[1];
  state.zDim = Number.isInteger(declared) ? declared : Number(params.get("z_dim") || 100);
  newButton.disabled = false;
  newButton.addEventListener("click", newFaces);
  walk.addEventListener("input", render);
  await newFaces();
}

main();
