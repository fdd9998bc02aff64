"""Discriminator augmentation (distgan/models/augment.py and its use in training): DiffAugment and ADA are
differentiable end to end (gradients reach the images and G through D(aug(G(z)))); the same
generator state and p give the same ops and another seed others; ADA at p = 0 is the identity
and at p = 0 the training step is bitwise the step without augmentation; ADA draws its ops per
image; colour ops act about the grey axis and only brightness and contrast touch one channel;
results keep the input's dtype and memory format under bf16 autocast and channels-last; the p
controller rises and falls with the sign of D's real logits, by images / (ada_kimg * 1000),
within [0, 1]; augment=auto trains bitwise as DiffAugment on a data set of up to
augment_auto_max images and as none on a larger one; every loss trains with augmentation; and end to end, ADA's p rises while D
overfits 8 images, is logged as aug_p and resumes where it was (bitwise the uninterrupted run),
DiffAugment runs with the ops asked for and only those act, and augment and its ops can change
on resume."""

import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from distgan.config.model import ModelConfig
from distgan.models.augment import Augment, ada_augment, diff_augment
from distgan.models.dcgan import Discriminator, Generator
from distgan.outputs.checkpoint import read_trainer_state
from tests.helpers import SMALL_GAN, run_train, small_run, tiny_gan, write_images

TINY = ModelConfig(resolution=32, g_channels=8, d_channels=8, z_dim=16)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(count=8, channels=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=seeded(seed)) * 2 - 1


AUGMENTS = {
    "diffaugment": lambda x, generator: diff_augment(x, generator),
    "ada": lambda x, generator: ada_augment(x, 1.0, generator),
}


@pytest.mark.parametrize("mode", AUGMENTS)
def test_gradients_reach_the_images_and_g_through_d_of_augmented_fakes(mode):
    augment = AUGMENTS[mode]
    generator, discriminator = Generator(TINY), Discriminator(TINY)
    fake = generator(torch.randn(8, TINY.z_dim, generator=seeded(0)))
    discriminator(augment(fake, seeded(1))).sum().backward()
    grads = [p.grad for p in generator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    real = images().requires_grad_(True)
    discriminator(augment(real, seeded(2))).sum().backward()
    assert torch.isfinite(real.grad).all() and (real.grad != 0).float().mean() > 0.3


@pytest.mark.parametrize("mode", AUGMENTS)
def test_same_seed_same_ops_other_seed_other_ops(mode):
    augment, x = AUGMENTS[mode], images()
    first, again, other = augment(x, seeded(5)), augment(x, seeded(5)), augment(x, seeded(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


def test_diffaugment_applies_exactly_the_ops_asked_for():
    flat = torch.full((64, 3, 16, 16), 0.5)

    def values(ops):
        out = diff_augment(flat, seeded(0), ops=ops)
        assert out.shape == flat.shape
        return out

    # Translation (zero fill) and cutout (zeros) only move the flat value or zero it.
    for ops in [("translation",), ("cutout",), ("translation", "cutout")]:
        out = values(ops)
        assert set(out.unique().tolist()) == {0.0, 0.5}, ops
    # Colour alone keeps each image flat (one value per image) but changes that value.
    out = values(("colour",))
    assert (out == out[:, :1, :1, :1]).all() and not torch.equal(out, flat)
    assert not torch.equal(values(("colour", "cutout")), values(("cutout",)))


def test_ada_at_p_zero_is_the_identity_and_ops_are_drawn_per_image():
    x = images(count=400, size=8)
    assert ada_augment(x, 0.0, seeded(0)) is x

    def unchanged(p):
        out = ada_augment(x, p, seeded(1))
        return torch.tensor([torch.equal(a, b) for a, b in zip(out, x, strict=True)]).float()

    # An image none of whose ops is chosen comes out bitwise as it went in.
    assert 0.2 < unchanged(0.05).mean() < 0.8  # some images changed, others not
    assert unchanged(1.0).sum() == 0  # at p = 1 every image has every op


def test_colour_ops_act_about_the_grey_axis_and_only_brightness_contrast_on_one_channel():
    grey = torch.rand(64, 1, 1, 1, generator=seeded(0)).expand(64, 3, 16, 16) * 2 - 1
    out = ada_augment(grey.contiguous(), 1.0, seeded(1))
    # Geometric ops keep a flat image flat (reflection padding); hue, saturation and luma flip
    # keep grey grey; brightness and contrast move it.
    torch.testing.assert_close(out, out[:, :1, :1, :1].expand_as(out), rtol=0, atol=1e-5)
    assert (out[:, 0, 0, 0] - grey[:, 0, 0, 0]).abs().mean() > 0.05
    gray_images = images(channels=1)
    for out in (ada_augment(gray_images, 1.0, seeded(2)), diff_augment(gray_images, seeded(2))):
        assert out.shape == gray_images.shape and torch.isfinite(out).all()
    flat = grey[:, :1].contiguous()
    out = ada_augment(flat, 1.0, seeded(3))  # brightness and contrast: x -> c * (x + b)
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out), rtol=0, atol=1e-5)
    assert (out - flat).abs().mean() > 0.05
    with pytest.raises(ValueError, match="1 or 3"):
        ada_augment(images(channels=4), 1.0)


@pytest.mark.parametrize("mode", AUGMENTS)
def test_bf16_autocast_and_channels_last_keep_dtype_layout_and_float32_arithmetic(mode):
    augment, x = AUGMENTS[mode], images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = augment(x, seeded(7))
        half = augment(x.bfloat16().contiguous(memory_format=torch.channels_last), seeded(7))
    assert torch.equal(under_autocast, augment(x, seeded(7)))  # float32 inside either way
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    assert half.is_contiguous(memory_format=torch.channels_last)
    channels_last = augment(x.contiguous(memory_format=torch.channels_last), seeded(7))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, under_autocast)  # the layout changes no value


def test_the_controller_moves_p_by_the_sign_of_real_logits_within_0_and_1():
    augment = Augment("ada", target=0.6, kimg=1.0)
    for _ in range(5):
        augment.record(torch.full((8, 1), -2.0))  # D unsure of the reals: too much augmentation
    sign_sum, count = (t.item() for t in augment.counts())
    assert (sign_sum, count) == (-40.0, 40.0)
    augment.restore(0.5)  # a checkpoint's p: the sums start afresh
    assert [t.item() for t in augment.counts()] == [0.0, 0.0]
    augment.adjust(-40.0, 40)  # over all processes: 40 images, mean sign -1 < 0.6
    assert augment.p == pytest.approx(0.46)  # down by 40 / (1 * 1000)
    augment.record(torch.tensor([3.0, 1.0, 0.5, -1.0]))  # mean sign 0.5 < 0.6
    augment.adjust(*(t.item() for t in augment.counts()))
    assert augment.p == pytest.approx(0.456)
    augment.adjust(400.0, 400)  # D overfits: up
    assert augment.p == pytest.approx(0.856)
    augment.adjust(6.0, 10)  # exactly on target: stays
    assert augment.p == pytest.approx(0.856)
    augment.adjust(800.0, 800)
    assert augment.p == 1.0 and augment.metrics() == {"aug_p": 1.0}
    augment.adjust(-5000.0, 5000)
    assert augment.p == 0.0
    for mode in ("none", "diffaugment"):  # no strength to steer
        other = Augment(mode)
        other.record(torch.ones(8))
        other.adjust(8.0, 8)
        assert other.p == 0.0 and other.metrics() == {}
        assert [t.item() for t in other.counts()] == [0.0, 0.0]


def trained_weights(steps=2, p=0.0, **train) -> list[torch.Tensor]:
    from distgan.training.gan import gan_step

    accelerator, tc, gan, real = tiny_gan(TINY, images(count=4), **train)
    gan.augment.restore(p)
    torch.manual_seed(3)  # z and the augmentations' draws
    for step in range(steps):
        out = gan_step(accelerator, tc, gan, real, step)
        assert (
            out.skipped.item() == 0.0 and torch.isfinite(out.loss_d) and torch.isfinite(out.loss_g)
        )
    modules = (gan.generator, gan.discriminator)
    return [p.detach().clone() for module in modules for p in module.parameters()]


def test_ada_at_p_zero_trains_bitwise_as_no_augmentation():
    plain = trained_weights(augment="none")
    assert all(map(torch.equal, plain, trained_weights(augment="ada")))
    augmented = trained_weights(augment="ada", p=0.5)
    assert not all(map(torch.equal, plain, augmented))


def test_auto_trains_as_diffaugment_up_to_its_size_and_as_none_above():
    small = trained_weights(augment="auto", augment_auto_max=4)  # 4 images: DiffAugment
    assert all(map(torch.equal, small, trained_weights(augment="diffaugment")))
    large = trained_weights(augment="auto", augment_auto_max=3)  # more than 3: none
    assert all(map(torch.equal, large, trained_weights(augment="none")))
    assert not all(map(torch.equal, small, large))
    with pytest.raises(ValueError, match="augment mode 'auto': use one of none, diffaugment"):
        Augment("auto")  # the trainer resolves it first, by the data's size


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
@pytest.mark.parametrize("mode", ["diffaugment", "ada"])
def test_every_loss_takes_augmented_steps(loss, mode):
    trained_weights(loss=loss, augment=mode, p=0.5)  # finite losses, no skipped step


def metrics(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss_d" in record]


@pytest.mark.slow
def test_ada_p_rises_while_d_overfits_8_images_and_resumes_where_it_was(tmp_path):
    write_images(tmp_path / "eight", 8)
    every = ["--log-every", "5", "--sample-every", "100", "--ckpt-every", "10"]
    ada = ["--augment", "ada", "--ada-kimg", "0.5", "--data-dir", tmp_path / "eight"]

    def run(out, steps):
        flags = ["--out-dir", out, *SMALL_GAN, *every, *ada, "--max-steps", steps]
        result = run_train(*flags)
        assert result.returncode == 0, result.stderr[-3000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, 30)
    p = [record["aug_p"] for record in metrics(straight)]
    # D tells 8 images from G's early attempts at once: p goes up, 40 / 500 per log line.
    assert len(p) == 6 and p[-1] > p[0] and p[-1] >= 0.16, p
    assert all(
        abs(b - a) == pytest.approx(0.08) or b == a == 0 for a, b in zip(p, p[1:], strict=False)
    )
    final = read_trainer_state(straight / "checkpoints" / "step-00000030")
    assert final.aug_p == p[-1]

    run(resumed, 20)
    assert read_trainer_state(resumed / "checkpoints" / "step-00000020").aug_p == p[3]
    run(resumed, 30)  # resumes at step 20 with its p, RNG and data position
    assert [r["aug_p"] for r in metrics(resumed)][-2:] == p[-2:]
    for name in ("generator.safetensors", "checkpoints/step-00000030/model_1.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_diffaugment_trains_and_augment_can_change_on_resume(tmp_path, faces_cache):
    out = tmp_path / "run"
    first = ("--max-steps", "10", "--augment", "diffaugment", "--diffaugment-ops", "colour")
    result = run_train(*small_run(out, faces_cache, *first))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [5, 10] and all("aug_p" not in r for r in records)
    assert read_trainer_state(out / "checkpoints" / "step-00000010").aug_p == 0.0
    saved = tomllib.loads((out / "config.toml").read_text())["train"]
    assert saved["diffaugment_ops"] == ["colour"]
    flags = ("--max-steps", "20", "--augment", "ada", "--ada-kimg", "0.5")
    result = run_train(*small_run(out, faces_cache, *flags, "--diffaugment-ops", "cutout"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with augment 'diffaugment' -> 'ada'" in result.stdout
    assert "diffaugment_ops ['colour'] -> ['cutout']" in result.stdout
    later = metrics(out)[2:]
    assert [r["step"] for r in later] == [15, 20] and all("aug_p" in r for r in later)
    assert read_trainer_state(out / "checkpoints" / "step-00000020").aug_p == later[-1]["aug_p"]
