"""Data: the DALI pipeline on generated image folders: shape, dtype, range and exact colours;
PNG, RGBA and grayscale inputs; the crop box; flips; sharding (disjoint, covering, equal step
counts, and DALI reading exactly the planned files); mid-epoch resume; and the decoded-image cache
(bitwise the streaming batches, and streaming when memory is short); which device DALI decodes on,
and how much memory the cache may take on a GPU node."""

import numpy as np
import pytest
import torch
from conftest import colour_index, solid_colour, write_images
from PIL import Image

from distgan import data as data_module
from distgan.data import (
    ImageLoader,
    dali_device_id,
    epoch_order,
    find_images,
    memory_for_cache,
    steps_per_epoch,
)


def loader(files, **kwargs):
    options = dict(resolution=32, batch_size=4, shard_id=0, num_shards=1, seed=0, flip=False)
    return ImageLoader(files, **{**options, **kwargs})


def batch_indices(batch: torch.Tensor) -> list[int]:
    """Which solid-colour image each decoded sample is (from its centre pixel)."""
    centre = ((batch[:, :, 16, 16] + 1) * 127.5).numpy()
    return [colour_index(pixel) for pixel in centre]


def test_shape_dtype_range_and_colours(jpeg_folder):
    files = find_images(jpeg_folder)
    assert len(files) == 24 and files == sorted(files)
    batches = list(loader(files).epoch(0))
    assert len(batches) == 6
    for batch in batches:
        assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
        assert batch.min() >= -1.0 and batch.max() <= 1.0
    decoded = torch.cat(batches)
    order = loader(files).epoch_files(0)
    for sample, path in zip(decoded, order, strict=True):
        expected = torch.tensor(solid_colour(int(path[-8:-4])), dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(sample[:, 16, 16], expected, atol=0.03, rtol=0)


def test_png_rgba_and_grayscale_become_rgb(mixed_folder):
    files = find_images(mixed_folder)
    assert not any(f.endswith(".txt") for f in files)
    assert len(files) == 12
    batches = torch.cat([b.clone() for b in loader(files, batch_size=3).epoch(0)])
    assert batches.shape == (12, 3, 32, 32)
    by_file = dict(zip(loader(files, batch_size=3).epoch_files(0), batches, strict=True))
    gray = next(v for k, v in by_file.items() if k.endswith("gray.jpg"))
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    assert gray.mean().item() == pytest.approx(128 / 127.5 - 1, abs=0.02)
    red = next(v for k, v in by_file.items() if k.endswith("alpha.png"))
    torch.testing.assert_close(red[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=0.01, rtol=0)


def test_crop_box_selects_the_region(tmp_path):
    image = np.zeros((80, 60, 3), np.uint8)
    image[40:60, 10:30] = (255, 255, 255)  # a white box at left=10, top=40, 20x20
    Image.fromarray(image).save(tmp_path / "box.png")
    files = find_images(tmp_path)
    cropped = next(loader(files, batch_size=1, crop_box=[10, 40, 20, 20]).epoch(0))
    assert cropped[:, :, 4:-4, 4:-4].min() > 0.95  # all white inside
    centred = next(loader(files, batch_size=1).epoch(0))
    assert centred.min() < -0.95  # the centred square holds black too


def test_flips_mirror_images_reproducibly(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 255  # white left half
    for i in range(16):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    files = find_images(tmp_path)
    first = torch.cat([b.clone() for b in loader(files, flip=True, seed=3).epoch(0)])
    flipped = first[:, 0, 16, 2] < 0  # left edge dark: mirrored
    assert 0 < flipped.sum() < 16
    again = torch.cat([b.clone() for b in loader(files, flip=True, seed=3).epoch(0)])
    assert torch.equal(first, again)
    other_epoch = torch.cat([b.clone() for b in loader(files, flip=True, seed=3).epoch(1)])
    assert not torch.equal(first, other_epoch)


def test_two_shards_are_disjoint_and_cover_the_set(jpeg_folder):
    files = find_images(jpeg_folder)
    shards = [loader(files, shard_id=r, num_shards=2, batch_size=3) for r in range(2)]
    planned = [s.epoch_files(0) for s in shards]
    assert len(planned[0]) == len(planned[1]) == 12
    assert not set(planned[0]) & set(planned[1])
    assert set(planned[0]) | set(planned[1]) == set(files)
    for shard, plan in zip(shards, planned, strict=True):
        read = [i for b in shard.epoch(0) for i in batch_indices(b)]
        assert read == [int(p[-8:-4]) for p in plan]  # DALI reads exactly this shard's plan


def test_uneven_data_gives_every_rank_the_same_steps(tmp_path):
    write_images(tmp_path, 13)
    files = find_images(tmp_path)
    assert steps_per_epoch(13, 2, 4) == 2
    counts = []
    for rank in range(2):
        batches = list(loader(files, shard_id=rank, num_shards=2, batch_size=4).epoch(0))
        counts.append(len(batches))
        assert all(b.shape[0] == 4 for b in batches)  # the last batch is filled, not dropped
    assert counts == [2, 2]
    order = epoch_order(13, 0, 0, 8)
    assert len(order) == 16 and set(order) == set(range(13))  # every image seen, 3 twice


def test_resume_mid_epoch_continues_the_same_stream(jpeg_folder):
    files = find_images(jpeg_folder)
    full = [
        b.clone() for b in loader(files, flip=True, shard_id=1, num_shards=2, batch_size=3).epoch(2)
    ]
    resumed = [
        b.clone()
        for b in loader(files, flip=True, shard_id=1, num_shards=2, batch_size=3).epoch(2, 2)
    ]
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b)


def test_epochs_are_shuffled_differently(jpeg_folder):
    files = find_images(jpeg_folder)
    assert loader(files).epoch_files(0) != loader(files).epoch_files(1)
    assert loader(files).epoch_files(0) == loader(files).epoch_files(0)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        find_images(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="holds no images"):
        find_images(tmp_path / "empty")


def noise_images(folder, count: int, size=(40, 30)) -> list[str]:
    """Random-noise JPEGs: every pixel differs, so any mismatch of image, crop or flip shows."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return find_images(folder)


@pytest.mark.parametrize("crop_box", [None, [4, 2, 24, 20]])
def test_decoded_cache_gives_exactly_the_streaming_batches(tmp_path, crop_box):
    files = noise_images(tmp_path / "noise", 13)  # 13: the last global batch is padded
    for shard in (0, 1):
        options = dict(
            flip=True, shard_id=shard, num_shards=2, batch_size=3, seed=5, crop_box=crop_box
        )
        streaming = loader(files, decoded_cache="off", **options)
        cached = loader(files, decoded_cache="auto", **options)
        for epoch, start in ((0, 0), (1, 1), (3, 0)):  # new orders and flips; a resumed epoch
            a = [b.clone() for b in streaming.epoch(epoch, start)]
            b = [b.clone() for b in cached.epoch(epoch, start)]
            assert len(a) == len(b) == 3 - start
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)
        assert streaming.cache is None
        assert cached.cache.dtype == torch.uint8 and cached.cache.shape == (13, 32, 32, 3)


def test_batches_are_nchw_laid_out_channels_last(jpeg_folder):
    files = find_images(jpeg_folder)
    for mode in ("off", "auto"):
        batch = next(loader(files, decoded_cache=mode).epoch(0))
        assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
        assert batch.is_contiguous(memory_format=torch.channels_last)


def test_decoded_cache_streams_when_memory_is_short(monkeypatch, jpeg_folder):
    files = find_images(jpeg_folder)
    monkeypatch.setattr(data_module, "memory_for_cache", lambda device: 0)
    short = loader(files, decoded_cache="auto", flip=True)
    assert short.build_cache() is None
    expected = [b.clone() for b in loader(files, flip=True).epoch(0)]
    got = [b.clone() for b in short.epoch(0)]
    assert short.cache is None and len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_dali_decodes_on_the_training_device(monkeypatch):
    # Accelerate's device for one process on one GPU is `cuda` with no index: the current device.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dali_device_id(torch.device("cuda")) == 3
    assert dali_device_id(torch.device("cuda", 1)) == 1
    assert dali_device_id(torch.device("cpu")) is None


def test_cache_budget_per_gpu_and_per_host(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * gib, 80 * gib))
    monkeypatch.setattr(data_module, "available_memory", lambda: 64 * gib)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    # Eight processes, eight GPUs: each GPU holds one copy, the host would hold eight.
    assert memory_for_cache(torch.device("cuda", 5)) == 20 * gib
    assert memory_for_cache(torch.device("cpu")) == 2 * gib
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # two processes per GPU
    assert memory_for_cache(torch.device("cuda", 0)) == 10 * gib
