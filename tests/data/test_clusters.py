"""Self-conditioning's clusters (data/clusters.py): k-means finds separated groups whatever their
order, the same clusters from the same images, numbered by size; images are clustered as
training crops them (the crop box, else the centred square); too few images or distinct groups
for --clusters, and a model that disagrees with --clusters, are one-line errors; and a run's
clusters file (paths relative to a relative --data-dir) is read back as the run's labels, with
a missing or mismatched file refused."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from distgan.config.model import ModelConfig
from distgan.config.sections import DataConfig
from distgan.data.clusters import (
    CLUSTERS_FILE,
    cluster_images,
    cluster_labels,
    kmeans,
    require_matching_model,
)
from distgan.errors import UserError

ONE_PROCESS = SimpleNamespace(
    is_main_process=True, num_processes=1, device="cpu", print=lambda *_: None
)


def test_kmeans_finds_separated_groups_the_same_way_each_time():
    rng = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.randint(3, (300,), generator=rng)
    points = centres[truth] + 0.5 * torch.randn(300, 2, generator=rng)
    found = kmeans(points, 3)
    assert torch.equal(found, kmeans(points, 3))
    # One found cluster per true group, whatever their numbers.
    pairs = {(int(t), int(f)) for t, f in zip(truth, found, strict=True)}
    assert len(pairs) == 3 and len({f for _, f in pairs}) == 3


def write_colours(folder, counts: dict) -> list[str]:
    """Solid 20x20 images: `counts[colour]` of each; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for colour, count in counts.items():
        for i in range(count):
            path = folder / f"{colour[0]}-{colour[1]}-{colour[2]}-{i}.png"
            Image.new("RGB", (20, 20), colour).save(path)
            files.append(str(path))
    return files


def test_images_are_clustered_by_their_pixels_and_numbered_by_size(tmp_path):
    files = write_colours(tmp_path, {(255, 0, 0): 3, (0, 0, 255): 7, (0, 255, 0): 5})
    # Each colour is one cluster, the largest group cluster 0: blue 0, green 1, red 2.
    assert cluster_images(files, 3) == [2] * 3 + [0] * 7 + [1] * 5


def test_images_are_clustered_as_training_crops_them(tmp_path):
    """40x20 images: a left half red or blue, and a right half white or black that splits them
    the other way (and by more). Cropped to the left half they split by red and blue; whole, by
    their centred square (the middle 20x20, half of each side), where white and black weigh
    more."""
    files, left_colours, right_colours = [], [], []
    for i in range(8):
        left, right = [(255, 0, 0), (0, 0, 255)][i % 2], [(255, 255, 255), (0, 0, 0)][i // 4]
        image = Image.new("RGB", (40, 20), right)
        image.paste(Image.new("RGB", (20, 20), left), (0, 0))
        path = tmp_path / f"{i}.png"
        image.save(path)
        files.append(str(path))
        left_colours.append(left)
        right_colours.append(right)

    def groups(found, keys):
        return {frozenset(i for i in range(8) if keys[i] == key) for key in set(keys)} == {
            frozenset(i for i in range(8) if found[i] == c) for c in set(found)
        }

    assert groups(cluster_images(files, 2, crop_box=[0, 0, 20, 20]), left_colours)
    assert groups(cluster_images(files, 2), right_colours)


def test_too_few_images_or_groups_is_a_one_line_error(tmp_path):
    files = write_colours(tmp_path, {(255, 0, 0): 3, (0, 0, 255): 2})
    with pytest.raises(UserError, match=r"--clusters 6 needs at least 6 images.*has 5: lower"):
        cluster_images(files, 6)
    with pytest.raises(UserError, match=r"form only 2 distinct groups: lower --clusters to 2"):
        cluster_images(files, 3)


def test_a_model_and_clusters_that_disagree_stop_before_any_work():
    require_matching_model(None, 20)
    require_matching_model(ModelConfig(cluster_shares=[0.5, 0.5]), 2)
    with pytest.raises(UserError, match="was not trained on clusters; drop --init-from"):
        require_matching_model(ModelConfig(), 20)
    with pytest.raises(UserError, match="self-conditioned on its own run's clusters: resume in"):
        require_matching_model(ModelConfig(cluster_shares=[0.5, 0.5]), 0)


def test_a_run_writes_its_clusters_and_reads_them_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    files = write_colours(tmp_path / "data", {(255, 0, 0): 4, (0, 0, 255): 6})
    monkeypatch.chdir(tmp_path)  # --data-dir as users give it: relative to where they are
    data = Path("data")
    dc = DataConfig(data_dir=str(data), clusters=2)
    labels = cluster_labels(ONE_PROCESS, files, data, dc, out, None)
    assert labels.clustered and labels.classes == ["0", "1"] and labels.counts() == [6, 4]
    assert labels.model_fields() == {"cluster_shares": [0.6, 0.4]}
    rows = (out / CLUSTERS_FILE).read_text().splitlines()
    assert rows[0] == "file,class" and len(rows) == 11 and rows[1].startswith("255-0-0-0.png,")

    # A run that goes on reads the file again: the same labels, even if the images changed.
    model = ModelConfig(cluster_shares=[0.6, 0.4])
    Image.new("RGB", (20, 20), (0, 0, 255)).save(files[0])
    again = cluster_labels(ONE_PROCESS, files, data, dc, out, model)
    assert (again.files, again.values) == (labels.files, labels.values)

    other = ModelConfig(cluster_shares=[0.5, 0.25, 0.25])
    with pytest.raises(UserError, match=r"holds 2 clusters and the model 3"):
        cluster_labels(ONE_PROCESS, files, data, dc, out, other)
    (out / CLUSTERS_FILE).unlink()
    with pytest.raises(UserError, match=r"clusters.csv is missing: resume in that run's"):
        cluster_labels(ONE_PROCESS, files, data, dc, out, model)
