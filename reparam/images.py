"""Natural-image batches with no download: random crops of photographs shipped inside the
scikit-image and scikit-learn wheels, or of the images in a folder.

Neither package is needed by the rest of reparam: they are imported here, lazily, and a
missing one is a one-line :class:`~reparam.errors.ConfigError` saying what to install
(``pip install 'reparam[images]'``).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from reparam.errors import ConfigError

#: photographs whose files ship in scikit-image's wheel (others in skimage.data download)
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")
#: ImageNet channel statistics, the usual input normalisation of torchvision models
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
INSTALL_HINT = "pip install 'reparam[images]' (scikit-image or scikit-learn)"


def _to_tensor(array) -> Tensor:
    """``(H, W)`` or ``(H, W, C)`` uint8 -> ``(3, H, W)`` float32 in [0, 1] (grey repeated, alpha dropped)."""
    image = torch.tensor(array)  # a copy: the arrays may be read-only
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3].permute(2, 0, 1).float() / 255.0
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image.contiguous()


@functools.cache
def _shipped_photographs() -> tuple[tuple[str, Tensor], ...]:
    photos: list[tuple[str, Tensor]] = []
    try:
        import skimage.data
    except ImportError:
        pass
    else:
        photos += [(f"skimage:{name}", _to_tensor(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        pass
    else:
        sample = load_sample_images()
        photos += [(f"sklearn:{Path(f).stem}", _to_tensor(a)) for f, a in zip(sample.filenames, sample.images)]
    return tuple(photos)


def natural_photographs() -> list[tuple[str, Tensor]]:
    """``[(name, image)]`` of the photographs shipped in the scikit-image and scikit-learn
    wheels (7 with both installed), each ``(3, H, W)`` float32 in [0, 1]; shared, do not modify."""
    photos = list(_shipped_photographs())
    if not photos:
        raise ConfigError(f"natural images need scikit-image or scikit-learn, and neither is installed: {INSTALL_HINT}")
    return photos


def folder_images(directory: str | os.PathLike) -> list[Path]:
    """The image files under ``directory`` (recursively: a torchvision ``ImageFolder`` layout or
    plain files), sorted; a clear error when it is not a directory or holds no image."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{directory}: not a directory; give 'natural' or a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    return files


def load_image(path: str | os.PathLike) -> Tensor:
    """One image file as ``(3, H, W)`` float32 in [0, 1] (PIL; a clear error when unreadable)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _to_tensor(np.array(image.convert("RGB")))
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"{path}: cannot read the image ({err})") from None


def random_crop(image: Tensor, size: int, generator: torch.Generator, scale: tuple[float, float] | None = None) -> Tensor:
    """A random ``size x size`` crop of ``(3, H, W)`` ``image``. ``scale=(lo, hi)``: the crop's side is
    a uniform fraction of ``min(H, W)`` in that range, resized to ``size`` (whole-scene statistics
    like CIFAR's); ``None``: native resolution (an image smaller than ``size`` is upsampled first)."""
    _, h, w = image.shape
    side = size
    if scale is not None:
        lo, hi = scale
        side = max(1, round(min(h, w) * (lo + (hi - lo) * float(torch.rand((), generator=generator)))))
    if min(h, w) < side:
        factor = side / min(h, w)
        image = _resize(image, (max(side, round(h * factor)), max(side, round(w * factor))))
        _, h, w = image.shape
    top = int(torch.randint(h - side + 1, (), generator=generator))
    left = int(torch.randint(w - side + 1, (), generator=generator))
    crop = image[:, top:top + side, left:left + side]
    return crop if side == size else _resize(crop, (size, size))


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                                           align_corners=False)[0].clamp_(0, 1)


def normalize(batch: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``(x - mean) / std`` per channel."""
    mean_ = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    std_ = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    return (batch - mean_) / std_


class NaturalCrops(Dataset):
    """``length`` random crops of the shipped photographs (or of ``images``), item ``i`` =
    ``(crop, label)`` with the label the index of the photograph it came from, so it is also a
    tiny real classification task. Deterministic: item ``i`` depends only on ``seed`` and ``i``.
    Normalised with ImageNet statistics unless ``normalized=False``."""

    def __init__(self, length: int, size: int = 32, *, seed: int = 0, scale: tuple[float, float] | None = None,
                 normalized: bool = True, images: Sequence[Tensor] | None = None) -> None:
        if length < 1 or size < 1:
            raise ConfigError(f"NaturalCrops: length={length} and size={size} must be >= 1")
        self.images = list(images) if images is not None else [image for _, image in natural_photographs()]
        self.length, self.size, self.seed, self.scale, self.normalized = length, size, seed, scale, normalized

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(len(self.images), (), generator=gen))
        crop = random_crop(self.images[label], self.size, gen, self.scale)
        return (normalize(crop) if self.normalized else crop), label


def image_batches(source: str | os.PathLike, num_batches: int, batch_size: int, size: int, *, seed: int = 0,
                  scale: tuple[float, float] | None = None, normalized: bool = True) -> list[Tensor]:
    """``num_batches`` batches ``(batch_size, 3, size, size)`` of random crops from ``source``:
    ``"natural"`` (the shipped photographs) or a folder of images (only the files drawn are read)."""
    if num_batches < 1 or batch_size < 1 or size < 1:
        raise ConfigError(f"num_batches={num_batches}, batch_size={batch_size}, size={size} must all be >= 1")
    gen = torch.Generator().manual_seed(seed)
    if os.fspath(source) == "natural":
        images = [image for _, image in natural_photographs()]
        load = images.__getitem__
    else:
        files = folder_images(source)
        images, load = files, functools.lru_cache(maxsize=256)(lambda i: load_image(files[i]))
    batches = []
    for _ in range(num_batches):
        picks = torch.randint(len(images), (batch_size,), generator=gen).tolist()
        batch = torch.stack([random_crop(load(i), size, gen, scale) for i in picks])
        batches.append(normalize(batch) if normalized else batch)
    return batches
