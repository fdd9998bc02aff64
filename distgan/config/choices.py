"""The allowed values of the settings that name a method (loss, augmentation, schedule), torch-free
so that the command line and the config files are read without importing torch."""

from __future__ import annotations

import typing
from typing import Literal

Loss = Literal["bce", "hinge", "wgan-gp"]
LOSSES = typing.get_args(Loss)

AugmentMode = Literal["none", "diffaugment", "ada", "auto"]
AppliedAugment = Literal["none", "diffaugment", "ada"]  # what D sees once auto is resolved
APPLIED_AUGMENTS = typing.get_args(AppliedAugment)
DiffAugmentOp = Literal["colour", "translation", "cutout"]
DIFF_OPS: tuple[str, ...] = typing.get_args(DiffAugmentOp)  # the paper's policy: all three

LrSchedule = Literal["constant", "linear", "cosine"]
