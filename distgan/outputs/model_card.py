"""The model card of a run's Hub model folder (README.md): the metadata the Hub indexes (YAML:
resolution, channels, training data, steps, the conditioning and classes of a conditional model,
and FID/KID where training measured them with the Inception features) and a page saying what the
model is, how it was trained, how well it scores and how to use it (with labels, when
conditional).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distgan import __version__
from distgan.config.config import Config
from distgan.config.model import ModelConfig
from distgan.outputs.checkpoint import TrainerState
from distgan.outputs.model_folder import LIBRARY
from distgan.outputs.report import read_jsonl

CARD_FILE = "README.md"
SAMPLES_FILE = "samples.png"
PIPELINE_TAG = "unconditional-image-generation"
TAGS = ["dcgan", "gan", "pytorch", "safetensors"]
CONDITIONAL_TAGS = {"class": "class-conditional", "attributes": "attribute-conditional"}
REPO_PLACEHOLDER = "USER/NAME"  # in the card; `push` puts the repo id in its place
BUILTIN_DATA = "built-in faces"


def data_label(cfg: Config) -> str:
    """What the card calls the training data: the data folder's name, or the built-in faces."""
    return Path(cfg.data.data_dir).name if cfg.data.data_dir else BUILTIN_DATA


def final_score(run_dir: Path, step: int) -> dict | None:
    """The FID/KID that training measured for the generator of `step` with the Inception
    features (none: pixel features are a smoke test, not FID), from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    scored = [
        r
        for r in records
        if r.get("step") == step
        and "fid" in r
        and str(r.get("feature_extractor", "")).startswith("inception")
    ]
    return scored[-1] if scored else None


def model_card(cfg: Config, state: TrainerState, *, name: str, score, samples: bool) -> ModelCard:
    """The card: metadata the Hub indexes (YAML) and a page saying what the model is, how it was
    trained, how well it scores and how to use it."""
    model, tc = state.model, cfg.train
    data = data_label(cfg)
    metadata = {
        "resolution": model.resolution,
        "channels": model.channels,
        "z_dim": model.z_dim,
        "z_distribution": model.z_distribution,
        "training_data": data,
        "steps": state.step,
        "images_seen": state.images_seen,
        "distgan_version": __version__,
    }
    if model.classes:
        metadata.update(conditioning=model.conditioning, classes=list(model.classes))
    results = None
    if score is not None:
        metadata.update(fid=round(score["fid"], 4), kid=round(score["kid_mean"], 6))
        common = {"task_type": PIPELINE_TAG, "dataset_type": data, "dataset_name": data}
        counts = {"n_fake": score["n_fake"], "n_real": score["n_real"], "features": "inception-v3"}
        results = [
            EvalResult(
                **common,
                metric_type=key,
                metric_name=key.upper(),
                metric_value=metadata[key],
                metric_args=counts,
            )
            for key in ("fid", "kid")
        ]
    card_data = ModelCardData(
        library_name=LIBRARY,
        pipeline_tag=PIPELINE_TAG,
        tags=TAGS + ([CONDITIONAL_TAGS[model.conditioning]] if model.classes else []),
        model_name=name if results else None,  # the model-index's name; alone it says nothing
        eval_results=results,
        **metadata,
    )
    colour = "grayscale" if model.channels == 1 else "RGB"
    z_law = "U[-1, 1]" if model.z_distribution == "uniform" else "N(0, 1)"
    lines = [f"# {name}", ""]
    lines += [
        f"A {conditioned(model)}DCGAN generator ({model.resolution}x{model.resolution} {colour} "
        f"images from a {model.z_dim}-d latent z ~ {z_law}) trained with distgan on {data}: the "
        "exponential moving average (EMA) of the generator's weights at the end of training.",
        "",
    ]
    if model.classes:
        what = "Classes" if model.conditioning == "class" else "Attributes"
        lines += [f"{what} (in label order): {', '.join(model.classes)}.", ""]
    if model.cluster_shares:
        lines += [
            f"Self-conditioned on {len(model.cluster_shares)} k-means clusters of its training "
            "images (no labels): it picks each image's cluster from z, so it takes z alone.",
            "",
        ]
    if samples:
        lines += [
            f"![Samples of the EMA generator at step {state.step}]({SAMPLES_FILE})",
            "",
            f"*The EMA generator at step {state.step}, on the run's fixed z.*",
            "",
        ]
    measured = (
        f"FID {score['fid']:.2f}, KID {score['kid_mean']:.4f} ({score['n_fake']} generated vs "
        f"{score['n_real']} real images, Inception-v3 features)"
        if score
        else "not measured at the last step (train with `--eval-every`)"
    )
    minutes = state.wall_time / 60
    took = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
    lines += [
        "## Training",
        "",
        f"- Data: {data}, at {model.resolution}x{model.resolution}",
        f"- Steps: {state.step} ({state.images_seen:,} images, global batch "
        f"{state.global_batch or tc.batch_size}), {took} of training",
        f"- Loss {tc.loss}, Adam lr G {tc.lr_g:g} / D {tc.lr_d:g}, betas ({tc.beta1:g}, "
        f"{tc.beta2:g}), EMA decay {tc.ema_decay:g}, precision {state.precision or 'no'}",
        f"- Generator width {model.g_channels}, discriminator width {model.d_channels}",
        f"- Scores: {measured}",
        "",
        "## Use",
        "",
        *usage(model),
        "",
        f"Fine-tune it on a folder of images: `python launch/train.py --init-from "
        f"{REPO_PLACEHOLDER} --data-dir DIR{fine_tune_labels(model)}`. Where the repository "
        "holds an ONNX export: "
        f"`python -m export generate --model FILE.onnx --num 16 {class_flag(model)}--out-dir "
        "faces` (onnxruntime only).",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def conditioned(model: ModelConfig) -> str:
    return f"{CONDITIONAL_TAGS[model.conditioning]} " if model.classes else ""


def class_flag(model: ModelConfig) -> str:
    """The ONNX `generate` flag that asks for the first class (or attribute), if conditional."""
    return f"--class {shlex.quote(model.classes[0])} " if model.classes else ""


def fine_tune_labels(model) -> str:
    """The labels flags a fine-tuning run of a conditional model needs (the same classes)."""
    if model.conditioning == "class":
        return " --labels folders"  # DIR/<class>/*.png, one folder per class of the model
    if model.conditioning == "attributes":
        return f" --labels list_attr_celeba.txt --attributes {','.join(model.classes)}"
    return ""


def usage(model: ModelConfig) -> list[str]:
    """The card's Python: load the generator and draw 16 images (of one class, when
    conditional: a class index [B], or a multi-hot attribute vector [B, K])."""
    lines = [
        "```python",
        *(["import torch", ""] if model.classes else []),
        "from distgan.models.dcgan import Generator, sample_latents",
        "",
        f'generator = Generator.from_pretrained("{REPO_PLACEHOLDER}")  # or a local folder',
    ]
    if not model.classes:
        lines.append(
            "images = generator(sample_latents(generator.config, 16))  # [16, C, H, W] in [-1, 1]"
        )
    elif model.conditioning == "class":
        lines += [
            f"label = generator.config.classes.index({json.dumps(model.classes[0])})  # by name",
            "labels = torch.full((16,), label)  # class indices [16]",
            "images = generator(sample_latents(generator.config, 16), labels)  # [16, C, H, W]",
        ]
    else:
        lines += [
            f"labels = torch.zeros(16, {model.num_classes})  # multi-hot attributes [16, K]",
            f"labels[:, generator.config.classes.index({json.dumps(model.classes[0])})] = 1  # on",
            "images = generator(sample_latents(generator.config, 16), labels)  # [16, C, H, W]",
        ]
    return [*lines, "```"]
