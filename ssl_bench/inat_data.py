"""iNaturalist-2018 on disk (``inat2018:ROOT``): ``ROOT/train2018.json`` and ``ROOT/val2018.json`` in COCO style
(``images`` with ``id`` and ``file_name`` relative to ROOT, ``annotations`` with ``image_id`` and ``category_id``,
``categories`` with ``id``), images under ``ROOT/train_val2018/...``. Classes are the categories in id order; the
splits are ``train`` and ``val`` in the json files' image order. Usable for pretraining (labels unused) and by
every classification task.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import Dataset, FileSplit, register_dataset_kind
from .errors import UserError

LAYOUT = "ROOT/train2018.json, ROOT/val2018.json (COCO style) and the images they name under ROOT/train_val2018/"
SPLIT_FILES = {"train": "train2018.json", "val": "val2018.json"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; expected {LAYOUT}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); expected {LAYOUT}") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}; expected COCO-style images, annotations, categories")
    return content


def _split(root: Path, name: str, category_index: dict[int, int] | None) -> tuple[list[tuple[str, int]], dict]:
    path = root / SPLIT_FILES[name]
    content = _read_json(path)
    if category_index is None:
        category_index = {int(c["id"]): i for i, c in enumerate(sorted(content["categories"], key=lambda c: c["id"]))}
    labels: dict[int, int] = {}
    for annotation in content["annotations"]:
        category = int(annotation["category_id"])
        if category not in category_index:
            raise UserError(f"{path}: annotation of image {annotation['image_id']} has category {category}, "
                            f"which is not among the categories")
        labels[int(annotation["image_id"])] = category_index[category]
    images = {int(image["id"]): image["file_name"] for image in content["images"]}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserError(f"{path}: annotation points at image id {orphans[0]}, which is not in its images "
                        f"({len(orphans)} such annotations)")
    samples = []
    for image_id, file_name in images.items():
        if image_id not in labels:
            raise UserError(f"{path}: image {image_id} ({file_name}) has no annotation")
        file = root / file_name
        if not file.is_file():
            raise UserError(f"{file} is missing (named by {path}, image id {image_id}); expected {LAYOUT}")
        samples.append((str(file), labels[image_id]))
    return samples, category_index


def inat2018(root: str, name: str | None = None) -> Dataset:
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{root} is not a folder; expected {LAYOUT}")
    train, category_index = _split(base, "train", None)
    val, _ = _split(base, "val", category_index)
    classes = [str(c) for c in category_index]
    return Dataset(name=name or "inat2018", spec=f"inat2018:{root}",
                   splits={"train": FileSplit(base, train, classes), "val": FileSplit(base, val, classes)})


register_dataset_kind("inat2018", inat2018, "inat2018:ROOT", "iNaturalist-2018: train2018.json / val2018.json")
