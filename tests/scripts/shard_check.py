"""Run under `accelerate launch` with N processes: each process reads its DALI shard of a folder
of solid-colour images, as the trainer does (shard_id = global rank); the main process checks
that the shards are disjoint and together cover the folder, and prints the verdict."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers
from distgan.data.folder import find_images  # noqa: E402
from distgan.data.loader import ImageLoader  # noqa: E402
from tests.helpers import colour_index  # noqa: E402


def main(folder: str) -> None:
    accelerator = Accelerator(cpu=True)
    files = find_images(folder)
    shard = dict(shard_id=accelerator.process_index, num_shards=accelerator.num_processes)
    loader = ImageLoader(files, resolution=32, batch_size=4, seed=0, flip=False, **shard)
    seen = []
    for batch in loader.epoch(0):
        centre = ((batch[:, :, 16, 16] + 1) * 127.5).tolist()
        seen += [colour_index(pixel) for pixel in centre]
    gathered = accelerator.gather(torch.tensor(seen).reshape(1, -1))  # [processes, images]
    if accelerator.is_main_process:
        shards = [set(row.tolist()) for row in gathered]
        overlap = set.intersection(*shards)
        union = set.union(*shards)
        counts = [len(row) for row in gathered]
        print(f"shards {sorted(map(sorted, shards))} counts {counts}")
        if not overlap and union == set(range(len(files))):
            print("disjoint and complete")
    # As the trainer ends: a rank that exits while its peer's gloo thread still reads the socket
    # can abort that peer ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
