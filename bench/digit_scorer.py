"""The digits benchmark's scorer: a small CNN that reads which digit a 28 px grayscale image shows.

Its penultimate layer is the feature space the benchmark measures Fréchet distances in; its
softmax gives the class entropy (are all ten digits made?) and the mean confidence (are they
legible?). It is trained offline, seeded and with deterministic kernels, on the first 8,000 of the
10,000 real MNIST digits (`python -m bench.digit_scorer --train DIGITS.npz`), judged on the last
2,000, and committed as `digit_scorer.safetensors` with `digit_scorer.json` (its record). The last
500 held-out digits are committed too (`digit_scorer_heldout.npz`, MNIST: LeCun, Cortes and
Burges, CC BY-SA 3.0), so a test can check the committed weights reproduce the recorded accuracy
on a machine without the data.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.quality_features import deterministic
from distgan.errors import UserError, exit_on_user_error

RESOLUTION = 28
CLASSES = 10
FEATURES = 128  # width of the penultimate layer: the feature vector
WEIGHTS_FILE = Path(__file__).resolve().with_name("digit_scorer.safetensors")
RECORD_FILE = WEIGHTS_FILE.with_suffix(".json")
HELD_OUT_FILE = WEIGHTS_FILE.with_name("digit_scorer_heldout.npz")
TRAIN_DIGITS = 8_000  # the first 8,000 train it; the rest are held out
COMMITTED_HELD_OUT = 500  # the last 500 are committed for the test
EPOCHS = 10
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
MAX_SHIFT = 2  # random translations in training, pixels: generated digits are not all centred
SEED = 0


class DigitNet(nn.Module):
    """uint8 grayscale images [N, 1, 28, 28] -> logits of the ten digits. `features` is the
    penultimate layer."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(1, 32),
            *block(32, 32),
            nn.MaxPool2d(2),  # 14x14
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),  # 7x7
            *block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Linear(128, FEATURES)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURES, CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1, 28, 28] -> float [N, FEATURES] (before the last ReLU)."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, RESOLUTION, RESOLUTION):
            raise ValueError(
                f"expected uint8 images [N, 1, {RESOLUTION}, {RESOLUTION}], got "
                f"{images.dtype} {list(images.shape)}"
            )
        return self.embed(self.trunk(images.float() / 127.5 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_scorer(path: str | Path = WEIGHTS_FILE) -> DigitNet:
    """The committed scorer, in eval mode (safetensors: tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: train it with `python -m bench.digit_scorer --train "
            "DIGITS.npz`"
        )
    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features_and_probabilities(
    net: DigitNet, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features [N, FEATURES] and class probabilities [N, 10] of uint8 images."""
    features, probabilities = [], []
    for first in range(0, len(images), batch_size):
        f = net.features(images[first : first + batch_size])
        features.append(f)
        probabilities.append(net.head(f).softmax(1))
    return torch.cat(features), torch.cat(probabilities)


def read_digits(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 28, 28] and labels [N] of an npz with `images` [N, 28, 28] and
    `labels` [N] (the layout of mnist10k.npz)."""
    try:
        data = np.load(path)
        images, labels = data["images"], data["labels"]
    except (OSError, KeyError, ValueError) as err:
        raise UserError(
            f"{path}: not an npz with images [N, 28, 28] and labels [N] ({err}); give mnist10k.npz"
        ) from None
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random whole-pixel offset of up to MAX_SHIFT (zeros fill in)."""
    padded = nn.functional.pad(images, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [
            padded[i, :, dy : dy + RESOLUTION, dx : dx + RESOLUTION]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )


def fit(net: DigitNet, images: torch.Tensor, labels: torch.Tensor, epochs: int, log) -> float:
    """Cross-entropy training with random shifts, AdamW and a cosine schedule; the last
    epoch's mean loss."""
    steps_per_epoch = math.ceil(len(images) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    order = torch.Generator().manual_seed(SEED)
    net.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        losses = []
        for first in range(0, len(images), BATCH_SIZE):
            batch = permutation[first : first + BATCH_SIZE]
            logits = net(shifted(images[batch], order))
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        log(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")
    net.eval()
    return float(np.mean(losses))


def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probabilities = features_and_probabilities(net, images)
    return float((probabilities.argmax(1) == labels).double().mean())


def train_scorer(digits: str | Path, *, epochs: int = EPOCHS, out: Path = WEIGHTS_FILE, log=print):
    """Train the scorer from scratch on the first TRAIN_DIGITS of `digits` (seeded, deterministic
    kernels), write it, its record and the committed held-out digits; return the record."""
    start = time.perf_counter()
    images, labels = read_digits(digits)
    if len(images) <= TRAIN_DIGITS + COMMITTED_HELD_OUT:
        raise UserError(f"{digits} holds {len(images)} digits: the scorer needs mnist10k.npz's")
    with deterministic(SEED):
        net = DigitNet()
        loss = fit(net, images[:TRAIN_DIGITS], labels[:TRAIN_DIGITS], epochs, log)
    held_images, held_labels = images[TRAIN_DIGITS:], labels[TRAIN_DIGITS:]
    committed = slice(-COMMITTED_HELD_OUT, None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    np.savez_compressed(
        out.with_name(HELD_OUT_FILE.name),
        images=held_images[committed, 0].numpy(),
        labels=held_labels[committed].numpy().astype(np.uint8),
    )
    record = {
        "what": f"digit classifier trained on digits 0..{TRAIN_DIGITS - 1} of mnist10k.npz, "
        f"judged on digits {TRAIN_DIGITS}..{len(images) - 1}",
        "held_out_accuracy": accuracy(net, held_images, held_labels),
        "committed_held_out_digits": COMMITTED_HELD_OUT,
        "committed_held_out_accuracy": accuracy(
            net, held_images[committed], held_labels[committed]
        ),
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "final_train_loss": round(loss, 5),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.digit_scorer", description=__doc__)
    parser.add_argument("--train", type=Path, metavar="DIGITS.npz", required=True)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        record = train_scorer(args.train)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
