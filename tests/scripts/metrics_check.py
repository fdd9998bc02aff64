"""Run under `accelerate launch` (any number of processes): real and fake statistics of a folder
and a fixed generator with the 8x8 pixel extractor, through distgan.metrics.stats; the main
process prints the scores as JSON, for comparison across process counts."""

import json
import sys

import torch
from accelerate import Accelerator

from distgan.config.model import ModelConfig
from distgan.data.folder import find_images
from distgan.metrics import features as extractors
from distgan.metrics import fid as metrics
from distgan.metrics import stats as statistics
from distgan.models.dcgan import Generator


def main(folder: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    generator = Generator(ModelConfig(resolution=32, g_channels=8, z_dim=16))
    with torch.no_grad():  # visible, varied images
        for module in generator.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.mul_(8)
    extractor = extractors.PixelFeatures()
    loading = dict(resolution=32, crop_box=None, batch_size=4, num_threads=1, device_id=None)
    real = statistics.real_stats(accelerator, extractor, find_images(folder), **loading)
    sampling = dict(batch_size=8, seed=3, device=torch.device("cpu"))
    fake = statistics.fake_stats(accelerator, extractor, generator, 50, **sampling)
    counts = {"n_real": real.count, "n_fake": fake.count, "real_mu_sum": float(real.mu.sum())}
    result = {**metrics.scores(real, fake), **counts}
    if accelerator.is_main_process:
        print(json.dumps(result))
    accelerator.wait_for_everyone()  # and end as the trainer does (see shard_check.py)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
