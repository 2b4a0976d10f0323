"""Tiny on-disk replicas of the nine transfer datasets' layouts (protocols.md §5.2), made of real digit images.

Each ``make_<key>(root)`` writes 3-4 classes with a few images per split, in the dataset's own file formats
(split text files, json, MATLAB .mat files, CIFAR python-pickle batches), and returns ``root``.
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from replicas import digit_images


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[list[Image.Image], np.ndarray]:
    return digit_images(32)


def _image(n: int) -> Image.Image:
    images, _ = _digits()
    return images[n % len(images)]


def _save(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(n).save(path, quality=90)


def colour_array(n: int) -> np.ndarray:
    """A 32x32 RGB uint8 image whose three channels differ, so a channel-order mistake shows."""
    grey = np.asarray(_image(n).convert("L"), dtype=np.uint8)
    return np.stack([grey, 255 - grey, np.full_like(grey, (37 * n) % 256)], axis=-1)


def _write_lines(path: Path, lines: list[str], ending: str = "\n", final_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ending.join(lines) + (ending if final_newline else "")
    path.write_bytes(text.encode())


AIRCRAFT_CLASSES = ["707-320", "A340-500", "Cessna 172"]


def make_aircraft(root: Path, per_split: int = 2) -> Path:
    """data/images_variant_{train,val,test}.txt, lines '<7-digit id> <variant>' (variants may hold spaces);
    the test file ends without a newline (the pitfall that gave sslt a spurious class)."""
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for _ in range(per_split):
            for variant in AIRCRAFT_CLASSES:
                image_id = f"{1000000 + n:07d}"
                _save(root / "data" / "images" / f"{image_id}.jpg", n)
                lines.append(f"{image_id} {variant}")
                n += 1
        _write_lines(root / "data" / f"images_variant_{split}.txt", lines, final_newline=split != "test")
    return root


CALTECH_CLASSES = ["BACKGROUND_Google", "Faces", "accordion"]  # case-sensitive sorted, as ImageFolder


def make_caltech101(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """train.txt with CRLF endings, test.txt with LF; images caltech101/101_ObjectCategories/<class>/image_NNNN.jpg."""
    folder = root / "caltech101" / "101_ObjectCategories"
    train, test = [], []
    for label, name in enumerate(CALTECH_CLASSES):
        for k in range(train_per_class + test_per_class):
            relative = f"{name}/image_{k + 1:04d}.jpg"
            _save(folder / relative, 100 + 10 * label + k)
            (train if k < train_per_class else test).append(f"{relative} {label}")
    _write_lines(root / "train.txt", train, ending="\r\n")
    _write_lines(root / "test.txt", test, ending="\n")
    return root


def _cifar_batch(first: int, count: int, labels: list[int], label_key: str) -> dict:
    data = np.stack([colour_array(first + i).transpose(2, 0, 1).reshape(-1) for i in range(count)])
    return {"batch_label": "replica", label_key: labels, "data": data,
            "filenames": [f"img_{first + i}.png" for i in range(count)]}


def _pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def cifar10_labels(batch: int, per_batch: int) -> list[int]:
    return [(batch * per_batch + i) % 4 for i in range(per_batch)]


def make_cifar10(root: Path, per_batch: int = 3, test_count: int = 4) -> Path:
    """cifar-10-batches-py/data_batch_1..5 (per_batch images each; image j of the train set is colour_array(j)),
    test_batch (colour_array(1000 + j)) and batches.meta."""
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        _pickle(folder / f"data_batch_{b + 1}", _cifar_batch(b * per_batch, per_batch, cifar10_labels(b, per_batch),
                                                            "labels"))
    _pickle(folder / "test_batch", _cifar_batch(1000, test_count, [9 - i for i in range(test_count)], "labels"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return root


def make_cifar100(root: Path, train_count: int = 10, test_count: int = 4) -> Path:
    """cifar-100-python/{train,test,meta} with fine and coarse labels."""
    folder = root / "cifar-100-python"
    for name, first, count in (("train", 0, train_count), ("test", 500, test_count)):
        batch = _cifar_batch(first, count, [(7 * i) % 100 for i in range(first, first + count)], "fine_labels")
        batch["coarse_labels"] = [label // 5 for label in batch["fine_labels"]]
        _pickle(folder / name, batch)
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]})
    return root


DTD_CLASSES = ["banded", "dotted", "zigzagged"]


def make_dtd(root: Path, per_split: int = 2) -> Path:
    """images/<class>/<class>_NNNN.jpg and labels/{train,val,test}1.txt (plus a partition-2 file to ignore)."""
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for name in DTD_CLASSES:
            for _ in range(per_split):
                relative = f"{name}/{name}_{n:04d}.jpg"
                _save(root / "images" / relative, 200 + n)
                lines.append(relative)
                n += 1
        _write_lines(root / "labels" / f"{split}1.txt", lines)
    _write_lines(root / "labels" / "train2.txt", ["banded/banded_9999.jpg"])
    return root


FLOWERS_LABELS = [5, 17, 102]  # original 1-based labels, mapped to 0, 1, 2
FLOWERS_SETID = {"trnid": [1, 4, 2, 5, 3, 6], "valid": [7, 8, 9, 10, 11, 12], "tstid": [18, 13, 14, 15, 16, 17]}


def flowers_label(image_id: int) -> int:
    return FLOWERS_LABELS[(image_id - 1) % 3]


def make_flowers(root: Path) -> Path:
    """setid.mat (1-based ids, (1, N) arrays), imagelabels.mat (labels 5/17/102) and jpg/image_%05d.jpg."""
    count = 18
    for image_id in range(1, count + 1):
        _save(root / "jpg" / f"image_{image_id:05d}.jpg", 300 + image_id)
    savemat(root / "imagelabels.mat", {"labels": np.array([[flowers_label(i) for i in range(1, count + 1)]],
                                                          dtype=np.uint8)})
    savemat(root / "setid.mat", {name: np.array([ids], dtype=np.uint16) for name, ids in FLOWERS_SETID.items()})
    return root


FOOD_CLASSES = ["apple_pie", "baklava", "churros"]


def make_food(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """food-101/meta/{classes.txt,train.json,test.json} (json keys in another order than classes.txt) and
    food-101/images/<class>/<id>.jpg."""
    base = root / "food-101"
    content: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    n = 0
    for name in reversed(FOOD_CLASSES):
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            ids = []
            for _ in range(count):
                ids.append(f"{name}/{100000 + n}")
                _save(base / "images" / f"{ids[-1]}.jpg", 400 + n)
                n += 1
            content[split][name] = ids
    _write_lines(base / "meta" / "classes.txt", FOOD_CLASSES)
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(content[split]))
    return root


PETS = [("Abyssinian", 1, 1, 1), ("american_bulldog", 2, 2, 1), ("yorkshire_terrier", 37, 2, 25)]


def make_pets(root: Path, trainval_per_class: int = 4, test_per_class: int = 2) -> Path:
    """annotations/{trainval,test}.txt, lines '<breed>_<n> <class id> <species> <breed id>' with class ids
    1, 2, 37 (mapped to 0, 1, 2), and images/<breed>_<n>.jpg."""
    n = 1
    for split, count in (("trainval", trainval_per_class), ("test", test_per_class)):
        lines = []
        for _ in range(count):
            for breed, class_id, species, breed_id in PETS:
                _save(root / "images" / f"{breed}_{n}.jpg", 500 + n)
                lines.append(f"{breed}_{n} {class_id} {species} {breed_id}")
                n += 1
        _write_lines(root / "annotations" / f"{split}.txt", lines)
    return root


SUN_CLASS_LINES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bar", "/b/barn"]


def make_sun397(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> Path:
    """ClassName.txt, Training_01.txt, Testing_01.txt and images ROOT/<letter>/<class>/sun_*.jpg. Class 'bar'
    is a prefix of 'barn', and the first abbey image is called sun_bar.jpg: only whole folder names count."""
    train, test = [], []
    n = 0
    for line in SUN_CLASS_LINES:
        for k in range(train_per_class + test_per_class):
            filename = "sun_bar.jpg" if (line, k) == ("/a/abbey", 0) else f"sun_{chr(97 + k)}{n:05d}.jpg"
            relative = f"{line}/{filename}"
            _save(root / relative.lstrip("/"), 600 + n)
            (train if k < train_per_class else test).append(relative)
            n += 1
    _write_lines(root / "ClassName.txt", SUN_CLASS_LINES)
    _write_lines(root / "Training_01.txt", train)
    _write_lines(root / "Testing_01.txt", test)
    return root


MAKERS = {
    "aircraft": make_aircraft, "caltech101": make_caltech101, "cifar10": make_cifar10, "cifar100": make_cifar100,
    "dtd": make_dtd, "flowers": make_flowers, "food": make_food, "pets": make_pets, "sun397": make_sun397,
}


def make_transfer_root(data_root: Path, keys: tuple[str, ...] | None = None) -> Path:
    """data_root/<key> for each of the nine (or the given) datasets, as find_transfer_datasets expects."""
    for key in keys or tuple(MAKERS):
        MAKERS[key](data_root / key)
    return data_root
