"""The nine transfer datasets of the linear-probe protocol (protocols.md §5.2, Ericsson et al.'s ``sslt``).

Each loader reads one dataset's own split files (never downloads) and returns a Dataset with the splits
``train``, ``val``, ``trainval`` and ``test`` and the metric the protocol scores it with.

Specs: ``<key>:<root>``, e.g. ``aircraft:/data/fgvc-aircraft-2013b``; ``LAYOUTS[key]`` says what ``root``
must hold. ``find_transfer_datasets(data_root)`` looks for each dataset in ``data_root/<key>``.

Validation sets: Aircraft, DTD and Flowers ship one, and ``trainval`` is train followed by val (every
class must occur in every split, so the per-split label indices agree). The others take a random 20 %
of their training split as val (``random_val_split``: ``np.random.seed(0)``, ``np.random.shuffle`` of
``0..N-1``, the first ``floor(0.2 N)`` indices), and ``trainval`` is the whole training split. Samples
keep the order of the dataset's files inside every split.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data import ArraySplit, Dataset, FileSplit, ImageSplit, register_dataset_kind
from .errors import UserError

log = logging.getLogger(__name__)

ACCURACY = "accuracy"
MEAN_PER_CLASS = "mean_per_class"

LAYOUTS: dict[str, str] = {
    "aircraft": "ROOT/data/images_variant_{train,val,test}.txt (lines '<image id> <variant>') and "
                "ROOT/data/images/<image id>.jpg; ROOT is the fgvc-aircraft-2013b folder",
    "caltech101": "ROOT/train.txt and ROOT/test.txt (sslt's caltech101-splits, lines '<class>/<file> <label>') and "
                  "ROOT/caltech101/101_ObjectCategories/<class>/<file>",
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (the python-pickle batches "
               "torchvision's CIFAR10 reads; ROOT may also be the cifar-10-batches-py folder itself)",
    "cifar100": "ROOT/cifar-100-python/{train,test,meta} (the python-pickle files torchvision's CIFAR100 reads; "
                "ROOT may also be the cifar-100-python folder itself)",
    "dtd": "ROOT/labels/{train,val,test}1.txt (partition 1, lines '<class>/<file>') and ROOT/images/<class>/<file>; "
           "ROOT is the dtd folder",
    "flowers": "ROOT/setid.mat (trnid, valid, tstid: 1-based image ids), ROOT/imagelabels.mat (labels: 1..102) and "
               "ROOT/jpg/image_%05d.jpg",
    "food": "ROOT/food-101/meta/{train,test}.json (class -> ['<class>/<id>', ...]), ROOT/food-101/meta/classes.txt "
            "and ROOT/food-101/images/<class>/<id>.jpg",
    "pets": "ROOT/annotations/{trainval,test}.txt (lines '<image id> <class id 1..37> <species> <breed id>') and "
            "ROOT/images/<image id>.jpg",
    "sun397": "ROOT/ClassName.txt (lines like '/a/abbey'), ROOT/Training_01.txt and ROOT/Testing_01.txt (lines like "
              "'/a/abbey/sun_x.jpg', from Partitions.zip) and the images ROOT/a/abbey/sun_x.jpg",
}

SPLITS = ("train", "val", "trainval", "test")


@dataclass(frozen=True)
class TransferDataset:
    """What the protocol says about one dataset; ``sizes`` are the standard split sizes (for sanity checks)."""

    key: str
    title: str
    metric: str
    num_classes: int
    predefined_val: bool
    sizes: dict[str, int]
    load: Callable[[Path], Dataset]


def random_val_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``sslt``'s hold-out: shuffle ``0..n-1`` as ``np.random.seed(seed); np.random.shuffle`` does, the first
    ``floor(fraction * n)`` go to val. Returns (train, val) indices, each sorted back into file order."""
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    cut = int(np.floor(fraction * n))
    return np.sort(indices[cut:]), np.sort(indices[:cut])


# ---------------------------------------------------------------------------------------------- helpers


def _fail(key: str, root: Path, message: str) -> UserError:
    return UserError(f"{key} dataset at {root}: {message}; expected {LAYOUTS[key]}")


def _require(key: str, root: Path, relative: str, folder: bool = False) -> Path:
    path = root / relative
    if not (path.is_dir() if folder else path.is_file()):
        raise _fail(key, root, f"{path} is missing")
    return path


def _lines(path: Path) -> list[str]:
    """Non-empty lines without their endings, whatever they are (Caltech's train.txt has CRLF, test.txt LF)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_files(key: str, root: Path, listed_in: Path | str, paths: Sequence[str]) -> None:
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise _fail(key, root, f"{len(missing)} of the {len(paths)} images listed in {listed_in} are missing, "
                               f"e.g. {missing[0]}")


def _same_classes(key: str, root: Path, per_source: dict[str, list]) -> list:
    """Per-split label indices only agree when every class occurs in every split: check that, naming the gaps.

    ``per_source`` maps where the classes came from (a split file) to its sorted classes."""
    names = list(per_source)
    reference = per_source[names[0]]
    for name in names[1:]:
        if per_source[name] != reference:
            only_here = sorted(set(per_source[name]) - set(reference))[:5]
            only_there = sorted(set(reference) - set(per_source[name]))[:5]
            raise _fail(key, root, f"the classes of {name} differ from those of {names[0]} "
                                   f"(only in {name}: {only_here}, only in {names[0]}: {only_there}); "
                                   f"every class must occur in every split")
    return reference


def _check_size(info: TransferDataset, dataset: Dataset) -> None:
    sizes = {name: len(dataset.splits[name]) for name in info.sizes}
    if sizes != info.sizes or dataset.num_classes != info.num_classes:
        log.warning("%s at %s: %d classes, split sizes %s; the standard dataset has %d classes and %s",
                    info.key, dataset.spec.partition(":")[2], dataset.num_classes, sizes, info.num_classes, info.sizes)


def _file_dataset(key: str, root: Path, classes: list[str], train: list[tuple[str, int]],
                  test: list[tuple[str, int]], val: list[tuple[str, int]] | None = None) -> Dataset:
    """Four FileSplits: a predefined ``val`` is appended to ``train`` for trainval, else val is drawn from train."""
    if val is None:
        train_idx, val_idx = random_val_split(len(train))
        trainval, train, val = train, [train[i] for i in train_idx], [train[i] for i in val_idx]
    else:
        trainval = train + val
    parts = {"train": train, "val": val, "trainval": trainval, "test": test}
    splits: dict[str, ImageSplit] = {name: FileSplit(root, parts[name], classes) for name in SPLITS}
    return Dataset(name=key, spec=f"{key}:{root}", splits=splits, metric=TRANSFER_DATASETS[key].metric)


def _root(key: str, root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{key} dataset root {path} is not a folder; expected {LAYOUTS[key]}")
    return path


# ---------------------------------------------------------------------------------------------- loaders


def load_aircraft(root: Path) -> Dataset:
    """Variant level; class = the text after the first space, classes = sorted unique per split file.

    ``sslt`` keeps the line ending in the class string, so a last line without one made a spurious class;
    here endings are stripped. Sorting with a ``\\n`` appended reproduces ``sslt``'s order exactly."""
    key = "aircraft"
    per_split: dict[str, list[tuple[str, str]]] = {}
    sources: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        listing = _require(key, root, f"data/images_variant_{split}.txt")
        rows = []
        for line in _lines(listing):
            image_id, sep, variant = line.partition(" ")
            if not sep or not variant.strip():
                raise _fail(key, root, f"{listing}: line {line!r} is not '<image id> <variant>'")
            rows.append((str(root / "data" / "images" / f"{image_id}.jpg"), variant.strip()))
        _check_files(key, root, listing, [path for path, _ in rows])
        per_split[split] = rows
        sources[listing.name] = sorted({v for _, v in rows}, key=lambda v: v + "\n")
    classes = _same_classes(key, root, sources)
    index = {name: i for i, name in enumerate(classes)}
    samples = {split: [(path, index[v]) for path, v in rows] for split, rows in per_split.items()}
    return _file_dataset(key, root, classes, samples["train"], samples["test"], val=samples["val"])


def load_caltech101(root: Path) -> Dataset:
    """sslt's split files; their labels are ImageFolder indices over the case-sensitive sorted class folders
    (BACKGROUND_Google = 0, Faces = 1, Faces_easy = 2, ...): checked against the class names they list."""
    key = "caltech101"
    images = _require(key, root, "caltech101/101_ObjectCategories", folder=True)
    per_split: dict[str, list[tuple[str, int]]] = {}
    label_of: dict[str, int] = {}
    for split in ("train", "test"):
        listing = _require(key, root, f"{split}.txt")
        rows = []
        for line in _lines(listing):
            relative, _, label = line.rpartition(" ")
            if not relative or not label.isdigit() or "/" not in relative:
                raise _fail(key, root, f"{listing}: line {line!r} is not '<class>/<file> <label>'")
            class_name = relative.split("/")[0]
            if label_of.setdefault(class_name, int(label)) != int(label):
                raise _fail(key, root, f"{listing}: class {class_name} has labels {label_of[class_name]} and {label}")
            rows.append((str(images / relative), int(label)))
        _check_files(key, root, listing, [path for path, _ in rows])
        per_split[split] = rows
    classes = sorted(label_of)
    if [label_of[name] for name in classes] != list(range(len(classes))):
        raise _fail(key, root, "the split files' labels are not the indices of their sorted class names "
                               f"(first classes: {[(name, label_of[name]) for name in classes[:4]]})")
    absent = sorted(set(range(len(classes))) - {label for _, label in per_split["train"]})
    if absent:
        raise _fail(key, root, f"train.txt has no image of class {classes[absent[0]]} ({len(absent)} classes absent)")
    return _file_dataset(key, root, classes, per_split["train"], per_split["test"])


def _unpickle(key: str, root: Path, path: Path) -> dict:
    with open(path, "rb") as handle:
        try:
            return pickle.load(handle, encoding="latin1")
        except Exception as error:  # a truncated or foreign file: say which one
            raise _fail(key, root, f"{path} is not a CIFAR python-pickle batch ({error})") from error


def _cifar(key: str, root: Path, folder: str, train_files: list[str], test_file: str, meta_file: str,
           label_key: str, names_key: str) -> Dataset:
    base = root / folder if (root / folder).is_dir() or not (root / meta_file).is_file() else root
    meta = _unpickle(key, root, _require(key, root, str((base / meta_file).relative_to(root))))
    if names_key not in meta:
        raise _fail(key, root, f"{base / meta_file} has no {names_key!r}")
    classes = [str(name) for name in meta[names_key]]

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in files:
            path = _require(key, root, str((base / name).relative_to(root)))
            batch = _unpickle(key, root, path)
            if "data" not in batch or label_key not in batch:
                raise _fail(key, root, f"{path} has no 'data' or {label_key!r}")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[label_key]) != len(data):
                raise _fail(key, root, f"{path}: data of shape {data.shape} with {len(batch[label_key])} labels, "
                                       "not N x 3072 with N labels")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    train_images, train_labels = read(train_files)
    test_images, test_labels = read([test_file])
    if max(train_labels.max(), test_labels.max()) >= len(classes) or min(train_labels.min(), test_labels.min()) < 0:
        raise _fail(key, root, f"labels outside 0..{len(classes) - 1}")
    train_idx, val_idx = random_val_split(len(train_labels))
    splits: dict[str, ImageSplit] = {
        "train": ArraySplit(train_images[train_idx], train_labels[train_idx], classes, f"{key}/train"),
        "val": ArraySplit(train_images[val_idx], train_labels[val_idx], classes, f"{key}/val"),
        "trainval": ArraySplit(train_images, train_labels, classes, f"{key}/trainval"),
        "test": ArraySplit(test_images, test_labels, classes, f"{key}/test"),
    }
    return Dataset(name=key, spec=f"{key}:{root}", splits=splits, metric=TRANSFER_DATASETS[key].metric)


def load_cifar10(root: Path) -> Dataset:
    return _cifar("cifar10", root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  "batches.meta", "labels", "label_names")


def load_cifar100(root: Path) -> Dataset:
    return _cifar("cifar100", root, "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names")


def load_dtd(root: Path) -> Dataset:
    """Partition 1; class index from the sorted folder names under images/."""
    key = "dtd"
    images = _require(key, root, "images", folder=True)
    classes = sorted(entry.name for entry in os.scandir(images) if entry.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    samples: dict[str, list[tuple[str, int]]] = {}
    sources = {"the folders of images/": classes}
    for split in ("train", "val", "test"):
        listing = _require(key, root, f"labels/{split}1.txt")
        rows = []
        for line in _lines(listing):
            class_name = line.split("/")[0]
            if class_name not in index or "/" not in line:
                raise _fail(key, root, f"{listing}: line {line!r} is not '<class>/<file>' with <class> a folder "
                                       f"under {images}")
            rows.append((str(images / line), index[class_name]))
        _check_files(key, root, listing, [path for path, _ in rows])
        samples[split] = rows
        sources[f"labels/{split}1.txt"] = sorted({classes[label] for _, label in rows})
    _same_classes(key, root, sources)
    return _file_dataset(key, root, classes, samples["train"], samples["test"], val=samples["val"])


def _mat_ids(key: str, root: Path, path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except Exception as error:
        raise _fail(key, root, f"{path} is not a MATLAB file ({error})") from error
    missing = [name for name in names if name not in content]
    if missing:
        raise _fail(key, root, f"{path} has no {missing[0]!r} (it has {sorted(k for k in content if k[0] != '_')})")
    return {name: np.asarray(content[name]).ravel().astype(np.int64) for name in names}


def load_flowers(root: Path) -> Dataset:
    """Oxford Flowers 102: 1-based image ids from setid.mat; labels 1..102 mapped through the sorted unique
    labels of each split (the same in every split, checked)."""
    key = "flowers"
    setid = _require(key, root, "setid.mat")
    labels_mat = _require(key, root, "imagelabels.mat")
    _require(key, root, "jpg", folder=True)
    all_labels = _mat_ids(key, root, labels_mat, ["labels"])["labels"]
    ids = _mat_ids(key, root, setid, ["trnid", "valid", "tstid"])
    per_split: dict[str, list[tuple[str, int]]] = {}
    for split, field in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        split_ids = ids[field]
        if len(split_ids) == 0 or split_ids.min() < 1 or split_ids.max() > len(all_labels):
            raise _fail(key, root, f"{setid}: {field} holds ids outside 1..{len(all_labels)} (ids are 1-based)")
        paths = [str(root / "jpg" / f"image_{i:05d}.jpg") for i in split_ids.tolist()]
        _check_files(key, root, f"{setid} ({field})", paths)
        per_split[split] = list(zip(paths, all_labels[split_ids - 1].tolist()))
    fields = {"train": "trnid", "val": "valid", "test": "tstid"}
    unique = _same_classes(key, root, {f"setid.mat {fields[split]}": sorted({int(label) for _, label in rows})
                                       for split, rows in per_split.items()})
    index = {label: i for i, label in enumerate(unique)}
    samples = {split: [(path, index[label]) for path, label in rows] for split, rows in per_split.items()}
    return _file_dataset(key, root, [str(label) for label in unique], samples["train"], samples["test"],
                         val=samples["val"])


def load_food(root: Path) -> Dataset:
    """Food-101: class order from meta/classes.txt; samples class by class in that order, ids in the json's order."""
    key = "food"
    classes = _lines(_require(key, root, "food-101/meta/classes.txt"))
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        listing = _require(key, root, f"food-101/meta/{split}.json")
        try:
            content = json.loads(listing.read_text(encoding="utf-8"))
        except ValueError as error:
            raise _fail(key, root, f"{listing} is not JSON ({error})") from error
        if not isinstance(content, dict) or set(content) != set(classes):
            keys = set(content) if isinstance(content, dict) else set()
            raise _fail(key, root, f"{listing}'s classes differ from classes.txt (only in {split}.json: "
                                   f"{sorted(keys - set(classes))[:5]}, only in classes.txt: "
                                   f"{sorted(set(classes) - keys)[:5]})")
        rows = [(str(root / "food-101" / "images" / f"{image_id}.jpg"), label)
                for label, name in enumerate(classes) for image_id in content[name]]
        _check_files(key, root, listing, [path for path, _ in rows])
        samples[split] = rows
    return _file_dataset(key, root, classes, samples["train"], samples["test"])


def load_pets(root: Path) -> Dataset:
    """Oxford-IIIT Pets: trainval.txt is the training split; the class-id column (1..37) is mapped through its
    sorted unique values; class names are the image ids less their trailing number (``Abyssinian_100``)."""
    key = "pets"
    per_split: dict[str, list[tuple[str, int]]] = {}
    names: dict[int, str] = {}
    for split, filename in (("train", "trainval.txt"), ("test", "test.txt")):
        listing = _require(key, root, f"annotations/{filename}")
        rows = []
        for line in _lines(listing):
            if line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise _fail(key, root, f"{listing}: line {line!r} is not '<image id> <class id> ...'")
            class_id, breed = int(fields[1]), fields[0].rpartition("_")[0] or fields[0]
            if names.setdefault(class_id, breed) != breed:
                raise _fail(key, root, f"{listing}: class id {class_id} is used for {names[class_id]} and {breed}")
            rows.append((str(root / "images" / f"{fields[0]}.jpg"), class_id))
        _check_files(key, root, listing, [path for path, _ in rows])
        per_split[split] = rows
    unique = _same_classes(key, root, {f"annotations/{file}": sorted({label for _, label in per_split[split]})
                                       for split, file in (("train", "trainval.txt"), ("test", "test.txt"))})
    index = {class_id: i for i, class_id in enumerate(unique)}
    samples = {split: [(path, index[label]) for path, label in rows] for split, rows in per_split.items()}
    return _file_dataset(key, root, [names[class_id] for class_id in unique], samples["train"], samples["test"])


def sun397_label(relative: str, class_index: dict[str, int]) -> int | None:
    """The first sorted class name ``c`` with ``/c/`` in ``relative`` (the path below the dataset root, so a
    folder above the root named like a class cannot match); None when no class matches.

    A ``/c/`` match starts and ends at a ``/``, so the candidates are the runs of whole folder names."""
    parts = relative.strip("/").split("/")[:-1]  # folders only: the file name is not followed by '/'
    matches = [class_index[name] for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
               if (name := "/".join(parts[i:j])) in class_index]
    return min(matches) if matches else None


def load_sun397(root: Path) -> Dataset:
    """Partition 01; class names = ClassName.txt lines less their first 3 characters ('/a/'), sorted."""
    key = "sun397"
    class_file = _require(key, root, "ClassName.txt")
    lines = _lines(class_file)
    odd = [line for line in lines if len(line) < 4 or line[0] != "/" or line[2] != "/"]
    if not lines or odd:
        raise _fail(key, root, f"{class_file}: {odd[0]!r} is not a line like '/a/abbey'" if odd
                               else f"{class_file} is empty")
    classes = sorted(line[3:] for line in lines)
    index = {name: i for i, name in enumerate(classes)}
    samples: dict[str, list[tuple[str, int]]] = {}
    for split, filename in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        listing = _require(key, root, filename)
        rows = []
        for line in _lines(listing):
            label = sun397_label(line, index)
            if label is None:
                raise _fail(key, root, f"{listing}: {line} matches no class of {class_file}")
            rows.append((str(root / line.lstrip("/")), label))
        _check_files(key, root, listing, [path for path, _ in rows])
        samples[split] = rows
    return _file_dataset(key, root, classes, samples["train"], samples["test"])


TRANSFER_DATASETS: dict[str, TransferDataset] = {
    info.key: info
    for info in (
        TransferDataset("aircraft", "FGVC-Aircraft 2013b, variant level", MEAN_PER_CLASS, 100, True,
                        {"train": 3334, "val": 3333, "test": 3333}, load_aircraft),
        TransferDataset("caltech101", "Caltech-101, sslt split with background", MEAN_PER_CLASS, 102, False,
                        {"trainval": 2416, "test": 6728}, load_caltech101),
        TransferDataset("cifar10", "CIFAR-10", ACCURACY, 10, False, {"trainval": 50000, "test": 10000}, load_cifar10),
        TransferDataset("cifar100", "CIFAR-100", ACCURACY, 100, False, {"trainval": 50000, "test": 10000},
                        load_cifar100),
        TransferDataset("dtd", "Describable Textures, partition 1", ACCURACY, 47, True,
                        {"train": 1880, "val": 1880, "test": 1880}, load_dtd),
        TransferDataset("flowers", "Oxford Flowers-102", MEAN_PER_CLASS, 102, True,
                        {"train": 1020, "val": 1020, "test": 6149}, load_flowers),
        TransferDataset("food", "Food-101", ACCURACY, 101, False, {"trainval": 75750, "test": 25250}, load_food),
        TransferDataset("pets", "Oxford-IIIT Pets", MEAN_PER_CLASS, 37, False, {"trainval": 3680, "test": 3669},
                        load_pets),
        TransferDataset("sun397", "SUN397, partition 01", ACCURACY, 397, False, {"trainval": 19850, "test": 19850},
                        load_sun397),
    )
}


def load_transfer_dataset(key: str, root: str | os.PathLike, name: str | None = None) -> Dataset:
    """One transfer dataset from its root (see ``LAYOUTS[key]``); a wrong layout raises a UserError naming the file."""
    if key not in TRANSFER_DATASETS:
        raise UserError(f"unknown transfer dataset {key!r}; valid: {', '.join(TRANSFER_DATASETS)}")
    info = TRANSFER_DATASETS[key]
    dataset = info.load(_root(key, root))
    _check_size(info, dataset)
    if name:
        dataset.name = name
    return dataset


def find_transfer_datasets(data_root: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, Dataset]:
    """The transfer datasets found as ``data_root/<key>`` folders (aircraft, caltech101, cifar10, cifar100, dtd,
    flowers, food, pets, sun397). An absent folder is left out; a folder whose layout is wrong raises."""
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise UserError(f"transfer data root {data_root} is not a folder; expected data_root/<key> folders for "
                        f"{', '.join(TRANSFER_DATASETS)}")
    found: dict[str, Dataset] = {}
    for key in keys or list(TRANSFER_DATASETS):
        if key not in TRANSFER_DATASETS:
            raise UserError(f"unknown transfer dataset {key!r}; valid: {', '.join(TRANSFER_DATASETS)}")
        if (data_root / key).is_dir():
            found[key] = load_transfer_dataset(key, data_root / key)
    return found


for _key, _info in TRANSFER_DATASETS.items():
    register_dataset_kind(
        _key,
        lambda rest, name, _key=_key: load_transfer_dataset(_key, rest, name),
        usage=f"{_key}:PATH",
        description=f"{_info.title}, {_info.num_classes} classes, {_info.metric}",
    )
