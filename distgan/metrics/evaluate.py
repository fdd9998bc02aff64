"""`distgan evaluate`: FID and KID of a trained generator (`--run`) or an exported ONNX
model (`--onnx`) against a folder of images, with the same pipeline and cache as training.

With `--onnx`, the PyTorch generator it was exported from (`--run`, or the path recorded in the
model) is scored on the same z too, and the two must agree within `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

from distgan.config.model import ModelConfig
from distgan.data.faces import ensure_builtin_faces, render_size
from distgan.data.folder import find_images
from distgan.data.loader import dali_device_id
from distgan.errors import UserError, exit_on_user_error, first_line
from distgan.metrics.features import make_extractor
from distgan.metrics.stats import SingleProcess, real_files, reference_stats, score
from distgan.outputs.checkpoint import load_generator
from distgan.outputs.generator_file import GENERATOR_WEIGHTS
from distgan.runtime.paths import default_cache_dir

SCORE_KEYS = ("fid", "kid_mean", "kid_std", "seconds")


class OnnxGenerator:
    """An exported model behind the interface fake_stats uses: z (and, for a conditional model,
    labels as the PyTorch generator takes them) -> images in [-1, 1]."""

    training = False

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort

        from distgan.runtime.ort_providers import pick_providers

        if not path.is_file():
            raise UserError(
                f"--onnx {path} does not exist: export one with `python -m export onnx`"
            )
        providers = pick_providers("auto" if device.type == "cuda" else "cpu")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:
            raise UserError(f"{path} is not a usable ONNX model ({first_line(err, 150)})") from None
        # what ran, not what was asked: a CUDA provider that fails to load falls back to the CPU
        self.provider = self.session.get_providers()[0]
        self.meta = self.session.get_modelmeta().custom_metadata_map
        if "model_config" not in self.meta:
            raise UserError(
                f"{path} has no distgan metadata: export it with `python -m export onnx`"
            )
        self.config = ModelConfig.from_dict(json.loads(self.meta["model_config"]))
        self.uint8 = self.session.get_outputs()[0].type == "tensor(uint8)"

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if bool(self.config.classes) != (labels is not None):  # as Generator.forward
            conditional = f"conditional ({self.config.conditioning})"
            wants = f"{conditional}: pass labels" if labels is None else "unconditional: no labels"
            raise ValueError(f"the ONNX model is {wants}")
        feeds = {"z": z.cpu().numpy().astype(np.float32)}
        if labels is not None:  # class indices int64 [B], or multi-hot attributes float32 [B, K]
            kind = np.int64 if self.config.conditioning == "class" else np.float32
            feeds["label"] = labels.cpu().numpy().astype(kind)
        images = torch.from_numpy(self.session.run(None, feeds)[0])
        if self.uint8:  # [B, H, W, C] pixels -> [B, C, H, W] in [-1, 1], exactly invertible
            return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return images


def run_config(run: Path | None) -> dict:
    """The [data] section of a run's config.toml (its data folder and crop), if there is one."""
    if run is None or not (run / "config.toml").is_file():
        return {}
    return tomllib.loads((run / "config.toml").read_text()).get("data", {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distgan.metrics.evaluate", description=__doc__)
    parser.add_argument(
        "--run", type=Path, help="a training output folder (its generator.safetensors)"
    )
    parser.add_argument("--onnx", type=Path, help="an exported ONNX generator")
    parser.add_argument(
        "--data-dir", help="reference images (default: the run's data, else the built-in faces)"
    )
    parser.add_argument("--num", type=int, default=50_000, help="generated images (default 50000)")
    parser.add_argument("--real-num", type=int, help="reference images (default: all)")
    parser.add_argument("--features", default="inception", help="inception (default) or pixels")
    parser.add_argument(
        "--inception-weights", help="the FID Inception weights file (offline machines)"
    )
    parser.add_argument(
        "--crop-box", type=int, nargs=4, metavar="N", help="as in training (default: the run's)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated z")
    parser.add_argument("--cache-dir", help="where real statistics are cached")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="largest relative FID difference between ONNX and PyTorch (default 0.01)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="append the result to this JSONL file (default with --run: RUN/eval.jsonl)",
    )
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    if not args.run and not args.onnx:
        raise UserError("give --run OUT_DIR or --onnx MODEL to evaluate")
    if args.num < 2 or args.batch_size < 1:
        raise UserError(
            f"--num {args.num} --batch-size {args.batch_size} is not allowed: use --num >= 2, "
            "--batch-size >= 1"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generators = {}
    if args.onnx:
        generators["onnx"] = OnnxGenerator(args.onnx, device)
        source = (
            args.run / GENERATOR_WEIGHTS
            if args.run
            else generators["onnx"].meta.get("source_generator")
        )
        if source and Path(source).exists():
            generators["torch"] = load_generator(source)[0].to(device)
            args.run = args.run or Path(source).parent  # its config.toml tells the data and crop
    else:
        generators["torch"] = load_generator(args.run)[0].to(device)
    config = next(iter(generators.values())).config
    saved = run_config(args.run)
    crop_box = args.crop_box or saved.get("crop_box")
    data_dir = args.data_dir or saved.get("data_dir")
    cache_dir = args.cache_dir or saved.get("cache_dir")
    if data_dir is None:
        faces = saved.get("builtin_faces", 10_000)
        data_dir = ensure_builtin_faces(faces, render_size(config.resolution), cache_dir)
    try:
        files = find_images(data_dir)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None

    extractor = make_extractor(args.features, args.inception_weights, device)
    dist = SingleProcess()
    pipeline = {"resolution": config.resolution, "crop_box": crop_box, "num_threads": 2}
    pipeline["channels"] = config.channels  # a gray model is scored against gray real images
    real = reference_stats(
        dist,
        extractor,
        real_files(files, args.real_num),
        cache_dir=cache_dir or default_cache_dir(),
        log=lambda line: print(line, file=sys.stderr),  # stdout is the result's JSON line
        batch_size=args.batch_size,
        device_id=dali_device_id(device),
        **pipeline,
    )

    result = {"model": str(args.onnx or args.run)}
    if "onnx" in generators:
        result["onnx_provider"] = generators["onnx"].provider
    subject = next(iter(generators))  # the model asked about; any other is its reference
    options = {"batch_size": args.batch_size, "seed": args.seed, "device": device}
    for name, generator in generators.items():
        scored = score(dist, extractor, generator, real, count=args.num, **options)
        if name == subject:
            result.update(scored)
        else:
            result.update({f"{name}_{k}": scored[k] for k in SCORE_KEYS})
    if "torch_fid" in result:
        difference = abs(result["fid"] - result["torch_fid"]) / max(result["torch_fid"], 1e-12)
        result["onnx_vs_torch_relative_fid_difference"] = difference
        if difference > args.tolerance:
            raise UserError(
                f"the ONNX model scores FID {result['fid']:.4f} but PyTorch "
                f"{result['torch_fid']:.4f} on the same z: the export is off"
            )
    return result


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        result = evaluate(args)
    line = json.dumps(result)
    print(line)
    out = args.out or (args.run / "eval.jsonl" if args.run and not args.onnx else None)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
