"""DINO's multi-crop augmentation as batched tensor ops on the images' device (issue 9: GPU-side data pipeline).

Same recipe and parameter distributions as :class:`.multicrop.MultiCropAugmentation` (the CPU/PIL pipeline),
but a GPU node no longer waits on PIL workers: the random parameters of every crop are drawn on the CPU from a
numpy Generator seeded by ``(seed, epoch, index)`` (stream 2 of :func:`.multicrop.sample_seed`; the masks use
stream 1), and the pixel work runs batched on whatever device the images are on. Which rows an op touches is
decided on the CPU and parameters reach the device by non-blocking copies, so nothing waits on the GPU.

Input: a list of decoded images ``[3, H_i, W_i]`` (uint8 0..255, or float in [0, 1]), sizes may differ, or one
``[B, 3, H, W]`` tensor. Output: ``[global 1 [B,3,G,G], global 2, local 1 [B,3,L,L], ...]`` float32, ImageNet
normalised, i.e. what ``collate_multicrop`` stacks from the CPU pipeline.

How the ops differ from the CPU pipeline (tolerances measured in tests/test_device_augment.py):

- crop + resize: PIL's antialiased bicubic (Keys a = -0.5, support widened by the downscale factor, crop then
  resize) written as two per-crop resampling matrices, so a whole crop group is two batched matmuls. It runs
  in float32 and clamps to [0, 1] once at the end; PIL rounds to 8 bits and clips after each of its two passes
  (and Pillow >= 13 picks the pass order by the scale factors). It equals torchvision's tensor
  ``resized_crop(..., BICUBIC, antialias=True)`` on float input to ~1e-6, and PIL's to ~1/255 except where
  PIL clipped an intermediate overshoot (high-contrast noise only).
- colour jitter, grayscale, solarize: torchvision's tensor semantics (contrast blends towards the mean of the
  crop's grayscale, hue goes through HSV) with per-sample factors, on float values; the PIL versions the CPU
  pipeline runs work in 8 bits (integer grayscale mean for contrast, 8-bit HSV for hue).
- blur: PIL's GaussianBlur(radius=sigma) is three extended box blurs per axis (variance sigma^2 / 3 each, edges
  replicated at every pass); the same per-sample kernels run here in float, multiplied out into one [L, L]
  matrix per axis, within 3/255 of PIL everywhere (PIL rounds to 8 bits after each of its six passes). A sampled Gaussian
  (``kind="gaussian"``) is also there, but at small sigma it blurs far less than PIL.

Cost: the resampling matrices are dense over the padded width/height, so a batch costs as if every image had
the batch's largest height and width; bucket very large images, or shrink them at decode time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ssl_bench.transforms import IMAGENET_MEAN, IMAGENET_STD

from .multicrop import MultiCropAugmentation, sample_seed

__all__ = [
    "CropParams",
    "DeviceMultiCrop",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernels",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "hflip",
    "normalize",
    "resized_crop",
    "sample_boxes",
    "solarize",
]

PARAM_STREAM = 2  # np.random.default_rng([sample_seed(...), PARAM_STREAM]); stream 1 is the iBOT masks
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
FLIP_P, JITTER_P, GRAY_P, SOLARIZE_P = 0.5, 0.8, 0.2, 0.2
BLUR_P = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, every local crop
# ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) as factor ranges, in op-id order.
JITTER_LOW = (0.6, 0.6, 0.8, -0.1)
JITTER_HIGH = (1.4, 1.4, 1.2, 0.1)
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on the 0..255 scale
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


# ---------------------------------------------------------------- random parameters (CPU, numpy)


@dataclass(frozen=True, eq=False)  # numpy fields: no element-wise __eq__
class CropParams:
    """Random parameters of ``n`` crops, one row per crop (numpy arrays, CPU)."""

    boxes: np.ndarray  # int64 [n, 4]: top, left, height, width in source pixels
    flip: np.ndarray  # bool [n]
    jitter: np.ndarray  # bool [n]: colour jitter applied at all
    order: np.ndarray  # int64 [n, 4]: jitter op order; 0 brightness, 1 contrast, 2 saturation, 3 hue
    factors: np.ndarray  # float64 [n, 4]: brightness, contrast, saturation, hue factor
    gray: np.ndarray  # bool [n]
    blur: np.ndarray  # bool [n]
    sigma: np.ndarray  # float64 [n]: blur sigma (drawn even when blur is off)
    solarize: np.ndarray  # bool [n]

    @classmethod
    def gather(cls, per_sample: Sequence[CropParams], crops: slice) -> CropParams:
        """Rows ``crops`` of every sample, crop-major: row ``k * B + b`` is crop k of sample b."""
        return cls(**{
            f.name: np.stack([getattr(p, f.name)[crops] for p in per_sample], axis=1).reshape(
                -1, *getattr(per_sample[0], f.name).shape[1:])
            for f in fields(cls)
        })


def sample_boxes(height: int, width: int, scale: np.ndarray, rng: np.random.Generator,
                 ratio: tuple[float, float] = RATIO, tries: int = 10) -> np.ndarray:
    """RandomResizedCrop boxes, int64 [n, 4] (top, left, height, width), for crops with area scales ``scale`` [n, 2].

    torchvision's rule, vectorised over crops: the first of ``tries`` (area ~ U(scale), log aspect ~ U(log ratio))
    draws that fits wins, at a uniform position; if none fits, the centred whole image clamped to ``ratio``.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1, 2)
    n = scale.shape[0]
    target = height * width * rng.uniform(scale[:, :1], scale[:, 1:], (n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
    # np.rint rounds half to even, as Python's round() in get_params.
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, found = fits.argmax(axis=1), fits.any(axis=1)
    rows = np.arange(n)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = (int(round(width / ratio[0])), width)
    elif in_ratio > ratio[1]:
        fallback = (height, int(round(height * ratio[1])))
    else:
        fallback = (height, width)
    h = np.where(found, h[rows, first], fallback[0])
    w = np.where(found, w[rows, first], fallback[1])
    top = rng.integers(0, height - h + 1)
    left = rng.integers(0, width - w + 1)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


# ---------------------------------------------------------------- batched image ops (any device)


def _to_device(values: Tensor | np.ndarray | Sequence[float], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Small parameter arrays onto ``like``'s device without a stream sync (a blocking copy would stall the GPU)."""
    return torch.as_tensor(values, dtype=dtype).to(like.device, non_blocking=True)


def _cubic(x: Tensor) -> Tensor:
    """PIL's bicubic kernel (Keys, a = -0.5)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _resample_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int, taps: int) -> Tensor:
    """Weights [..., out_size, in_size] that crop [start, start + length) and resize it as PIL does.

    Only the ``taps`` input pixels under each output pixel's kernel are evaluated, then scattered into the
    dense matrix (zero elsewhere, and zero outside the crop: PIL crops first).
    """
    start, length = start.to(torch.float32), length.to(torch.float32)
    scale = length / out_size
    support = scale.clamp(min=1.0)  # antialias: the kernel widens by the downscale factor
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5) * scale[..., None]
    first = torch.floor(centre - 2.0 * support[..., None])  # bicubic reaches 2 * support either side
    pos = first[..., None] + torch.arange(taps, device=start.device, dtype=torch.float32)  # crop coordinates
    weights = _cubic((pos + 0.5 - centre[..., None]) / support[..., None, None])
    weights = weights * ((pos >= 0) & (pos < length[..., None, None]))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    index = (pos + start[..., None, None]).clamp_(0, in_size - 1).long()  # clamped taps carry zero weight
    dense = torch.zeros(*weights.shape[:-1], in_size, device=start.device, dtype=torch.float32)
    return dense.scatter_add_(-1, index, weights)


def resized_crop(images: Tensor, boxes: Tensor | np.ndarray, size: int) -> Tensor:
    """Crop ``K`` boxes from each image and resize each to ``size`` x ``size`` (bicubic, antialiased).

    images: float [B, 3, H, W] in [0, 1] (padding beyond a box is never read); boxes: int [B, K, 4]
    (top, left, height, width), best on the CPU (their largest side is read there). Returns
    [K, B, 3, size, size], crop-major so each crop's batch is contiguous. Clamped to [0, 1] at the end only
    (bicubic overshoots); PIL also clips between its two 8-bit passes.
    """
    n_images, channels, height, width = images.shape
    n_boxes = boxes.shape[1]
    taps = math.ceil(4.0 * max(1.0, int(boxes[..., 2:].max()) / size)) + 2  # widest kernel, in input pixels
    boxes = _to_device(boxes, images)
    wx = _resample_matrix(boxes[..., 1], boxes[..., 3], width, size, taps)  # [B, K, size, W]
    wy = _resample_matrix(boxes[..., 0], boxes[..., 2], height, size, taps)  # [B, K, size, H]
    rows = torch.bmm(images.reshape(n_images, channels * height, width),
                     wx.permute(0, 3, 1, 2).reshape(n_images, width, n_boxes * size))
    rows = rows.view(n_images, channels, height, n_boxes, size).permute(3, 0, 2, 1, 4)
    rows = rows.reshape(n_boxes * n_images, height, channels * size)
    out = torch.bmm(wy.transpose(0, 1).reshape(n_boxes * n_images, size, height), rows).clamp_(0.0, 1.0)
    return out.view(n_boxes, n_images, size, channels, size).permute(0, 1, 3, 2, 4).contiguous()


def _per_sample(values: Tensor | Sequence[float], x: Tensor) -> Tensor:
    """Per-sample parameters as [N, 1, 1, 1] on x's device, to broadcast over (C, H, W)."""
    return _to_device(values, x, x.dtype).view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend, factor * x + (1 - factor) * other clamped, as one lerp (same up to float rounding)."""
    return torch.lerp(other.expand_as(x), x, factor.expand_as(x)).clamp_(0.0, 1.0)


def hflip(x: Tensor, mask: Tensor | np.ndarray) -> Tensor:
    """Mirror the samples of [N, C, H, W] where ``mask`` [N] (bool) is set."""
    return torch.where(_to_device(mask, x, torch.bool).view(-1, 1, 1, 1), x.flip(-1), x)


def adjust_brightness(x: Tensor, factor: Tensor | Sequence[float]) -> Tensor:
    """torchvision's adjust_brightness with one factor per sample: blend with black."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | Sequence[float]) -> Tensor:
    """torchvision's adjust_contrast per sample: blend with the mean of the sample's grayscale."""
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), _per_sample(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor | Sequence[float]) -> Tensor:
    """torchvision's adjust_saturation per sample: blend with the pixel's grayscale."""
    return _blend(x, _gray(x), _per_sample(factor, x))


def adjust_hue(x: Tensor, factor: Tensor | Sequence[float]) -> Tensor:
    """torchvision's adjust_hue per sample: rotate the HSV hue by ``factor`` turns (|factor| <= 0.5).

    The RGB -> HSV -> RGB round trip is folded: HSV value is the channel max and value * saturation the
    chroma (max - min), so a channel comes back as min + chroma * clamp(|k - 2| - 1, 0, 1) with
    k = (n + 6 hue) mod 6 and n = 5, 3, 1 for red, green, blue; the hue stays in sixths of a turn throughout.
    """
    r, g, b = x.unbind(dim=1)
    value, low = x.amax(dim=1), x.amin(dim=1)
    chroma = value - low
    red_max, green_max = value == r, value == g
    # Hue sector offset and numerator as torchvision picks them (red wins ties, then green); grey pixels have
    # numerator 0, so any positive divisor gives them hue 0 as in torchvision.
    numerator = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    offset = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    hue6 = numerator.div_(chroma.clamp(min=1e-30)).add_(offset).add_(6.0 * _per_sample(factor, x).view(-1, 1, 1))
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        ramp = torch.remainder(hue6 + n, 6.0).sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(low, chroma, ramp, out=out[:, channel])
    return out


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor | np.ndarray, order: np.ndarray, apply: np.ndarray | None = None) -> Tensor:
    """ColorJitter per sample: the four ops in each sample's ``order`` [N, 4] with ``factors`` [N, 4].

    ``order`` and ``apply`` (bool [N], None for all) live on the CPU, so the rows each op touches are known
    without a device sync; each op runs once per position on just the rows that take it there. In place.
    """
    order = np.asarray(order)
    rows_on = np.ones(len(order), dtype=bool) if apply is None else np.asarray(apply, dtype=bool)
    factors = _to_device(factors, x, x.dtype)
    for position in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            rows = np.flatnonzero(rows_on & (order[:, position] == op_id))
            if rows.size:
                index = _to_device(rows, x)
                x[index] = op(x[index], factors[index, op_id])
    return x


def grayscale(x: Tensor, mask: Tensor | np.ndarray) -> Tensor:
    """torchvision's rgb_to_grayscale(num_output_channels=3) on the samples where ``mask`` [N] is set."""
    return torch.where(_to_device(mask, x, torch.bool).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def _box_radius(sigma: np.ndarray, passes: int) -> np.ndarray:
    """PIL's extended-box radius whose ``passes``-fold box has variance sigma^2 (Gwosdek et al. 2011)."""
    var = sigma * sigma / passes
    length = np.sqrt(12.0 * var + 1.0)
    whole = np.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    return whole + frac


def blur_kernels(sigma: np.ndarray | Sequence[float], kind: str = "pil") -> tuple[np.ndarray, int]:
    """One 1-D kernel per sample [N, 2R + 1] and how many times to apply it per axis.

    ``"pil"``: PIL's GaussianBlur(radius=sigma), an extended box applied 3 times (each pass has variance
    sigma^2 / 3; the fractional box radius r gives the two end taps weight r - floor(r)). ``"gaussian"``: a
    sampled Gaussian, radius ceil(3 sigma), once; sampling leaves its variance short of sigma^2 below sigma ~0.7
    (12x short at sigma 0.3), so it blurs less than PIL there.
    """
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if kind == "pil":
        passes = 3
        radius = _box_radius(sigma, passes)
        reach = int(np.floor(radius.max())) + 1
        offsets = np.abs(np.arange(-reach, reach + 1))[None, :]
        whole = np.floor(radius)[:, None]
        taps = np.where(offsets <= whole, 1.0, np.where(offsets == whole + 1, radius[:, None] - whole, 0.0))
        return taps / (2.0 * radius[:, None] + 1.0), passes
    if kind == "gaussian":
        reach = max(1, math.ceil(3.0 * float(sigma.max())))
        taps = np.exp(-0.5 * (np.arange(-reach, reach + 1)[None, :] / sigma[:, None]) ** 2)
        return taps / taps.sum(axis=1, keepdims=True), 1
    raise ValueError(f"blur kind must be 'pil' or 'gaussian', got {kind!r}")


def _pass_matrices(taps: Tensor, length: int) -> Tensor:
    """[N, L, L]: one pass of each sample's 1-D kernel along an axis of length L, edge pixels replicated."""
    width = taps.shape[1]
    offsets = torch.arange(width, device=taps.device) - width // 2
    source = (torch.arange(length, device=taps.device)[:, None] + offsets).clamp_(0, length - 1)  # [L, T]
    reads = (source[:, :, None] == torch.arange(length, device=taps.device)).to(taps.dtype)  # [L, T, L]
    return (taps @ reads.transpose(0, 1).reshape(width, length * length)).view(-1, length, length)


def _blur_matrices(taps: Tensor, passes: int, length: int) -> Tensor:
    """[N, L, L]: all ``passes`` of each sample's kernel along one axis, multiplied out."""
    one_pass = _pass_matrices(taps, length)
    matrix = one_pass
    for _ in range(passes - 1):
        matrix = torch.bmm(matrix, one_pass)
    return matrix


def gaussian_blur(x: Tensor, sigma: np.ndarray | Sequence[float], kind: str = "pil") -> Tensor:
    """Separable blur of [N, C, H, W] with one sigma per sample; edges replicated at every pass, as PIL does.

    Each axis is one per-sample [L, L] matrix (all passes multiplied out), so the blur is two batched matmuls;
    meant for crop-sized images. ``sigma`` is read on the CPU (the pipeline draws it there): no device sync.
    """
    n, channels, height, width = x.shape
    taps, passes = blur_kernels(sigma, kind)
    if taps.shape[0] != n:
        raise ValueError(f"gaussian_blur: {n} images but {taps.shape[0]} sigmas")
    taps_t = _to_device(taps, x, x.dtype)
    along_w = _blur_matrices(taps_t, passes, width)
    along_h = along_w if height == width else _blur_matrices(taps_t, passes, height)
    rows = torch.bmm(x.reshape(n, channels * height, width), along_w.transpose(1, 2))
    return torch.matmul(along_h[:, None], rows.view(n, channels, height, width))


def solarize(x: Tensor, mask: Tensor | np.ndarray, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """torchvision's solarize (invert values >= threshold) on the samples where ``mask`` [N] is set."""
    hit = _to_device(mask, x, torch.bool).view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(hit, 1.0 - x, x)


def normalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Per-channel (x - mean) / std on [N, 3, H, W]."""
    mean_t = _to_device(mean, x, x.dtype).view(1, -1, 1, 1)
    std_t = _to_device(std, x, x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


# ---------------------------------------------------------------- the pipeline


def _check_image(i: int, image: object, first: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image {i}: expected an RGB tensor [3, H, W], got {shape}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"image {i}: expected dtype uint8 (0..255) or float (0..1), got {image.dtype}")
    if image.dtype != first.dtype or image.device != first.device:
        raise ValueError(f"image {i}: all images must share one dtype and device; got {image.dtype} on "
                         f"{image.device} after {first.dtype} on {first.device}")


def _as_batch(images: Sequence[Tensor] | Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
    """Float32 [B, 3, H_max, W_max] in [0, 1] (zero padded bottom/right) and each image's (H, W)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"expected a [B, 3, H, W] batch or a list of [3, H, W] images, got shape "
                             f"{tuple(images.shape)}")
        _check_image(0, images[0], images)
        batch = images
        sizes = [(int(images.shape[2]), int(images.shape[3]))] * images.shape[0]
    else:
        images = list(images)
        if not images:
            raise ValueError("expected at least one image, got an empty batch")
        for i, image in enumerate(images):
            _check_image(i, image, images[0])  # image 0 goes first, so `first` is valid
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        if len(set(sizes)) == 1:
            batch = torch.stack(images)
        else:  # pad in the source dtype (4x less to copy for uint8), convert once
            batch = images[0].new_zeros((len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes)))
            for i, image in enumerate(images):
                batch[i, :, : image.shape[1], : image.shape[2]] = image
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32).div_(255.0).contiguous(), sizes  # div, not * 1/255: 128 must hit 128/255
    return batch.to(torch.float32).contiguous(), sizes


@dataclass(frozen=True)
class DeviceMultiCrop:
    """DINO multi-crop on the images' device, with the settings of a :class:`MultiCropAugmentation` (sizes, local
    crop count, scales, blur sigma: one source for both pipelines) and the run's seed.

    ``crops = DeviceMultiCrop(augmentation, seed=run_seed)(images, indices, epoch)`` gives the same list as
    ``collate_multicrop`` of the CPU pipeline; each crop depends on (seed, epoch, index) and the image only.
    """

    augmentation: MultiCropAugmentation = field(default_factory=MultiCropAugmentation)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def sample_params(self, height: int, width: int, rng: np.random.Generator) -> CropParams:
        """Every random choice for one image of size (height, width), crops in output order.

        All draws are made whether or not they are used, so the stream never depends on an earlier outcome.
        """
        settings = self.augmentation
        n, n_local = settings.n_crops, settings.n_local
        scale = np.array([settings.global_scale] * 2 + [settings.local_scale] * n_local)
        boxes = sample_boxes(height, width, scale, rng)
        blur_p = np.array(BLUR_P[:2] + (BLUR_P[2],) * n_local)
        solarize_p = np.array((0.0, SOLARIZE_P) + (0.0,) * n_local)
        return CropParams(
            boxes=boxes,
            flip=rng.random(n) < FLIP_P,
            jitter=rng.random(n) < JITTER_P,
            order=rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1),
            factors=rng.uniform(JITTER_LOW, JITTER_HIGH, (n, 4)),
            gray=rng.random(n) < GRAY_P,
            blur=rng.random(n) < blur_p,
            sigma=rng.uniform(settings.blur_sigma[0], settings.blur_sigma[1], n),
            solarize=rng.random(n) < solarize_p,
        )

    def params_for(self, sizes: Sequence[tuple[int, int]], indices: Sequence[int], epoch: int) -> list[CropParams]:
        """Per-sample parameters, each from its own Generator seeded by (seed, epoch, index)."""
        if len(sizes) != len(indices):
            raise ValueError(f"got {len(sizes)} images but {len(indices)} indices")
        return [self.sample_params(h, w, np.random.default_rng([sample_seed(self.seed, epoch, int(i)), PARAM_STREAM]))
                for (h, w), i in zip(sizes, indices)]

    def apply(self, images: Sequence[Tensor] | Tensor, params: Sequence[CropParams]) -> list[Tensor]:
        """The crops of ``images`` under given per-sample ``params``: [global 1, global 2, local 1, ...]."""
        batch, sizes = _as_batch(images)
        if len(params) != len(sizes):
            raise ValueError(f"got {len(sizes)} images but parameters for {len(params)}")
        return self._crops(batch, params)

    def __call__(self, images: Sequence[Tensor] | Tensor, indices: Sequence[int] | Tensor, epoch: int) -> list[Tensor]:
        """Crops of a batch whose dataset indices are ``indices`` at ``epoch`` (images: see the module docstring)."""
        batch, sizes = _as_batch(images)
        indices = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        return self._crops(batch, self.params_for(sizes, indices, int(epoch)))

    def _crops(self, batch: Tensor, params: Sequence[CropParams]) -> list[Tensor]:
        crops: list[Tensor] = []
        settings = self.augmentation
        for size, rows in ((settings.global_size, slice(0, 2)), (settings.local_size, slice(2, settings.n_crops))):
            if rows.stop <= rows.start:
                continue
            boxes = torch.from_numpy(np.stack([p.boxes[rows] for p in params]))  # [B, K, 4]
            x = resized_crop(batch, boxes, size)
            n_boxes = x.shape[0]
            x = self._photometric(x.view(-1, 3, size, size), CropParams.gather(params, rows))
            crops.extend(x.view(n_boxes, len(params), 3, size, size).unbind(0))
        return crops

    @staticmethod
    def _photometric(x: Tensor, p: CropParams) -> Tensor:
        # Parameters stay numpy until an op moves them (non-blocking); row subsets are chosen on the CPU.
        x = hflip(x, p.flip)
        x = color_jitter(x, p.factors, p.order, p.jitter)
        x = grayscale(x, p.gray)
        rows = np.flatnonzero(p.blur)
        if rows.size:
            index = _to_device(rows, x)
            x[index] = gaussian_blur(x[index], p.sigma[rows])
        x = solarize(x, p.solarize)
        return normalize(x)
