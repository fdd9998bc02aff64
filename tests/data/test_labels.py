"""Labels for conditional training: classes from subfolders (the ImageFolder layout), from a CSV
of file,class rows and CelebA-style attribute lists (multi-hot); each bad label input (an image
without a label, a class without images, a file the labels name that is not there, a bad row, an
unknown attribute) stopping with a one-line error, or the unlabelled images skipped as
--on-unlabelled says; hidden folders, Excel's CSVs, ambiguous or repeated names, the same class
order everywhere; a resumed model's classes checked against the data's; the start-up line's images
per class; the labels config's own checks; and labels travelling with their images through DALI, sharded, streamed and cached alike."""

import pytest
import torch
from PIL import Image

from distgan.config.model import ModelConfig
from distgan.config.sections import DataConfig
from distgan.data.folder import find_images
from distgan.data.labels import class_order, read_labels, require_the_model_classes
from distgan.data.loader import ImageLoader, label_table
from distgan.errors import UserError
from tests.helpers import colour_index, write_images


def gray_png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


@pytest.fixture
def class_folders(tmp_path):
    """3 classes (cat: 2 images, dog: 3, 10: 1) in DIR/<class>/."""
    root = tmp_path / "pets"
    for name, count in (("cat", 2), ("dog", 3), ("10", 1)):
        for i in range(count):
            gray_png(root / name / f"{i}.png")
    return root


def test_classes_come_from_the_subfolders(class_folders):
    files = find_images(class_folders)
    labels = read_labels("folders", class_folders, files)
    assert labels.conditioning == "class"
    assert labels.classes == ["10", "cat", "dog"]
    assert labels.files == files
    names = [labels.classes[v] for v in labels.values]
    assert names == [f.split("/")[-2] for f in files]
    assert labels.counts() == [1, 2, 3]
    assert labels.describe() == "3 classes: 10 1, cat 2, dog 3"


def test_numeric_classes_sort_as_numbers():
    assert class_order(["10", "9", "1"]) == ["1", "9", "10"]
    assert class_order(["b", "a", "10"]) == ["10", "a", "b"]


def test_an_image_outside_any_class_folder_stops_or_is_skipped(class_folders):
    gray_png(class_folders / "stray.png")
    files = find_images(class_folders)
    with pytest.raises(UserError, match=r"1 image in .* outside any class folder \(stray.png\).*"):
        read_labels("folders", class_folders, files)
    skipped = read_labels("folders", class_folders, files, on_unlabelled="skip")
    assert len(skipped.files) == len(files) - 1 and not any("stray" in f for f in skipped.files)


def test_a_class_folder_without_images_stops(class_folders):
    (class_folders / "emu").mkdir()
    (class_folders / "emu" / "notes.txt").write_text("no pictures yet")
    with pytest.raises(UserError, match=r"1 class without usable images \(emu\)"):
        read_labels("folders", class_folders, find_images(class_folders))


def test_a_class_left_without_usable_images_stops(class_folders):
    labels = read_labels("folders", class_folders, find_images(class_folders))
    usable = [f for f in labels.files if "/10/" not in f]  # its one image was unusable
    with pytest.raises(UserError, match=r"class without usable images \(10\)"):
        labels.only(usable)
    kept = read_labels("folders", class_folders, find_images(class_folders)).only(labels.files)
    assert kept.values == labels.values


def test_one_class_is_not_conditioning(tmp_path):
    gray_png(tmp_path / "only" / "a.png")
    with pytest.raises(UserError, match="one class"):
        read_labels("folders", tmp_path, find_images(tmp_path))


def test_a_csv_of_file_and_class(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        gray_png(tmp_path / "images" / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class\na.png,smiling\nsub/c.png,neutral\nb.png,smiling\n")
    files = find_images(tmp_path / "images")
    labels = read_labels(str(csv), tmp_path / "images", files)
    assert labels.classes == ["neutral", "smiling"]
    named = zip(files, labels.values, strict=True)
    by_file = {f.split("images/")[1]: labels.classes[v] for f, v in named}
    assert by_file == {"a.png": "smiling", "b.png": "smiling", "sub/c.png": "neutral"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a.png,x\nb.png,y\ngone.png,x\n", r"names 1 file that .* does not hold \(gone.png\)"),
        ("a.png,x\nb.png,y\na.png,y\n", r"gives a.png two classes \(x, y\)"),
        ("a.png,x\nb.png\n", r"line 2 is not `file,class`"),
        ("a.png,x\n", r"1 image in .* not named in .*\(b.png\)"),
    ],
)
def test_bad_csv_labels_stop_with_one_line(tmp_path, rows, message):
    for name in ("a.png", "b.png"):
        gray_png(tmp_path / "images" / name)
    csv = tmp_path / "labels.csv"
    csv.write_text(rows)
    with pytest.raises(UserError, match=message) as error:
        read_labels(str(csv), tmp_path / "images", find_images(tmp_path / "images"))
    assert "\n" not in str(error.value)


def test_a_missing_label_file_stops(tmp_path):
    gray_png(tmp_path / "a" / "x.png")
    with pytest.raises(UserError, match="label file .*nope.csv does not exist"):
        read_labels(str(tmp_path / "nope.csv"), tmp_path, find_images(tmp_path))


ATTRIBUTES = "3\nSmiling Male Young\n000001.jpg 1 -1 1\n000002.jpg -1 -1 1\n000003.jpg 1 1 -1\n"


@pytest.fixture
def celeba_like(tmp_path):
    images = tmp_path / "img_align_celeba"
    for i in (1, 2, 3):
        path = images / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(path)
    listing = tmp_path / "list_attr_celeba.txt"
    listing.write_text(ATTRIBUTES)
    return images, listing


def test_celeba_attributes_are_multi_hot(celeba_like):
    images, listing = celeba_like
    files = find_images(images)
    labels = read_labels(str(listing), images, files, attributes=["Male", "Smiling"])
    assert labels.conditioning == "attributes"
    assert labels.classes == ["Male", "Smiling"]
    assert labels.values == [[0, 1], [0, 0], [1, 1]]
    assert labels.counts() == [1, 2]
    table = label_table(labels)
    assert table.dtype == torch.float32 and table.shape == (3, 2)


def test_attribute_choices_are_checked(celeba_like):
    images, listing = celeba_like
    files = find_images(images)
    with pytest.raises(UserError, match="lists 3 attributes .*--attributes"):
        read_labels(str(listing), images, files)
    with pytest.raises(UserError, match="no attribute Bald: choose from Smiling, Male, Young"):
        read_labels(str(listing), images, files, attributes=["Bald"])
    (images / "000002.jpg").unlink()
    with pytest.raises(UserError, match=r"names 1 file .*\(000002.jpg\)"):
        read_labels(str(listing), images, find_images(images), attributes=["Male"])


def test_the_labels_config_checks_itself():
    with pytest.raises(ValueError, match="needs data_dir: the built-in faces have no labels"):
        DataConfig(labels="folders")
    with pytest.raises(ValueError, match="attributes need a label file"):
        DataConfig(data_dir="x", labels="folders", attributes=["Smiling"])
    config = DataConfig(data_dir="x", labels="a.txt", attributes=["Smiling,Male", "Young"])
    assert config.attributes == ["Smiling", "Male", "Young"]


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_labels_travel_with_their_images_through_dali(tmp_path, cache):
    """write_images puts image i in part{i // 10}/: the label of each decoded image must be the
    class of the colour it shows, on every shard, in every epoch, from the files or the cache."""
    write_images(tmp_path, 36, fmt="PNG")
    files = find_images(tmp_path)
    labels = read_labels("folders", tmp_path, files)
    table = label_table(labels)
    seen = []
    for shard in (0, 1):
        loader = ImageLoader(
            files,
            resolution=32,
            batch_size=4,
            shard_id=shard,
            num_shards=2,
            seed=3,
            flip=True,
            decoded_cache=cache,
            labels=table,
        )
        for epoch, start in ((0, 0), (1, 2)):
            for images, batch_labels in loader.labelled_epoch(epoch, start):
                centre = ((images[:, :, 16, 16] + 1) * 127.5).numpy()
                shown = [colour_index(pixel) for pixel in centre]
                assert batch_labels.tolist() == [
                    labels.classes.index(f"part{i // 10}") for i in shown
                ]
                seen += shown
    assert set(seen) == set(range(36))


def test_hidden_folders_are_no_class(class_folders):
    gray_png(class_folders / ".ipynb_checkpoints" / "0-checkpoint.png")
    files = find_images(class_folders)
    skipped = read_labels("folders", class_folders, files, on_unlabelled="skip")
    assert skipped.classes == ["10", "cat", "dog"] and len(skipped.files) == len(files) - 1
    with pytest.raises(UserError, match="outside any class folder"):
        read_labels("folders", class_folders, files)


def test_class_order_is_the_same_everywhere():
    assert class_order(["07", "7", "1", "01"]) == ["01", "1", "07", "7"]
    assert class_order(["--1", "2"]) == ["--1", "2"]  # not all integers: as text


def test_an_attribute_list_naming_a_file_twice_or_ambiguously_stops(celeba_like, tmp_path):
    images, listing = celeba_like
    listing.write_text(ATTRIBUTES + "\n000001.jpg -1 -1 1\n")  # a blank line, then a conflict
    with pytest.raises(UserError, match="lists 000001.jpg twice with other values"):
        read_labels(str(listing), images, find_images(images), attributes=["Smiling"])
    listing.write_text(ATTRIBUTES + "\n000004.jpg 1 1\n")
    with pytest.raises(UserError, match="line 7 has 2 values for 3 attributes"):
        read_labels(str(listing), images, find_images(images), attributes=["Smiling"])
    for split in ("train", "val"):  # the same name in two folders: a basename matches both
        (images / split).mkdir()
        Image.new("RGB", (8, 8)).save(images / split / "000001.jpg")
    (images / "000001.jpg").unlink()
    listing.write_text(ATTRIBUTES)
    with pytest.raises(UserError, match="names 000001.jpg, and 2 files in .* have that name"):
        read_labels(str(listing), images, find_images(images), attributes=["Smiling"])


def test_attributes_named_twice_or_on_for_no_image_stop(celeba_like):
    images, listing = celeba_like
    files = find_images(images)
    with pytest.raises(UserError, match="names Smiling twice"):
        read_labels(str(listing), images, files, attributes=["Smiling", "Smiling"])
    listing.write_text(ATTRIBUTES.replace("1 -1 1\n", "-1 -1 1\n", 1).replace("1 1 -1", "-1 1 -1"))
    with pytest.raises(UserError, match="no usable image has Smiling: drop it"):
        read_labels(str(listing), images, files, attributes=["Smiling", "Male"])


def test_a_csv_saved_by_excel_reads(tmp_path):
    for name in ("a.png", "b.png"):
        gray_png(tmp_path / "images" / name)
    csv = tmp_path / "labels.csv"
    csv.write_bytes("\ufeffFile,Class\r\na.png,x\r\nb.png,y\r\n".encode())
    labels = read_labels(str(csv), tmp_path / "images", find_images(tmp_path / "images"))
    assert labels.classes == ["x", "y"] and labels.values == [0, 1]


def test_a_resumed_model_needs_its_classes(class_folders):
    labels = read_labels("folders", class_folders, find_images(class_folders))
    model = ModelConfig(**labels.model_fields())
    require_the_model_classes(model, labels)
    require_the_model_classes(ModelConfig(), None)
    with pytest.raises(UserError, match="trained on labels class 10, cat, dog, and the data now"):
        require_the_model_classes(model, None)
    with pytest.raises(UserError, match="trained on labels none, and the data now gives class"):
        require_the_model_classes(ModelConfig(), labels)
