"""The nine transfer datasets (protocols.md §5.2): layouts, splits, labels, metrics and layout errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_bench.data import dataset_kinds, resolve_dataset
from ssl_bench.errors import UserError
from ssl_bench.transfer_data import (
    LAYOUTS, TRANSFER_DATASETS, find_transfer_datasets, load_transfer_dataset, random_val_split, sun397_label,
)

from transfer_replicas import (
    AIRCRAFT_CLASSES, CALTECH_CLASSES, DTD_CLASSES, FOOD_CLASSES, MAKERS, colour_array, make_transfer_root,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# key: (classes, split sizes, metric), worked out from transfer_replicas by hand
EXPECTED = {
    "aircraft": (AIRCRAFT_CLASSES, (6, 6, 12, 6), "mean_per_class"),
    "caltech101": (CALTECH_CLASSES, (10, 2, 12, 6), "mean_per_class"),
    "cifar10": (CIFAR10_NAMES, (12, 3, 15, 4), "accuracy"),
    "cifar100": ([f"fine{i:02d}" for i in range(100)], (8, 2, 10, 4), "accuracy"),
    "dtd": (DTD_CLASSES, (6, 6, 12, 6), "accuracy"),
    "flowers": (["5", "17", "102"], (6, 6, 12, 6), "mean_per_class"),
    "food": (FOOD_CLASSES, (10, 2, 12, 6), "accuracy"),
    "pets": (["Abyssinian", "american_bulldog", "yorkshire_terrier"], (10, 2, 12, 6), "mean_per_class"),
    "sun397": (["abbey", "apartment_building/outdoor", "bar", "barn"], (10, 2, 12, 8), "accuracy"),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_transfer_root(tmp_path_factory.mktemp("transfer"))


@pytest.fixture(scope="module")
def datasets(data_root):
    return find_transfer_datasets(data_root)


def _tail(path: str, parts: int = 2) -> str:
    return "/".join(path.split("/")[-parts:])


def sslt_val_split(n: int) -> tuple[list[int], list[int]]:
    """What sslt does, on numpy's global generator (state restored afterwards)."""
    state = np.random.get_state()
    try:
        indices = list(range(n))
        np.random.seed(0)
        np.random.shuffle(indices)
    finally:
        np.random.set_state(state)
    cut = int(np.floor(0.2 * n))
    return sorted(indices[cut:]), sorted(indices[:cut])


@pytest.mark.parametrize("key", list(EXPECTED))
def test_replica_parses_to_its_classes_splits_and_metric(key, data_root):
    classes, sizes, metric = EXPECTED[key]
    dataset = resolve_dataset(f"{key}:{data_root / key}")
    assert (dataset.name, dataset.spec, dataset.metric) == (key, f"{key}:{data_root / key}", metric)
    assert metric == TRANSFER_DATASETS[key].metric
    assert list(dataset.splits) == ["train", "val", "trainval", "test"]
    assert tuple(len(dataset.split(s)) for s in dataset.splits) == sizes
    assert all(split.classes == classes for split in dataset.splits.values()) and dataset.num_classes == len(classes)
    train, val, trainval = dataset.split("train"), dataset.split("val"), dataset.split("trainval")
    if TRANSFER_DATASETS[key].predefined_val:  # trainval = train then val
        assert trainval.labels.tolist() == train.labels.tolist() + val.labels.tolist()
        assert trainval.paths == train.paths + val.paths
        assert all(set(dataset.split(s).labels.tolist()) == set(range(len(classes))) for s in ("train", "val", "test"))
    else:  # val = the sslt 20 % of the whole training split
        train_idx, val_idx = sslt_val_split(len(trainval))
        assert train.labels.tolist() == trainval.labels[train_idx].tolist()
        assert val.labels.tolist() == trainval.labels[val_idx].tolist()
    image = dataset.split("test").load_image(len(dataset.split("test")) - 1)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert len({split.manifest_sha256() for split in dataset.splits.values()}) == 4


def test_aircraft_labels_and_a_last_line_without_newline(datasets):
    train, test = datasets["aircraft"].split("train"), datasets["aircraft"].split("test")
    assert [_tail(p) for p in train.paths[:3]] == ["images/1000000.jpg", "images/1000001.jpg", "images/1000002.jpg"]
    assert train.labels[:3].tolist() == [0, 1, 2]  # 707-320, A340-500, Cessna 172 (a variant with a space)
    assert test.labels.tolist() == [0, 1, 2, 0, 1, 2] and len(test.classes) == 3  # no spurious 'Cessna 172' class


def test_caltech_split_files_with_crlf_and_lf(datasets):
    dataset = datasets["caltech101"]
    trainval, test = dataset.split("trainval"), dataset.split("test")
    assert not any("\r" in path for path in trainval.paths + test.paths)
    assert trainval.paths[0].endswith("caltech101/101_ObjectCategories/BACKGROUND_Google/image_0001.jpg")
    assert trainval.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert _tail(test.paths[2], 3) == "101_ObjectCategories/Faces/image_0005.jpg" and test.labels[2] == 1


def test_cifar_reads_python_batches_pixel_exact(datasets):
    cifar10 = datasets["cifar10"]
    trainval, test, val = cifar10.split("trainval"), cifar10.split("test"), cifar10.split("val")
    for j in (0, 7, 14):  # image j of data_batch_{j // 3 + 1}
        assert np.array_equal(np.asarray(trainval.load_image(j)), colour_array(j)) and trainval.labels[j] == j % 4
    assert np.array_equal(np.asarray(test.load_image(0)), colour_array(1000)) and test.labels.tolist() == [9, 8, 7, 6]
    _, val_idx = sslt_val_split(15)
    assert np.array_equal(np.asarray(val.load_image(1)), colour_array(val_idx[1]))
    cifar100 = datasets["cifar100"]
    assert cifar100.split("trainval").labels.tolist() == [(7 * i) % 100 for i in range(10)]
    assert cifar100.split("test").labels.tolist() == [0, 7, 14, 21]


def test_dtd_flowers_food_pets_labels_by_hand(datasets):
    dtd = datasets["dtd"].split("train")
    assert _tail(dtd.paths[2], 3) == "images/dotted/dotted_0002.jpg" and dtd.labels.tolist() == [0, 0, 1, 1, 2, 2]
    flowers = datasets["flowers"]  # trnid [1, 4, 2, 5, 3, 6], labels 5/17/102 -> 0/1/2
    assert [_tail(p, 1) for p in flowers.split("train").paths[:2]] == ["image_00001.jpg", "image_00004.jpg"]
    assert flowers.split("train").labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert _tail(flowers.split("test").paths[0], 1) == "image_00018.jpg" and flowers.split("test").labels[0] == 2
    food = datasets["food"].split("trainval")  # json lists churros first; the order comes from classes.txt
    assert food.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert _tail(food.paths[0], 3) == "images/apple_pie/100012.jpg"
    pets = datasets["pets"].split("trainval")  # class ids 1, 2, 37 -> 0, 1, 2
    assert [_tail(p, 1) for p in pets.paths[:3]] == ["Abyssinian_1.jpg", "american_bulldog_2.jpg",
                                                     "yorkshire_terrier_3.jpg"]
    assert pets.labels[:3].tolist() == [0, 1, 2]


def test_sun397_labels_only_whole_folder_names(datasets):
    trainval = datasets["sun397"].split("trainval")
    by_file = {"/".join(p.split("/")[-3:]): int(label) for p, label in zip(trainval.paths, trainval.labels)}
    assert by_file["a/abbey/sun_bar.jpg"] == 0  # 'bar' in the file name does not count
    assert {label for name, label in by_file.items() if "/barn/" in name} == {3}  # 'bar' is a prefix of 'barn'
    assert {label for name, label in by_file.items() if "/outdoor/" in name} == {1}
    index = {name: i for i, name in enumerate(EXPECTED["sun397"][0])}
    assert sun397_label("/b/barn/sun_x.jpg", index) == 3 and sun397_label("/z/zoo/sun_x.jpg", index) is None


def test_sun397_root_below_a_class_named_folder_is_not_mislabelled(tmp_path):
    root = MAKERS["sun397"](tmp_path / "abbey" / "b" / "bar" / "SUN397")
    trainval = load_transfer_dataset("sun397", root).split("trainval")
    classes = EXPECTED["sun397"][0]  # the class is the folders between the letter folder and the file
    expected = [classes.index("/".join(Path(p).relative_to(root).parts[1:-1])) for p in trainval.paths]
    assert trainval.labels.tolist() == expected == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    sslt_labels = [next(i for i, name in enumerate(trainval.classes) if name in path) for path in trainval.paths]
    assert set(sslt_labels) == {0}  # matching the full path would call every image an abbey


def test_random_val_split_reproduces_np_random_seed_0_shuffle():
    for n in (1, 4, 12, 15, 101, 3680, 50000):
        train, val = random_val_split(n)
        expected_train, expected_val = sslt_val_split(n)
        assert train.tolist() == expected_train and val.tolist() == expected_val
        assert len(val) == int(np.floor(0.2 * n))


REQUIRED = {
    "aircraft": "data/images_variant_val.txt",
    "caltech101": "train.txt",
    "cifar10": "cifar-10-batches-py/data_batch_3",
    "cifar100": "cifar-100-python/meta",
    "dtd": "labels/test1.txt",
    "flowers": "imagelabels.mat",
    "food": "food-101/meta/classes.txt",
    "pets": "annotations/trainval.txt",
    "sun397": "ClassName.txt",
}


@pytest.mark.parametrize("key", list(REQUIRED))
def test_a_missing_file_is_named(key, tmp_path):
    root = MAKERS[key](tmp_path / key)
    (root / REQUIRED[key]).unlink()
    with pytest.raises(UserError, match=re.escape(f"{root / REQUIRED[key]} is missing; expected ")) as error:
        resolve_dataset(f"{key}:{root}")
    assert LAYOUTS[key] in str(error.value)
    with pytest.raises(UserError, match=re.escape(REQUIRED[key])):
        find_transfer_datasets(tmp_path)  # a folder that is there but wrong is an error, not a skip


def test_a_missing_image_is_named(tmp_path):
    root = MAKERS["pets"](tmp_path / "pets")
    (root / "images" / "american_bulldog_2.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of the 12 images listed in .*trainval.txt are missing, "
                                        r"e\.g\. .*images/american_bulldog_2\.jpg"):
        load_transfer_dataset("pets", root)
    root = MAKERS["flowers"](tmp_path / "flowers")
    (root / "jpg" / "image_00018.jpg").unlink()
    with pytest.raises(UserError, match=r"setid.mat \(tstid\) are missing, e\.g\. .*image_00018\.jpg"):
        load_transfer_dataset("flowers", root)


def test_a_class_missing_from_one_split_is_refused(tmp_path):
    root = MAKERS["dtd"](tmp_path / "dtd")
    val = root / "labels" / "val1.txt"
    val.write_text("".join(line + "\n" for line in val.read_text().splitlines() if not line.startswith("zigzagged")))
    with pytest.raises(UserError, match=r"classes of labels/val1.txt differ .*'zigzagged'.*every class must occur"):
        load_transfer_dataset("dtd", root)
    root = MAKERS["aircraft"](tmp_path / "aircraft")
    test = root / "data" / "images_variant_test.txt"
    test.write_text(test.read_text().replace("Cessna 172", "Cessna 208"))
    with pytest.raises(UserError, match=r"images_variant_test.txt differ .*Cessna 208"):
        load_transfer_dataset("aircraft", root)
    root = MAKERS["flowers"](tmp_path / "flowers")
    from scipy.io import savemat

    savemat(root / "setid.mat", {"trnid": [[1, 2, 3]], "valid": [[7, 8]], "tstid": [[13, 14, 15]]})  # val lacks 102
    with pytest.raises(UserError, match=r"setid.mat valid differ"):
        load_transfer_dataset("flowers", root)


def test_find_transfer_datasets_finds_the_present_ones(data_root, datasets, tmp_path):
    assert sorted(datasets) == sorted(TRANSFER_DATASETS) and len(datasets) == 9
    assert all(dataset.metric == TRANSFER_DATASETS[key].metric for key, dataset in datasets.items())
    partial = make_transfer_root(tmp_path / "some", keys=("pets", "cifar10"))
    (partial / "unrelated").mkdir()
    assert sorted(find_transfer_datasets(partial)) == ["cifar10", "pets"]
    (partial / "dtd").mkdir()
    with pytest.raises(UserError, match=r"dtd dataset at .*dtd/images is missing"):
        find_transfer_datasets(partial)
    assert sorted(find_transfer_datasets(partial, keys=["pets"])) == ["pets"]
    with pytest.raises(UserError, match="is not a folder"):
        find_transfer_datasets(tmp_path / "nowhere")


def test_specs_are_registered_kinds(data_root, tmp_path):
    kinds = dataset_kinds()
    assert kinds[0] == "builtin:digits"
    assert all(any(kind.startswith(f"{key}:PATH") for kind in kinds) for key in TRANSFER_DATASETS)
    assert resolve_dataset(f"pets:{data_root / 'pets'}", name="oxford_pets").name == "oxford_pets"
    with pytest.raises(UserError, match=r"pets dataset root .*nowhere is not a folder; expected ROOT/annotations"):
        resolve_dataset(f"pets:{tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="not a folder and not a known spec"):
        resolve_dataset(f"petz:{data_root / 'pets'}")
    # the batch folder itself works too
    cifar_folder = resolve_dataset(f"cifar10:{data_root / 'cifar10' / 'cifar-10-batches-py'}")
    assert len(cifar_folder.split("trainval")) == 15


def test_loaded_splits_feed_the_eval_transform(datasets):
    from ssl_bench.transforms import TransformSpec

    transform = TransformSpec("eval_dino", 32).build()
    for key in ("cifar100", "sun397"):
        tensor, label, index = datasets[key].split("val").with_transform(transform)[1]
        assert tensor.shape == (3, 32, 32) and label == datasets[key].split("val").labels[1] and index == 1


def test_bad_caltech_labels_are_refused(tmp_path):
    root = MAKERS["caltech101"](tmp_path / "caltech101")
    test = root / "test.txt"
    test.write_text(test.read_text().replace("accordion/image_0005.jpg 2", "accordion/image_0005.jpg 1"))
    with pytest.raises(UserError, match="class accordion has labels 2 and 1"):
        load_transfer_dataset("caltech101", root)
    shutil.rmtree(root)
    root = MAKERS["caltech101"](tmp_path / "caltech101")
    for listing in (root / "train.txt", root / "test.txt"):  # labels no longer follow the sorted names
        listing.write_bytes(listing.read_bytes().replace(b"Faces/", b"zebra/"))
    images = root / "caltech101" / "101_ObjectCategories"
    (images / "Faces").rename(images / "zebra")
    with pytest.raises(UserError, match="not the indices of their sorted class names"):
        load_transfer_dataset("caltech101", root)
