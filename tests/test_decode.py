"""Bytes-in / batch-out loading (ssl_bench.decode) against the PIL path of ssl_bench.data and transforms.

Tolerances, measured on this machine (torch 2.14 / torchvision 0.29 / Pillow 13, CPU):
  JPEG, torchvision's libjpeg-turbo vs PIL's: 0 grey levels (asserted <= 1: the two wheels bundle their own
  libjpeg-turbo builds); PNG and the PIL fallback: exact.
  eval_batch on CPU vs the PIL eval_dino transform (astronaut 512x512, chelsea 300x451): max 1 grey level
  (0.0175 in normalised units), mean <= 1.1e-4. The CUDA resize kernel (float, then clamp + round; emulated
  here on CPU): max 3.0 levels (0.052), mean 0.0024 on astronaut.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_bench.data import image_folder, resolve_dataset
from ssl_bench.decode import (
    BytesDataset, bytes_loader, collate_bytes, decode_batch, device_eval_batches, eval_batch, eval_batch_params,
    is_jpeg, jpeg_components,
)
from ssl_bench.errors import UserError
from ssl_bench.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec

LEVEL = 1 / 255 / min(IMAGENET_STD)  # one grey level in normalised units (0.0175)


def natural_images() -> list[np.ndarray]:
    """Photographs (not noise), so resize and JPEG differences look like they do on real data."""
    try:
        import skimage.data

        return [skimage.data.astronaut(), skimage.data.chelsea()]
    except ImportError:
        from sklearn.datasets import load_sample_image

        return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")[::2, ::2]]


GOOD = ("a/big.jpg", "a/small422.jpg", "a/grey.jpg", "a/png_named_jpg.jpg", "b/cmyk.jpg", "b/progressive.jpg",
        "b/rgba.png")
CORRUPT = ("c/truncated.jpg", "c/garbage.jpg", "c/empty.jpg")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/train/<class>/* : JPEGs of several sizes and kinds, PNGs (one named .jpg) and three broken files."""
    root = tmp_path_factory.mktemp("decode")
    astronaut, cat = natural_images()
    for name in ("a", "b", "c"):
        (root / "train" / name).mkdir(parents=True)
    base = root / "train"
    Image.fromarray(astronaut).save(base / "a/big.jpg", quality=90)
    Image.fromarray(cat[:201, :303]).save(base / "a/small422.jpg", quality=75, subsampling=1)
    Image.fromarray(astronaut).convert("L").resize((160, 120)).save(base / "a/grey.jpg", quality=85)
    Image.fromarray(cat).save(base / "a/png_named_jpg.jpg", format="PNG")
    Image.fromarray(astronaut[::3, ::2]).convert("CMYK").save(base / "b/cmyk.jpg", quality=90)
    Image.fromarray(cat).save(base / "b/progressive.jpg", quality=80, progressive=True, subsampling=0)
    rgba = np.dstack([astronaut[:64, :96], np.arange(64 * 96, dtype=np.uint8).reshape(64, 96)])
    Image.fromarray(rgba, "RGBA").save(base / "b/rgba.png")
    jpeg = (base / "a/big.jpg").read_bytes()
    (base / "c/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (base / "c/garbage.jpg").write_bytes(bytes(range(256)) * 4)
    (base / "c/empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def split(folder):
    return image_folder(folder, splits=("train",)).split("train")


def _index(split, relative: str) -> int:
    return next(i for i, path in enumerate(split.paths) if path.endswith(relative))


def _bytes(dataset: BytesDataset, indices: list[int]) -> tuple[list[torch.Tensor], list[str]]:
    return [dataset[i][0] for i in indices], [dataset.path(i) for i in indices]


def test_jpeg_is_recognised_by_magic_bytes_not_name(split):
    dataset = BytesDataset(split)
    kinds = {relative: is_jpeg(dataset[_index(split, relative)][0]) for relative in GOOD + CORRUPT}
    assert kinds == {"a/big.jpg": True, "a/small422.jpg": True, "a/grey.jpg": True, "a/png_named_jpg.jpg": False,
                     "b/cmyk.jpg": True, "b/progressive.jpg": True, "b/rgba.png": False,
                     "c/truncated.jpg": True, "c/garbage.jpg": False, "c/empty.jpg": False}
    components = {r: jpeg_components(dataset[_index(split, r)][0]) for r in ("a/big.jpg", "a/grey.jpg", "b/cmyk.jpg")}
    assert components == {"a/big.jpg": 3, "a/grey.jpg": 1, "b/cmyk.jpg": 4}


def test_decode_batch_matches_pil(split):
    dataset = BytesDataset(split)
    indices = [_index(split, relative) for relative in GOOD]
    decoded = decode_batch(*_bytes(dataset, indices), device="cpu")
    for relative, index, image in zip(GOOD, indices, decoded):
        reference = np.asarray(split.load_image(index)).transpose(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape == reference.shape, relative
        diff = np.abs(image.numpy().astype(np.int16) - reference)
        if relative.endswith(".png") or relative == "a/png_named_jpg.jpg":
            assert diff.max() == 0, relative  # PNG: the PIL path itself, bit for bit
        else:
            assert diff.max() <= 1 and diff.mean() < 0.01, (relative, diff.max(), diff.mean())


@pytest.mark.parametrize("relative", CORRUPT)
def test_corrupt_file_raises_user_error_naming_it(split, relative):
    dataset = BytesDataset(split)
    indices = [_index(split, "a/big.jpg"), _index(split, relative), _index(split, "b/rgba.png")]
    with pytest.raises(UserError, match="cannot decode .*" + relative.replace(".", r"\.")) as caught:
        decode_batch(*_bytes(dataset, indices), device="cpu")
    assert "expected a readable" in str(caught.value)


def test_two_workers_give_the_same_batches_as_none(split):
    batches = {}
    for workers in (0, 2):
        batches[workers] = list(bytes_loader(split, batch_size=4, workers=workers))
    assert len(batches[0]) == len(batches[2]) == 3
    for (data0, labels0, index0), (data2, labels2, index2) in zip(batches[0], batches[2]):
        assert torch.equal(labels0, labels2) and torch.equal(index0, index2)
        assert [bytes(t.numpy()) for t in data0] == [bytes(t.numpy()) for t in data2]
    dataset = BytesDataset(split)
    every = [bytes(t.numpy()) for data, _, _ in batches[2] for t in data]
    assert every == [bytes(dataset[i][0].numpy()) for i in range(len(split))]
    assert torch.cat([labels for _, labels, _ in batches[2]]).tolist() == split.labels.tolist()


def test_collate_keeps_variable_lengths_in_one_buffer():
    items = [(torch.arange(n, dtype=torch.uint8), n % 2, n) for n in (3, 0, 5)]
    data, labels, indices = collate_bytes(items)
    assert [t.tolist() for t in data] == [[0, 1, 2], [], [0, 1, 2, 3, 4]]
    assert labels.tolist() == [1, 0, 1] and indices.tolist() == [3, 0, 5]
    assert len({t.untyped_storage().data_ptr() for t in data}) == 1


def test_in_memory_split_goes_through_lossless_png():
    digits = resolve_dataset("builtin:digits").split("val")
    dataset = BytesDataset(digits)
    data, label, index = dataset[7]
    (image,) = decode_batch([data], [dataset.path(7)])
    assert (label, index) == (int(digits.labels[7]), 7) and "in memory" in dataset.path(7)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(digits.load_image(7)))


def test_eval_batch_matches_cpu_transform():
    reference_transform = TransformSpec("eval_dino", 224).build()
    images = natural_images()
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in images]
    batch = eval_batch(tensors + tensors[:1], size=224, resize=256)  # a repeated size shares one resize call
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[2])
    for image, out in zip(images, batch):
        diff = (out - reference_transform(Image.fromarray(image))).abs()
        assert diff.max() <= LEVEL + 1e-5 and diff.mean() < 2e-4, (diff.max(), diff.mean())


def test_cuda_resize_kernel_tolerance_emulated_on_cpu():
    """On CUDA, torchvision resizes uint8 bicubic in float then clamps and rounds; the same on CPU."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    image = natural_images()[0]
    floats = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    resized = TF.resize(floats, [256], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 255).round()
    crop = TF.center_crop(resized, [224, 224]) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    diff = ((crop - mean) / std - TransformSpec("eval_dino", 224).build()(Image.fromarray(image))).abs()
    assert diff.max() <= 4 * LEVEL and diff.mean() < 0.004, (diff.max(), diff.mean())


def test_eval_batch_params_follow_the_protocol_transforms():
    assert eval_batch_params(TransformSpec("eval_dino", 224)) == {"resize": 256, "size": 224, "interpolation":
                                                                  TransformSpec().build().transforms[0].interpolation}
    assert eval_batch_params(TransformSpec("eval_ft", 224))["resize"] == 256
    assert eval_batch_params(TransformSpec("eval_sslt", 96))["resize"] == 96
    with pytest.raises(UserError, match="train_lin"):
        eval_batch_params(TransformSpec("train_lin", 224))


def test_device_eval_batches_match_the_transformed_split(split):
    spec = TransformSpec("eval_dino", 64)
    good = [_index(split, relative) for relative in GOOD]
    reference = split.with_transform(spec.build())
    seen = []
    for images, labels, indices in device_eval_batches(split, spec, "cpu", batch_size=3, workers=0, indices=good):
        assert images.shape == (len(indices), 3, 64, 64)
        for image, label, index in zip(images, labels.tolist(), indices.tolist()):
            expected, expected_label, _ = reference[index]
            assert label == expected_label and (image - expected).abs().max() <= LEVEL + 1e-5
            seen.append(index)
    assert seen == good


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_close_to_cpu_decode(split):
    """nvjpeg's IDCT and upsampling differ from libjpeg's: torchvision's own bound is a mean under 2 levels."""
    dataset = BytesDataset(split)
    indices = [_index(split, relative) for relative in GOOD]
    data, paths = _bytes(dataset, indices)
    for relative, gpu, cpu in zip(GOOD, decode_batch(data, paths, "cuda"), decode_batch(data, paths, "cpu")):
        assert gpu.is_cuda and gpu.shape == cpu.shape, relative
        assert (gpu.cpu().float() - cpu.float()).abs().mean() < 2, relative
    with pytest.raises(UserError, match="truncated"):
        decode_batch(*_bytes(dataset, [_index(split, "a/big.jpg"), _index(split, "c/truncated.jpg")]), "cuda")
