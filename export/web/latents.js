// Latents by seed: the twin of export/latents.py, line by line, so the page draws the same z for
// a seed as `python -m export generate --seeds`. Each seed has a stream of 32-bit words (a hash of
// seed and position: triple32 with Math.imul); a uniform is a word's top 24 bits over 2**24; normal
// z is Box-Muller in float64 on words 2p, 2p + 1 (cosine -> component 2p, sine -> 2p + 1), cast to
// float32; uniform z is 2u - 1. Loaded by index.html (window.distganLatents) and by node (tests).
"use strict";

(function (exports) {
  const GOLDEN = 0x9e3779b9;
  const MAX_SEED = 4294967295;
  const MIN_THRESHOLD = 0.01;

  function triple32(x) {
    // A bijection on uint32 (hash-prospector's "triple32"); Math.imul wraps as uint32 math does.
    x ^= x >>> 17;
    x = Math.imul(x, 0xed5ad4bb);
    x ^= x >>> 11;
    x = Math.imul(x, 0xac4c1b51);
    x ^= x >>> 15;
    x = Math.imul(x, 0x31848bab);
    x ^= x >>> 14;
    return x >>> 0;
  }

  function seedStream(seed, distribution) {
    // The seed's z components in order: value(j) is component j.
    if (!(Number.isInteger(seed) && seed >= 0 && seed <= MAX_SEED)) {
      throw new Error(`seed ${seed} is out of range: seeds are 0 .. ${MAX_SEED}`);
    }
    const firstKey = triple32((seed + GOLDEN) >>> 0);
    const secondKey = triple32((firstKey + GOLDEN) >>> 0);
    const uniform = (counter) => (triple32(triple32(counter ^ firstKey) ^ secondKey) >>> 8) / 16777216;
    if (distribution === "uniform") return (j) => Math.fround(uniform(j) * 2 - 1);
    if (distribution !== "normal") throw new Error(`z distribution ${distribution} is not normal or uniform`);
    return (j) => {
      const pair = j >>> 1;
      const radius = Math.sqrt(-2 * Math.log(1 - uniform(2 * pair))); // 1 - u is in (0, 1]
      const angle = 2 * Math.PI * uniform(2 * pair + 1);
      return Math.fround(j % 2 === 0 ? radius * Math.cos(angle) : radius * Math.sin(angle));
    };
  }

  function latents(seeds, zDim, distribution = "normal", psi = 1, threshold = null) {
    // Float32Array [seeds.length * zDim]: face i's z depends only on seeds[i]. `threshold` T keeps
    // the first zDim components within +-T; `psi` scales z towards its mean 0 (StyleGAN's psi).
    if (!(psi >= 0 && psi <= 1)) throw new Error(`psi ${psi} is not allowed: use 0 .. 1`);
    if (threshold !== null && !(threshold >= MIN_THRESHOLD)) {
      throw new Error(`threshold ${threshold} is not allowed: use ${MIN_THRESHOLD} or more`);
    }
    const z = new Float32Array(seeds.length * zDim);
    const scale = Math.fround(psi);
    seeds.forEach((seed, i) => {
      const value = seedStream(seed, distribution);
      for (let j = 0, kept = 0; kept < zDim; j++) {
        const v = value(j);
        if (threshold !== null && Math.abs(v) > threshold) continue;
        z[i * zDim + kept++] = psi === 1 ? v : v * scale; // float32 x float32 is exact in float64
      }
    });
    return z;
  }

  function parseSeeds(spec, limit = 10000000) {
    // "0-35,100" -> [0, ..., 35, 100], as `generate --seeds` reads it.
    const seeds = [];
    for (const raw of String(spec).split(",")) {
      const part = raw.trim();
      const match = /^(\d+)(?:-(\d+))?$/.exec(part);
      if (!match) throw new Error(`"${part}" is not a seed or a range: give seeds and ranges such as 0-35,100`);
      const first = Number(match[1]);
      const last = match[2] === undefined ? first : Number(match[2]);
      if (last < first) throw new Error(`range ${first}-${last} runs backwards: write ${last}-${first}`);
      if (last > MAX_SEED) throw new Error(`seed ${last} is out of range: seeds are 0 .. ${MAX_SEED}`);
      if (seeds.length + last - first + 1 > limit) throw new Error(`more than ${limit} faces asked for`);
      for (let s = first; s <= last; s++) seeds.push(s);
    }
    const seen = new Set();
    for (const seed of seeds) {
      if (seen.has(seed)) throw new Error(`seed ${seed} is named twice: list each seed once`);
      seen.add(seed);
    }
    return seeds;
  }

  Object.assign(exports, { triple32, seedStream, latents, parseSeeds, MAX_SEED });
})(typeof module === "object" && module.exports ? module.exports : (window.distganLatents = {}));
