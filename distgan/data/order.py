"""The order of the data, which is ours, not DALI's; pure numpy, the same on every process.

Each epoch is one global permutation (from the seed and the epoch number), padded by wrapping to
a whole number of global batches, so that every process runs the same number of steps and no
image is dropped. Global batch k is entries [k*W*B, (k+1)*W*B) of that order, and process r takes
the r-th block of B. `shard_layout` lays that order out so that a reader's contiguous shard r is
exactly process r's share, which also makes resuming mid-epoch exact: start the list at the
resumed step. Flips are drawn the same way, from the seed, per position in the order.
"""

from __future__ import annotations

import math

import numpy as np


def global_batch(num_shards: int, batch_size: int) -> int:
    """Images in one step over all processes: `batch_size` from each of the `num_shards`."""
    return num_shards * batch_size


def steps_per_epoch(num_files: int, num_shards: int, batch_size: int) -> int:
    """Steps in one epoch, the same on every process: the last global batch is filled up."""
    return math.ceil(num_files / global_batch(num_shards, batch_size))


def epoch_order(
    num_files: int, epoch: int, seed: int, num_shards: int, batch_size: int
) -> np.ndarray:
    """The global sample order of one epoch: a permutation wrapped to whole global batches."""
    rng = np.random.default_rng([seed, epoch])
    steps = steps_per_epoch(num_files, num_shards, batch_size)
    return np.resize(rng.permutation(num_files), steps * global_batch(num_shards, batch_size))


def epoch_flips(length: int, epoch: int, seed: int) -> np.ndarray:
    """Per-position horizontal-flip decisions of one epoch (independent of the order's RNG)."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2, length, dtype=np.int32)


def shard_layout(
    order: np.ndarray, num_shards: int, batch_size: int, start_step: int
) -> np.ndarray:
    """Rearrange a global order so that contiguous shard r holds process r's batches from
    `start_step` on: [steps, shards, batch] -> [shards, steps, batch]."""
    blocks = order.reshape(-1, num_shards, batch_size)[start_step:]
    return blocks.transpose(1, 0, 2).reshape(-1)
