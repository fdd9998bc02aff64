"""The architecture's settings (ModelConfig), torch-free: stored in every checkpoint and generator
file, read by the command line without importing torch."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from dataclasses import dataclass
from typing import Literal, get_args

from distgan.config.rules import setting

MIN_RESOLUTION, MAX_RESOLUTION = 28, 256
BASES = range(4, 8)  # G starts from, and D ends on, a base x base map
RESOLUTION_EXAMPLES = "28, 32, 40, 48, 56, 64, 96, 112, 128, 256"
ZDistribution = Literal["normal", "uniform"]
Init = Literal["normal", "xavier"]
Conditioning = Literal["none", "class", "attributes"]
MAX_GRID_ATTRIBUTES = 4  # up to 2^4 = 16 rows of attribute combinations; beyond, one per attribute
NO_ATTRIBUTES = "none"  # the name of the grid row with every attribute off


def grid_rows(conditioning: str, classes: list[str]) -> list[tuple[str, int | tuple[int, ...]]]:
    """The rows of a conditional sample grid as (name, label): one per class (its index); for
    attributes, one per combination of up to MAX_GRID_ATTRIBUTES of them (a 0/1 flag each,
    named by those on, joined by " + "), else none and then each alone. Torch-free: training's
    grids and export's `--class all` share it."""
    if conditioning == "class":
        return [(name, index) for index, name in enumerate(classes)]
    if len(classes) <= MAX_GRID_ATTRIBUTES:
        combos = list(itertools.product((0, 1), repeat=len(classes)))
    else:
        combos = [(0,) * len(classes)]
        combos += [tuple(int(i == j) for j in range(len(classes))) for i in range(len(classes))]
    named = [" + ".join(n for n, on in zip(classes, c, strict=True) if on) for c in combos]
    return [(name or NO_ATTRIBUTES, combo) for name, combo in zip(named, combos, strict=True)]


def split_resolution(resolution: int) -> tuple[int, int] | None:
    """(base, stages) with resolution = base * 2**stages and base in 4..7, or None if there is
    none. The pair is unique: the bases of one stage count cover [4 * 2**k, 8 * 2**k)."""
    stages = 0
    while resolution % 2 == 0 and resolution // 2 >= BASES.start:
        resolution, stages = resolution // 2, stages + 1
    return (resolution, stages) if resolution in BASES else None


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of G and D. Stored in every checkpoint and generator file, so that a resume or
    an export rebuilds exactly the same shapes; fixed on resume (the checkpoint's model)."""

    resolution: int = setting(64, on_resume="fixed")
    """Image side in pixels, from 28 to 256: base * 2^k with base 4 to 7 (28, 32, 40, 48, 56, 64,
    96, 112, 128, 256, ...). G starts from a base x base map and D ends on one."""

    channels: int = setting(3, on_resume="fixed", resolved=True)
    """Image channels, 1 (grayscale) or 3 (RGB). Not a flag of its own: training sets it from
    --channels (data), resolved against the images."""

    z_dim: int = setting(100, on_resume="fixed")
    """Length of the latent vector z."""

    z_distribution: ZDistribution = setting("normal", on_resume="fixed")
    """Distribution of z: normal (N(0, 1)) or uniform (U[-1, 1])."""

    init: Init = setting("normal", on_resume="fixed")
    """Initial conv weights: normal (DCGAN's N(0, 0.02)) or xavier (Glorot uniform, as Keras);
    BatchNorm weights N(1, 0.02) either way."""

    g_channels: int = setting(64, on_resume="fixed")
    """Width of G: channels of its last hidden layer; earlier layers double it, up to 8x."""

    d_channels: int = setting(64, on_resume="fixed")
    """Width of D: channels of its first layer; later layers double it, up to 8x."""

    leaky_slope: float = setting(0.2, on_resume="fixed")
    """Negative slope of D's LeakyReLU."""

    d_spectral_norm: bool = setting(False, on_resume="fixed")
    """Wrap every convolution of D in spectral normalisation."""

    d_dropout: float = setting(0.0, on_resume="fixed")
    """Dropout probability after each hidden block of D (0 disables it)."""

    g_label_gain: bool = setting(True, on_resume="fixed")
    """How a conditional (or self-conditioned) G's BatchNorm takes the label: a gain and a bias
    per label (conditional BatchNorm), or, off, BatchNorm's own affine and then a bias per label:
    one add a layer where the gain costs a product and its gradients (the digits recipe's: as
    good on its clusters, and a cheaper step). Unconditional models have no label to take."""

    # Checked against --labels in Config.__post_init__: the conditioning is set from the data later.
    d_classifier: bool = setting(False, on_resume="fixed")
    """Give a conditional D a classifier head on the features its projection reads (AC-GAN,
    Odena et al. 2017): D learns to read the real images' labels, and G is trained to make its
    images' labels readable, by a cross-entropy (binary per attribute) added to each one's
    logged loss. Needs --labels; an unconditional D has no head."""

    conditioning: Conditioning = setting("none", on_resume="fixed", resolved=True)
    """What G and D are conditioned on: none; class (one class per image, given as its index);
    or attributes (any subset of `classes` per image, given as a multi-hot vector). Not a flag
    of its own: training sets it from --labels (data)."""

    classes: list[str] = setting(factory=list, on_resume="fixed", resolved=True)
    """The class (or attribute) names, in label order; empty when unconditional. Stored with the
    weights, so exports, the Hub card and `from_pretrained` name them."""

    cluster_shares: list[float] = setting(factory=list, on_resume="fixed", resolved=True)
    """Self-conditioning (--clusters): the share of the training images in each k-means cluster
    of their pixels (data/clusters.py); empty otherwise. G picks each image's cluster from its
    z, with these odds (`cluster_edges`), and is conditioned on it as on a class; D learns the
    real images' clusters. Not a flag of its own: training sets it from the data."""

    def __post_init__(self) -> None:
        self.cluster_shares = [float(share) for share in self.cluster_shares]
        shares = self.cluster_shares
        if shares and (len(shares) < 2 or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6):
            raise ValueError(
                f"cluster_shares={shares} is not allowed: give two or more positive shares "
                "summing to 1"
            )
        if shares and self.classes:
            raise ValueError("a model is conditioned on labels or on clusters, not both")
        if self.conditioning not in get_args(Conditioning):
            listed = ", ".join(get_args(Conditioning))
            raise ValueError(f"conditioning={self.conditioning!r} is not allowed: use {listed}")
        self.classes = [str(name) for name in self.classes]
        if (self.conditioning == "none") != (not self.classes):
            raise ValueError(
                f"conditioning={self.conditioning!r} with {len(self.classes)} classes: a "
                "conditional model needs class names, an unconditional one none"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes={self.classes} repeat a name: class names must be unique")
        resolution = self.resolution
        if (
            not isinstance(resolution, int)
            or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
            or split_resolution(resolution) is None
        ):
            raise ValueError(
                f"resolution={resolution!r} is not allowed: use base * 2^k with base 4 to 7, from "
                f"{MIN_RESOLUTION} to {MAX_RESOLUTION} (e.g. {RESOLUTION_EXAMPLES})"
            )
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels={self.channels!r} is not allowed: use 1 or 3")
        for name, allowed in (("z_distribution", ZDistribution), ("init", Init)):
            if getattr(self, name) not in get_args(allowed):
                listed = " or ".join(get_args(allowed))
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: use {listed}")
        for name in ("z_dim", "g_channels", "d_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: use a positive integer")
        if not 0.0 <= self.leaky_slope < 1.0:
            raise ValueError(f"leaky_slope={self.leaky_slope} is not allowed: use 0 <= slope < 1")
        if not 0.0 <= self.d_dropout < 1.0:
            raise ValueError(f"d_dropout={self.d_dropout} is not allowed: use 0 <= p < 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}: this file is from another version"
            )
        return cls(**values)

    @property
    def num_classes(self) -> int:
        """How many classes (or attributes) the label has: 0 when unconditional."""
        return len(self.classes)

    @property
    def label_count(self) -> int:
        """Rows of G's and D's label tables: the classes (or attributes), or the clusters."""
        return self.num_classes or len(self.cluster_shares)

    def cluster_edges(self) -> list[float]:
        """The values of z's first coordinate at which G's cluster moves to the next: the
        quantiles of z's distribution at the clusters' cumulative shares, so that G picks each
        cluster as often as the data holds it."""
        cumulative = list(itertools.accumulate(self.cluster_shares))[:-1]
        if self.z_distribution == "uniform":
            return [2 * c - 1 for c in cumulative]
        return [statistics.NormalDist().inv_cdf(c) for c in cumulative]

    @property
    def base(self) -> int:
        """Side of G's first and D's last feature map (4 for powers of two, 7 for 28, 56, ...)."""
        return split_resolution(self.resolution)[0]

    @property
    def num_stages(self) -> int:
        """Number of 2x up-/down-sampling stages between base x base and the full resolution."""
        return split_resolution(self.resolution)[1]
