"""Generator -> ONNX: the EMA generator with BatchNorm folded into its convolutions, a dynamic batch
axis, distgan metadata, and a check against PyTorch before the file is kept. A conditional
generator gets a second input, `label` (export/labels.py), and its class names in the metadata."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from distgan import __version__
from distgan.errors import UserError, first_line
from distgan.models.conditioning import ConditionalBatchNorm2d
from distgan.models.dcgan import Generator, sample_latents
from distgan.outputs.checkpoint import load_generator
from distgan.outputs.generator_file import GENERATOR_WEIGHTS
from distgan.runtime.files import write_atomically
from distgan.runtime.ort_providers import pick_providers
from export.labels import check_labels
from export.runtime import (
    FLOAT_OUTPUT,
    LABEL_INPUT,
    UINT8_OUTPUT,
    create_session,
    session_device,
)

OPSET = 18
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
CHECK_BATCHES = (1, 7, 64)


def fold_batchnorm(generator: Generator) -> nn.Sequential:
    """G's layers with each BatchNorm folded into the transposed conv before it (eval statistics):
    fewer ops at inference, and the same function. A conditional BatchNorm's normalisation (with
    its affine, when the label adds a bias alone) folds the same way; the layer stays, as the
    label's gain and bias, or bias."""
    layers = list(copy.deepcopy(generator).eval().net)
    folded: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d):
            folded[-1] = fuse_conv_bn_eval(folded[-1], layer, transpose=True)
            continue
        if isinstance(layer, ConditionalBatchNorm2d):
            folded[-1] = fuse_conv_bn_eval(folded[-1], layer.norm, transpose=True)
            layer.norm = nn.Identity()
        folded.append(layer)
    return nn.Sequential(*folded)


class InferenceGenerator(nn.Module):
    """What the ONNX graph computes: z [B, z_dim] float32 (and, when conditional, label: int64
    class indices [B] or float32 multi-hot attributes [B, K]) -> image, float32 [B, C, H, W] in
    [-1, 1] or, with `uint8`, [B, H, W, C] uint8 pixels ready to save (C: 3 RGB, or 1 gray).
    `half` computes the convolutions in fp16 inside (a label's maps stay fp32)."""

    def __init__(self, generator: Generator, *, uint8: bool = False, half: bool = False):
        super().__init__()
        self.z_dim = generator.config.z_dim
        self.net = fold_batchnorm(generator)
        self.generator = None
        if generator.config.label_count:  # G's own forward, which feeds the label (a self-
            # conditioned G's from z), on the folded net
            self.generator = copy.deepcopy(generator).eval()
            self.generator.net = self.net
        self.uint8, self.half = uint8, half
        for layer in self.net if half else []:
            if isinstance(layer, nn.ConvTranspose2d):
                layer.half()

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.generator is None:
            x = z.reshape(z.shape[0], self.z_dim, 1, 1)
            image = self.net(x.half() if self.half else x).float()
        else:
            if self.generator.config.cluster_shares:  # from z before fp16 rounds it
                label = self.generator.clusters(z)
            image = self.generator.synthesize(z.half() if self.half else z, label).float()
        if self.uint8:
            pixels = torch.clamp((image + 1.0) * 127.5 + 0.5, 0.0, 255.0)
            return pixels.to(torch.uint8).permute(0, 2, 3, 1)
        return image


def reference_output(
    generator: Generator, z: np.ndarray, *, uint8: bool, labels: np.ndarray | None = None
) -> np.ndarray:
    """The unfolded fp32 PyTorch generator's output for `z` (and `labels`), in the ONNX output's
    format."""
    labels = None if labels is None else torch.from_numpy(labels)
    with torch.no_grad():
        image = generator.eval()(torch.from_numpy(z), labels)
    if uint8:
        image = torch.clamp((image + 1.0) * 127.5 + 0.5, 0.0, 255.0).floor().permute(0, 2, 3, 1)
    return image.numpy()


def export_onnx(
    generator_path: str | Path,
    out_path: str | Path,
    *,
    uint8: bool = False,
    fp16: bool = False,
    log=print,
) -> dict:
    """Export, verify, and only then move the model to `out_path`. Returns the check's errors
    by batch size (CPU provider), and on a GPU the CUDA provider's under "cuda"."""
    generator, meta = load_generator(generator_path)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder: give a file name such as g.onnx")
    if not out_path.parent.exists():
        raise UserError(f"--out folder {out_path.parent} does not exist: create it first")
    precision = "fp16" if fp16 else "fp32"
    module = InferenceGenerator(generator, uint8=uint8, half=fp16).eval()
    config = generator.config
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = (sample_latents(config, 2),)
    dynamic_shapes = {"z": {0: batch}}
    if config.classes:  # a second input, on the same batch axis
        example += (torch.from_numpy(check_labels(config.conditioning, config.num_classes, 2)),)
        dynamic_shapes[LABEL_INPUT] = {0: batch}
    with torch.no_grad(), warnings.catch_warnings():
        # z and label share the batch axis: the exporter says it names that axis once
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(dynamic_shapes),
            output_names=["image"],
            opset_version=OPSET,
            external_data=False,
        )
    model = program.model_proto
    metadata = {
        "producer": "distgan",
        "distgan_version": __version__,
        "z_dim": str(config.z_dim),
        "z_distribution": config.z_distribution,
        "resolution": str(config.resolution),
        "channels": str(config.channels),
        "output_format": UINT8_OUTPUT if uint8 else FLOAT_OUTPUT,
        "precision": precision,
        "step": str(meta.get("step", "")),
        "model_config": json.dumps(config.to_dict()),
        "conditioning": config.conditioning,  # "none", "class" or "attributes"
        "classes": json.dumps(config.classes),  # the names, in label order ([] when "none")
        "source_generator": str(Path(generator_path).resolve()),  # for `python -m export bench`
    }
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)

    def save_verified(tmp: Path) -> dict:  # a model that fails the check is never moved into place
        onnx.save(model, str(tmp))
        return verify(tmp, generator, uint8=uint8, tolerance=TOLERANCE[precision], log=log)

    return write_atomically(out_path, save_verified)


def cuda_session(path: Path, log=print):
    """A session on onnxruntime's CUDA provider where one really runs here, else None."""
    if pick_providers("auto")[0] == "CPUExecutionProvider":
        return None  # no GPU: no second session to pay for
    session = create_session(path, "auto")
    if session_device(session) != "cuda":
        log("CUDA provider did not load (onnxruntime fell back to the CPU): no GPU figure")
        return None
    return session


def verify(path: Path, generator: Generator, *, uint8: bool, tolerance: float, log=print) -> dict:
    """onnxruntime vs PyTorch on fresh random z (from the model's z distribution) at several
    batch sizes, and for a conditional model on labels drawn the same every time
    (export.labels.check_labels: every class at batch 64); raise if out of tolerance.

    The check runs on the CPU provider: onnxruntime's CUDA convolutions use TF32 by default
    (errors ~1e-3), so on a GPU the CUDA provider's error is measured too, logged and returned
    under "cuda", but not checked. Errors are in [-1, 1] image units; for uint8 output, in pixel
    levels, where a value at a .5 boundary may round either way, so the limit is at least one level.
    """
    session = create_session(path, "cpu")
    on_gpu = cuda_session(path, log)
    limit = max(1.0, float(np.ceil(tolerance * 127.5))) if uint8 else tolerance
    unit = " levels" if uint8 else ""
    errors, gpu_errors = {}, {}
    config = generator.config
    for batch in CHECK_BATCHES:
        z = sample_latents(config, batch).numpy()
        labels = check_labels(config.conditioning, config.num_classes, batch)
        feeds = {"z": z} if labels is None else {"z": z, LABEL_INPUT: labels}
        ours = session.run(["image"], feeds)[0].astype(np.float32)
        reference = reference_output(generator, z, uint8=uint8, labels=labels)
        if ours.shape != reference.shape:
            raise RuntimeError(f"ONNX output shape {ours.shape} != PyTorch {reference.shape}")
        errors[batch] = float(np.abs(ours - reference).max())
        error = f"{errors[batch]:.2e}{unit}"
        line = f"batch {batch:3d}: max abs error vs PyTorch {error} (limit {limit:g})"
        if on_gpu is not None:
            try:
                gpu = on_gpu.run(["image"], feeds)[0].astype(np.float32)
            except Exception as err:  # an informative figure: a CUDA failure must not fail export
                detail = first_line(err, 160)
                log(f"CUDA provider failed ({detail}): no GPU figure")
                on_gpu = None
            else:
                gpu_errors[batch] = float(np.abs(gpu - reference).max())
                line += f"; CUDA provider {gpu_errors[batch]:.2e}{unit} (not checked)"
        log(line)
    worst = max(errors.values())
    if worst > limit:
        raise UserError(
            f"the exported model differs from PyTorch by {worst:.2e} > {limit:g}: export failed "
            "(nothing was written)"
        )
    if gpu_errors:
        errors["cuda"] = gpu_errors
    return errors


def resolve_generator(run: str | None, generator: str | None) -> Path:
    if run:
        return Path(run) / GENERATOR_WEIGHTS
    return Path(generator)
