"""The feature extractors FID and KID are computed on: the 2048-d pool features of
torch-fidelity's FID Inception-v3 (the pytorch-fid / torch-fidelity weights, which reproduce the
original TensorFlow numbers; the file is checked before it is loaded), or images area-averaged to
8x8 for smoke tests. Both take uint8 RGB; a grayscale image's one channel is repeated into three.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from distgan.config.sections import EVAL_FEATURES
from distgan.errors import UserError, first_line

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub convention


class FeatureExtractor(Protocol):
    name: str  # what produced the features, recorded with every number
    resize: str  # how images reach the extractor's input size
    numerics: str  # where and in what precision it ran: features differ slightly between them

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float [N, D]."""


def default_weights_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file, checked: torch-fidelity's cache (downloaded there if it can
    be), or `path` for offline clusters. A missing or wrong file is a one-line error."""
    if path is None:
        target = default_weights_dir() / INCEPTION_FILE
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(
                    URL_INCEPTION_V3,
                    str(target),
                    hash_prefix=INCEPTION_SHA256_PREFIX,
                    progress=False,
                )
            except Exception as err:
                reason = first_line(err, 120)
                raise UserError(
                    f"the FID Inception weights {INCEPTION_FILE} are not in {target.parent} and "
                    f"could not be downloaded ({reason}): put {URL_INCEPTION_V3} there, or pass "
                    "--inception-weights PATH"
                ) from None
    else:
        target = Path(path)
        if not target.is_file():
            raise UserError(
                f"--inception-weights {target} does not exist: download "
                f"{URL_INCEPTION_V3} and give its path"
            )
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise UserError(
            f"{target} is not the FID Inception weights (sha256 {digest[:8]}..., expected "
            f"{INCEPTION_SHA256_PREFIX}...): download {URL_INCEPTION_V3} again"
        )
    try:
        torch.load(target, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except Exception as err:
        raise UserError(
            f"{target} holds more than weights and is refused ({type(err).__name__})"
        ) from None
    return target


@contextmanager
def full_fp32():
    """Matmuls and convolutions in IEEE fp32, not TF32, then the settings as they were (torch's
    fp32_precision API only: reading the legacy allow_tf32 flags after it is an error)."""
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [knob.fp32_precision for knob in knobs]
    for knob in knobs:
        knob.fp32_precision = "ieee"
    try:
        yield
    finally:
        for knob, value in zip(knobs, before, strict=True):
            knob.fp32_precision = value


class InceptionFeatures:
    """The 2048-d pool features of the FID Inception-v3, via torch-fidelity."""

    name = "inception-v3-compat pool3 2048 (torch-fidelity)"
    resize = "bilinear to 299x299 like TensorFlow 1.x (torch-fidelity)"

    def __init__(self, weights_path: str | os.PathLike | None, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        checked = inception_weights(weights_path)  # verified: the load below is of known bytes
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(checked)
        ).to(device)
        self.device = device
        self.numerics = f"{device.type} fp32, TF32 off"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with full_fp32():  # TF32 (on by default for cuDNN convolutions) would shift FID
            return self.model(images.to(self.device))[0].double()


class PixelFeatures:
    """Images area-averaged to 8x8: a cheap extractor for smoke tests and machines without the
    Inception weights. Its FID is NOT comparable to Inception FID."""

    name = "pixels-8x8 (not comparable to Inception FID)"
    resize = "area-average to 8x8"
    numerics = "float64"  # the same on any device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.double() / 255.0, 8).flatten(1)


def make_extractor(kind: str, weights_path: str | None, device: torch.device) -> FeatureExtractor:
    if kind == "inception":
        return InceptionFeatures(weights_path, device)
    if kind == "pixels":
        return PixelFeatures()
    raise UserError(f"features={kind!r} is not allowed: use one of {', '.join(EVAL_FEATURES)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, rounded as a PNG of them would be."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def extractor_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images, RGB or gray -> uint8 [N, 3, H, W], what the extractors take: a gray
    image's one channel repeated into three (as an RGB file of it would hold)."""
    pixels = to_uint8(images)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
