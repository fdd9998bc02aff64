"""Latents by seed, as StyleGAN's tools give them: the z of seed s depends on s alone, so any face
can be made again alone, at any batch size, and the web page (export/web/latents.js, the
twin of this file) draws the same z for the same seed.

numpy only. Each seed has a stream of 32-bit words, the word at position c being a hash of (seed, c)
built from triple32 (a bijective 32-bit integer hash, Chris Wellons' hash-prospector) with 32-bit
wrapping multiplies, which JavaScript has as Math.imul. A uniform float is the top 24 bits of a
word over 2**24 (exact in float32 and float64). Normal z: Box-Muller in float64 on words 2p and
2p + 1, giving components 2p (cosine) and 2p + 1 (sine), then cast to float32; uniform z on
[-1, 1): component j is 2 u_j - 1, exact. So z for a smaller z_dim is a prefix of z for a larger.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from distgan.errors import UserError

Z_DISTRIBUTIONS = ("normal", "uniform")
MAX_SEED = 2**32 - 1
MAX_SEEDS = 10_000_000  # one PNG each: more at once is surely a typo
MIN_THRESHOLD = 0.01  # below this almost every draw is rejected: memory and time explode
GOLDEN = np.uint32(0x9E3779B9)  # keeps seed 0's keys away from triple32's fixed point 0


def triple32(x: np.ndarray) -> np.ndarray:
    """A bijection on uint32 with near-ideal avalanche (hash-prospector's "triple32")."""
    x = np.array(x, dtype=np.uint32)
    x ^= x >> np.uint32(17)
    x *= np.uint32(0xED5AD4BB)
    x ^= x >> np.uint32(11)
    x *= np.uint32(0xAC4C1B51)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x31848BAB)
    x ^= x >> np.uint32(14)
    return x


def seed_words(seeds: Sequence[int], start: int, count: int) -> np.ndarray:
    """uint32 [len(seeds), count]: words start .. start + count - 1 of each seed's stream.

    Two keys per seed, both bijective in it, enter at two rounds, so no two seeds' streams are
    shifted or permuted copies of each other."""
    seed_array = check_seeds(seeds)
    first_key = triple32(seed_array + GOLDEN)[:, None]
    second_key = triple32(first_key + GOLDEN)
    counters = np.arange(start, start + count, dtype=np.uint32)[None, :]
    return triple32(triple32(counters ^ first_key) ^ second_key)


def seed_uniforms(seeds: Sequence[int], start: int, count: int) -> np.ndarray:
    """float64 [len(seeds), count] in [0, 1): a word's top 24 bits over 2**24."""
    return (seed_words(seeds, start, count) >> np.uint32(8)).astype(np.float64) / 2.0**24


def seed_values(seeds: Sequence[int], start: int, count: int, distribution: str) -> np.ndarray:
    """float32 [len(seeds), count]: components start .. start + count - 1 of each seed's z."""
    if distribution == "uniform":
        return (seed_uniforms(seeds, start, count) * 2.0 - 1.0).astype(np.float32)
    if distribution != "normal":
        raise UserError(
            f"z distribution {distribution!r} is not one of {', '.join(Z_DISTRIBUTIONS)}"
        )
    first_pair, end_pair = start // 2, (start + count + 1) // 2
    words = seed_uniforms(seeds, 2 * first_pair, 2 * (end_pair - first_pair))
    radius = np.sqrt(-2.0 * np.log(1.0 - words[:, 0::2]))  # 1 - u is in (0, 1]: no log(0)
    angle = 2.0 * np.pi * words[:, 1::2]
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=2)
    values = pairs.reshape(len(words), -1).astype(np.float32)
    offset = start - 2 * first_pair
    return values[:, offset : offset + count]


def latents(
    seeds: Sequence[int],
    z_dim: int,
    distribution: str = "normal",
    *,
    psi: float = 1.0,
    threshold: float | None = None,
) -> np.ndarray:
    """float32 [len(seeds), z_dim]: row i depends only on seeds[i].

    `threshold` T keeps, in order, the first z_dim components of the seed's stream within +-T
    (the old truncation: redraw what lies beyond). `psi` is StyleGAN's truncation: z * psi pulls z
    towards its mean, 0 for both distributions (1 = none, 0 = the mean face)."""
    check_truncation(psi, threshold)
    if threshold is None:
        z = seed_values(seeds, 0, z_dim, distribution)
    else:
        drawn = z_dim
        while True:  # a longer stream keeps every earlier word: the result does not depend on it
            stream = seed_values(seeds, 0, drawn, distribution)
            inside = np.abs(stream) <= np.float64(threshold)  # in float64, as the web page
            if len(stream) == 0 or inside.sum(axis=1).min() >= z_dim:
                break
            drawn *= 2
        first_inside = np.argsort(~inside, axis=1, kind="stable")[:, :z_dim]
        z = np.take_along_axis(stream, first_inside, axis=1)
    return z * np.float32(psi) if psi != 1.0 else z


def check_seeds(seeds: Sequence[int]) -> np.ndarray:
    """The seeds as uint32, or a one-line error for one outside 0 .. 2**32 - 1."""
    for seed in seeds:
        if not 0 <= int(seed) <= MAX_SEED:
            raise UserError(f"seed {seed} is out of range: seeds are 0 .. {MAX_SEED}")
    return np.array([int(seed) for seed in seeds], dtype=np.uint32)


def check_truncation(psi: float, threshold: float | None) -> None:
    if not 0.0 <= psi <= 1.0:
        raise UserError(
            f"--truncation-psi {psi} is not allowed: use 0 .. 1 (1 = none, 0.7 = typical faces)"
        )
    if threshold is not None and not threshold >= MIN_THRESHOLD:
        raise UserError(
            f"--truncation-threshold {threshold} is not allowed: use {MIN_THRESHOLD} or more "
            "(e.g. 1.5); for faces nearer the mean use --truncation-psi"
        )


SEED_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(spec: str) -> list[int]:
    """'0-35,100' -> [0, 1, ..., 35, 100]: comma-separated seeds and inclusive ranges, in order."""
    seeds: list[int] = []
    for part in spec.split(","):
        match = SEED_RANGE.match(part.strip())
        if match is None:
            raise UserError(
                f"--seeds {spec!r}: {part.strip()!r} is not a seed or a range: "
                "give seeds and ranges such as 0-35,100"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UserError(
                f"--seeds {spec!r}: range {first}-{last} runs backwards: write {last}-{first}"
            )
        if last > MAX_SEED:
            raise UserError(
                f"--seeds {spec!r}: seed {last} is out of range: seeds are 0 .. {MAX_SEED}"
            )
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise UserError(
                f"--seeds {spec!r} asks for more than {MAX_SEEDS:,} images: split the job"
            )
        seeds.extend(range(first, last + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise UserError(f"--seeds {spec!r} names seed {seed} twice: list each seed once")
        seen.add(seed)
    return seeds
