"""Export: ONNX export of a trained generator (dynamo exporter, opset >= 18, dynamic batch, BN
folded, metadata), its verification against PyTorch (fp32, fp16, uint8; checked on the CPU
provider, a GPU's TF32 figure reported apart), torch-free generation (one PNG per seed, a seed's
image the same alone, at any batch size and from the PyTorch generator; --num; grid,
interpolation, psi and threshold truncation; gray models in gray from the uniform or normal z they
were trained on, read from the metadata with defaults for older models), one-line errors for
bad input, and, with CUDA faked on this GPU-less machine, that a CUDA provider which does not
load is an error for `--device cuda` and is labelled as the CPU it fell back to everywhere else
(generate, bench rows, evaluate); and that the bench's two sides do the same numpy-in,
numpy-out work."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import export.bench
import export.onnx_export
import export.runtime
from distgan.config.model import ModelConfig
from distgan.errors import UserError
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import save_generator
from distgan.runtime import ort_providers
from distgan.runtime.ort_providers import pick_providers
from export.__main__ import main as export_main
from export.bench import bench, ort_side, torch_side
from export.generate import Runner, generate, to_pixels
from export.latents import latents
from export.onnx_export import InferenceGenerator, cuda_session, export_onnx
from export.runtime import FLOAT_OUTPUT, UINT8_OUTPUT, create_session, model_info, session_device
from tests.helpers import (
    REPO,
    assert_one_line_errors,
    linear_onnx_generator,
    run_generate,
    run_module,
)


def trained_like_generator(tmp_path, **config):
    """A small generator with non-trivial BatchNorm statistics, saved as a run would save it."""
    torch.manual_seed(0)
    generator = Generator(ModelConfig(resolution=32, g_channels=8, z_dim=16, **config))
    generator.train()
    with torch.no_grad():
        for _ in range(3):
            generator(torch.randn(32, generator.config.z_dim))  # running stats move off 0/1
    run = tmp_path / "run"
    run.mkdir()
    save_generator(run, generator.eval(), step=123, images_seen=4567)
    return run, generator


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run, generator = trained_like_generator(tmp)
    paths = {}
    for name, options in {"fp32": {}, "fp16": {"fp16": True}, "uint8": {"uint8": True}}.items():
        paths[name] = tmp / f"g-{name}.onnx"
        export_onnx(run / "generator.safetensors", paths[name], log=lambda _: None, **options)
    return run, generator, paths


def visible_generator(tmp_path, **config):
    """trained_like_generator with 8x larger transposed-conv weights than its BatchNorm
    statistics expect: faces with contrast (std > 10 levels), not near-flat grey, so that pixel
    comparisons can fail."""
    run, generator = trained_like_generator(tmp_path, **config)
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.mul_(8)
    save_generator(run, generator.eval(), step=123, images_seen=4567)
    return run, generator


@pytest.fixture(scope="module")
def visible(tmp_path_factory):
    """A visible_generator exported as fp32 and uint8."""
    tmp = tmp_path_factory.mktemp("visible")
    run, generator = visible_generator(tmp)
    paths = {"fp32": tmp / "g.onnx", "uint8": tmp / "g-uint8.onnx"}
    export_onnx(run / "generator.safetensors", paths["fp32"], log=lambda _: None)
    export_onnx(run / "generator.safetensors", paths["uint8"], uint8=True, log=lambda _: None)
    return generator, paths


def test_graph_has_dynamic_batch_opset_metadata_and_no_batchnorm(exported):
    _, _, paths = exported
    model = onnx.load(paths["fp32"])
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    z, image = model.graph.input[0], model.graph.output[0]
    assert z.name == "z" and image.name == "image"
    assert z.type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
    assert z.type.tensor_type.shape.dim[1].dim_value == 16
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["z_dim"] == "16" and meta["resolution"] == "32" and meta["step"] == "123"
    assert meta["output_format"] == FLOAT_OUTPUT and meta["precision"] == "fp32"
    assert meta["z_distribution"].startswith("normal") and meta["distgan_version"]


@pytest.mark.parametrize("batch", [1, 7, 64, 100])
def test_fp32_matches_pytorch_at_any_batch(exported, batch):
    _, generator, paths = exported
    z = np.random.default_rng(batch).standard_normal((batch, 16), dtype=np.float32)
    ours = create_session(paths["fp32"], "cpu").run(None, {"z": z})[0]
    with torch.no_grad():
        reference = generator(torch.from_numpy(z)).numpy()
    assert ours.shape == (batch, 3, 32, 32)
    assert np.abs(ours - reference).max() <= 1e-4


def test_fp16_and_uint8_formats(exported):
    _, generator, paths = exported
    z = np.random.default_rng(1).standard_normal((5, 16), dtype=np.float32)
    with torch.no_grad():
        reference = generator(torch.from_numpy(z)).numpy()
    half = create_session(paths["fp16"], "cpu")
    assert half.get_inputs()[0].type == "tensor(float)"  # fp16 inside, float32 at the edges
    assert half.get_outputs()[0].type == "tensor(float)"
    assert np.abs(half.run(None, {"z": z})[0] - reference).max() <= 2e-2
    fp16_weights = [i for i in onnx.load(paths["fp16"]).graph.initializer if i.data_type == 10]
    assert fp16_weights  # the weights really are half precision
    pixels = create_session(paths["uint8"], "cpu").run(None, {"z": z})[0]
    assert pixels.dtype == np.uint8 and pixels.shape == (5, 32, 32, 3)
    expected = np.clip((reference + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(pixels.astype(int) - expected).max() <= 1


def test_failed_verification_keeps_nothing(tmp_path, monkeypatch):
    run, _ = trained_like_generator(tmp_path)
    monkeypatch.setattr(
        InferenceGenerator, "forward", lambda self, z: self.net(z.reshape(-1, 16, 1, 1)) * 0.5
    )
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx(run / "generator.safetensors", tmp_path / "bad.onnx", log=lambda _: None)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*tmp*"))


def test_uses_the_dynamo_exporter(monkeypatch, tmp_path):
    """Guard: the export goes through torch.onnx.export(dynamo=True) with dynamic_shapes."""
    run, _ = trained_like_generator(tmp_path)
    seen = {}
    original = torch.onnx.export

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    export_onnx(run / "generator.safetensors", tmp_path / "g.onnx", log=lambda _: None)
    assert seen["dynamo"] is True and "z" in seen["dynamic_shapes"]
    assert seen["opset_version"] >= 18


def test_generate_cli_is_reproducible_and_writes_extras(exported, tmp_path):
    _, _, paths = exported
    fp32 = ["--model", paths["fp32"], "--batch-size", 4, "--out-dir", tmp_path / "a"]
    uint8 = ["--model", paths["uint8"], "--batch-size", 3, "--out-dir", tmp_path / "b"]
    same = ["--num", 10, "--seed", 7, "--truncation-threshold", 1.5, "--truncation-psi", 0.7]
    first = run_generate(*fp32, *same, "--grid", tmp_path / "grid.png", "--interpolate", 5)
    assert first.returncode == 0, first.stderr
    second = run_generate(*uint8, *same)
    assert second.returncode == 0, second.stderr
    names = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert names == [f"{i:06d}.png" for i in range(10)]
    for name in names:  # same seed: the same faces, whichever output format and batch size
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=int)
        assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 1
    other = run_generate(
        "--model", paths["fp32"], "--num", 2, "--out-dir", tmp_path / "c", "--seed", 8
    )
    assert other.returncode == 0
    other_first = np.asarray(Image.open(tmp_path / "c" / names[0]))  # another seed
    assert not np.array_equal(other_first, np.asarray(Image.open(tmp_path / "a" / names[0])))
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 10 faces, 4 columns
    assert Image.open(tmp_path / "a" / "interpolation.png").size == (5 * 34 + 2, 36)
    assert Image.open(tmp_path / "a" / "interpolation.gif").n_frames == 2 * 5 - 2


def test_a_seeds_image_is_the_same_alone_at_any_batch_size(visible, tmp_path):
    _, paths = visible
    fp32 = ["--model", paths["fp32"]]
    result = run_generate(*fp32, "--seeds", "3,7", "--batch-size", 2, "--out-dir", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["seed0003.png", "seed0007.png"]
    for seeds, batch, folder in [("7", 1, "b"), ("0-8,12", 4, "c"), ("7,3", 64, "d")]:
        args = ["--seeds", seeds, "--batch-size", str(batch), "--out-dir", str(tmp_path / folder)]
        export_main(["generate", "--model", str(paths["fp32"]), *args])
    numbered = ["--num", "4", "--seed", "5", "--batch-size", "3", "--out-dir", str(tmp_path / "e")]
    export_main(["generate", "--model", str(paths["fp32"]), *numbered])  # 000002.png: seed 7
    assert len(list((tmp_path / "c").glob("seed*.png"))) == 10
    seven = (tmp_path / "a" / "seed0007.png").read_bytes()
    for alone in ["b/seed0007.png", "c/seed0007.png", "d/seed0007.png", "e/000002.png"]:
        assert (tmp_path / alone).read_bytes() == seven, alone  # the same file, byte for byte
    three = (tmp_path / "a" / "seed0003.png").read_bytes()
    assert (tmp_path / "d" / "seed0003.png").read_bytes() == three and three != seven


def test_a_seeds_image_is_the_same_from_pytorch_and_onnxruntime(visible, tmp_path):
    generator, paths = visible
    seeds = [3, 7, 11]
    z = latents(seeds, 16)
    with torch.no_grad():  # the PyTorch generator fed the same per-seed z
        reference = generator.eval()(torch.from_numpy(z)).numpy()
    ours = create_session(paths["fp32"], "cpu").run(None, {"z": z})[0]
    assert np.abs(ours - reference).max() <= 1e-4
    written = generate(paths["uint8"], seeds, 2, tmp_path, progress=False)
    assert to_pixels(reference).std() > 10
    for path, expected in zip(written, to_pixels(reference), strict=True):
        assert np.abs(np.asarray(Image.open(path), dtype=int) - expected).max() <= 1, path


def test_grayscale_uniform_models_get_uniform_z_and_grayscale_pngs(tmp_path):
    model = tmp_path / "gray.onnx"
    weight = linear_onnx_generator(model, z_dim=8, resolution=4, channels=1)
    info = model_info(create_session(model, "cpu"))
    assert info.channels == 1 and info.z_distribution == "uniform"
    seeds = [4, 9, 1000]
    written = generate(model, seeds, 2, tmp_path / "out", truncation_psi=0.8, progress=False)
    pixels = np.stack([np.asarray(Image.open(p)) for p in written])
    assert [Image.open(p).mode for p in written] == ["L"] * 3 and pixels.shape == (3, 4, 4)

    def expected(z):
        return to_pixels(np.tanh(z @ weight).reshape(-1, 1, 4, 4)).astype(int)

    uniform = expected(latents(seeds, 8, "uniform", psi=0.8))
    assert np.abs(pixels - uniform).max() <= 1 and pixels.std() > 20
    assert np.abs(pixels - expected(latents(seeds, 8, "normal", psi=0.8))).mean() > 10
    generate(model, seeds, 2, tmp_path, grid=tmp_path / "grid.png", progress=False)
    assert Image.open(tmp_path / "grid.png").mode == "L"
    assert to_pixels(np.zeros((2, 4, 4, 1), np.uint8)).shape == (2, 4, 4)  # uint8 NHWC gray


@pytest.mark.parametrize("uint8", [False, True])
def test_an_exported_gray_uniform_generator_gives_its_pytorch_faces_in_gray(tmp_path, uint8):
    run, generator = visible_generator(tmp_path, channels=1, z_distribution="uniform")
    model = tmp_path / "gray.onnx"
    export_onnx(run / "generator.safetensors", model, uint8=uint8, log=lambda _: None)
    info = model_info(create_session(model, "cpu"))
    assert (info.channels, info.z_distribution) == (1, "uniform")
    seeds = [2, 5, 31]
    written = generate(model, seeds, 2, tmp_path / "out", truncation_psi=0.9, progress=False)
    assert [Image.open(p).mode for p in written] == ["L"] * 3
    pixels = np.stack([np.asarray(Image.open(p), dtype=int) for p in written])
    with torch.no_grad():
        z = torch.from_numpy(latents(seeds, 16, "uniform", psi=0.9))
        expected = to_pixels(generator.eval()(z).numpy()).astype(int)
        normal = torch.from_numpy(latents(seeds, 16, "normal", psi=0.9))
        from_normal_z = to_pixels(generator(normal).numpy()).astype(int)
    assert pixels.shape == (3, 32, 32) and np.abs(pixels - expected).max() <= 1
    assert pixels.std() > 10  # not flat grey: so that the next line means something
    assert np.abs(pixels - from_normal_z).mean() > 5  # the uniform z it was trained on, not N(0, 1)


def test_metadata_defaults_for_older_and_foreign_models(exported, tmp_path):
    _, _, paths = exported
    info = model_info(create_session(paths["uint8"], "cpu"))
    assert info.channels == 3 and info.z_distribution == "normal"
    model = onnx.load(paths["fp32"])
    for key, value, expected in [
        ("z_distribution", "normal(0, 1)", ("normal", 3)),  # what exports wrote before
        ("z_distribution", "uniform", ("uniform", 3)),
        ("channels", "1", ("normal", 1)),
        ("z_distribution", "gamma", "is not one generate can draw"),
        ("channels", "4", "channels '4' is not 1"),
    ]:
        kept = [p for p in model.metadata_props if p.key not in ("z_distribution", "channels")]
        del model.metadata_props[:]
        model.metadata_props.extend([*kept, onnx.StringStringEntryProto(key=key, value=value)])
        onnx.save(model, tmp_path / "m.onnx")
        session = create_session(tmp_path / "m.onnx", "cpu")
        if isinstance(expected, str):
            with pytest.raises(UserError, match=expected):
                model_info(session)
        else:
            info = model_info(session)
            assert (info.z_distribution, info.channels) == expected


def test_generate_never_imports_torch(exported, tmp_path):
    _, _, paths = exported
    code = (
        "import sys; from export.__main__ import main\n"
        f"main(['generate', '--model', r'{paths['fp32']}', '--num', '3', '--out-dir', r'{tmp_path}'])\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch'\n"
        "print('torch-free')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "torch-free" in result.stdout


def generate_with_a_gpu(model, out_dir, device: str) -> subprocess.CompletedProcess:
    """`python -m export generate` in a process without torch, on a machine whose driver reports
    one GPU (faked: this machine has none, so the provider's load can only fail on libcuda)."""
    code = (
        "import sys\nimport distgan.runtime.ort_providers\n"
        "distgan.runtime.ort_providers.cuda_device_count = lambda: 1\n"
        "from export.__main__ import main\n"
        "try:\n"
        f"    main(['generate', '--model', r'{model}', '--num', '2', '--out-dir', r'{out_dir}', '--device', '{device}'])\n"
        "finally:\n"
        "    assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def missing_libraries(text: str) -> set[str]:
    return set(re.findall(r"(lib[\w.+-]+\.so[.\d]*): cannot open shared object file", text))


def test_generate_without_torch_preloads_the_cuda_libraries_and_says_when_it_falls_back(tmp_path):
    """Issue 20, item 1: a pip install keeps CUDA, cuBLAS and cuDNN under site-packages/nvidia,
    where the loader does not look, so the provider's library could not load without torch
    (libcublasLt.so.13 missing). Preloaded, only the driver's libcuda.so.1 can be missing, and
    every GPU machine has it; `auto` says that it fell back, and why."""
    import onnxruntime as ort

    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        pytest.skip(f"onnxruntime {ort.__version__} here has no CUDA provider library")
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            "from distgan.runtime.ort_cuda import *; print(cuda_provider_problem())",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    model = tmp_path / "g.onnx"
    linear_onnx_generator(model)
    auto = generate_with_a_gpu(model, tmp_path / "auto", "auto")
    assert auto.returncode == 0, auto.stderr
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["000000.png", "000001.png"]
    said = next(line for line in auto.stderr.splitlines() if line.startswith("onnxruntime: "))
    assert said.startswith(
        "onnxruntime: CPUExecutionProvider (a GPU is here but onnxruntime could not load its CUDA provider"
    ), said
    # `bare` (no preload) shows what the loader misses without it: libcublasLt.so.13 here.
    assert missing_libraries(said) <= {"libcuda.so.1"}, (said, bare.stdout)
    cuda = generate_with_a_gpu(model, tmp_path / "cuda", "cuda")
    assert cuda.returncode == 2
    error = cuda.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "error: CUDA was asked for but onnxruntime could not load its CUDA provider"
    ), error
    assert missing_libraries(error) <= {"libcuda.so.1"}, (error, bare.stdout)
    assert not (tmp_path / "cuda").exists()


def test_the_env_report_tries_the_cuda_provider_without_torch(monkeypatch):
    """`python -m distgan.runtime.env` imports torch, which loads CUDA libraries that a torch-free
    `python -m export generate` lacks: its onnxruntime line must come from a process without
    torch (here, with no GPU, one that cannot load libcuda; never a library pip installed)."""
    import onnxruntime as ort

    from distgan.runtime import env

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} here has no CUDA provider")
    probed = run_module("distgan.runtime.ort_cuda", timeout=180)
    assert probed.returncode == 0, probed.stderr
    answer = json.loads(probed.stdout.strip().splitlines()[-1])
    assert answer["torch_loaded"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the "any GPU?" gate
    line = env._onnxruntime_line()
    if answer["problem"] is None:
        assert line.endswith(
            "a CUDA session without torch (python -m export generate) runs on the GPU"
        )
    else:
        assert line.endswith(
            f"a CUDA session without torch FALLS BACK TO THE CPU ({answer['problem']})"
        ), line
        assert missing_libraries(line) <= {"libcuda.so.1"}, line


def test_providers_are_chosen_without_error_spam(exported):
    _, _, paths = exported
    import onnxruntime as ort

    providers = pick_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"
    if not torch.cuda.is_available():
        assert providers == ["CPUExecutionProvider"]
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_providers("cuda")
    session = create_session(paths["fp32"])
    assert session.get_providers()[0] in ort.get_available_providers()


def test_bad_inputs_give_one_line_errors(exported, tmp_path):
    _, _, paths = exported
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    fp32, out = ["--model", paths["fp32"]], ["--out-dir", tmp_path / "o"]
    cases = [
        (["--model", tmp_path / "missing.onnx", "--num", 1, *out], "does not exist"),
        (["--model", garbage, "--num", 1, *out], "is not a usable ONNX model"),
        ([*fp32, "--num", 0, *out], "--num 0 is not allowed"),
        ([*fp32, "--num", 2, "--batch-size", 0, *out], "--batch-size 0 is not allowed"),
        ([*fp32, "--num", 2, "--out-dir", "/proc/distgan-out"], "cannot write to --out-dir"),
        ([*fp32, "--seeds", "1-3,x", *out], "'x' is not a seed or a range"),
        ([*fp32, "--seeds", "5-2", *out], "runs backwards"),
        ([*fp32, "--seeds", "1", "--num", 2, *out], "--num and --seeds do not go together"),
        ([*fp32, "--seeds", "1", "--seed", 2, *out], "--seed and --seeds do not go together"),
        ([*fp32, *out], "say which images: --seeds"),
        ([*fp32, "--seeds", "1", "--truncation", 0.7, *out], "--truncation is ambiguous"),
        ([*fp32, "--seeds", "1", "--truncation-psi", 1.5, *out], "--truncation-psi 1.5 is not"),
        ([*fp32, "--seeds", "1", "--truncation-threshold", 0, *out], "--truncation-threshold 0"),
        ([*fp32, "--seeds", "1", "--interpolate", 4, *out], "give two or more"),
        ([*fp32, "--num", 2, "--seed", 2**32 - 1, *out], "seeds are 0 .. 4294967295"),
    ]
    assert_one_line_errors(run_generate, cases)


def test_model_without_metadata_needs_z_dim(exported, tmp_path):
    _, _, paths = exported
    model = onnx.load(paths["fp32"])
    del model.metadata_props[:]
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "z"  # hide the size too
    bare = tmp_path / "bare.onnx"
    onnx.save(model, bare)
    with pytest.raises(UserError, match="no distgan metadata: give its latent size with --z-dim"):
        model_info(create_session(bare))
    info = model_info(create_session(bare), z_dim=16)
    assert info.z_dim == 16 and info.output_format == FLOAT_OUTPUT
    assert model_info(create_session(paths["uint8"])).output_format == UINT8_OUTPUT


def test_export_cli_errors(tmp_path):
    result = run_module("export", "onnx", "--run", tmp_path, "--out", tmp_path / "g.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'generator.safetensors'} does not exist: pass a run folder or its "
        "generator.safetensors"
    ]


def test_export_cli_end_to_end(tmp_path):
    run, _ = trained_like_generator(tmp_path)
    args = ["--run", run, "--out", tmp_path / "g.onnx", "--uint8"]
    result = run_module("export", "onnx", *args, timeout=300)
    assert result.returncode == 0, result.stderr
    for batch in (1, 7, 64):
        assert f"batch {batch:3d}: max abs error vs PyTorch" in result.stdout
    meta = {p.key: p.value for p in onnx.load(tmp_path / "g.onnx").metadata_props}
    assert meta["output_format"] == UINT8_OUTPUT
    assert json.loads(meta["model_config"])["z_dim"] == 16


def test_verify_checks_on_the_cpu_provider_and_reports_the_gpu_apart(tmp_path, monkeypatch):
    """A GPU's CUDA provider runs TF32 convolutions (~1e-3 off): it must not fail the export."""
    run, _ = trained_like_generator(tmp_path)
    asked = []
    real_create = export.runtime.create_session

    def spy(path, device="auto", *args, **kwargs):
        asked.append(device)
        return real_create(path, device, *args, **kwargs)

    class TF32Session:  # a CUDA session as a GPU runs it: the right images, 2e-3 off
        def __init__(self, path, log):
            self.session = real_create(path, "cpu")

        def run(self, names, feeds):
            return [self.session.run(names, feeds)[0] + 2e-3]

    monkeypatch.setattr(export.onnx_export, "create_session", spy)
    monkeypatch.setattr(export.onnx_export, "cuda_session", TF32Session)
    logs = []
    errors = export_onnx(run / "generator.safetensors", tmp_path / "g.onnx", log=logs.append)
    assert asked == ["cpu"]  # the pass/fail check ran on the CPU provider
    assert (tmp_path / "g.onnx").is_file()
    assert max(errors[batch] for batch in (1, 7, 64)) <= 1e-4
    assert sorted(errors["cuda"]) == [1, 7, 64]
    assert all(1.5e-3 < e < 2.5e-3 for e in errors["cuda"].values())  # measured, not checked
    assert all("; CUDA provider 2.0" in line and "not checked" in line for line in logs), logs


def pretend_cuda(monkeypatch):
    """What a GPU machine with a mismatched CUDA/cuDNN looks like to pick_providers: a driver
    that sees a GPU, and onnxruntime listing its CUDA provider (which then cannot load)."""
    if ort_providers.cuda_device_count():
        pytest.skip("a real GPU is here: its CUDA provider may well load")
    monkeypatch.setattr(ort_providers, "cuda_device_count", lambda: 1)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_providers.ort, "get_available_providers", lambda: providers)
    assert pick_providers("cuda")[0][0] == "CUDAExecutionProvider"


def test_cuda_that_falls_back_is_an_error_for_cuda_and_labelled_for_auto(
    exported, tmp_path, monkeypatch, capsys
):
    _, _, paths = exported
    pretend_cuda(monkeypatch)
    with pytest.raises(UserError, match="fell back to the CPU"):
        create_session(paths["fp32"], "cuda")
    args = ["generate", "--model", str(paths["fp32"]), "--num", "3", "--out-dir"]
    with pytest.raises(SystemExit) as stopped:
        export_main([*args, str(tmp_path / "cuda"), "--device", "cuda"])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA was asked for but"), lines
    assert "CUDA/cuDNN version mismatch" in lines[0] and "or use --device cpu" in lines[0]
    assert not (tmp_path / "cuda").exists()  # it failed before any work

    written = generate(paths["fp32"], [0, 1, 2], 2, tmp_path / "auto", device="auto")
    assert [p.is_file() for p in written] == [True] * 3
    said = capsys.readouterr().err.splitlines()[0]  # auto says that it fell back, and why
    assert said.startswith(
        "onnxruntime: CPUExecutionProvider (a GPU is here but onnxruntime could not load its CUDA provider"
    ), said
    assert "or use --device cpu)" in said
    assert session_device(create_session(paths["fp32"], "auto")) == "cpu"
    logs = []
    assert cuda_session(paths["fp32"], logs.append) is None  # no GPU figure from a CPU session
    assert logs and "did not load" in logs[0]


def test_a_cuda_provider_that_raises_is_not_blamed_on_the_model(exported, tmp_path, monkeypatch):
    """Some onnxruntime builds raise instead of falling back when the CUDA provider fails."""
    _, _, paths = exported
    pretend_cuda(monkeypatch)
    real_session = export.runtime.ort.InferenceSession

    def cuda_raises(path, options, providers):
        if providers[0] != "CPUExecutionProvider":
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient")
        return real_session(path, options, providers=providers)

    monkeypatch.setattr(export.runtime.ort, "InferenceSession", cuda_raises)
    with pytest.raises(UserError, match="CUDA was asked for but onnxruntime"):
        create_session(paths["fp32"], "cuda")
    assert session_device(create_session(paths["fp32"], "auto")) == "cpu"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="is not a usable ONNX model"):
        create_session(garbage, "auto")


def test_bench_sides_do_the_same_work_and_rows_name_what_ran(exported, monkeypatch, capsys):
    run, generator, paths = exported
    z = np.random.default_rng(3).standard_normal((3, 16), dtype=np.float32)
    from_torch = torch_side(generator, z, torch.device("cpu"))()
    from_ort = ort_side(Runner(create_session(paths["fp32"], "cpu")), z)()
    assert isinstance(from_torch, np.ndarray) and from_torch.shape == (3, 3, 32, 32)
    assert isinstance(from_ort, np.ndarray) and np.abs(from_torch - from_ort).max() <= 1e-4

    pretend_cuda(monkeypatch)
    monkeypatch.setattr(export.bench, "cuda_device_count", lambda: 1)  # bench adds a "cuda" pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows = bench(paths["fp32"], run / "generator.safetensors", [2], repeats=1)
    out, err = capsys.readouterr()
    assert [row["device"] for row in rows] == ["cpu", "cpu"]  # the cuda pass fell back: says so
    assert "numpy z in, numpy image out" in out
    assert out.count("| cpu | 2 |") == 2 and "| cuda |" not in out
    assert "rows below ran on the CPU" in err


def test_evaluate_records_the_onnx_provider_that_ran(exported, monkeypatch, jpeg_folder, tmp_path):
    from distgan.metrics.evaluate import (
        OnnxGenerator,
        build_parser,
        evaluate,
    )  # others' failures stay here

    _, _, paths = exported
    data = ["--data-dir", str(jpeg_folder), "--cache-dir", str(tmp_path)]
    scoring = ["--features", "pixels", "--num", "8", "--batch-size", "4"]
    result = evaluate(build_parser().parse_args(["--onnx", str(paths["fp32"]), *data, *scoring]))
    assert result["onnx_provider"] == "CPUExecutionProvider"
    pretend_cuda(monkeypatch)  # evaluate asks for CUDA whenever torch sees a GPU
    onnx_cuda = OnnxGenerator(paths["uint8"], torch.device("cuda"))
    assert onnx_cuda.provider == "CPUExecutionProvider"  # what ran, not what was asked
