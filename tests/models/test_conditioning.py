"""Class conditioning in the models: a conditional G (conditional BatchNorm, and the one-hot label
beside z) and a projection D, for class indices and multi-hot attributes, indices and their
one-hot vectors giving the same function; D's optional classifier head; the label checks; the
unconditional models unchanged (the same parameters, and labels refused); the rows of a sample
grid; labels drawn to the data's class frequencies; the ModelConfig rules of the new fields; and
self-conditioning (--clusters): G reads its cluster from z at the clusters' shares and takes no
labels, D takes the clusters as labels, and a cluster changes G's image as a class does; and G's
bias-only conditional BatchNorm (g_label_gain off)."""

import pytest
import torch

from distgan.config.model import ModelConfig
from distgan.models.conditioning import (
    ConditionalBatchNorm2d,
    draw_labels,
    grid_rows,
)
from distgan.models.dcgan import Discriminator, Generator, sample_latents

DIGITS = [str(i) for i in range(10)]


def digits_config(**kwargs) -> ModelConfig:
    options = dict(resolution=28, channels=1, g_channels=8, d_channels=8)
    return ModelConfig(**{**options, "conditioning": "class", "classes": DIGITS, **kwargs})


def test_the_label_changes_g_and_d():
    torch.manual_seed(0)
    config = digits_config()
    generator, discriminator = Generator(config).eval(), Discriminator(config).eval()
    assert any(isinstance(m, ConditionalBatchNorm2d) for m in generator.modules())
    z = sample_latents(config, 1).repeat(10, 1)
    images = generator(z, torch.arange(10))
    assert images.shape == (10, 1, 28, 28)
    assert all(not torch.allclose(images[0], images[i]) for i in range(1, 10))
    logits = discriminator(images[:1].repeat(10, 1, 1, 1), torch.arange(10))
    assert logits.shape == (10,) and len(set(logits.tolist())) == 10


def test_every_conditional_parameter_learns():
    config = digits_config()
    generator, discriminator = Generator(config), Discriminator(config)
    labels = torch.tensor([0, 3, 3, 9])
    logits = discriminator(generator(sample_latents(config, 4), labels), labels)
    logits.sum().backward()
    for name, p in [*generator.named_parameters(), *discriminator.named_parameters()]:
        if ".embed." in name or "projection" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_indices_and_their_one_hot_vectors_agree():
    # Indices are looked up, vectors multiplied: one function either way.
    torch.manual_seed(0)
    config = digits_config()
    generator, discriminator = Generator(config).eval(), Discriminator(config).eval()
    labels = torch.tensor([0, 3, 9, 3])
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    z = sample_latents(config, 4)
    images = generator(z, labels)
    torch.testing.assert_close(generator(z, one_hot), images)
    torch.testing.assert_close(discriminator(images, one_hot), discriminator(images, labels))


def test_a_d_classifier_head_reads_the_labels_only_when_conditional():
    torch.manual_seed(0)
    discriminator = Discriminator(digits_config(d_classifier=True))
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4])
    logits, classes = discriminator(images, labels, classify=True)
    torch.testing.assert_close(logits, discriminator(images, labels))  # the head adds no term
    assert classes.shape == (5, 10)
    with pytest.raises(ValueError, match="D has no classifier head"):
        Discriminator(digits_config())(images, labels, classify=True)
    plain = ModelConfig(resolution=28, channels=1, d_classifier=True)
    assert list(Discriminator(plain).state_dict()) == list(
        Discriminator(ModelConfig(resolution=28, channels=1)).state_dict()
    )


def test_attributes_are_multi_hot():
    config = ModelConfig(
        resolution=32,
        g_channels=8,
        d_channels=8,
        conditioning="attributes",
        classes=["Smiling", "Male"],
    )
    generator, discriminator = Generator(config).eval(), Discriminator(config).eval()
    labels = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    z = sample_latents(config, 1).repeat(3, 1)
    images = generator(z, labels)
    assert images.shape == (3, 3, 32, 32) and not torch.allclose(images[0], images[2])
    assert discriminator(images, labels).shape == (3,)
    with pytest.raises(ValueError, match=r"label vectors must be float \[B, 2\]"):
        generator(z, torch.tensor([0, 1, 1]))


def test_labels_are_required_and_refused_as_the_model_says():
    conditional, plain = digits_config(), ModelConfig(resolution=28, channels=1)
    z = sample_latents(plain, 2)
    with pytest.raises(ValueError, match=r"G is conditional \(class\): pass labels"):
        Generator(conditional)(z)
    with pytest.raises(ValueError, match="D is unconditional: pass no labels"):
        Discriminator(plain)(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class labels must be integer indices \[B\]"):
        Generator(conditional)(z, torch.tensor([0.0, 1.0]))


def test_unconditional_models_keep_their_parameters():
    plain = ModelConfig(resolution=28, channels=1)
    names = list(Generator(plain).state_dict()) + list(Discriminator(plain).state_dict())
    assert not any(".embed." in n or "projection" in n or "norm." in n for n in names)
    assert "net.1.weight" in names  # the BatchNorm of old checkpoints, under the old name
    torch.manual_seed(0)
    first = Generator(plain).state_dict()
    torch.manual_seed(0)
    again = Generator(plain).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_model_config_rules_for_classes():
    with pytest.raises(ValueError, match="a conditional model needs class names"):
        ModelConfig(conditioning="class")
    with pytest.raises(ValueError, match="an unconditional one none"):
        ModelConfig(classes=["a", "b"])
    with pytest.raises(ValueError, match="repeat a name"):
        ModelConfig(conditioning="class", classes=["a", "a"])
    with pytest.raises(ValueError, match="conditioning='labels' is not allowed"):
        ModelConfig(conditioning="labels", classes=["a"])
    old = ModelConfig(resolution=32).to_dict()
    del old["conditioning"], old["classes"]  # a model saved before conditioning existed
    assert ModelConfig.from_dict(old).classes == []
    config = digits_config()
    assert ModelConfig.from_dict(config.to_dict()) == config and config.num_classes == 10


def test_grid_rows():
    names, labels = grid_rows(digits_config())
    assert names == DIGITS and labels.tolist() == list(range(10))
    two = ModelConfig(conditioning="attributes", classes=["Smiling", "Male"])
    names, labels = grid_rows(two)
    assert names == ["none", "Male", "Smiling", "Smiling + Male"]
    assert labels.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    five = ModelConfig(conditioning="attributes", classes=list("abcde"))
    names, labels = grid_rows(five)
    assert names == ["none", "a", "b", "c", "d", "e"] and labels.sum(1).tolist() == [0] + [1] * 5


def test_drawn_labels_follow_the_data():
    config = digits_config()
    table = torch.tensor([0] * 90 + [7] * 10)
    drawn = draw_labels(config, 5000, generator=torch.Generator().manual_seed(0), table=table)
    assert set(drawn.tolist()) == {0, 7} and 0.07 < (drawn == 7).float().mean() < 0.13
    again = draw_labels(config, 5000, generator=torch.Generator().manual_seed(0), table=table)
    assert torch.equal(drawn, again)
    uniform = draw_labels(config, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(uniform, minlength=10).min() > 400
    assert draw_labels(ModelConfig(), 3) is None


def clustered_config(shares, **kwargs) -> ModelConfig:
    options = dict(resolution=28, channels=1, g_channels=8, d_channels=8, cluster_shares=shares)
    return ModelConfig(**{**options, **kwargs})


@pytest.mark.parametrize("z_distribution", ["normal", "uniform"])
def test_a_self_conditioned_g_reads_its_clusters_from_z_at_their_shares(z_distribution):
    shares = [0.5, 0.3, 0.15, 0.05]
    config = clustered_config(shares, z_distribution=z_distribution)
    generator = Generator(config).eval()
    assert "cluster_edges" not in generator.state_dict()  # derived from the config
    z = sample_latents(config, 40_000, generator=torch.Generator().manual_seed(0))
    found = torch.bincount(generator.clusters(z), minlength=4).float() / len(z)
    assert torch.allclose(found, torch.tensor(shares), atol=0.01)
    # G's image is its cluster's: the same z made for another cluster differs.
    with torch.no_grad():
        made = generator(z[:8])
        assert torch.equal(made, generator.synthesize(z[:8], generator.clusters(z[:8])))
        other = (generator.clusters(z[:8]) + 1) % 4
        assert not torch.allclose(made, generator.synthesize(z[:8], other))


def test_a_self_conditioned_d_takes_the_clusters_as_labels():
    config = clustered_config([0.5, 0.5], d_classifier=True)
    generator, discriminator = Generator(config), Discriminator(config)
    z = sample_latents(config, 4)
    with pytest.raises(ValueError, match="G is unconditional: pass no labels"):
        generator(z, torch.tensor([0, 1, 0, 1]))
    images = generator(z)
    with pytest.raises(ValueError, match=r"D is conditional \(clusters\): pass labels"):
        discriminator(images)
    logits, classes = discriminator(images, generator.clusters(z), classify=True)
    assert logits.shape == (4,) and classes.shape == (4, 2)


def test_model_config_rules_for_clusters():
    for shares, message in [
        ([1.0], "give two or more positive shares"),
        ([0.5, 0.6], "summing to 1"),
        ([1.0, 0.0], "positive shares"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(cluster_shares=shares)
    with pytest.raises(ValueError, match="on labels or on clusters, not both"):
        digits_config(cluster_shares=[0.5, 0.5])
    config = clustered_config([0.25, 0.75])
    assert ModelConfig.from_dict(config.to_dict()) == config and config.label_count == 2


def test_a_bias_only_conditional_batchnorm_keeps_batchnorms_affine():
    torch.manual_seed(0)
    config = digits_config(g_label_gain=False)
    generator = Generator(config).eval()
    norms = [m for m in generator.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert norms and all(
        m.norm.affine and m.embed.weight.shape[1] == m.norm.num_features for m in norms
    )
    assert all(torch.equal(m.embed.weight, torch.zeros_like(m.embed.weight)) for m in norms)
    with torch.no_grad():
        for m in norms:
            m.embed.weight.normal_()
        z = sample_latents(config, 4)
        assert not torch.allclose(
            generator(z, torch.tensor([0] * 4)), generator(z, torch.tensor([3] * 4))
        )
    loss = generator.train()(z, torch.tensor([0, 1, 2, 3])).square().mean()
    loss.backward()
    assert all(m.embed.weight.grad[:4].abs().sum() > 0 for m in norms)
    assert all(m.embed.weight.grad[4:].abs().sum() == 0 for m in norms)  # unused rows
