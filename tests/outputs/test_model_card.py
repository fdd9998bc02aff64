"""The Hub model folder of a conditional generator: `Generator.from_pretrained` of it gives back a
conditional G with the same classes and the same images for the same z and labels; its card
names the conditioning and the classes (in the YAML the Hub indexes, and on the page), and its
usage snippet, run as written, passes labels and draws images of one class. An unconditional
card says nothing of classes; a self-conditioned one (--clusters) says it takes z alone, and
its folder loads back with the same images."""

import pytest
import torch
from huggingface_hub import ModelCard

from distgan.config.config import make_config
from distgan.config.model import ModelConfig
from distgan.models.dcgan import Generator, sample_latents
from distgan.outputs.checkpoint import TrainerState
from distgan.outputs.hub import save_model_folder
from distgan.outputs.model_card import REPO_PLACEHOLDER, model_card


def hub_folder(tmp_path, model: ModelConfig):
    """A conditional G (off its init, so that a wrong load shows) and its model folder."""
    torch.manual_seed(0)
    generator = Generator(model).eval()
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    state = TrainerState(step=10, model=model, images_seen=80, global_batch=8)
    folder = save_model_folder(tmp_path / "run", generator, make_config(), state)
    return generator, folder


def python_snippet(card: ModelCard) -> str:
    return card.text.split("```python\n")[1].split("```")[0]


@pytest.mark.parametrize(
    ("conditioning", "classes"),
    [("class", [str(d) for d in range(10)]), ("attributes", ["Smiling", "Male", "Eyeglasses"])],
)
def test_a_conditional_model_folder_carries_its_classes(tmp_path, conditioning, classes):
    model = ModelConfig(
        resolution=28,
        channels=1,
        g_channels=8,
        z_dim=16,
        conditioning=conditioning,
        classes=classes,
    )
    generator, folder = hub_folder(tmp_path, model)
    loaded = Generator.from_pretrained(folder)
    assert loaded.config == model and loaded.config.classes == classes
    z = sample_latents(model, 4, generator=torch.Generator().manual_seed(1))
    labels = (
        torch.tensor([0, 3, 7, 9]) if conditioning == "class" else torch.tensor([[1.0, 0, 1]] * 4)
    )
    with torch.no_grad():
        assert torch.equal(loaded(z, labels), generator(z, labels))
        with pytest.raises(ValueError, match="conditional"):
            loaded(z)

    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["conditioning"] == conditioning and data["classes"] == classes
    assert f"{conditioning if conditioning == 'class' else 'attribute'}-conditional" in data["tags"]
    assert ", ".join(classes) in card.text and "-conditional DCGAN generator" in card.text
    assert f"--class {classes[0]} " in card.text  # the ONNX command asks for a class too
    snippet = python_snippet(card).replace(REPO_PLACEHOLDER, str(folder))
    assert "labels" in snippet
    scope = {}
    exec(snippet, scope)  # the card's usage, as written
    assert scope["images"].shape == (16, 1, 28, 28)
    first = torch.full((16,), 0) if conditioning == "class" else torch.tensor([[1.0, 0, 0]] * 16)
    assert torch.equal(scope["labels"], first.to(scope["labels"].dtype))


def test_an_unconditional_card_names_no_classes():
    model = ModelConfig(resolution=32, g_channels=8)
    card = model_card(
        make_config(), TrainerState(step=1, model=model), name="plain", score=None, samples=False
    )
    data = card.data.to_dict()
    assert "conditioning" not in data and "classes" not in data
    assert "-conditional" not in card.text and "--class" not in card.text
    assert "images = generator(sample_latents(generator.config, 16))" in python_snippet(card)


def test_a_self_conditioned_card_and_folder(tmp_path):
    model = ModelConfig(resolution=32, g_channels=8, cluster_shares=[0.5, 0.3, 0.2])
    generator, folder = hub_folder(tmp_path, model)
    card = ModelCard.load(folder / "README.md")
    assert "Self-conditioned on 3 k-means clusters" in card.text and "--class" not in card.text
    assert "images = generator(sample_latents(generator.config, 16))" in python_snippet(card)
    loaded = Generator.from_pretrained(folder)
    assert loaded.config.cluster_shares == [0.5, 0.3, 0.2]
    z = sample_latents(model, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(z), generator(z))
