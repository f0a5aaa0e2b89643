"""Image data: IDX files (MNIST family), image folders and image arrays.

Every loader returns train and test `ArrayData` of shape (N, C, H, W), float32
in [-1, 1], kept apart (IDX data sets ship their own test split; a folder or
array is split once, by a seeded permutation, before anything else sees it).

    train, test = load_dataset("fashion_mnist", 60000, 10000, seed=0, pad_to=32)
    train, test = load_dataset("image_folder", path="photos/", resize=64, crop=64, mode="rgb")

Images of a folder may have any size: `resize = S` scales each image so that its
shorter side is S (bicubic, antialiased: PIL), then `crop = S` cuts the centre
S x S, then `pad_to` pads with black. `mode` converts every image to "rgb" or
"grey" ("auto": each file grey or colour as it is, refusing a folder that mixes
them; see AUTO_GREY, AUTO_COLOUR). 16-bit grey images keep their depth (value / 257
in 0..255); 32-bit integer and float images ("I", "F") are refused, their range
being unknown. Each image is first turned upright by its EXIF orientation (as a
viewer shows it). Each top-level sub-folder is a class (images at any depth below
it belong to it; one holding no image is refused, as it would shift the labels);
hidden entries (names starting with ".") are skipped. Every file type the installed Pillow reads is read
(image_suffixes: .png, .jpg, .jfif, .webp, .jp2, .avif where its build decodes them, ...); files of other
types are skipped, with a warning for image types it does not read (MEANT_AS_IMAGES: .heic photos, ...).
Images of more pixels than Pillow reads (2 x PIL.Image.MAX_IMAGE_PIXELS, kept) are refused as too large
(TooLargeImage).

IDX images must be unsigned bytes (IDX type 0x08, 0..255, as the MNIST family): files of the other
IDX value types are refused, their range being unknown; IDX labels must be whole numbers 0 or more.

Fashion-MNIST is read from the files of the Debian package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/) unless `dir` names
another folder holding the four `*-ubyte[.gz]` files.
"""
from __future__ import annotations

import functools
import gzip
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ddmkit.data.arrays import (LABEL_NAMES, ArrayData, NpzArrays, check_finite, check_float32_range,
                                check_rows_to_split, check_sample_size, checked_labels, data_array_name,
                                load_array_file, no_sample_array, relative_hint, split_indices, take_rows,
                                warn_unread_arrays)
from ddmkit.errors import DDMError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MODES = {"auto": None, "rgb": "RGB", "grey": "L"}  # data.params.mode -> the PIL mode every image is converted to
AUTO_GREY = ("1", "L", "LA")  # PIL modes that mode = "auto" makes "L" (the alpha dropped, as RGBA's is)
AUTO_COLOUR = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # ... and "RGB"
COMMON_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # named first in messages
# image files a folder may hold that the researcher likely meant to be read (phone photos, raw camera files, other
# formats): those the installed Pillow does not read (unread_suffixes) are skipped with a warning naming how many of
# each; other files are skipped silently
MEANT_AS_IMAGES = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".webp", ".heic", ".heif", ".avif", ".avifs", ".jxl",
                   ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".eps", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                   ".ico", ".psd", ".svg", ".exr", ".hdr", ".qoi", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                   ".rw2", ".raf")
NEEDS_CODEC = {"JPEG": "jpg", "JPEG2000": "jpg_2000"}  # formats Pillow opens whose pixels need a codec (PIL.features)
NOT_DECODED = ("MPEG",)  # Pillow reads an MPEG video's size, never its frames
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---------------------------------------------------------------- IDX files

def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """The array stored in IDX bytes: magic 0x0000 | dtype code | ndim, then
    ndim big-endian uint32 sizes, then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DDMError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                       "expected MNIST-style *-ubyte files")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DDMError(f"{source}: unknown IDX value type 0x{code:02x}; accepted: "
                       + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES))
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DDMError(f"{source}: IDX header truncated or with 0 dimensions")
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DDMError(f"{source}: IDX header says shape {shape} ({expected} bytes of values) but the file holds "
                       f"{len(data) - header}; the file is corrupt or truncated, download it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not (decided by the gzip magic, not the name)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DDMError(f"{path}: corrupt gzip data ({e}); download the file again") from e
    return parse_idx(raw, str(path))


def find_idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DDMError(f"data.params.dir: IDX folder {folder} holds no {stem}[.gz]; for Fashion-MNIST install the files "
                   f"with `{INSTALL_HINT}`, or set data.params.dir to a folder holding them")


def load_idx_split(folder: str | Path, split: str) -> tuple[np.ndarray, torch.Tensor]:
    """(images (N, H, W) uint8, labels (N,) int64) of split 'train' or 't10k'. Images must be IDX type 0x08
    (unsigned bytes, 0..255, as the MNIST family), the one type whose range is known; labels must be whole
    numbers 0 or more (checked_labels)."""
    folder = Path(folder).expanduser()  # "~" as a shell reads it
    if not folder.is_dir():
        raise DDMError(f"data.params.dir: IDX folder {folder} does not exist; set data.params.dir to a folder "
                       f"holding the *-ubyte[.gz] files (Fashion-MNIST's: `{INSTALL_HINT}`)")
    images_file = find_idx(folder, f"{split}-images-idx3-ubyte")
    labels_file = find_idx(folder, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DDMError(f"{folder}: {split} images have shape {images.shape} and labels {labels.shape}; "
                       "expected (N, H, W) and (N,)")
    if images.dtype != np.uint8:
        raise DDMError(f"{images_file}: IDX images of value type {images.dtype.name}; ddmkit reads IDX images as "
                       "unsigned bytes only (type 0x08, values 0 .. 255, as the MNIST family), the one type whose "
                       "range it knows. Write the images as uint8 IDX (e.g. np.round((x - lo) / (hi - lo) * 255) "
                       "for values in lo .. hi), or save them as an image array (np.savez(\"images.npz\", x=x, "
                       "labels=labels) with uint8 (N, H, W) or float (N, 1, H, W) in [-1, 1]) and set "
                       "data.name = \"image_array\"")
    return images, checked_labels(labels, len(labels), f"IDX labels file {labels_file}")


# ---------------------------------------------------------------- scaling and padding

def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """Values in 0..255 (uint8, or float from 16-bit images), (N, H, W) or (N, H, W, C) -> float32
    (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)) / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def pad_images(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Pad (N, C, H, W) symmetrically with -1 (black) to size x size."""
    if not size:
        return x
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise DDMError(f"data.params.pad_to = {size} is smaller than the images (height x width: {h}x{w}); set "
                       f"pad_to = {max(h, w)} or more, or data.params.resize and crop (scale and cut the images first)")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


def resize_crop(x: torch.Tensor, resize: int | None, crop: int | None, source: str) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1]: the shorter side scaled to `resize` (bicubic, antialiased), then the
    centre crop x crop (image arrays; folders do the same per file with PIL)."""
    if resize:
        h, w = x.shape[-2:]
        size = (max(1, round(h * resize / min(h, w))), max(1, round(w * resize / min(h, w))))
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True,
                                            align_corners=False).clamp(-1, 1)
    if crop:
        h, w = x.shape[-2:]
        if h < crop or w < crop:
            raise DDMError(f"data.params.crop = {crop}: the images of {source} (height x width: {h}x{w}) are smaller "
                           f"than {crop}; set data.params.resize = {crop} as well (the shorter side scaled to {crop} "
                           "first)")
        top, left = (h - crop) // 2, (w - crop) // 2
        x = x[..., top:top + crop, left:left + crop].contiguous()
    return x


def _pair(name, train, train_labels, test, test_labels, n_train, n_test, seed, meta) -> tuple[ArrayData, ArrayData]:
    xtr, ytr = take_rows(train, train_labels, n_train, seed)
    xte, yte = take_rows(test, test_labels, n_test, seed + 1)
    return (ArrayData(name, xtr, ytr, None, {"split": "train", **meta}),
            ArrayData(name, xte, yte, None, {"split": "test", **meta}))


# ---------------------------------------------------------------- loaders (registered in LOADERS)

def load_idx_dataset(n_train: int, n_test: int, seed: int, dir: str = FASHION_MNIST_DIR, pad_to: int | None = None,
                     name: str = "fashion_mnist") -> tuple[ArrayData, ArrayData]:
    """An MNIST-family data set: train-* and t10k-* IDX files in `dir`."""
    tr, ytr = load_idx_split(dir, "train")
    te, yte = load_idx_split(dir, "t10k")
    if tr.shape[1:] != te.shape[1:]:
        raise DDMError(f"{dir}: train images are {tr.shape[1:]} but test images are {te.shape[1:]}")
    meta = {"source": str(dir), "pad_to": pad_to, "classes": FASHION_MNIST_CLASSES if name == "fashion_mnist" else None}
    return _pair(name, pad_images(to_unit_range(tr), pad_to), ytr, pad_images(to_unit_range(te), pad_to), yte,
                 n_train, n_test, seed, meta)


def _is_16bit(im) -> bool:
    """A 16-bit grey image: Pillow's I;16 modes, or an "I" PNG (older Pillow opens 16-bit grey PNGs so)."""
    return im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")


def _target_mode(im, mode: str, path: Path) -> str:
    """The PIL mode ("L" or "RGB") that data.params.mode makes of this image; an image whose range of
    values ddmkit cannot know (32-bit integer or float) is a DDMError naming the file."""
    if _is_16bit(im):
        return MODES[mode] or "L"
    if im.mode in ("I", "F") or im.mode.startswith(("I;", "F;")):
        kind = "float" if im.mode.startswith("F") else "integer"
        raise DDMError(f"{path}: a 32-bit {kind} image (PIL mode {im.mode!r}): ddmkit cannot know the range of its "
                       "values; convert it to an 8-bit or 16-bit PNG (e.g. scale the values to 0 .. 65535 and save "
                       "Image.fromarray(x.astype(np.uint16)))")
    if MODES[mode]:
        return MODES[mode]
    if im.mode in AUTO_GREY + AUTO_COLOUR:
        return "L" if im.mode in AUTO_GREY else "RGB"
    raise DDMError(f"{path}: PIL mode {im.mode!r} has no grey or colour form that data.params.mode = \"auto\" "
                   "knows; set data.params.mode = \"rgb\" (or \"grey\") to convert every image")


def _convert(im, target: str):
    """im in PIL mode `target`; through RGB where Pillow has no direct conversion (e.g. LAB -> L)."""
    try:
        return im.convert(target)
    except ValueError:
        return im.convert("RGB").convert(target)


def _resize_crop(im, resize: int | None, crop: int | None, path: Path):
    """A PIL image with its shorter side scaled to `resize` (bicubic, antialiased when shrinking), then its
    centre crop x crop."""
    from PIL import Image

    if resize:
        w, h = im.size
        im = im.resize((max(1, round(w * resize / min(w, h))), max(1, round(h * resize / min(w, h)))),
                       Image.Resampling.BICUBIC)
    if crop:
        w, h = im.size
        if w < crop or h < crop:
            raise DDMError(f"data.params.crop = {crop}: {path} (height x width: {h}x{w}) is smaller than {crop}; set "
                           f"data.params.resize = {crop} as well (each shorter side scaled to {crop} first)")
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
    return im


def _from_16bit(values: np.ndarray, target: str) -> np.ndarray:
    """A 16-bit grey image's values (0..65535, read as float) as float32 in 0..255 (value / 257), three
    equal channels when target is "RGB"."""
    x = (np.clip(values, 0, 65535) / 257).astype(np.float32)  # clip: bicubic overshoots, as uint8 clips it
    return np.repeat(x[..., None], 3, axis=2) if target == "RGB" else x


def image_values(im, mode: str = "auto", resize: int | None = None, crop: int | None = None,
                 path: Path | str = "image") -> np.ndarray:
    """A PIL image as (H, W[, C]) values in 0..255, uint8 (float32 for a 16-bit image): converted to
    `mode` (MODES; "auto": AUTO_GREY to L, AUTO_COLOUR to RGB), its shorter side scaled to `resize`
    (PIL bicubic, antialiased when shrinking), then its centre crop x crop; `path` names it in errors."""
    target = _target_mode(im, mode, path)
    if _is_16bit(im):  # kept 16-bit ("F") until scaled: converting to L would clip it at 255
        return _from_16bit(np.asarray(_resize_crop(im.convert("F"), resize, crop, path)), target)
    return np.asarray(_resize_crop(_convert(im, target), resize, crop, path))


class UnreadableImage(DDMError):
    """An image file that Pillow cannot read (read_image): its path, and why (Pillow's message)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not a readable image ({reason}); remove or replace the file")
        self.path, self.reason = path, reason


class TooLargeImage(UnreadableImage):
    """An image file of more pixels than Pillow reads (2 x PIL.Image.MAX_IMAGE_PIXELS, its guard against
    decompression bombs, kept on): its path and pixel count (None when Pillow's message does not give it)."""

    def __init__(self, path: Path, pixels: int | None, limit: int):
        more = f"{pixels:,} pixels, more than" if pixels else "more than"
        self.path, self.reason = path, f"too large to read safely: {more} Pillow's limit of {limit:,} pixels"
        DDMError.__init__(self, f"{path}: {self.reason} (2 x PIL.Image.MAX_IMAGE_PIXELS, its guard against "
                          f"decompression bombs); {downscale('it')}")


def downscale(what: str) -> str:
    """How to make `what` (image files too large for Pillow, TooLargeImage) readable."""
    return (f"downscale {what} first, e.g. to at most 4096 pixels a side (ImageMagick: magick FILE -resize "
            "4096x4096 SMALLER.png): data.params.resize acts only once an image is read")


def too_large(path: Path, error: Exception) -> TooLargeImage:
    """The TooLargeImage of Pillow's DecompressionBombError `error` ("Image size (N pixels) exceeds limit of
    M pixels, ...") on `path`."""
    from PIL import Image

    counted = re.search(r"\((\d+) pixels\)", str(error))
    return TooLargeImage(path, int(counted.group(1)) if counted else None, 2 * Image.MAX_IMAGE_PIXELS)


def read_image(path: Path, mode: str = "auto", resize: int | None = None, crop: int | None = None) -> np.ndarray:
    """One image file's values (image_values), turned upright by its EXIF orientation first (a phone photo
    as a viewer shows it), or an UnreadableImage naming a file that is not a readable image."""
    from PIL import Image, ImageOps

    # what Pillow raises on a damaged file: OSError most often, SyntaxError for a broken PNG chunk, ValueError,
    # EOFError or struct.error for damaged headers; DecompressionBombError for a header claiming more pixels than
    # 2 x Image.MAX_IMAGE_PIXELS (a huge photo, or a damaged header)
    damaged = (OSError, SyntaxError, ValueError, EOFError, struct.error)
    try:
        with Image.open(path) as im:
            ImageOps.exif_transpose(im, in_place=True)  # in place: keeps the file's format and mode
            return image_values(im, mode, resize, crop, path)
    except Image.DecompressionBombError as e:
        raise too_large(path, e) from e
    except damaged as e:
        raise UnreadableImage(path, str(e)) from e


def read_images(files: list[Path], root: Path, mode: str, resize: int | None, crop: int | None) -> list[np.ndarray]:
    """read_image of every file; the files that are not readable images are named together (the first few, and
    how many), so that a folder with several damaged files is fixed in one go."""
    arrays, unreadable = [], []
    for p in files:
        try:
            arrays.append(read_image(p, mode, resize, crop))
        except UnreadableImage as e:
            unreadable.append(e)
    if len(unreadable) == 1:
        raise unreadable[0]
    if unreadable:
        shown = "; ".join(f"{e.path}: {e.reason}" for e in unreadable[:3])
        more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        large = any(isinstance(e, TooLargeImage) for e in unreadable)
        large = f"; {downscale('the ones too large to read')}" if large else ""
        raise DDMError(f"image folder {root}: {len(unreadable)} of its {len(files)} image files are not readable "
                       f"images ({shown}{more}); remove or replace them{large}")
    return arrays


def pad_array(image: np.ndarray, size: int) -> np.ndarray:
    """One uint8 image (H, W[, C]), at most size x size, padded symmetrically with black (0, i.e. -1 once
    scaled) to size x size, as pad_images pads a batch."""
    h, w = image.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(image, [(top, size - h - top), (left, size - w - left)] + [(0, 0)] * (image.ndim - 2))


def decodes(fmt: str, factory) -> bool:
    """Whether the installed Pillow reads the pixels of image format `fmt` (factory: its Image.OPEN entry): not a stub
    that needs a handler of the user's (HDF5, GRIB, BUFR; WMF outside Windows), not MPEG video, and with the codec
    (JPEG 2000: OpenJPEG) or the program (EPS: Ghostscript) it needs."""
    from PIL import EpsImagePlugin, ImageFile, features

    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile) or fmt in NOT_DECODED:
        return False
    if fmt == "EPS":
        return EpsImagePlugin.has_ghostscript()
    return features.check_codec(NEEDS_CODEC[fmt]) if fmt in NEEDS_CODEC else True


@functools.cache
def image_suffixes() -> tuple[str, ...]:
    """The file suffixes ddmkit reads as images (lower case, sorted): every extension the installed Pillow registers
    for a format whose pixels it reads (Image.registered_extensions, Image.OPEN, decodes)."""
    from PIL import Image

    extensions = Image.registered_extensions()  # loads every plugin first
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items() if decodes(fmt, factory)}
    return tuple(sorted(ext for ext, fmt in extensions.items() if fmt in readable))


def readable_text() -> str:
    """The image types ddmkit reads, as messages name them: the common ones, and how many others."""
    suffixes = image_suffixes()
    common = [s for s in COMMON_SUFFIXES if s in suffixes]
    return f"{', '.join(common)} and the {len(suffixes) - len(common)} other types this Pillow reads"


def image_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The image files (suffixes, in any case; default: image_suffixes()) at any depth below root, sorted; hidden
    entries (a name starting with ".", e.g. .ipynb_checkpoints/ or macOS's ._x.png) and everything below them are
    skipped."""
    suffixes = image_suffixes() if suffixes is None else suffixes
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def unread_images(root: Path) -> str:
    """The files below root of image types the installed Pillow does not read (MEANT_AS_IMAGES not in
    image_suffixes: .heic phone photos, raw camera files, ...), which image_files skips, as a message says it
    ("" when none): how many, of which types, and how to include them."""
    unread = tuple(s for s in MEANT_AS_IMAGES if s not in image_suffixes())
    counts: dict[str, int] = {}
    for p in image_files(root, unread):
        counts[p.suffix.lower()] = counts.get(p.suffix.lower(), 0) + 1
    if not counts:
        return ""
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items(), key=lambda item: -item[1]))
    return (f"{sum(counts.values())} image file(s) of types ddmkit does not read ({kinds}) are skipped; to include "
            f"them, convert them to PNG or JPEG (ddmkit reads {readable_text()})")


def class_of(root: Path, file: Path) -> str | None:
    """The class of an image file: the top-level sub-folder of root that holds it, at any depth (None for
    a file directly in root)."""
    parts = file.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def check_one_layout(root: Path, files: list[Path], classes: list[str]) -> None:
    """A folder with images directly in root and in class sub-folders is a DDMError, said before any image is
    decoded: one image of each kind named, and the two ways to make it one layout."""
    top = [p for p in files if p.parent == root]
    if classes and top:
        shown = ", ".join(classes[:3]) + (f" and {len(classes) - 3} more" if len(classes) > 3 else "")
        raise DDMError(f"image folder {root} has images both at the top and in class sub-folders; use one layout: "
                       f"{len(top)} image(s) directly in it (e.g. {top[0]}) are unlabelled, and those in its "
                       f"sub-folders ({shown}) are classes. Move the top images into a class sub-folder, or the "
                       "sub-folders' images to the top (images without classes)")


def check_no_empty_class(root: Path, classes: list[str]) -> None:
    """With class sub-folders, a (non-hidden) top-level sub-folder holding no image is a DDMError: dropping
    it would shift the label of every class after it (labels are the sorted folder names)."""
    if not classes:
        return
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    empty = [root / name for name in folders if name not in classes]
    if empty:
        named = ", ".join(map(str, empty[:3])) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DDMError(f"{named}: class sub-folder(s) of image folder {root} holding no images "
                       f"({readable_text()}); label i is the i-th sub-folder in sorted order, so the classes "
                       "after it would get other labels. Add images to it, or remove it (or rename it to start with "
                       "\".\", which skips it)")


def different_sizes(root: Path, named: list[tuple[tuple[int, int], Path]], sizes: list[tuple[int, int]],
                    resize: int | None) -> DDMError:
    """The error for a folder of images of several sizes ((H, W) each): two files named with their sizes, and
    the settings that make them one size."""
    (s1, p1), (s2, p2) = named
    side = resize or min(min(size) for size in sizes)
    return DDMError(f"data.params.path: image folder {root} holds images of different sizes (height x width: "
                    f"{p1}: {s1[0]}x{s1[1]}, {p2}: {s2[0]}x{s2[1]}); set data.params.resize = {side} and "
                    f"data.params.crop = {side} (each image's shorter side scaled to {side}, then its centre "
                    f"{side}x{side} kept), or data.params.pad_to = {max(max(size) for size in sizes)} (each padded "
                    "with black)")


def stored_size(path: Path, upright: bool = False) -> tuple[int, int] | None:
    """(H, W) of an image file from its header, nothing decoded (upright: turned by its EXIF orientation, which
    may decode a PNG); None for a file Pillow cannot open (read_images names it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = upright and im.getexif().get(0x0112) in (5, 6, 7, 8)  # the orientations turned by 90 degrees
    except Exception:  # a damaged file: read_images names it
        return None
    return (w, h) if turned else (h, w)


def check_stored_sizes(root: Path, files: list[Path]) -> None:
    """Without resize, crop and pad_to, a folder whose files' headers already give sizes of other sides (which no
    EXIF turn makes equal) is refused before any image is decoded: a folder of large photos was read whole into
    memory only to be refused."""
    first: dict[tuple[int, int], Path] = {}
    for p in files:
        size = stored_size(p)
        if size is not None:
            first.setdefault(tuple(sorted(size)), p)
    if len(first) > 1:
        named = [(stored_size(p, upright=True), p) for p in list(first.values())[:2]]
        raise different_sizes(root, named, list(first), None)


def read_image_folder(path: str | Path, mode: str = "auto", resize: int | None = None, crop: int | None = None,
                      pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images (N, H, W[, C]) in 0..255 (uint8, float32 with 16-bit images), labels or None, class names).
    Each top-level sub-folder is a class (labels by sorted name), with the images at any depth below it;
    images directly in `path` are unlabelled; hidden entries are skipped (image_files). Every image is
    read by read_image (mode, resize, crop) and padded to pad_to; they must then have one size and mode."""
    from PIL import Image

    if not str(path):  # Path("") is the working folder: every image below it would be read
        raise DDMError("data.params.path: no image folder given; name it in the config ([data] params = { path = "
                       "\"FOLDER\" }) or on the command line (--set data.params.path=FOLDER)")
    root = Path(path).expanduser()  # "~" as a shell reads it
    if mode not in MODES:
        raise DDMError(f"data.params.mode: unknown {mode!r}; accepted: {', '.join(MODES)}")
    if root.is_file():
        fix = (f'for an array of images set data.name = "image_array" (data.params.path = "{path}")'
               if root.suffix.lower() in (".npy", ".npz") else f'name the folder (data.params.path = "{root.parent}")')
        raise DDMError(f"data.params.path: {root} is a file, not a folder: image_folder reads every image in a folder; "
                       f"{fix}")
    if not root.is_dir():
        raise DDMError(f"data.params.path: image folder {root} does not exist (or is not a folder)"
                       f"{relative_hint(root)}")
    files, unread = image_files(root), unread_images(root)
    if not files:
        fix = unread or ("point data.params.path at a folder of image files (directly in it, or in one sub-folder "
                         f"per class) of the types ddmkit reads: {readable_text()}")
        raise DDMError(f"data.params.path: image folder {root} holds no images (hidden files and folders, whose "
                       f"names start with \".\", are skipped): {fix}")
    if unread:
        warnings.warn(f"image folder {root}: {unread}", UserWarning)
    classes = sorted({class_of(root, p) for p in files} - {None})
    check_one_layout(root, files, classes)
    check_no_empty_class(root, classes)
    # Pillow warns of images of more than Image.MAX_IMAGE_PIXELS ("... could be decompression bomb DOS attack"):
    # the user's own photos, read as any other, so not shown; those of more than twice as many are refused
    # (TooLargeImage: downscale them first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if not (resize or crop or pad_to):
            check_stored_sizes(root, files)
        arrays = read_images(files, root, mode, resize, crop)
    if pad_to:
        largest = max(max(a.shape[:2]) for a in arrays)
        if largest > pad_to:
            p, a = next((p, a) for p, a in zip(files, arrays) if max(a.shape[:2]) > pad_to)
            raise DDMError(f"{p} (height x width: {a.shape[0]}x{a.shape[1]}) is larger than data.params.pad_to = "
                           f"{pad_to}; set pad_to = {largest} or more (the folder's largest side), or "
                           "data.params.resize and crop (each image scaled and cut before padding)")
        arrays = [pad_array(a, pad_to) for a in arrays]
    channels, sizes = {}, {}
    for p, a in zip(files, arrays):
        channels.setdefault(a.shape[2] if a.ndim == 3 else 1, p)
        sizes.setdefault(a.shape[:2], p)
    if len(channels) > 1:
        (c1, p1), (c2, p2) = list(channels.items())[:2]
        raise DDMError(f"image folder {root} mixes grayscale and colour images ({p1}: {c1} channel(s), {p2}: {c2} "
                       "channel(s)); set data.params.mode = \"rgb\" (or \"grey\") to convert every image")
    if len(sizes) > 1:
        raise different_sizes(root, list(sizes.items())[:2], list(sizes), resize)
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[class_of(root, p)] for p in files], dtype=np.int64)
    return np.stack(arrays), labels, classes


def _split(x: torch.Tensor, labels: torch.Tensor | None, test_fraction: float, seed: int, where: str):
    check_rows_to_split(len(x), where, "add images")
    te, tr = split_indices(len(x), test_fraction, seed)
    lab = (lambda idx: labels[idx]) if labels is not None else (lambda idx: None)
    return x[tr], lab(tr), x[te], lab(te)


def load_image_folder(n_train: int, n_test: int, seed: int, path: str = "", pad_to: int | None = None,
                      test_fraction: float = 0.2, resize: int | None = None, crop: int | None = None,
                      mode: str = "auto") -> tuple[ArrayData, ArrayData]:
    """Images from a folder (class sub-folders give labels), made one size by resize and crop."""
    images, labels, classes = read_image_folder(path, mode, resize, crop, pad_to)
    x = to_unit_range(images)
    y = torch.as_tensor(labels) if labels is not None else None
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed, f"data.params.path: image folder {str(path)!r}")
    return _pair(Path(path).name, xtr, ytr, xte, yte, n_train, n_test, seed,
                 {"source": str(path), "classes": classes, "resize": resize, "crop": crop, "mode": mode})


def check_image_layout(arr: np.ndarray, where: str, path: str) -> None:
    """An image array's dtype and shape are uint8 (N, H, W[, C]) or float (N, C, H, W), C = 1 or 3; else a
    DDMError opening with `where` that says what would make them so (a transpose, a cast, a channel axis)."""
    if arr.dtype == np.uint8:
        if arr.ndim not in (3, 4):
            raise DDMError(f"{where}: uint8 images must be (N, H, W) or (N, H, W, C); got {arr.shape}"
                           + (f" (vectors? give data.name = {str(path)!r}, which reads (N, D) rows as they are)"
                              if arr.ndim == 2 else ""))
        if arr.ndim == 4 and arr.shape[3] not in (1, 3):
            fix = (" (channels first? give x.transpose(0, 2, 3, 1))" if arr.shape[1] in (1, 3) else
                   " (RGBA? drop the alpha channel: x[..., :3])" if arr.shape[3] == 4 else "")
            raise DDMError(f"{where}: uint8 images (N, H, W, C) need C = 1 or 3 channels; got {arr.shape}{fix}")
        return
    if arr.dtype.kind in "iu" and arr.ndim in (3, 4):  # pixels of another integer type (np.array of ints: int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        fix = ("save them as uint8, x.astype(np.uint8)" if 0 <= lo and hi <= 255 else
               "scale them to 0 .. 255 and save them as uint8 (16-bit pixels: (x / 257).round().astype(np.uint8)), "
               "or save float (N, C, H, W) images in [-1, 1]")
        raise DDMError(f"{where}: images must be uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1]; got "
                       f"{arr.dtype} {arr.shape} with values {lo} .. {hi}: {fix}")
    if arr.ndim != 4 or arr.dtype.kind != "f":
        fix = (" (float grey images (N, H, W)? give x[:, None], (N, 1, H, W))" if arr.dtype.kind == "f" and
               arr.ndim == 3 else f" (vectors? give data.name = {str(path)!r}, which reads (N, D) rows as they are)"
               if arr.ndim == 2 else "")
        raise DDMError(f"{where}: images must be uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1]; got "
                       f"{arr.dtype} {arr.shape}{fix}")
    if arr.shape[1] not in (1, 3):
        raise DDMError(f"{where}: float images (N, C, H, W) need C = 1 or 3 channels; got {arr.shape}"
                       + (" (channels last? give x.transpose(0, 3, 1, 2))" if arr.shape[3] in (1, 3) else ""))


def load_image_array(n_train: int, n_test: int, seed: int, path: str = "", pad_to: int | None = None,
                     test_fraction: float = 0.2, resize: int | None = None,
                     crop: int | None = None) -> tuple[ArrayData, ArrayData]:
    """Images from a .npy/.npz file: uint8 (N, H, W[, C]) or float (N, C, H, W)
    already in [-1, 1]; an .npz may hold `x` (or `images`) and `labels`. resize and
    crop as for a folder (torch's antialiased bicubic)."""
    if not str(path):
        raise DDMError("data.params.path: no image array file given; name it in the config ([data] params = { path = "
                       "\"FILE.npy\" }) or on the command line (--set data.params.path=FILE.npy)")
    p = Path(path).expanduser()  # "~" as a shell reads it
    if p.is_dir():
        raise DDMError(f"data.params.path: {path!r} is a folder, not an array file: for a folder of images set "
                       f'data.name = "image_folder" (data.params.path = "{path}")')
    if not p.is_file():
        raise DDMError(f"data.params.path: image array file {path!r} does not exist (or is not a file)"
                       f"{relative_hint(path)}")
    arr = load_array_file(p, f"data.params.path: image array file {path!r}")
    labels = None
    where = f"data.params.path: image array file {path!r}"
    if isinstance(arr, NpzArrays):
        if not arr.files:
            raise DDMError(f"{where}: the .npz file holds no arrays")
        key = data_array_name(arr.files, ("x", "images"))
        if key is None or key in LABEL_NAMES and arr[key].ndim < 2:
            raise DDMError(no_sample_array(where, arr.files))
        warn_unread_arrays(where, arr.files, key, "image_array reads the images of 'x' (else 'images'): save the "
                           "ones to train on under 'x'")
        labels = arr["labels"] if "labels" in arr.files else None
        arr = arr[key]
    check_image_layout(arr, where, path)
    check_sample_size(arr.shape, where)
    if arr.dtype == np.uint8:
        x = to_unit_range(arr)
    else:
        check_float32_range(arr, f"image array file {path!r}")
        x = torch.as_tensor(arr.astype(np.float32))
        check_finite(x, f"image array file {path!r}")
        check_image_range(x, f"image array file {path!r}", "scale them before saving, e.g. x / 127.5 - 1 for "
                          "values in 0 .. 255 (or save uint8 (N, H, W[, C]) images, which ddmkit scales)")
    labels = checked_labels(labels, len(x), where)
    x = pad_images(resize_crop(x, resize, crop, f"image array file {path!r}"), pad_to)
    xtr, ytr, xte, yte = _split(x, labels, test_fraction, seed, where)
    return _pair(p.stem, xtr, ytr, xte, yte, n_train, n_test, seed, {"source": str(path)})


def load_idx_folder(n_train: int, n_test: int, seed: int, dir: str | None = None,
                    pad_to: int | None = None) -> tuple[ArrayData, ArrayData]:
    """The "idx" data set: load_idx_dataset of the folder data.params.dir, which must be given (without it, the
    reader's Fashion-MNIST default would train on Fashion-MNIST in place of the user's files)."""
    if dir is None:
        raise DDMError("data.params.dir: no IDX folder given; name the folder holding the train-* and t10k-* "
                       "*-ubyte[.gz] files ([data] params = { dir = \"FOLDER\" }, or --set data.params.dir=FOLDER); "
                       "for Fashion-MNIST from its Debian package set data.name = \"fashion_mnist\"")
    return load_idx_dataset(n_train, n_test, seed, dir, pad_to, name="idx")


IMAGE_LOADERS = {"fashion_mnist": load_idx_dataset, "idx": load_idx_folder,
                 "image_folder": load_image_folder, "image_array": load_image_array}


def is_image_shape(shape) -> bool:
    """(C, H, W) with 1 or 3 channels: data the image pipeline handles."""
    return len(shape) == 3 and shape[0] in (1, 3)


def check_image_range(x: torch.Tensor, where: str, fix: str) -> None:
    """Image-shaped data (N, C, H, W), C = 1 or 3 (is_image_shape), must lie in [-1, 1], the range the image
    networks and FID take; values outside are a DDMError opening with `where`, naming the first rows and
    ending with `fix`. Values that all lie in [0, 1] (torchvision's ToTensor images?) are legal but warned
    of. Other data (vectors) are left alone."""
    if not is_image_shape(tuple(x.shape[1:])) or len(x) == 0:
        return
    bad = x.abs() > 1.0 + 1e-4
    if bad.any():
        rows = bad.reshape(len(x), -1).any(1).nonzero().flatten()[:5].tolist()
        raise DDMError(f"{where}: images (N, C, H, W) must lie in [-1, 1]; found values from {x.min():.4g} to "
                       f"{x.max():.4g} (first bad rows: {rows}); {fix}")
    if x.min() >= 0:
        warnings.warn(f"{where}: the images' values lie in [0, 1] (from {x.min():.4g} to {x.max():.4g}); ddmkit "
                      "images are in [-1, 1] (-1 black, 1 white): if these are [0, 1] images (e.g. torchvision's "
                      "ToTensor), map them with x * 2 - 1", UserWarning)
