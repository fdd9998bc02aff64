"""Hugging Face Hub model folders (distgan/outputs/hub.py, model_card.py, model_folder.py) and
--init-from (distgan/outputs/pretrained.py): a finished run writes RUN/hub/ with a card whose YAML
the Hub's own parser reads, the sample grid and the EMA generator; `Generator.from_pretrained`
gives back that generator bit for bit; folders that are not distgan generators fail with one line;
`save` replaces only an unchanged folder of its own; `push` uploads exactly the folder and the
ONNX exports, and fails with one line without a token or a network; --init-from starts a new run
at step 0 from a run's G, D and EMA G (or a Hub folder's G) with fresh optimizers, refuses flags
that contradict the source, and yields to a run already in --out-dir."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from distgan.config.config import make_config, resume_config
from distgan.errors import UserError
from distgan.models.dcgan import Generator, sample_latents
from distgan.outputs import hub, model_folder
from distgan.outputs.checkpoint import list_checkpoints, read_trainer_state
from distgan.outputs.pretrained import config_from_source, read_starting_weights
from distgan.outputs.report import read_jsonl
from tests.helpers import free_port, run_module, run_train, small_run

FOLDER_FILES = {"README.md", "config.json", "model.safetensors", "samples.png"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, faces_cache):
    """A finished 10-step run of the small GAN, evaluated at its end with pixel features."""
    out = tmp_path_factory.mktemp("hub") / "run"
    evaluation = ["--eval-every", "10", "--eval-features", "pixels", "--eval-num", "16"]
    result = run_train(*small_run(out, faces_cache, "--max-steps", "10", *evaluation))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the trained run that a test may change."""
    return shutil.copytree(trained_run, tmp_path / "run")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def hub_cli(capsys, *args) -> tuple[int, str, str]:
    """`python -m distgan.outputs.hub ARGS` run in this process: (exit status, stdout, stderr)."""
    try:
        hub.main([str(arg) for arg in args])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def ema_generator(run) -> Generator:
    """The EMA generator of the run's final checkpoint."""
    final = list_checkpoints(run / "checkpoints")[-1]
    generator = Generator(read_trainer_state(final).model)
    generator.load_state_dict(load_file(final / "ema.safetensors"))
    return generator.eval()


@pytest.mark.slow
def test_a_finished_run_writes_its_model_folder_with_a_card(trained_run):
    folder = trained_run / "hub"
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES | {hub.MANIFEST_FILE}
    final_grid = trained_run / "samples" / "step-00000010.png"
    assert (folder / "samples.png").read_bytes() == final_grid.read_bytes()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "distgan"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert "dcgan" in data["tags"]
    assert (data["resolution"], data["channels"], data["steps"]) == (32, 3, 10)
    assert (data["training_data"], data["images_seen"]) == ("built-in faces", 80)
    # Pixel features were measured at step 10, and are not FID: the card claims none.
    records = read_jsonl(trained_run / "metrics.jsonl")
    assert any(r.get("step") == 10 and "fid" in r for r in records)
    assert "fid" not in data and "model-index" not in data
    assert "](samples.png)" in card.text and "step 10" in card.text
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "distgan-generator" and config["distgan_version"]
    assert (
        config["model"]
        == read_trainer_state(trained_run / "checkpoints" / "step-00000010").model.to_dict()
    )


@pytest.mark.slow
def test_from_pretrained_gives_the_runs_ema_generator(trained_run):
    loaded = Generator.from_pretrained(trained_run / "hub")
    reference = ema_generator(trained_run)
    assert not loaded.training and loaded.config == reference.config
    z = sample_latents(loaded.config, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(z), reference(z))


@pytest.mark.slow
def test_a_repo_id_is_downloaded_then_loaded(trained_run, monkeypatch):
    asked = {}

    def snapshot_download(repo_id, **options):  # the Hub's side: a folder in its cache
        asked.update(options, repo_id=repo_id)
        return str(trained_run / "hub")

    monkeypatch.setattr(model_folder, "snapshot_download", snapshot_download)
    loaded = Generator.from_pretrained("someone/faces", revision="v1")
    assert asked["repo_id"] == "someone/faces" and asked["revision"] == "v1"
    assert set(asked["allow_patterns"]) == {"config.json", "model.safetensors"}
    assert loaded.config == ema_generator(trained_run).config


@pytest.mark.slow
def test_what_is_not_a_distgan_generator_fails_with_one_line(trained_run, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = shutil.copytree(trained_run / "hub", tmp_path / "other")
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    wider = shutil.copytree(trained_run / "hub", tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    config["model"]["g_channels"] = 32
    (wider / "config.json").write_text(json.dumps(config))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((trained_run / "hub" / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "model.safetensors")
    expected = {
        empty: "not a distgan model folder (no config.json or model.safetensors)",
        other: "is not a distgan generator description",
        wider: "does not hold the weights",
        pickled: "does not hold the weights",
        trained_run / "hub" / "model.safetensors": "is a file",
        tmp_path / "no" / "such" / "thing": "does not exist, and is not a Hub repo id",
    }
    for source, message in expected.items():
        with pytest.raises(UserError) as caught:
            Generator.from_pretrained(source)
        assert message in one_line(str(caught.value)), source

    # As HF_HUB_OFFLINE=1 with an empty cache: the Hub cannot be reached, nothing is cached.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(UserError) as caught:
        Generator.from_pretrained("someone/nothing-here")
    assert "could not download someone/nothing-here" in one_line(str(caught.value))


@pytest.mark.slow
def test_save_replaces_its_own_folder_and_never_the_users(run_copy, tmp_path, capsys):
    before = (run_copy / "hub" / "model.safetensors").read_bytes()
    assert hub_cli(capsys, "save", run_copy)[0] == 0
    assert (run_copy / "hub" / "model.safetensors").read_bytes() == before  # the same EMA G
    card = run_copy / "hub" / "README.md"
    card.write_text(card.read_text() + "\nMy notes.\n")
    status, _, err = hub_cli(capsys, "save", run_copy)
    assert status == 2 and "changed since" in one_line(err)
    assert card.read_text().endswith("My notes.\n")
    elsewhere = tmp_path / "elsewhere"
    assert hub_cli(capsys, "save", run_copy, "--out", elsewhere)[0] == 0
    assert {p.name for p in elsewhere.iterdir()} == FOLDER_FILES | {hub.MANIFEST_FILE}
    assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob(".deleting-*"))
    status, _, err = hub_cli(capsys, "save", tmp_path)
    assert status == 2 and "is not a distgan run folder" in one_line(err)


@pytest.mark.slow
def test_a_resumed_run_keeps_a_users_folder_and_says_so(run_copy, faces_cache):
    mine = run_copy / "hub" / "mine.txt"
    mine.write_text("my own file")
    result = run_train(*small_run(run_copy, faces_cache, "--max-steps", "12"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: no Hub model folder written" in result.stdout
    assert mine.read_text() == "my own file"
    assert json.loads((run_copy / "hub" / "config.json").read_text())["step"] == 10


@pytest.mark.slow
def test_the_card_reports_inception_fid_measured_at_the_last_step(run_copy, tmp_path):
    inception = "inception-v3-compat pool3 2048 (torch-fidelity)"
    measured = {"n_fake": 16, "n_real": 240, "feature_extractor": inception, "kid_std": 0.01}
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "fid": 300.0, "kid_mean": 0.5, **measured}) + "\n")
        f.write(json.dumps({"step": 10, "fid": 123.456, "kid_mean": 0.0789, **measured}) + "\n")
    folder = hub.save_from_run(run_copy, tmp_path / "scored")
    data = ModelCard.load(folder / "README.md").data
    assert (data.fid, data.kid) == (123.456, 0.0789)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"fid": 123.456, "kid": 0.0789}
    assert "FID 123.46" in ModelCard.load(folder / "README.md").text


@pytest.mark.slow
def test_push_uploads_the_folder_and_onnx_exports_in_one_commit(
    run_copy, tmp_path, monkeypatch, capsys
):
    (run_copy / "g.onnx").write_bytes(b"onnx bytes")
    files = hub.upload_set(run_copy)
    assert files.keys() == FOLDER_FILES | {"g.onnx"}  # not the manifest
    given = tmp_path / "exports" / "g-uint8.onnx"
    given.parent.mkdir()
    given.write_bytes(b"other onnx bytes")
    assert hub.upload_set(run_copy, [given]).keys() == FOLDER_FILES | {"g-uint8.onnx"}
    assert hub.upload_set(run_copy / "hub").keys() == FOLDER_FILES  # a model folder itself
    (run_copy / "hub" / "g-uint8.onnx").write_bytes(b"a third")
    with pytest.raises(UserError, match="would both be g-uint8.onnx"):
        hub.upload_set(run_copy, [given])
    (run_copy / "hub" / "g-uint8.onnx").unlink()
    status, listed, _ = hub_cli(capsys, "push", run_copy, "--repo-id", "me/faces", "--dry-run")
    assert status == 0 and {line.split("\t")[0] for line in listed.splitlines()} == files.keys()
    status, _, err = hub_cli(capsys, "push", tmp_path, "--repo-id", "me/faces", "--dry-run")
    assert status == 2 and "has no model folder" in one_line(err)

    commits = []
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **options: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(hub, "create_commit", lambda repo_id, ops, **kw: commits.append(ops))
    assert hub.push(run_copy, "me/faces", log=lambda line: None) == "https://hf.co/me/faces"
    (operations,) = commits
    assert {op.path_in_repo for op in operations} == files.keys()
    card = next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md")
    assert b'from_pretrained("me/faces")' in card and hub.REPO_PLACEHOLDER.encode() not in card


@pytest.mark.slow
def test_push_without_a_token_or_a_network_fails_with_one_line(run_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = run_module("distgan.outputs.hub", "push", run_copy, "--repo-id", "me/faces")
    assert result.returncode == 2
    assert "no Hugging Face token" in one_line(result.stderr)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    result = run_module(
        "distgan.outputs.hub", "push", run_copy, "--repo-id", "me/faces", timeout=120
    )
    assert result.returncode == 2
    assert "could not upload to me/faces" in one_line(result.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run", "checkpoint", "hub"])
def test_init_from_loads_the_sources_weights_with_fresh_optimizers(trained_run, source):
    from bench.training import fresh_accelerator
    from distgan.training.gan import build_gan

    final = trained_run / "checkpoints" / "step-00000010"
    path = {"run": trained_run, "checkpoint": final, "hub": trained_run / "hub"}[source]
    start = read_starting_weights(str(path))
    cfg = config_from_source(make_config(init_from=str(path), channels_last=False), start)
    assert cfg.model == read_trainer_state(final).model
    accelerator = fresh_accelerator("no", torch.device("cpu"))
    gan = build_gan(accelerator, cfg.model, cfg.train, start, images=16)
    g_source = (
        "hub/model.safetensors"
        if source == "hub"
        else "checkpoints/step-00000010/model.safetensors"
    )
    ema_source = (
        "hub/model.safetensors" if source == "hub" else "checkpoints/step-00000010/ema.safetensors"
    )
    expected = {
        "G": (gan.generator_core, load_file(trained_run / g_source)),
        "EMA G": (gan.ema.module, load_file(trained_run / ema_source)),
    }
    if source != "hub":  # a Hub folder has no D: it starts fresh
        d_source = load_file(final / "model_1.safetensors")
        expected["D"] = (accelerator.unwrap_model(gan.discriminator), d_source)
    for name, (module, weights) in expected.items():
        state = module.state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights), name
    assert not gan.opt_g.state and not gan.opt_d.state  # no Adam moments, no step count


@pytest.mark.slow
def test_init_from_a_run_trains_from_step_zero_and_resumes_its_own(
    trained_run, tmp_path, faces_cache
):
    fine = tmp_path / "fine"
    flags = small_run(fine, faces_cache, "--init-from", trained_run)
    result = run_train(*flags, "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting from {trained_run}: G, D and EMA G; fresh optimizers, step 0" in result.stdout
    assert "steps 0 -> 4" in result.stdout
    state = read_trainer_state(fine / "checkpoints" / "step-00000004")
    assert (state.step, state.images_seen) == (4, 32)
    optimizer = torch.load(
        fine / "checkpoints" / "step-00000004" / "optimizer.bin", weights_only=True
    )
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}  # not 10 + 4
    assert "init_from" in (fine / "config.toml").read_text()
    # The same command again, for more steps: the run in --out-dir wins, and it resumes.
    result = run_train(*flags, "--max-steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 4 -> 6" in result.stdout and "starting from" not in result.stdout


@pytest.mark.slow
def test_init_from_a_hub_folder_starts_a_fresh_d_of_the_width_asked(
    trained_run, tmp_path, faces_cache
):
    fresh_d = tmp_path / "fresh-d"
    flags = small_run(fresh_d, faces_cache, "--init-from", trained_run / "hub", "--d-channels", "8")
    result = run_train(*flags, "--max-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "G and EMA G (D fresh)" in result.stdout
    model = read_trainer_state(fresh_d / "checkpoints" / "step-00000002").model
    assert (model.g_channels, model.d_channels) == (16, 8)


@pytest.mark.slow
def test_init_from_refuses_what_contradicts_the_source(trained_run, tmp_path):
    start = read_starting_weights(str(trained_run))
    for flags, said in (
        ({"g_channels": 32}, "g_channels 32 (it has 16)"),
        ({"d_channels": 8}, "d_channels 8 (it has 16)"),  # this source has a D
        ({"channels": "1"}, "channels 1 (it has 3)"),
    ):
        with pytest.raises(UserError) as caught:
            config_from_source(make_config(init_from=str(trained_run), **flags), start)
        assert said in one_line(str(caught.value)), flags
    same = config_from_source(make_config(resolution=32, channels="3"), start)
    assert same.model == start.model
    # A run already in --out-dir that started from elsewhere (or from scratch) resumes only
    # with its own source: its config.toml would be changed, which resuming refuses.
    saved = make_config(init_from=str(trained_run / "hub"))
    with pytest.raises(UserError) as caught:
        resume_config(saved, make_config(init_from=str(trained_run)))
    assert "init_from" in one_line(str(caught.value))
    with pytest.raises(UserError) as caught:
        read_starting_weights(str(tmp_path))
    assert "--init-from: " in one_line(str(caught.value))
