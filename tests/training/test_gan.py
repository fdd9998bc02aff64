"""The GAN step: the R1 option: the penalty changes D's update on exactly the steps its interval
names (lazy regularisation) and leaves G's and the logged loss alone; off (0), the step is the
plain one bit for bit; and the settings R1 cannot run with are refused in one line. A conditional
step trains G's and D's label parameters with every loss, R1 included, and D's classifier head
when it has one. A self-conditioned step (--clusters) gives D the real images' clusters with the
real images, and with G's images the clusters G read from their z."""

import pytest
import torch

from distgan.config.config import make_config
from distgan.config.model import ModelConfig
from distgan.errors import UserError
from tests.helpers import tiny_gan

TINY = ModelConfig(resolution=32, g_channels=8, d_channels=8, z_dim=16)


def d_weights_after(step: int, **train) -> tuple[list[torch.Tensor], float]:
    """D's weights after one GAN step numbered `step` from the same start, and the logged loss."""
    from distgan.training.gan import gan_step

    real = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    accelerator, tc, gan, real = tiny_gan(TINY, real, augment="none", **train)
    torch.manual_seed(3)
    out = gan_step(accelerator, tc, gan, real, step)
    weights = [p.detach().clone() for p in gan.discriminator.parameters()]
    return weights, out.loss_d.item()


def test_r1_changes_d_on_its_steps_only_and_is_not_logged():
    plain, plain_loss = d_weights_after(0)
    off, _ = d_weights_after(0, r1_gamma=0.0)
    assert all(map(torch.equal, plain, off))
    penalised, penalised_loss = d_weights_after(0, r1_gamma=1.0, r1_every=2)
    assert not all(map(torch.equal, plain, penalised))
    assert penalised_loss == plain_loss  # the logged loss is the GAN loss alone
    between, _ = d_weights_after(1, r1_gamma=1.0, r1_every=2)
    plain_between, _ = d_weights_after(1)
    assert all(map(torch.equal, plain_between, between))  # step 1 of every 2: no penalty


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"r1_gamma": float("nan")}, "r1_gamma=nan is not allowed"),
        ({"r1_gamma": -1.0}, "r1_gamma=-1.0 is not allowed"),
        ({"r1_gamma": 0.1, "compile": True}, "compile=True does not work with r1_gamma"),
        ({"r1_gamma": 0.1, "sync_bn": True}, "sync_bn=True does not work with r1_gamma"),
        ({"r1_every": 0}, "r1_every=0 is not allowed"),
    ],
)
def test_settings_r1_cannot_run_with_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        make_config(**settings)


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
@pytest.mark.parametrize("d_classifier", [False, True])
def test_a_conditional_step_trains_the_label_parameters_with_every_loss_and_r1(loss, d_classifier):
    from distgan.training.gan import gan_step

    config = ModelConfig(
        resolution=32,
        g_channels=8,
        d_channels=8,
        z_dim=16,
        conditioning="class",
        classes=["a", "b", "c"],
        d_classifier=d_classifier,
    )
    real = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    accelerator, tc, gan, real = tiny_gan(config, real, augment="none", loss=loss, r1_gamma=1.0)
    before = {n: p.detach().clone() for n, p in gan.discriminator.named_parameters()}
    before |= {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    out = gan_step(accelerator, tc, gan, real, 0, labels=torch.tensor([0, 1, 2, 1]))
    assert torch.isfinite(out.loss_d) and torch.isfinite(out.loss_g) and out.skipped == 0
    after = dict(gan.discriminator.named_parameters()) | dict(gan.generator.named_parameters())
    labelled = [n for n in after if "projection" in n or "embed" in n or "classifier" in n]
    assert labelled and all(not torch.equal(before[n], after[n]) for n in labelled)
    assert any("classifier" in n for n in labelled) == d_classifier


@pytest.mark.parametrize("loss", ["bce", "wgan-gp"])
def test_a_self_conditioned_step_judges_fakes_by_the_clusters_g_drew(loss):
    from distgan.training.gan import gan_step

    config = ModelConfig(
        resolution=32, g_channels=8, d_channels=8, z_dim=16, cluster_shares=[0.5, 0.5]
    )
    real = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    accelerator, tc, gan, real = tiny_gan(config, real, augment="none", loss=loss, r1_gamma=1.0)
    drawn, judged = [], []
    clusters = gan.generator_core.clusters
    gan.generator_core.clusters = lambda z: drawn.append(clusters(z)) or drawn[-1]
    forward = gan.discriminator.forward
    gan.discriminator.forward = lambda images, labels=None, **kw: (
        judged.append(labels) or forward(images, labels, **kw)
    )
    real_clusters = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1])
    torch.manual_seed(5)  # a z whose clusters are not all 1
    out = gan_step(accelerator, tc, gan, real, 0, labels=real_clusters)
    assert torch.isfinite(out.loss_d) and torch.isfinite(out.loss_g)
    (fake_clusters,) = {tuple(d.tolist()) for d in drawn}  # one z, read once or more
    assert 0 in fake_clusters
    # D's calls: real, fake, (the penalties), then G's images: each with the right clusters.
    assert torch.equal(judged[0], real_clusters) and judged[1].tolist() == list(fake_clusters)
    assert judged[-1].tolist() == list(fake_clusters)
