"""The onnxruntime side, without torch: sessions (on the providers distgan.runtime.ort_providers
chooses), and the model's distgan metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from distgan.errors import UserError, first_line  # a torch-free module
from distgan.runtime.ort_cuda import cuda_provider_problem  # torch-free too
from distgan.runtime.ort_providers import CPU_ONLY, pick_providers  # torch-free too
from export.labels import CONDITIONINGS
from export.latents import Z_DISTRIBUTIONS

# The output's layout; its channels (3 RGB, 1 gray) are the "channels" key. Older exports wrote
# "... NCHW RGB ..." / "... NHWC RGB ...": nothing compares the text, readers go by the output type.
FLOAT_OUTPUT = "float32 NCHW in [-1, 1]"
UINT8_OUTPUT = "uint8 NHWC in [0, 255]"
LABEL_INPUT = "label"  # a conditional model's second input (export/labels.py)


def create_session(
    path: str | Path, device: str = "auto", threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation, or a one-line error for a bad file.

    onnxruntime falls back to the CPU when its CUDA provider fails to load (a CUDA/cuDNN major
    other than its build's), printing errors but raising nothing: with `device="cuda"` that is a
    one-line error here; with "auto" the session runs on the CPU, and `session_device` says so.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist: export one with `python -m export onnx`")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    providers = pick_providers(device)
    try:
        session = _open(path, options, providers)
    except UserError:
        if providers == CPU_ONLY:
            raise
        # some builds raise instead of falling back: it may be the CUDA provider, not the model
        session = _open(path, options, CPU_ONLY)
    if device == "cuda" and session_device(session) != "cuda":
        raise UserError(cuda_fallback_message())
    return session


def _open(path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own types for bad protobufs and graphs
        detail = first_line(err)
        raise UserError(f"{path} is not a usable ONNX model ({detail})") from None


def cuda_fallback_message(asked: bool = True) -> str:
    """Why a session meant for CUDA runs on the CPU, with the dynamic loader's word on the
    provider's library; `asked`: --device cuda (an error) rather than auto (a note)."""
    build = str(getattr(ort, "cuda_version", "") or "")  # what this onnxruntime-gpu was built for
    needs = f": this onnxruntime-gpu build needs CUDA {build.split('.')[0]}" if build else ""
    loader = cuda_provider_problem()
    said = f"; the loader says: {loader}" if loader else ""
    head = "CUDA was asked for but onnxruntime" if asked else "a GPU is here but onnxruntime"
    return (
        f"{head} could not load its CUDA provider and fell back to the CPU (probably a "
        f"CUDA/cuDNN version mismatch{needs}{said}): install the onnxruntime-gpu build for your "
        "CUDA major version, or use --device cpu"
    )


def running_on(session: ort.InferenceSession, device: str = "auto") -> str:
    """The provider a session runs on, for a log line; where `device` "auto" found a GPU and
    the session still runs on the CPU, why (a fallback is never silent)."""
    first = session.get_providers()[0]
    if first == "CUDAExecutionProvider" or device == "cpu" or pick_providers(device) == CPU_ONLY:
        return first
    return f"{first} ({cuda_fallback_message(asked=False)})"


def session_device(session: ort.InferenceSession) -> str:
    """Where the session really runs, "cuda" or "cpu" (its first provider), not what was asked."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to feed the model and read its output."""

    z_dim: int
    output_format: str
    resolution: int | None
    precision: str
    step: str
    z_distribution: str = "normal"
    """How the model was trained to read z: "normal" N(0, 1) or "uniform" U[-1, 1]."""
    channels: int = 3
    """3 for RGB images, 1 for grayscale."""
    conditioning: str = "none"
    """What the `label` input takes: "none" (no such input), "class" (int64 class indices [B])
    or "attributes" (float32 multi-hot [B, K])."""
    classes: tuple[str, ...] = ()
    """The class or attribute names, in label order (empty when unconditional)."""


def model_info(session: ort.InferenceSession, z_dim: int | None = None) -> ModelInfo:
    """The model's distgan metadata; `z_dim` given by hand serves models exported elsewhere."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    meta = session.get_modelmeta().custom_metadata_map
    conditioning, classes = read_conditioning(meta)
    label_rank = {"none": None, "class": 1, "attributes": 2}[conditioning]
    ranks = [len(i.shape) for i in inputs]
    if ranks != [2] + ([label_rank] if label_rank else []):
        shapes = [(i.name, i.shape) for i in inputs]
        wanted = {
            "none": "one [batch, z_dim] latent input",
            "class": "a [batch, z_dim] latent input and a [batch] class label input",
            "attributes": "a [batch, z_dim] latent input and a [batch, K] attribute label input",
        }[conditioning]
        raise UserError(f"the model's inputs {shapes} are not {wanted}")
    declared = inputs[0].shape[1]
    if z_dim is not None and isinstance(declared, int) and z_dim != declared:
        raise UserError(f"--z-dim {z_dim} does not match the model's input [batch, {declared}]")
    if "z_dim" in meta:
        z_dim = z_dim or int(meta["z_dim"])
    elif z_dim is None:
        if not isinstance(declared, int):
            raise UserError("the model has no distgan metadata: give its latent size with --z-dim")
        z_dim = declared
    output_format = meta.get("output_format")
    if output_format is None:  # a foreign model: judge by the output's type and layout
        uint8 = outputs[0].type == "tensor(uint8)"
        output_format = UINT8_OUTPUT if uint8 else FLOAT_OUTPUT
    resolution = int(meta["resolution"]) if "resolution" in meta else None
    return ModelInfo(
        z_dim=z_dim,
        output_format=output_format,
        resolution=resolution,
        precision=meta.get("precision", "fp32"),
        step=meta.get("step", ""),
        z_distribution=read_z_distribution(meta),
        channels=read_channels(meta, outputs[0].shape, outputs[0].type == "tensor(uint8)"),
        conditioning=conditioning,
        classes=classes,
    )


def read_conditioning(meta: dict) -> tuple[str, tuple[str, ...]]:
    """The metadata's "conditioning" and "classes" (a JSON list of names); models from before
    conditioning, and foreign ones, are unconditional."""
    conditioning = meta.get("conditioning", "none")
    if conditioning not in CONDITIONINGS:
        raise UserError(
            f"the model's conditioning {conditioning!r} is not one of {', '.join(CONDITIONINGS)}: "
            "re-export it with `python -m export onnx`"
        )
    try:
        classes = json.loads(meta.get("classes", "[]"))
        if not isinstance(classes, list):
            raise ValueError("not a list")
    except ValueError as err:
        raise UserError(
            f"the model's classes {meta['classes']!r} are not a JSON list ({err})"
        ) from None
    if (conditioning == "none") != (not classes):
        raise UserError(
            f"the model's metadata says conditioning {conditioning!r} with {len(classes)} classes:"
            " re-export it with `python -m export onnx`"
        )
    return conditioning, tuple(str(name) for name in classes)


def read_z_distribution(meta: dict) -> str:
    """The metadata's "z_distribution"; models from before it was recorded, and foreign ones,
    were trained on N(0, 1) (older exports wrote "normal(0, 1)")."""
    recorded = meta.get("z_distribution", "normal")
    for known in Z_DISTRIBUTIONS:
        if recorded.startswith(known):
            return known
    raise UserError(
        f"the model's z_distribution {recorded!r} is not one generate can draw "
        f"({', '.join(Z_DISTRIBUTIONS)}): re-export it with `python -m export onnx`"
    )


def read_channels(meta: dict, output_shape: list, uint8: bool) -> int:
    """The metadata's "channels"; else the output's channel axis where it is fixed; else RGB."""
    declared = output_shape[3 if uint8 else 1] if len(output_shape) == 4 else None
    count = meta.get("channels", declared if isinstance(declared, int) else 3)
    if str(count) not in ("1", "3"):
        raise UserError(f"the model's channels {count!r} is not 1 (grayscale) or 3 (RGB)")
    return int(count)
