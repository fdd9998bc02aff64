"""Models: G and D shapes and ranges at every resolution (base * 2^k, base 4 to 7) and for 1 and
3 channels, the base x base first and last maps, the DCGAN and Xavier inits, the latent
distributions, the options (width, spectral norm, dropout), and config validation."""

import pytest
import torch

from distgan.config.model import ModelConfig
from distgan.models.dcgan import Discriminator, Generator, sample_latents


@pytest.mark.parametrize(
    "resolution, channels", [(32, 3), (64, 3), (128, 3), (28, 1), (56, 3), (112, 1), (40, 3)]
)
def test_shapes_and_ranges(resolution, channels):
    config = ModelConfig(resolution=resolution, channels=channels, g_channels=16, d_channels=16)
    generator, discriminator = Generator(config), Discriminator(config)
    images = generator(torch.randn(5, config.z_dim) * 3)
    assert images.shape == (5, channels, resolution, resolution)
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
        ({"resolution": 36}, r"resolution=36 is not allowed: use base \* 2\^k with base 4 to 7"),
        ({"resolution": 512}, r"from 28 to 256 \(e.g. 28, 32, 40"),
        ({"resolution": 24}, "resolution=24"),
        ({"channels": 2}, "channels=2 is not allowed: use 1 or 3"),
        ({"z_distribution": "laplace"}, "z_distribution='laplace' is not allowed"),
        ({"init": "kaiming"}, "init='kaiming' is not allowed: use normal or xavier"),
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


@pytest.mark.parametrize("resolution, base", [(28, 7), (32, 4), (40, 5), (48, 6), (224, 7)])
def test_g_starts_and_d_ends_on_a_base_square(resolution, base):
    config = ModelConfig(resolution=resolution, g_channels=8, d_channels=8)
    first = Generator(config).net[0]
    assert first.kernel_size == (base, base)
    assert first(torch.zeros(1, 100, 1, 1)).shape[-2:] == (base, base)
    head = Discriminator(config).net[-1]
    assert head.kernel_size == (base, base)
    assert head(torch.zeros(1, head.in_channels, base, base)).shape[-2:] == (1, 1)


def test_uniform_latents_lie_in_the_unit_cube_and_normal_ones_do_not():
    seeded = torch.Generator().manual_seed(0)
    uniform = sample_latents(ModelConfig(z_distribution="uniform"), 4000, generator=seeded)
    assert uniform.shape == (4000, 100)
    assert uniform.min() >= -1 and uniform.max() <= 1
    assert uniform.min() < -0.999 and uniform.max() > 0.999  # the whole interval, not a part
    assert uniform.mean().abs() < 0.01 and uniform.var().item() == pytest.approx(1 / 3, rel=0.02)
    normal = sample_latents(ModelConfig(z_dim=16), 4000, generator=seeded)
    assert normal.abs().max() > 3 and normal.std().item() == pytest.approx(1, rel=0.02)
    again = sample_latents(ModelConfig(z_dim=16), 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, torch.randn(3, 16, generator=torch.Generator().manual_seed(5)))


def test_xavier_init_differs_from_normal_and_is_deterministic():
    def weights(init: str, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        config = ModelConfig(resolution=28, init=init, g_channels=16, d_channels=16)
        return [
            p.detach().clone()
            for m in (Generator(config), Discriminator(config))
            for p in m.parameters()
        ]

    xavier, normal = weights("xavier", 0), weights("normal", 0)
    assert all(torch.equal(a, b) for a, b in zip(xavier, weights("xavier", 0), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(xavier, normal, strict=True) if a.dim() == 4)
    torch.manual_seed(0)
    generator = Generator(ModelConfig(resolution=28, init="xavier", g_channels=16))
    for module in generator.modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = (6 / (fan_in + fan_out)) ** 0.5  # Glorot uniform
            assert module.weight.abs().max() <= bound
            assert module.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
        if isinstance(module, torch.nn.BatchNorm2d):  # as with the normal init
            assert module.weight.mean().item() == pytest.approx(1.0, abs=0.02)
