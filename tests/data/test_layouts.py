"""The folder layouts people use (train/ with val/ or validation/ or valid/, and test/, at any depth; train/ alone),
one class refused before any training, data.limit keeping every class, labels given as indices, and splits tfpipe
draws keeping copies of a photo together."""

import json

import numpy as np
import pytest
from PIL import Image

from tasks.data.ingest import ingest
from tasks.errors import PipelineError
from tests.conftest import invoke_cli, make_config, photo


def make_folder(root, layout: dict[str, int], seed: int = 0) -> None:
    """`layout`: relative directory -> how many PNGs in it (each distinct)."""
    rng = np.random.default_rng(seed)
    for directory, count in layout.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(photo(rng, 20, 24, i % 3)).save(root / directory / f"{i:03d}.png")


def manifest_of(dataset) -> dict:
    return json.loads(open(f"{dataset.uri}/manifest.json").read())


def folder_config(tmp_path, root, *sets):
    return make_config(tmp_path / "artifacts", f"data.source=folder:{root}", "data.image_size=[16, 16]", *sets)


@pytest.mark.parametrize("validation", ["val", "validation", "valid"])
def test_train_and_val_directories_are_splits_not_classes(tmp_path, validation):
    root = tmp_path / "photos"
    make_folder(root, {"train/cat": 30, "train/dog": 30, f"{validation}/cat": 7, f"{validation}/dog": 5})
    dataset = ingest(folder_config(tmp_path, root).data, str(tmp_path / "artifacts"))
    assert dataset.label_names == ["cat", "dog"]  # not "train" against "val"
    assert dataset.counts["validation"] == 12  # the val/ directory, whole
    assert dataset.counts["train"] + dataset.counts["test"] == 60 and dataset.counts["test"] > 0  # test drawn
    manifest = manifest_of(dataset)
    assert manifest["validation_split"]["method"] == "the source's own"
    assert manifest["test_split"].startswith("hash of the content")


def test_train_validation_and_test_directories_deeper_in_the_tree(tmp_path):
    root = tmp_path / "export"
    make_folder(root, {"2026/train/a": 20, "2026/train/b": 20, "2026/validation/a": 4, "2026/validation/b": 4,
                       "2026/test/a": 3, "2026/test/b": 6})
    dataset = ingest(folder_config(tmp_path, root).data, str(tmp_path / "artifacts"))
    assert dataset.label_names == ["a", "b"]
    assert dataset.counts == {"train": 40, "validation": 8, "test": 9}
    assert manifest_of(dataset)["split_directories"] == ["train/", "val/", "test/"]


def test_train_alone_draws_its_test_split_and_one_class_is_refused(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, {"train/cat": 25, "train/dog": 25})
    dataset = ingest(folder_config(tmp_path, root).data, str(tmp_path / "artifacts"))
    assert dataset.label_names == ["cat", "dog"] and dataset.counts["test"] > 0
    lonely = tmp_path / "lonely"
    make_folder(lonely, {"train/cat": 25})
    code, _, err = invoke_cli("ingest", "--set", f"artifacts.root={tmp_path / 'b'}", "--set",
                              f"data.source=folder:{lonely}", "--set", "data.image_size=[16, 16]")
    assert code == 1 and err.strip().splitlines() == [
        f"tfpipe: error: {lonely}: the data has 1 class (cat): a classifier needs at least two; check the layout "
        "(data.source=folder:PATH needs PATH/<class>/<image files> (or PATH/train/<class>/... with PATH/val/ and "
        "PATH/test/), or data.labels_file with path,label rows)"]
    assert not (tmp_path / "b" / "ingest").exists()


def test_limit_keeps_every_class(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, {"cat": 80, "dog": 80, "emu": 4})  # path order: every cat before any dog
    limited = ("data.limit=30", "data.validation_fraction=0.3")
    dataset = ingest(folder_config(tmp_path, root, *limited).data, str(tmp_path / "artifacts"))
    histogram = [t + v for t, v in zip(dataset.class_histograms["train"], dataset.class_histograms["validation"])]
    assert sum(histogram) == 30 and min(histogram[:2]) >= 10 and histogram[2] >= 1  # not 30 cats
    again = ingest(folder_config(tmp_path / "2", root, *limited).data, str(tmp_path / "2" / "artifacts"))
    assert again.class_histograms == dataset.class_histograms  # seeded


def test_copies_of_a_photo_under_two_names_end_in_one_split(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, {"cat": 60, "dog": 60})
    for cls in ("cat", "dog"):  # a phone's export next to the originals: the same bytes, another name
        for original in sorted((root / cls).iterdir())[:30]:
            (root / cls / f"IMG_{original.stem}-copy.png").write_bytes(original.read_bytes())
    cfg = folder_config(tmp_path, root, "data.test_fraction=0.3", "data.validation_fraction=0.3")
    dataset = ingest(cfg.data, str(tmp_path / "artifacts"))
    statistics = json.loads(open(f"{dataset.uri}/statistics.json").read())
    assert statistics["leakage"] == {"train/validation": 0, "train/test": 0, "validation/test": 0}
    test = set(manifest_of(dataset)["test_files"]["paths"])
    pairs = [(f"{cls}/{i:03d}.png", f"{cls}/IMG_{i:03d}-copy.png") for cls in ("cat", "dog") for i in range(30)]
    assert all((a in test) == (b in test) for a, b in pairs) and any(a in test for a, _ in pairs)


def test_a_labels_file_may_give_indices_into_class_names(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, {"all": 40})
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"all/{i:03d}.png,{i % 2}\n" for i in range(40)))
    cfg = folder_config(tmp_path, root, f"data.labels_file={labels}", "data.class_names=[sour, sweet]")
    dataset = ingest(cfg.data, str(tmp_path / "artifacts"))
    assert dataset.label_names == ["sour", "sweet"] and sum(dataset.class_histograms["test"]) > 0
    labels.write_text("path,label\n" + "".join(f"all/{i:03d}.png,{i % 3}\n" for i in range(40)))
    with pytest.raises(PipelineError, match=r"label 2 but data.class_names has 2 names"):
        ingest(folder_config(tmp_path / "b", root, f"data.labels_file={labels}", "data.class_names=[sour, sweet]")
               .data, str(tmp_path / "b" / "artifacts"))
