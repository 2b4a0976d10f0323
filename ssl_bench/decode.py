"""Bytes-in / batch-out image loading: DataLoader workers only read file bytes; the main process decodes a whole
batch on the device (nvjpeg on CUDA, libjpeg on CPU) and applies the eval transform there.

Decoding policy:
  - JPEG is recognised by its magic bytes (FF D8 FF), never by the file name, and decoded with the batched
    ``torchvision.io.decode_jpeg`` in RGB mode (grey and CMYK become RGB, as PIL's ``convert("RGB")`` does).
  - Everything else (PNG, BMP, TIFF, WebP ...) and any JPEG the batched decoder rejects is decoded on the CPU
    with PIL, exactly like ``FileSplit.load_image``, then moved to the device.
  - A file neither decoder can read raises ``UnreadableImageError`` (a ``UserError``) naming its path. One
    unreadable image stops the run unless the caller collects failures (``device_eval_batches(failures=...)``,
    which feature extraction uses when the dataset opts in to skipping them, counted and reported).
  - EXIF orientation is not applied, matching the PIL path of ``ssl_bench.data``.
  - On CUDA, four-component (CMYK/YCCK) JPEGs are decoded on the CPU: upstream tests skip them on nvjpeg.

torchvision 0.29 deprecates ``torchvision.io`` decoding in favour of TorchCodec (it still works, with a
DeprecationWarning); the decoders are confined to ``decode_batch`` and ``_decode_one_cpu`` so a swap stays local.
"""

from __future__ import annotations

import io
import os
from typing import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from .data import ImageSplit, UnreadableImageError
from .errors import UserError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec

JPEG_MAGIC = b"\xff\xd8\xff"


def read_bytes(path: str | os.PathLike) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor, read straight into the tensor's memory (no intermediate copy)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = torch.empty(size, dtype=torch.uint8)
        if size:
            handle.readinto(memoryview(data.numpy()))
    return data


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 = DHT, C8 = JPG, CC = DAC


def jpeg_components(data: torch.Tensor) -> int | None:
    """Colour components in a JPEG's frame header (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK); None if none is found
    before the scan. Walks the marker segments without decoding anything."""
    view = memoryview(data.numpy())
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker in _SOF_MARKERS:
            return view[pos + 9] if pos + 9 < end else None
        elif marker == 0xDA:  # start of scan: no frame header came first
            return None
        else:
            pos += 2 + (view[pos + 2] << 8 | view[pos + 3])
    return None


class BytesDataset(torch.utils.data.Dataset):
    """(bytes uint8 [n], label, index) of a split. File-backed splits yield the file as stored; in-memory splits
    (no ``paths``) yield a lossless PNG of ``load_image``, so every split can take the device path."""

    def __init__(self, split: ImageSplit) -> None:
        self.split = split
        self.paths: list[str] | None = getattr(split, "paths", None)

    def __len__(self) -> int:
        return len(self.split)

    def path(self, index: int) -> str:
        """What an error message calls image ``index``: its file path, or a description for in-memory images."""
        if self.paths is not None:
            return str(self.paths[index])
        return f"{type(self.split).__name__} image {index} (in memory)"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if self.paths is not None:
            try:
                data = read_bytes(self.paths[index])
            except OSError as error:
                raise UnreadableImageError(f"cannot read image {self.paths[index]} "
                                           f"({type(error).__name__}: {error})") from None
        else:
            buffer = io.BytesIO()
            self.split.load_image(index).save(buffer, format="PNG")
            data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        return data, int(self.split.labels[index]), index


def collate_bytes(
    batch: Sequence[tuple[torch.Tensor, int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Variable-length byte tensors stay a list. They are views into one flat buffer, so a worker hands the main
    process one shared-memory segment per batch rather than one per image (file descriptors are limited)."""
    tensors = [item[0] for item in batch]
    flat = torch.cat(tensors) if tensors else torch.empty(0, dtype=torch.uint8)
    views = list(flat.split([t.numel() for t in tensors]))
    labels = torch.tensor([item[1] for item in batch], dtype=torch.int64)
    indices = torch.tensor([item[2] for item in batch], dtype=torch.int64)
    return views, labels, indices


def _decode_pil(data: torch.Tensor, path: str, jpeg_error: str | None) -> torch.Tensor:
    """CPU fallback with PIL; fails with a UserError naming the file and what each decoder said."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            rgb = image.convert("RGB")
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        said = f"decode_jpeg: {jpeg_error.splitlines()[-1]}; " if jpeg_error else ""
        kind = "JPEG (starts with FF D8 FF)" if is_jpeg(data) else f"image ({data.numel()} bytes, not a JPEG)"
        raise UnreadableImageError(
            f"cannot decode {path}: expected a readable {kind} ({said}PIL: {type(error).__name__}: {error})"
        ) from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def _decode_one_cpu(data: torch.Tensor, path: str) -> torch.Tensor:
    jpeg_error = None
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            jpeg_error = str(error)
    return _decode_pil(data, path, jpeg_error)


def decode_batch(byte_tensors: Sequence[torch.Tensor], paths: Sequence[str],
                 device: torch.device | str = "cpu", errors: dict[int, str] | None = None) -> list[torch.Tensor]:
    """Decode a batch to RGB uint8 [3, H, W] tensors on ``device``, in input order.

    JPEGs go through one batched ``decode_jpeg`` call on the device; if that call fails (one bad file fails the
    whole call) each JPEG is retried alone, and what still fails falls back to the CPU path. A file no decoder
    reads raises ``UnreadableImageError``; with ``errors`` given, its message is stored there under its batch
    position instead and it is left out of the returned list."""
    if len(byte_tensors) != len(paths):
        raise ValueError(f"{len(byte_tensors)} byte tensors but {len(paths)} paths")
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(byte_tensors)
    jpegs = [i for i, data in enumerate(byte_tensors) if is_jpeg(data)]
    if device.type != "cpu":  # nvjpeg's CMYK output is untested upstream: four-component JPEGs take the CPU path
        jpegs = [i for i in jpegs if jpeg_components(byte_tensors[i]) in (1, 3)]
    if jpegs:
        try:
            decoded = decode_jpeg([byte_tensors[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                out[i] = image
        except RuntimeError:
            if device.type != "cpu":  # find the culprit on the device; the rest keep the fast path
                for i in jpegs:
                    try:
                        out[i] = decode_jpeg(byte_tensors[i], mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        pass
    for i, data in enumerate(byte_tensors):
        if out[i] is None:
            try:
                out[i] = _decode_one_cpu(data, str(paths[i])).to(device, non_blocking=True)
            except UnreadableImageError as error:
                if errors is None:
                    raise
                errors[i] = str(error)
    return [image for image in out if image is not None]


def eval_batch(images: Sequence[torch.Tensor], size: int = 224, resize: int = 256,
               interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> torch.Tensor:
    """Resize(shorter side to ``resize``, antialiased) + CenterCrop(``size``) + ImageNet normalisation of uint8
    [3, H, W] images on their device -> float32 [B, 3, size, size]. Same-sized images are resized in one call.

    On CPU, torch's uint8 antialiased resize follows PIL's integer algorithm (within 1 grey level of the PIL
    transform); on CUDA the resize runs in float and is rounded, a few levels apart at sharp edges."""
    if not images:
        return torch.empty(0, 3, size, size)
    device = images[0].device
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected uint8 [3, H, W] images, got {image.dtype} {tuple(image.shape)}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    crops = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for members in groups.values():
        stacked = torch.stack([images[i] for i in members])
        resized = TF.resize(stacked, [resize], interpolation=interpolation, antialias=True)
        crops[members] = TF.center_crop(resized, [size, size])
    # The same float ops, in the same order, as ToTensor + Normalize.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return crops.float().div_(255).sub_(mean).div_(std)


def eval_batch_params(transform: TransformSpec) -> dict:
    """``eval_batch`` keyword arguments reproducing a deterministic protocol transform (read from the transform
    that ``TransformSpec.build`` makes, so the two paths cannot drift apart)."""
    params: dict = {}
    for step in transform.build().transforms:
        shorter_side = isinstance(step, T.Resize) and (isinstance(step.size, int) or len(step.size) == 1)
        if shorter_side and step.max_size is None:
            params["resize"] = step.size if isinstance(step.size, int) else step.size[0]
            params["interpolation"] = step.interpolation
        elif isinstance(step, T.CenterCrop) and step.size[0] == step.size[1]:
            params["size"] = step.size[0]
        elif isinstance(step, T.Normalize) and tuple(step.mean) == IMAGENET_MEAN and tuple(step.std) == IMAGENET_STD:
            continue
        elif not isinstance(step, T.ToTensor):
            raise UserError(f"transform {transform.key} has a step the device path does not do ({step}); "
                            f"expected a deterministic Resize + CenterCrop protocol such as eval_dino")
    if set(params) != {"resize", "interpolation", "size"}:
        raise UserError(f"transform {transform.key} is not Resize + CenterCrop; the device path cannot run it")
    return params


def bytes_loader(split: ImageSplit, batch_size: int = 64, workers: int = 2,
                 indices: Sequence[int] | None = None) -> torch.utils.data.DataLoader:
    """DataLoader of (list of byte tensors, labels, split indices) in split order (or ``indices`` order)."""
    dataset: torch.utils.data.Dataset = BytesDataset(split)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate_bytes, persistent_workers=False)


def device_eval_batches(split: ImageSplit, transform: TransformSpec, device: torch.device | str = "cpu",
                        batch_size: int = 64, workers: int = 2, indices: Sequence[int] | None = None,
                        failures: list[tuple[int, str]] | None = None,
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images float [B, 3, S, S] on ``device``, labels, split indices): the bytes loader, ``decode_batch`` and
    ``eval_batch`` chained, a drop-in for iterating a DataLoader over ``split.with_transform(transform.build())``.
    With ``failures`` given, undecodable images are appended there as (split index, message) and left out of
    their batch (whose labels and indices then cover the decoded ones only); without it they raise."""
    params = eval_batch_params(transform)
    source = BytesDataset(split)
    for data, labels, index in bytes_loader(split, batch_size, workers, indices):
        errors: dict[int, str] | None = {} if failures is not None else None
        images = decode_batch(data, [source.path(i) for i in index.tolist()], device, errors)
        if errors:
            failures.extend((int(index[i]), message) for i, message in sorted(errors.items()))
            keep = torch.tensor([i for i in range(len(data)) if i not in errors], dtype=torch.int64)
            labels, index = labels[keep], index[keep]
        yield eval_batch(images, **params), labels, index
