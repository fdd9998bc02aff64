"""Models: G and D shapes and ranges at every resolution, the DCGAN init statistics, the options
(width, spectral norm, dropout), and config validation."""

import pytest
import torch

from distgan.models import Discriminator, Generator, ModelConfig


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_and_ranges(resolution):
    config = ModelConfig(resolution=resolution, g_channels=16, d_channels=16)
    generator, discriminator = Generator(config), Discriminator(config)
    images = generator(torch.randn(5, config.z_dim) * 3)
    assert images.shape == (5, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.01  # not a constant image
    logits = discriminator(images)
    assert logits.shape == (5,)
    assert (logits.abs() > 0).any()  # raw logits, no sigmoid squashing to (0, 1) required


def test_256_and_uneven_widths():
    config = ModelConfig(resolution=256, g_channels=8, d_channels=4)
    assert Generator(config)(torch.randn(2, 100)).shape == (2, 3, 256, 256)
    assert Discriminator(config)(torch.zeros(2, 3, 256, 256)).shape == (2,)


def test_width_is_configurable_and_g_may_be_wider():
    wide = Generator(ModelConfig(g_channels=64))
    narrow = Generator(ModelConfig(g_channels=32))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > 3 * count(narrow)
    config = ModelConfig(g_channels=64, d_channels=32)
    assert count(Generator(config)) > count(Discriminator(config))


def test_classic_dcgan_layout_at_64():
    generator = Generator(ModelConfig())
    convs = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    discriminator = Discriminator(ModelConfig())
    layers = list(discriminator.net)
    assert isinstance(layers[0], torch.nn.Conv2d)
    assert isinstance(layers[1], torch.nn.LeakyReLU)  # no BatchNorm on the first layer
    assert layers[1].negative_slope == 0.2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules()) == 3
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in discriminator.modules())


def test_init_statistics():
    torch.manual_seed(0)
    for model in (Generator(ModelConfig()), Discriminator(ModelConfig())):
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                assert abs(module.weight.mean().item()) < 0.002
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.weight.mean().item() == pytest.approx(1.0, abs=0.01)
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.3)
                assert torch.all(module.bias == 0)


def test_spectral_norm_and_dropout_options():
    config = ModelConfig(resolution=32, d_spectral_norm=True, d_dropout=0.3)
    discriminator = Discriminator(config)
    names = [name for name, _ in discriminator.named_parameters()]
    assert any("parametrizations.weight.original" in n for n in names)
    assert sum(isinstance(m, torch.nn.Dropout) for m in discriminator.modules()) == 3
    images = torch.randn(4, 3, 32, 32)
    discriminator.train()
    assert not torch.equal(discriminator(images), discriminator(images))  # dropout is active
    discriminator.eval()
    assert torch.equal(discriminator(images), discriminator(images))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 48}, "resolution=48"),
        ({"resolution": 512}, "power of two from 32 to 256"),
        ({"z_dim": 0}, "z_dim=0"),
        ({"d_dropout": 1.0}, "d_dropout=1.0"),
        ({"leaky_slope": -0.1}, "leaky_slope"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_round_trip_rejects_unknown_keys():
    config = ModelConfig(resolution=32, g_channels=8)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "depth": 3})
