"""Conditional models out of PyTorch: the ONNX export of a class-conditional generator (int64 class
indices) and of an attribute-conditional one (float32 multi-hot) has a second input `label` on the
same dynamic batch axis, no BatchNorm left, `conditioning` and `classes` in its metadata beside
the old keys, and matches PyTorch with labels (fp32, fp16, uint8); the export's own check covers
the label. `generate --class` (by name, else index; attribute sets; `all`: a subfolder and a grid
row per class, in the order of the training grids) is deterministic per seed and class, the
class leaves z alone, and the images are PyTorch's; a missing, unknown or unwanted --class is a
one-line error. `bench` and `evaluate --onnx` feed labels too. A self-conditioned generator
(--clusters) exports with z alone, its cluster read from z inside the graph, in fp32 and fp16,
with a per-cluster gain and bias or a bias alone (g_label_gain)."""

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from distgan.config.model import ModelConfig
from distgan.errors import UserError
from distgan.metrics.evaluate import OnnxGenerator, build_parser, evaluate
from distgan.models import conditioning
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import save_generator
from export.bench import ort_side, torch_side
from export.generate import Runner, generate, to_pixels
from export.labels import grid_rows, select_labels
from export.latents import latents
from export.onnx_export import InferenceGenerator, export_onnx
from export.runtime import create_session, model_info
from tests.helpers import assert_one_line_errors, linear_onnx_generator, run_generate

DIGITS = [str(d) for d in range(10)]
ATTRIBUTES = ["Smiling", "Male", "Eyeglasses"]


def conditional_generator(folder, conditioning, classes, **config) -> Generator:
    """A small conditional (or, with cluster_shares, self-conditioned) G with BatchNorm
    statistics off 0/1 and images that show their label (larger weights than at init), saved
    as a run saves it."""
    torch.manual_seed(0)
    model = ModelConfig(
        g_channels=8, z_dim=16, conditioning=conditioning, classes=classes, **config
    )
    generator = Generator(model).train()
    with torch.no_grad():
        for _ in range(3):
            labels = conditioning_labels(model, 32, torch.Generator().manual_seed(1))
            generator(torch.randn(32, 16), labels)
        for module in generator.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.mul_(4)
            if isinstance(module, torch.nn.Embedding):  # gains and biases that differ
                module.weight.normal_(0.0, 1.0)
    save_generator(folder, generator.eval(), step=42, images_seen=420)
    return generator


def conditioning_labels(config, count, rng):
    return conditioning.draw_labels(config, count, generator=rng)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"class": (G, {format: path}), "attributes": ...}: 28 px gray digits 0-9 and 32 px RGB
    attributes, exported as fp32, fp16 and uint8."""
    tmp = tmp_path_factory.mktemp("conditional")
    found = {}
    for kind, classes, config in [
        ("class", DIGITS, {"resolution": 28, "channels": 1}),
        ("attributes", ATTRIBUTES, {"resolution": 32}),
    ]:
        generator = conditional_generator(tmp / kind, kind, classes, **config)
        paths = {}
        for name, options in {"fp32": {}, "fp16": {"fp16": True}, "uint8": {"uint8": True}}.items():
            paths[name] = tmp / f"{kind}-{name}.onnx"
            export_onnx(
                tmp / kind / "generator.safetensors", paths[name], log=lambda _: None, **options
            )
        found[kind] = (generator, paths)
    return found


def test_the_graph_has_a_label_input_on_the_batch_axis_and_class_metadata(models):
    for kind, label_type, label_dims in [("class", 7, 1), ("attributes", 1, 2)]:
        model = onnx.load(models[kind][1]["fp32"])
        z, label = model.graph.input
        assert (z.name, label.name) == ("z", "label")
        assert label.type.tensor_type.elem_type == label_type  # int64, or float32
        dims = label.type.tensor_type.shape.dim
        assert (
            len(dims) == label_dims
            and dims[0].dim_param == z.type.tensor_type.shape.dim[0].dim_param
        )
        if kind == "attributes":
            assert dims[1].dim_value == 3
        assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["conditioning"] == kind and meta["step"] == "42" and meta["z_dim"] == "16"
        assert {"model_config", "z_distribution", "channels", "output_format"} <= meta.keys()
        info = model_info(create_session(models[kind][1]["uint8"], "cpu"))
        expected = DIGITS if kind == "class" else ATTRIBUTES
        assert (info.conditioning, info.classes) == (kind, tuple(expected))


@pytest.mark.parametrize("kind", ["class", "attributes"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_matches_pytorch_with_labels_in_every_format(models, kind, batch):
    generator, paths = models[kind]
    rng = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, 16, generator=rng)
    labels = conditioning_labels(generator.config, batch, rng)
    with torch.no_grad():
        reference = generator.eval()(z, labels).numpy()
    feeds = {"z": z.numpy(), "label": labels.numpy()}
    assert feeds["label"].dtype == (np.int64 if kind == "class" else np.float32)
    for name, limit in [("fp32", 1e-4), ("fp16", 2e-2)]:
        ours = create_session(paths[name], "cpu").run(None, feeds)[0]
        assert ours.shape == reference.shape and np.abs(ours - reference).max() <= limit, name
    pixels = create_session(paths["uint8"], "cpu").run(None, feeds)[0].astype(int)
    expected = to_pixels(reference).astype(int)
    assert np.abs(pixels.reshape(expected.shape) - expected).max() <= 1
    if batch == 64:  # the label matters: the same z with other labels gives other images
        other = {"z": z.numpy(), "label": np.roll(labels.numpy(), 1, axis=0)}
        moved = create_session(paths["fp32"], "cpu").run(None, other)[0]
        assert np.abs(moved - reference).mean() > 0.05


def test_the_exports_check_covers_the_label(models, tmp_path, monkeypatch):
    """An export that ignored the label would pass a check on z alone: it must fail."""
    forward = InferenceGenerator.forward
    monkeypatch.setattr(
        InferenceGenerator,
        "forward",
        lambda self, z, label: forward(self, z, torch.zeros_like(label)),
    )
    source = models["class"][1]["fp32"].parent / "class" / "generator.safetensors"
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx(source, tmp_path / "bad.onnx", log=lambda _: None)
    assert not list(tmp_path.glob("*.onnx"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_generate_class_is_the_same_per_seed_and_class_and_is_pytorchs(models, tmp_path):
    generator, paths = models["class"]
    model = ["--model", paths["fp32"], "--seeds", "0-5"]
    for folder, args in [("a", ["--class", "7"]), ("b", ["--class", "7", "--batch-size", "4"])]:
        result = run_generate(*model, *args, "--out-dir", tmp_path / folder)
        assert result.returncode == 0, result.stderr
    export_main_args = ["--seeds", "3", "--class", "3", "--batch-size", "1"]
    assert (
        run_generate(
            "--model", paths["uint8"], *export_main_args, "--out-dir", tmp_path / "c"
        ).returncode
        == 0
    )
    names = [f"seed{s:04d}.png" for s in range(6)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    for name in names:  # same seed and class: the same file, at any batch size
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    threes = generate(paths["fp32"], list(range(6)), 3, tmp_path / "d", label="3", progress=False)
    sevens = np.stack([pixels(tmp_path / "a" / n) for n in names])
    assert np.abs(np.stack([pixels(p) for p in threes]) - sevens).mean() > 5  # another class
    assert np.abs(pixels(tmp_path / "c" / "seed0003.png") - pixels(threes[3])).max() <= 1
    with torch.no_grad():  # the PyTorch generator fed the seeds' z and the class
        z = torch.from_numpy(latents(range(6), 16))
        reference = to_pixels(generator(z, torch.full((6,), 7)).numpy()).astype(int)
    assert sevens.std() > 10 and np.abs(sevens - reference).max() <= 1


def test_class_all_writes_a_folder_and_a_grid_row_per_class(models, tmp_path):
    _, paths = models["class"]
    result = run_generate(
        "--model", paths["uint8"], "--seeds", "4-6", "--class", "all", "--out-dir", tmp_path / "all"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 30 images" in result.stdout
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted([*DIGITS, "grid.png"])
    generate(paths["uint8"], [5], 1, tmp_path / "seven", label="7", progress=False)
    alone = (tmp_path / "seven" / "seed0005.png").read_bytes()
    assert (tmp_path / "all" / "7" / "seed0005.png").read_bytes() == alone  # label leaves z alone
    grid = pixels(tmp_path / "all" / "grid.png")
    assert grid.shape == (10 * 30 + 2, 3 * 30 + 2)  # a row per class, a column per seed
    seven_row = grid[2 + 7 * 30 : 2 + 7 * 30 + 28, 2 + 30 : 2 + 30 + 28]
    assert np.array_equal(seven_row, pixels(tmp_path / "seven" / "seed0005.png"))


def test_attributes_by_name_index_and_all(models, tmp_path):
    generator, paths = models["attributes"]
    by_name = generate(
        paths["fp32"], [1, 2], 2, tmp_path / "a", label="Smiling,Eyeglasses", progress=False
    )
    by_index = generate(paths["fp32"], [1, 2], 2, tmp_path / "b", label="0, 2", progress=False)
    for a, b in zip(by_name, by_index, strict=True):
        assert a.read_bytes() == b.read_bytes()
    with torch.no_grad():
        z = torch.from_numpy(latents([1, 2], 16))
        reference = to_pixels(generator(z, torch.tensor([[1.0, 0.0, 1.0]] * 2)).numpy()).astype(int)
    assert np.abs(np.stack([pixels(p) for p in by_name]) - reference).max() <= 1
    rows = generate(paths["fp32"], [1], 1, tmp_path / "all", label="all", progress=False)
    folders = [p.parent.name for p in rows]
    assert folders == [
        "none",
        "Eyeglasses",
        "Male",
        "Male+Eyeglasses",
        "Smiling",
        "Smiling+Eyeglasses",
        "Smiling+Male",
        "Smiling+Male+Eyeglasses",
    ]
    assert (tmp_path / "all" / "Smiling+Eyeglasses" / "seed0001.png").read_bytes() == by_name[
        0
    ].read_bytes()


@pytest.mark.parametrize(
    ("kind", "classes"),
    [
        ("class", DIGITS),
        ("attributes", ATTRIBUTES),
        ("attributes", list("ABCDEF")),
        ("attributes", ["x"]),
    ],
)
def test_the_grid_rows_are_the_training_grids(kind, classes):
    names, labels = conditioning.grid_rows(ModelConfig(conditioning=kind, classes=classes))
    rows = grid_rows(kind, classes)
    assert [row.name for row in rows] == names
    assert np.array_equal(np.stack([row.label for row in rows]), labels.numpy())


def test_class_names_come_before_indices():
    [row] = select_labels("0", "class", ["1", "0"])  # the class named 0, which is index 1
    assert (row.name, int(row.label)) == ("0", 1)
    [row] = select_labels("1", "class", ["cat", "dog"])
    assert (row.name, int(row.label)) == ("dog", 1)
    [row] = select_labels("none", "attributes", ATTRIBUTES)
    assert row.name == "none" and not row.label.any()
    assert row.batch(3).shape == (3, 3) and row.batch(3).dtype == np.float32


def test_missing_unknown_and_unwanted_class_are_one_line_errors(models, tmp_path):
    from tests.export.test_export import trained_like_generator  # an unconditional export

    run, _ = trained_like_generator(tmp_path)
    plain = tmp_path / "plain.onnx"
    export_onnx(run / "generator.safetensors", plain, log=lambda _: None)
    digits, attributes = models["class"][1]["fp32"], models["attributes"][1]["fp32"]
    out = ["--seeds", "1-2", "--out-dir", tmp_path / "o"]
    cases = [
        (
            ["--model", digits, *out],
            "conditional on 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9): choose with --class",
        ),
        (
            ["--model", digits, "--class", "eight", *out],
            "'eight' is not one of the model's classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)",
        ),
        (["--model", digits, "--class", "10", *out], "an index 0 .. 9"),
        (
            ["--model", attributes, "--class", "Smiling,Bald", *out],
            "'Bald' is not one of the model's attributes (Smiling, Male, Eyeglasses)",
        ),
        (
            ["--model", plain, "--class", "7", *out],
            "this model is unconditional (it has no classes): drop --class",
        ),
        (
            ["--model", digits, "--class", "all", "--interpolate", 3, *out],
            "--interpolate walks within one class",
        ),
    ]
    assert_one_line_errors(run_generate, cases)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_metadata_that_contradicts_the_inputs_is_refused(models, tmp_path):
    linear_onnx_generator(tmp_path / "old.onnx")  # no conditioning keys: as before them
    info = model_info(create_session(tmp_path / "old.onnx", "cpu"))
    assert (info.conditioning, info.classes) == ("none", ())
    model = onnx.load(models["class"][1]["fp32"])
    for key, value, message in [
        ("conditioning", "none", "conditioning 'none' with 10 classes"),
        ("conditioning", "attributes", "and a \\[batch, K\\] attribute label input"),
        ("conditioning", "colour", "conditioning 'colour' is not one of"),
        ("classes", "[]", "conditioning 'class' with 0 classes"),
        ("classes", "{not json", "are not a JSON list"),
    ]:
        kept = [p for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        model.metadata_props.extend([*kept, onnx.StringStringEntryProto(key=key, value=value)])
        onnx.save(model, tmp_path / "m.onnx")
        with pytest.raises(UserError, match=message):
            model_info(create_session(tmp_path / "m.onnx", "cpu"))
        model = onnx.load(models["class"][1]["fp32"])


def test_bench_and_evaluate_feed_labels(models, jpeg_folder, tmp_path):
    generator, paths = models["class"]
    z = np.random.default_rng(3).standard_normal((4, 16), dtype=np.float32)
    labels = np.array([0, 3, 7, 9])
    from_torch = torch_side(generator, z, torch.device("cpu"), labels)()
    from_ort = ort_side(Runner(create_session(paths["fp32"], "cpu")), z, labels)()
    assert from_torch.shape == (4, 1, 28, 28) and np.abs(from_torch - from_ort).max() <= 1e-4

    onnx_generator = OnnxGenerator(paths["uint8"], torch.device("cpu"))
    with torch.no_grad():
        reference = generator(torch.from_numpy(z), torch.from_numpy(labels))
    assert (
        onnx_generator(torch.from_numpy(z), torch.from_numpy(labels)) - reference
    ).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="conditional \\(class\\): pass labels"):
        onnx_generator(torch.from_numpy(z))
    data = ["--data-dir", str(jpeg_folder), "--cache-dir", str(tmp_path)]
    scoring = ["--features", "pixels", "--num", "8", "--batch-size", "4"]
    result = evaluate(build_parser().parse_args(["--onnx", str(paths["fp32"]), *data, *scoring]))
    assert result["torch_fid"] == pytest.approx(result["fid"], rel=1e-3)  # the same z and labels


@pytest.mark.parametrize("gain", [True, False])
def test_a_self_conditioned_generator_exports_with_z_alone(tmp_path, gain):
    shares = [0.4, 0.35, 0.25]
    generator = conditional_generator(
        tmp_path, "none", [], cluster_shares=shares, g_label_gain=gain
    )
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    assert len(set(generator.clusters(z).tolist())) == 3
    with torch.no_grad():
        reference = generator.eval()(z).numpy()
    for name, options, limit in [("fp32", {}, 1e-4), ("fp16", {"fp16": True}, 2e-2)]:
        path = tmp_path / f"clusters-{name}.onnx"
        export_onnx(tmp_path / "generator.safetensors", path, log=lambda _: None, **options)
        assert [i.name for i in onnx.load(path).graph.input] == ["z"]
        ours = create_session(path, "cpu").run(None, {"z": z.numpy()})[0]
        assert np.abs(ours - reference).max() <= limit, name
