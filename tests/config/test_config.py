"""Config: defaults, TOML file (also one written before the sections split), flags over the file,
each field's rules read from beside it, the documented --help, and one-line errors
for bad values (non-finite numbers too), unknown keys (with a suggestion) and wrong types; and
what a resumed run goes on with when flags change (applied, kept, or refused); the course's
settings (--channels in [data], resolved into the model; --z-distribution, --init) as flags and
file keys, fixed on resume."""

import dataclasses
import re
import subprocess
import sys

import pytest

from distgan.config.config import (
    FIELDS,
    SECTIONS,
    Config,
    load_toml,
    make_config,
    resume_config,
    saved_run_config,
)
from distgan.config.flags import build_parser, field_docs, parse_args
from distgan.config.rules import is_resolved, on_resume
from distgan.errors import UserError


def test_defaults():
    config = parse_args([])
    assert config.model.resolution == 64 and config.model.z_dim == 100
    assert config.train.lr_g == config.train.lr_d == 2e-4
    assert (config.train.beta1, config.train.beta2) == (0.5, 0.999)
    assert config.train.loss == "bce" and config.train.real_label == 0.9
    assert config.outputs.resume == "auto" and config.data.data_dir is None


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nresolution = 32\n[train]\nbatch_size = 16\nlr_g = 1\nloss = "hinge"\n'
    )
    config = parse_args(["--config", str(path), "--batch-size", "8", "--no-flip"])
    assert config.model.resolution == 32  # from the file
    assert config.train.batch_size == 8  # the flag wins
    assert config.train.lr_g == 1.0 and isinstance(config.train.lr_g, float)
    assert config.train.loss == "hinge" and config.data.flip is False


def test_flips_default_to_colour_images_only():
    data = parse_args([]).data
    assert data.flip is None and data.flips_for(3) and not data.flips_for(1)
    assert parse_args(["--flip"]).data.flips_for(1)
    assert not parse_args(["--no-flip"]).data.flips_for(3)


def test_augment_auto_is_diffaugment_up_to_its_size_and_none_above():
    train = parse_args(["--augment", "auto", "--augment-auto-max", "1000"]).train
    assert [train.augment_for(n) for n in (1, 1000, 1001)] == ["diffaugment"] * 2 + ["none"]
    for mode in ("none", "diffaugment", "ada"):  # a mode named outright holds at any size
        chosen = parse_args(["--augment", mode, "--augment-auto-max", "10"]).train
        assert chosen.augment_for(10) == chosen.augment_for(10**6) == mode


def test_saved_toml_round_trips(tmp_path):
    config = parse_args(["--crop-box", "25", "50", "128", "128", "--max-steps", "7"])
    config.save_toml(tmp_path / "config.toml")
    again = parse_args(["--config", str(tmp_path / "config.toml")])
    assert again == config


def test_every_field_has_a_documented_flag():
    help_text = build_parser().format_help()
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if not is_resolved(f):  # set by training from the data (channels, classes)
                assert "--" + f.name.replace("_", "-") in help_text
    # A list's default shows as its values (the help re-joined across argparse's line wraps).
    assert "(default: colour translation cutout)" in " ".join(help_text.split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "36"], "resolution=36 is not allowed"),
        (["--channels", "2"], "channels='2' is not allowed: use one of auto, 1, 3"),
        (["--z-distribution", "gauss"], "z_distribution='gauss' is not allowed"),
        (["--lr-d", "0"], "lr_d=0.0 is not allowed"),
        (["--diffaugment-ops", "flip"], "diffaugment_ops=['flip'] is not allowed: use one or"),
        (["--augment", "always"], "augment='always' is not allowed: use one of none, diffaug"),
        (["--augment-auto-max", "0"], "augment_auto_max=0 is not allowed: use a finite number"),
        (["--diffaugment-ops", "cutout", "cutout"], "cutout'] is not allowed: use one or more"),
        (["--batch-size", "-4"], "batch_size=-4 is not allowed"),
        (["--max-steps", "0"], "max_steps=0 is not allowed"),
        (["--loss", "wgan"], "loss='wgan' is not allowed: use one of bce, hinge, wgan-gp"),
        (["--mixed-precision", "fp8"], "mixed_precision='fp8'"),
        (["--crop-box", "1", "2", "3"], "crop_box=[1, 2, 3]"),
        (["--ema-decay", "1.5"], "ema_decay=1.5"),
        (["--decoded-cache", "on"], "decoded_cache='on' is not allowed: use auto or off"),
        (["--compile", "--loss", "wgan-gp"], "does not work with loss='wgan-gp'"),
        (["--sync-bn", "--loss", "wgan-gp"], "sync_bn=True does not work with loss='wgan-gp'"),
        (["--lr-g", "nan"], "lr_g=nan is not allowed: use a finite number > 0"),
        (["--gp-weight", "inf"], "gp_weight=inf is not allowed: use a finite number > 0"),
        (["--d-classifier"], "d_classifier needs labels to learn: give --labels"),
        (["--clusters", "1"], "clusters=1 is not allowed: use 0 .off. or 2 or more"),
        (
            ["--clusters", "4", "--labels", "folders", "--data-dir", "x"],
            "condition on the labels or on clusters, not both .drop --clusters or --labels.",
        ),
    ],
)
def test_bad_values_fail_with_the_key_and_the_fix(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_args(argv)


def test_unknown_toml_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nbatch_sise = 3\n")
    with pytest.raises(
        UserError, match="unknown key 'batch_sise' in \\[train\\]; did you mean 'batch_size'"
    ):
        load_toml(path)
    path.write_text("[optim]\nlr = 3\n")
    with pytest.raises(UserError, match="unknown section \\[optim\\]"):
        load_toml(path)


def test_wrong_type_and_bad_files(tmp_path):
    path = tmp_path / "typed.toml"
    path.write_text('[train]\nbatch_size = "64"\n')
    with pytest.raises(
        UserError, match="batch_size='64' in \\[train\\] is not allowed: expected int"
    ):
        parse_args(["--config", str(path)])
    path.write_text("[train\n")
    with pytest.raises(UserError, match="is not valid TOML"):
        load_toml(path)
    with pytest.raises(UserError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_entry_point_prints_one_line_and_exits_2():
    command = [sys.executable, "launch/train.py", "--resolution", "100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: resolution=100 is not allowed: use base * 2^k with base 4 to 7, from 28 to 256 "
        "(e.g. 28, 32, 40, 48, 56, 64, 96, 112, 128, 256)"
    ]


def test_example_celeba_config_loads():
    from tests.helpers import REPO

    config = parse_args(["--config", str(REPO / "launch" / "configs" / "celeba64.toml")])
    assert isinstance(config, Config) and config.model.resolution == 64
    assert config.data.crop_box is not None


def test_example_digits_config_loads():
    from tests.helpers import REPO

    config = parse_args(["--config", str(REPO / "launch" / "configs" / "mnist28.toml")])
    assert config.model.resolution == 28 and config.data.flip is False
    # Self-conditioned, with D's head on the clusters: no labels needed.
    assert config.data.clusters == 20 and config.model.d_classifier
    # DiffAugment for a few hundred digits, none for the course's 10,000.
    assert config.train.augment_for(500) == "diffaugment"
    assert config.train.augment_for(10_000) == "none"


def test_config_files_layer_in_order_under_the_flags(tmp_path):
    from tests.helpers import REPO

    configs = REPO / "launch" / "configs"
    recipe, overlay = str(configs / "mnist28.toml"), str(configs / "mnist28-classes.toml")
    config = parse_args(["--config", recipe, overlay, "--data-dir", "x", "--batch-size", "8"])
    assert config.model.resolution == 28 and config.model.g_channels == 80  # the recipe's
    assert config.train.loss == "hinge" and config.model.d_spectral_norm  # the overlay's
    assert config.data.labels == "folders" and config.data.clusters == 0  # the overlay's
    assert config.train.r1_gamma == 0.0
    assert config.train.lr_g == 2e-3 and config.train.batch_size == 8  # the flag's
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text("[train]\nlr_g = 1e-3\nlr_d = 1e-3\n")
    second.write_text("[train]\nlr_d = 5e-4\n")
    layered = parse_args(["--config", str(first), str(second)])
    assert (layered.train.lr_g, layered.train.lr_d) == (1e-3, 5e-4)


def saved_run() -> Config:
    """A run's config.toml as a resume reads it back: everything in it counts as given."""
    return parse_args(
        ["--resolution", "32", "--batch-size", "16", "--lr-g", "1e-3", "--loss", "hinge"]
    )


def test_resume_applies_what_can_change_and_keeps_the_rest():
    requested = parse_args(["--lr-g", "1e-4", "--max-steps", "50", "--out-dir", "runs/x"])
    config, changes = resume_config(saved_run(), requested)
    assert changes == {"lr_g": (1e-3, 1e-4), "max_steps": (None, 50)}
    assert config.train.lr_g == 1e-4 and config.train.max_steps == 50
    # Not given now: the run's own values, not the defaults (64 px, batch 64, bce).
    assert config.model.resolution == 32 and config.train.batch_size == 16
    assert config.train.loss == "hinge" and config.outputs.out_dir == "runs/x"
    assert resume_config(saved_run(), parse_args(["--resolution", "32"]))[1] == {}


def test_resume_refuses_what_cannot_change_in_one_line():
    requested = parse_args(["--resolution", "64", "--seed", "3", "--lr-d", "1e-4"])
    with pytest.raises(UserError) as caught:
        resume_config(saved_run(), requested)
    message = str(caught.value)
    assert "\n" not in message and "resolution 32 -> 64, seed 0 -> 3" in message
    assert "lr_d" not in message and "new --out-dir" in message and "--resume none" in message
    with pytest.raises(UserError, match="compile=True does not work with loss='wgan-gp'"):
        resume_config(parse_args(["--loss", "wgan-gp"]), parse_args(["--compile"]))


def test_course_settings_are_flags_and_file_keys(tmp_path):
    argv = ["--resolution", "28", "--channels", "1", "--z-distribution", "uniform"]
    config = parse_args([*argv, "--init", "xavier"])
    assert config.model.resolution == 28 and config.data.channels == "1"
    assert (config.model.z_distribution, config.model.init) == ("uniform", "xavier")
    assert config.model.channels == 3  # resolved from the data when training starts
    help_text = build_parser().format_help()
    assert "--channels {auto,1,3}" in help_text and "--init {normal,xavier}" in help_text
    path = tmp_path / "course.toml"
    path.write_text("[data]\nchannels = 1\n[model]\nresolution = 56\n")  # a number in TOML
    assert parse_args(["--config", str(path)]).data.channels == "1"
    config.save_toml(tmp_path / "config.toml")
    assert "channels" not in load_toml(tmp_path / "config.toml")["model"]
    assert parse_args(["--config", str(tmp_path / "config.toml")]) == config
    path.write_text("[model]\nchannels = 1\n")  # the model's count is not a setting
    with pytest.raises(UserError, match="unknown key 'channels' in \\[model\\]"):
        load_toml(path)


def test_resume_refuses_other_channels_latents_or_init():
    saved = parse_args(["--channels", "1", "--z-distribution", "uniform"])
    for flags, change in [
        (["--channels", "3"], "channels '1' -> '3'"),
        (["--z-distribution", "normal"], "z_distribution 'uniform' -> 'normal'"),
        (["--init", "xavier"], "init 'normal' -> 'xavier'"),
    ]:
        with pytest.raises(UserError, match=change):
            resume_config(saved, parse_args(flags))
    config, changes = resume_config(saved, parse_args(["--channels", "1"]))
    assert changes == {} and config.data.channels == "1"


def test_a_run_saved_before_augmentation_resumes_without_it(tmp_path):
    # The default is diffaugment now; a config.toml without the field trained with none.
    path = tmp_path / "config.toml"
    parse_args([]).save_toml(path)
    assert saved_run_config(path).train.augment == "diffaugment"
    path.write_text(re.sub(r"^\w*augment\w* = (\[[^]]*\]|.*)\n", "", path.read_text(), flags=re.M))
    assert saved_run_config(path).train.augment == "none"
    # ... and one saved before DiffAugment's ops could be chosen used all three, the default.
    assert saved_run_config(path).train.diffaugment_ops == ["colour", "translation", "cutout"]


def test_a_config_toml_from_before_the_sections_split_still_loads(tmp_path):
    # Earlier versions wrote every training field under [train]; each now lives in its section.
    path = tmp_path / "config.toml"
    path.write_text(
        '[train]\nout_dir = "runs/old"\nbatch_size = 16\nlog_every = 5\nckpt_every = 20\n'
        'eval_every = 100\neval_features = "pixels"\nnonfinite_limit = 3\n'
        'on_nonfinite = "stop"\ndist_timeout = 60\nresume = "none"\n'
    )
    config = saved_run_config(path)
    assert config.outputs.out_dir == "runs/old" and config.outputs.resume == "none"
    assert (config.outputs.log_every, config.outputs.ckpt_every) == (5, 20)
    assert (config.eval.eval_every, config.eval.eval_features) == (100, "pixels")
    assert (config.failures.nonfinite_limit, config.failures.on_nonfinite) == (3, "stop")
    assert config.failures.dist_timeout == 60 and config.train.batch_size == 16
    # Written again, each field goes to its own section, and reads back the same.
    config.save_toml(tmp_path / "again.toml")
    sections = load_toml(tmp_path / "again.toml")
    assert "out_dir" in sections["outputs"] and "out_dir" not in sections["train"]
    assert saved_run_config(tmp_path / "again.toml") == config


def test_each_fields_rules_sit_beside_it():
    # The checks read the rules from the fields: every field marked positive refuses 0 with its
    # name, and every field marked fixed on resume is refused when a resume changes it.
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            if f.metadata.get("positive"):
                with pytest.raises(UserError, match=f"^{f.name}=0(\\.0)? is not allowed"):
                    make_config(**{f.name: 0})
    fixed = {name for name, f in FIELDS.items() if on_resume(f) == "fixed"}
    assert {"batch_size", "seed", "loss", "data_dir", "resolution", "channels"} <= fixed
    assert not fixed & {"lr_g", "max_steps", "log_every", "augment", "lr_schedule"}
    saved = make_config(batch_size=16, seed=3)
    for key, value in (("batch_size", 8), ("seed", 4), ("g_channels", 8), ("loss", "hinge")):
        with pytest.raises(UserError, match=f"{key} .* -> "):
            resume_config(saved, make_config(**{key: value}))
