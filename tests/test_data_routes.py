"""The user's own data through `ddmkit run`: an image folder of mixed sizes (resize + crop), an array
with test_fraction and one with test_path, a dataset function of the user's code, a Gaussian
mixture written in the TOML (exact truth in the report); bad inputs exit 2 with the field named and
nothing written; and the early checks, whose suggested fix the tests apply before running again."""
import json
import os
import re
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from ddmkit.config import RunConfig, validate
from ddmkit.data import load_dataset
from ddmkit.errors import DDMError
from ddmkit.io import load_tensors
from ddmkit.pipeline.checks import check_clusters, check_run_plan, held_out_rows, largest_n

from conftest import run_cli

VECTORS = """
[data]
name = "{name}"
n_train = {n_train}
n_test = {n_test}
params = {params}

[partition]
k = {k}

[expert.net]
arch = "mlp"
kwargs = {{ width = 16, depth = 1 }}

[expert.train]
steps = 10
batch_size = 32
warmup = 1
log_every = 5

[router.net]
arch = "router_mlp"
kwargs = {{ width = 16, depth = 1 }}

[router.train]
steps = 10
batch_size = 32
warmup = 1
log_every = 5

[monolith]
enabled = false

[sample]
n = {n}
steps = 4
strategies = ["top-1"]

[evaluate]
chunk = 50
missing_experts = false
stats_router = {stats_router}
"""

IMAGES = """
[data]
name = "image_folder"
n_train = 1000
n_test = 0
params = {params}

[partition]
k = 2

[expert.net]
arch = "unet"
kwargs = { channels = [8, 16], blocks = 1, attention_res = [] }

[expert.train]
steps = 2
batch_size = 8
warmup = 1
log_every = 1
device = "cpu"

[router.net]
arch = "router_cnn"
kwargs = { channels = [8, 16] }

[router.train]
steps = 2
batch_size = 8
warmup = 1
log_every = 1
device = "cpu"

[monolith]
enabled = false

[sample]
n = 8
steps = 2
strategies = ["top-1"]

[evaluate]
fid_features = "pixels"
kid_subset = {kid_subset}
"""


def vectors(path, name, params="{}", n_train=400, n_test=200, k=2, n=100, stats_router="false"):
    path.write_text(VECTORS.format(name=name, params=params, n_train=n_train, n_test=n_test, k=k, n=n,
                                   stats_router=stats_router))
    return path


def cli(*args) -> tuple[int, str]:
    """`ddmkit ARGS` in this process (conftest's run_cli): (exit code, stderr)."""
    done = run_cli(*args)
    return done.returncode, done.stderr


def refused(config, out, *fields) -> str:
    """Run CONFIG: exit 2, every field named in the message, no run folder left. Returns the message."""
    code, err = cli("run", config, "--out", out)
    message = " ".join(err.split())
    assert code == 2, err
    assert all(field in message for field in fields), message
    assert not out.exists()
    return message


def runs(monkeypatch, capsys, config, out) -> dict:
    """Run CONFIG: exit 0 and a report; returns metrics.json."""
    code, err = cli("run", config, "--out", out)
    assert code == 0, err
    assert (out / "report.md").exists()
    return json.loads((out / "metrics.json").read_text())


def blobs(n: int, seed: int = 0, dim: int = 2) -> np.ndarray:
    """Two well separated Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = np.where(rng.random(n)[:, None] < 0.5, -2.0, 2.0) * np.eye(dim)[0]
    return (centres + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def data_info(out) -> dict:
    return json.loads((out / "data" / "data.json").read_text())


# ----- a Gaussian mixture written in the TOML -----------------------------------------------------

MIXTURE = "{ weights = [1.0, 3.0], means = [[-2.0, 0.0], [2.0, 0.0]], stds = [[0.3, 0.5], [0.4, 0.2]] }"


def test_a_mixture_in_the_toml_gives_the_exact_rows(tmp_path, monkeypatch, capsys):
    metrics = runs(monkeypatch, capsys, vectors(tmp_path / "m.toml", "mixture", MIXTURE), tmp_path / "run")
    truth = load_tensors(tmp_path / "run" / "data" / "truth.safetensors")  # the truth written, as given
    assert torch.equal(truth["weights"], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(truth["means"], torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(truth["eigvals"], torch.tensor([[0.09, 0.25], [0.16, 0.04]], dtype=torch.float64))
    exact = [name for name in metrics["rows"] if name.startswith("exact")]
    assert exact and all(np.isfinite(metrics["rows"][name]["nll"]) for name in [*exact, "top-1"])
    assert "| exact (full, exact experts + router) |" in (tmp_path / "run" / "report.md").read_text()
    # a new [sample] section on the trained run is checked too, before its samples are removed
    config = tmp_path / "m.toml"
    config.write_text(config.read_text().replace("\nn = 100\n", "\nn = 1000\n"))
    code, err = cli("run", config, "--out", tmp_path / "run")
    assert code == 2 and "set sample.n = 149 or lower" in " ".join(err.split())  # 2 x 2 chunks of 50 <= 200
    assert (tmp_path / "run" / "samples" / "top-1.safetensors").exists() and (tmp_path / "run" / "report.md").exists()


@pytest.mark.parametrize("params, field", [
    ("{ means = [[0.0, 0.0], [1.0]], std = 0.1 }", "data.params.means"),
    ("{ means = [[0.0, 0.0]], std = 0.1, stds = [[0.1, 0.1]] }", "exactly one of covs"),
    ("{ means = [[0.0], [1.0]], weights = [1.0, 0.0], std = 0.1 }", "data.params.weights: component 1"),
    ("{ means = [[0.0], [1.0]], weights = [1.0], std = 0.1 }", "data.params.weights"),
    ("{ means = [[0.0, 0.0], [3.0, 0.0]], covs = [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]] }",
     "data.params.covs[1] (component 1) is not positive definite"),
    ("{ means = [[0.0, 0.0], [3.0, 0.0]], covs = [[[1.0, 0.5], [0.4, 1.0]], [[1.0, 0.0], [0.0, 1.0]]] }",
     "data.params.covs[0] (component 0) is not symmetric"),
    ("{ means = [[0.0, inf]], std = 0.1 }", "data.params.means: every number must be finite"),
    ("{ means = [[0.0, true]], std = 0.1 }", "data.params.means"),
    ("{ std = 0.1 }", "data.params.means: required"),
])
def test_a_bad_mixture_exits_2_naming_the_field(tmp_path, monkeypatch, capsys, params, field):
    refused(vectors(tmp_path / "m.toml", "mixture", params), tmp_path / "run", field)


def test_lists_are_accepted_only_for_the_keys_that_take_them():
    with pytest.raises(DDMError, match=r"data.params.radius: give a number from 0 to 1e\+06 "
                                       r"\(it is \[1.0, 2.0\], a list\)"):
        load_dataset("ring8", 10, 10, params={"radius": [1.0, 2.0]})
    with pytest.raises(DDMError, match="data.params.means: unknown keyword for the 'ring8' preset"):
        load_dataset("ring8", 10, 10, params={"means": [[0.0, 0.0]]})
    with pytest.raises(DDMError, match="data.params.means: expected a list"):
        load_dataset("mixture", 10, 10, params={"means": "0 0", "std": 1.0})


# ----- arrays: test_fraction and test_path --------------------------------------------------------

@pytest.mark.parametrize("values, dtype", [(np.ones((20, 2)) + 1j, "complex128"), (np.ones((20, 2)) > 0, "bool")])
def test_an_array_file_of_complex_or_bool_values_is_refused(tmp_path, values, dtype):
    np.save(tmp_path / "x.npy", values)  # the same rule as a dataset function's: no silent cast to float32
    with pytest.raises(DDMError, match=f"data.name: data file .* holds an array of {dtype}; expected numbers"):
        load_dataset(str(tmp_path / "x.npy"), 10, 5)


def test_channels_last_uint8_images_given_as_an_array_file_point_to_image_array(tmp_path):
    """They trained as vectors of 0 .. 255 with no hint; the fixes offered both work."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    with pytest.raises(DDMError, match=r"holds uint8 arrays of shape \(8, 8, 3\), channels-last images .* give "
                                       r'data.name = "image_array" with data.params.path'):
        load_dataset(str(tmp_path / "x.npy"), 10, 5)
    assert load_dataset("image_array", 10, 5, params={"path": str(tmp_path / "x.npy")})[0].data_shape == (3, 8, 8)
    np.save(tmp_path / "f.npy", pixels.astype(np.float32))
    assert load_dataset(str(tmp_path / "f.npy"), 10, 5)[0].data_shape == (8, 8, 3)


def test_grey_uint8_images_given_as_an_array_file_point_to_image_array(tmp_path):
    """uint8 (N, H, W), as MNIST is saved, trained as vectors of 0 .. 255 without a word (channels-last ones
    were refused); the fixes offered both work, and uint8 rows (N, D) are vectors as they were."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    with pytest.raises(DDMError, match=r"holds uint8 arrays of shape \(8, 8\), grey images \(N, H, W\) by the look "
                                       r'of them, .* give data.name = "image_array" with data.params.path'):
        load_dataset(str(tmp_path / "x.npy"), 10, 5)
    assert load_dataset("image_array", 10, 5, params={"path": str(tmp_path / "x.npy")})[0].data_shape == (1, 8, 8)
    np.save(tmp_path / "f.npy", pixels.astype(np.float32))
    assert load_dataset(str(tmp_path / "f.npy"), 10, 5)[0].data_shape == (8, 8)
    np.save(tmp_path / "rows.npy", pixels.reshape(20, 64))
    assert load_dataset(str(tmp_path / "rows.npy"), 10, 5)[0].data_shape == (64,)


@pytest.mark.parametrize("name", ["x.NPY", "x.Npz"])
def test_array_file_suffixes_are_read_in_any_case(tmp_path, name):
    """data.name = "x.NPY" was refused as an unknown data set, while image files' suffixes are read in any
    case; it is read as x.npy is, split by test_fraction, and its changes are noted as a .npy file's."""
    from ddmkit.data.source import source_files

    with open(tmp_path / name, "wb") as f:  # np.save and np.savez would append their own suffix
        (np.savez if name.lower().endswith(".npz") else np.save)(f, blobs(400))
    config = vectors(tmp_path / "a.toml", tmp_path / name, "{ test_fraction = 0.5 }", n_train=1000, n_test=0)
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 0, err
    assert data_info(tmp_path / "run")["n_test"] == 200 and data_info(tmp_path / "run")["n_train"] == 200
    assert source_files(str(tmp_path / name), {}) == [tmp_path / name]


@pytest.mark.parametrize("name", ["a" * 600, "a" * 300 + "/b.npy"])
def test_a_data_name_too_long_for_the_file_system_is_refused_in_one_line_with_what_to_give(tmp_path, name):
    """`--set data.name=<600 x a>` was read as a path and failed as the file system's 'File name too long ...
    check that path (its permissions, the free space of its disk)': one line naming data.name and what to give,
    exit 2, nothing written."""
    code, err = cli("partition", "--out", tmp_path / "run", "--set", f"data.name={name}")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: data.name: "), err
    assert "is too long for a path" in err and "give a built-in data set (checkerboard, " in err and \
        "or the path of a .npy/.npz file" in err and "permissions" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_data_name_that_is_a_folder_a_file_of_another_type_or_a_typo_is_refused_with_the_settings_that_read_it(
        tmp_path, monkeypatch):
    """data.name = "photos" (a folder of images), "x.csv" or "image_foldr" was refused as an unknown data set with
    the list of names only; the message now says what the name is and what reads it, and the folder's fix runs."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8), 25 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "x.csv").write_text("1,2\n3,4\n")
    monkeypatch.chdir(tmp_path)  # a name relative to the folder ddmkit runs in, as a user writes it
    said = {"photos": 'it is a folder: for a folder of images set data.name = "image_folder" and data.params.path = '
                      '"photos"',
            "x.csv": 'it is a .csv file; ddmkit reads arrays from .npy/.npz files: save yours with np.save("data.npy", '
                     'x)',
            "image_foldr": "(did you mean 'image_folder'?)"}
    for name, hint in said.items():
        message = refused(vectors(tmp_path / "a.toml", name), tmp_path / "run", "data.name: unknown data set", hint)
        assert "accepted: checkerboard" in message
    code, err = cli("partition", "--config", vectors(tmp_path / "a.toml", "image_folder", '{ path = "photos" }'),
                    "--out", tmp_path / "run", "--set", "evaluate.kid_subset=2")
    assert code == 0 and "8 train / 2 test samples of shape (1, 8, 8)" in err, err


@pytest.mark.parametrize("shape, fix", [((400, 8, 8, 3), "np.save(path, x.transpose(0, 3, 1, 2))"),
                                        ((400, 8, 8, 4), "np.save(path, x[..., :3].transpose(0, 3, 1, 2))")])
def test_float_channels_last_images_given_as_an_array_file_train_as_vectors_with_a_warning(tmp_path, shape, fix):
    """A uint8 array of them is refused with the image_array lines; as floats (the way to train on the values as
    they are) they trained as flattened vectors without a word. They still do, with a warning of how to save
    them as images; images channels first and other vectors say nothing."""
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    config = vectors(tmp_path / "a.toml", tmp_path / "x.npy", "{ test_fraction = 0.5 }", n_train=1000, n_test=0)
    said = f"data.name: data file '{tmp_path / 'x.npy'}' holds samples of shape {shape[1:]}, channels-last images by " \
           f"the look of them, which train as vectors of {np.prod(shape[1:])} values"
    with pytest.warns(UserWarning, match=re.escape(said)) as warned:
        code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 0, err
    assert any(fix in str(w.message) for w in warned), [str(w.message) for w in warned]
    assert data_info(tmp_path / "run")["data_shape"] == list(shape[1:])
    for other in ((400, 3, 8, 8), (400, 8, 8, 2), (400, 6)):  # images the image stages read; vectors
        np.save(tmp_path / "o.npy", np.full(other, -0.5, np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_dataset(str(tmp_path / "o.npy"), 100, 0, params={"test_fraction": 0.5})


def test_an_array_file_that_is_not_an_array_says_what_to_save(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not an array at all")
    with pytest.raises(DDMError, match="never pickle: save a numeric array with np.save") as error:
        load_dataset(str(tmp_path / "x.npy"), 10, 5)
    assert "allow_pickle" not in str(error.value).split("(", 1)[0]  # no fix ddmkit cannot take


@pytest.mark.parametrize("name", ["x", "labels"])
def test_an_npz_holding_an_object_array_is_refused_naming_it(tmp_path, name):
    """An .npz whose samples (rows of several lengths) or labels are an object array was numpy's ValueError
    traceback (np.load reads an .npz's arrays only when asked, past load_array_file's check): exit 2 naming the
    file and the array, with how to save it as numbers, and nothing written; as an image_array file too."""
    rows = np.array([np.zeros(3), np.zeros(4)] * 50, dtype=object)
    arrays = {"x": rows} if name == "x" else {"x": blobs(100), "labels": np.array([None] * 100, dtype=object)}
    np.savez(tmp_path / "d.npz", **arrays)
    fix = "np.stack(rows).astype(np.float32)" if name == "x" else "np.asarray(labels, dtype=np.int64)"
    message = refused(vectors(tmp_path / "a.toml", tmp_path / "d.npz"), tmp_path / "run", "data.name",
                      f"its array {name!r} holds Python objects", f"np.savez(path, {name}={fix})")
    assert "allow_pickle" not in message
    with pytest.raises(DDMError, match=rf"^data.params.path: image array file .*: its array {name!r} holds Python "):
        load_dataset("image_array", 10, 5, params={"path": str(tmp_path / "d.npz")})


def test_an_array_with_a_test_fraction(tmp_path, monkeypatch, capsys):
    x = blobs(500)
    np.save(tmp_path / "x.npy", x)
    config = vectors(tmp_path / "a.toml", tmp_path / "x.npy", "{ test_fraction = 0.4 }", n_train=1000, n_test=0)
    runs(monkeypatch, capsys, config, tmp_path / "run")
    assert data_info(tmp_path / "run")["n_test"] == 200 and data_info(tmp_path / "run")["n_train"] == 300
    assert "(300 train, 200 test)" in (tmp_path / "run" / "report.md").read_text()  # the rows, not the config's 1000 / 0
    split = {s: load_tensors(tmp_path / "run" / "data" / f"{s}.safetensors")["x"].numpy() for s in ("train", "test")}
    together = np.concatenate([split["train"], split["test"]])  # the two splits are the file's rows, each once
    assert np.array_equal(together[np.lexsort(together.T)], x[np.lexsort(x.T)])
    # data.n_test takes at most the split; it never moves rows from the test split into training
    train, test = load_dataset(str(tmp_path / "x.npy"), 1000, 50, params={"test_fraction": 0.4})
    assert len(test) == 50 and len(train) == 300
    assert set(map(bytes, test.x.numpy())) <= set(map(bytes, split["test"]))
    with pytest.raises(DDMError, match="data.params.key: .* is a .npy file"):  # key names an array of an .npz
        load_dataset(str(tmp_path / "x.npy"), 1000, 50, params={"key": "x"})
    np.savez(tmp_path / "v.npz", x=x[:20], labels=np.arange(20) % 3 - 1)  # labels are class indices 0, 1, 2, ...
    with pytest.raises(DDMError, match="negative values"):
        load_dataset(str(tmp_path / "v.npz"), 1000, 5)


def shuffled(a: np.ndarray, b: np.ndarray) -> bool:
    """a holds b's rows in another order (a test split's rows are taken in a seeded random order)."""
    return not np.array_equal(a, b) and np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])])


def test_a_test_file_sorted_by_class_gives_a_test_split_in_random_order(tmp_path):
    """The held-out sets (W2 reference, noise floor, analyze's rows) are consecutive blocks of the test split;
    a test file sorted by class kept its order, so the floor compared one class with another (W2 0.52 -> 3.9)."""
    labels = np.repeat(np.arange(4), 50)
    x = (labels[:, None] * 3.0 + np.random.default_rng(0).normal(size=(200, 2))).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x, labels=labels)
    np.savez(tmp_path / "x.npz", x=x, labels=labels)
    train, test = load_dataset(str(tmp_path / "x.npz"), 0, 0, params={"test_path": str(tmp_path / "t.npz")})
    assert shuffled(test.x.numpy(), x) and sorted(test.labels.tolist()) == labels.tolist()
    assert len(set(test.labels[:50].tolist())) == 4  # the first block holds every class
    again = load_dataset(str(tmp_path / "x.npz"), 0, 0, params={"test_path": str(tmp_path / "t.npz")})[1]
    assert torch.equal(again.x, test.x)  # seeded
    assert np.array_equal(train.x.numpy(), x)  # the training rows keep the file's order


def test_an_array_with_a_test_file(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "x.npy", blobs(300))
    np.save(tmp_path / "t.npy", blobs(200, seed=1))
    config = vectors(tmp_path / "a.toml", tmp_path / "x.npy", f'{{ test_path = "{tmp_path / "t.npy"}" }}',
                     n_train=1000, n_test=0)
    runs(monkeypatch, capsys, config, tmp_path / "run")
    test = load_tensors(tmp_path / "run" / "data" / "test.safetensors")["x"].numpy()
    assert shuffled(test, blobs(200, seed=1)) and data_info(tmp_path / "run")["n_train"] == 300

    np.save(tmp_path / "t3.npy", blobs(150, seed=1, dim=3))
    config = vectors(tmp_path / "b.toml", tmp_path / "x.npy", f'{{ test_path = "{tmp_path / "t3.npy"}" }}')
    refused(config, tmp_path / "bad", "data.params.test_path", "(3,)", "(2,)")
    config = vectors(tmp_path / "c.toml", tmp_path / "x.npy",
                     f'{{ test_path = "{tmp_path / "t.npy"}", test_fraction = 0.1 }}')
    refused(config, tmp_path / "bad", "data.params.test_fraction", "test_path")


def test_a_resumed_run_notes_that_its_data_files_changed_since_it_loaded_them(tmp_path):
    """A run resumed after the user's array file was written again (the same shape and size) kept the data
    it had loaded, without a word."""
    from ddmkit.config import load_config
    from ddmkit.pipeline.prepare import prepare_run_dir

    np.save(tmp_path / "x.npy", blobs(300))
    cfg, run, said = load_config(vectors(tmp_path / "a.toml", tmp_path / "x.npy", n=30)), tmp_path / "run", []
    prepare_run_dir(run, cfg, log=said.append)
    kept = (run / "data" / "train.safetensors").read_bytes()
    prepare_run_dir(run, cfg, log=said.append)
    assert not [m for m in said if "have changed" in m], said
    np.save(tmp_path / "x.npy", blobs(300, seed=5))
    later = (tmp_path / "x.npy").stat().st_mtime_ns + 10**9  # a clock of coarse resolution sees a change too
    os.utime(tmp_path / "x.npy", ns=(later, later))
    prepare_run_dir(run, cfg, log=said.append)
    notes = [" ".join(m.split()) for m in said if "have changed" in m]
    assert len(notes) == 1 and f"data files ({tmp_path / 'x.npy'}) have changed since" in notes[0] \
        and "--out NEW_RUN" in notes[0], said
    assert (run / "data" / "train.safetensors").read_bytes() == kept


def test_an_image_folder_fingerprint_changes_with_its_images_only(tmp_path):
    from PIL import Image

    from ddmkit.data.source import source_fingerprint

    (tmp_path / "photos" / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "cats" / "a.png")
    params = {"path": str(tmp_path / "photos")}
    first = source_fingerprint("image_folder", params)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "cats" / "._a.png")  # hidden: the loaders skip it
    assert source_fingerprint("image_folder", params) == first
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "cats" / "b.png")
    assert source_fingerprint("image_folder", params) != first
    assert source_fingerprint("ring8", {}) is None and source_fingerprint("image_folder", {"path": "nowhere"}) is None


def test_an_idx_folder_fingerprint_changes_with_its_idx_files_only(tmp_path):
    """A run of IDX files had no fingerprint, so a resumed run whose files were written again said nothing."""
    from ddmkit.data.source import source_fingerprint

    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"1234")
    params = {"dir": str(tmp_path / "idx")}
    first = source_fingerprint("idx", params)
    (tmp_path / "idx" / "README.txt").write_text("not read")
    assert first is not None and source_fingerprint("idx", params) == first
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"12")
    assert source_fingerprint("idx", params) != first


def test_a_missing_relative_data_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A config's relative path is read from the folder ddmkit runs in, not the config's: the message only
    said the file does not exist."""
    monkeypatch.chdir(tmp_path)
    for name, params, field in (("data/x.npy", {}, "data.name"),
                                ("image_folder", {"path": "photos"}, "data.params.path"),
                                ("image_array", {"path": "x.npz"}, "data.params.path")):
        with pytest.raises(DDMError, match=rf"{re.escape(field)}: .*does not exist .*a relative path is read from the "
                                           rf"folder ddmkit runs in \({re.escape(str(tmp_path))}\)"):
            load_dataset(name, 10, 10, params=params)
    with pytest.raises(DDMError) as info:
        load_dataset(str(tmp_path / "x.npy"), 10, 10)
    assert "relative path" not in str(info.value)


def test_an_image_path_of_the_other_kind_names_the_loader_that_reads_it(tmp_path, monkeypatch):
    """image_folder given an image or an array file, and image_array given a folder, were said "not to exist (or
    not a folder / file)" with the relative-path hint, though the path is there; the message names what reads it,
    and that fix loads."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(5):
        Image.fromarray(np.full((4, 4), 50 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4), np.uint8))
    cases = {("image_folder", "photos/0.png"): ('photos/0.png is a file, not a folder: image_folder reads every image '
                                                'in a folder; name the folder (data.params.path = "photos")'),
             ("image_folder", "x.npy"): 'for an array of images set data.name = "image_array" (data.params.path = '
                                        '"x.npy")',
             ("image_array", "photos"): "'photos' is a folder, not an array file: for a folder of images set "
                                        'data.name = "image_folder" (data.params.path = "photos")'}
    for (name, path), said in cases.items():
        with pytest.raises(DDMError, match=re.escape(said)) as info:
            load_dataset(name, 0, 0, params={"path": path})
        assert "relative path" not in str(info.value)
    assert load_dataset("image_folder", 0, 0, params={"path": "photos"})[0].data_shape == (1, 4, 4)
    assert load_dataset("image_array", 0, 0, params={"path": "x.npy"})[0].data_shape == (1, 4, 4)


def test_data_paths_starting_with_a_tilde_are_read_as_a_shell_reads_them(tmp_path, monkeypatch):
    """`name = "~/data/x.npy"` (and an image folder's, image array's, test file's or IDX folder's "~/...")
    was said not to exist, while latent.pretrained, partition.encoder and the data's fingerprint expanded
    "~"; every data path now does."""
    from PIL import Image

    from test_images import write_idx_set

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    home.mkdir()
    np.save(home / "x.npy", blobs(400))
    np.save(home / "t.npy", blobs(100, seed=1))
    config = vectors(tmp_path / "a.toml", "~/x.npy", '{ test_path = "~/t.npy" }', n_test=0, n=40)
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 0 and "400 train / 100 test samples" in err and "changed" not in err, err
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 0 and "changed" not in err, err  # the same files: resumed, not called changed
    (home / "photos").mkdir()
    for i in range(4):
        Image.new("RGB", (4, 4), (60 * i, 0, 0)).save(home / "photos" / f"{i}.png")
    np.savez(home / "x.npz", x=np.zeros((4, 4, 4), np.uint8))
    write_idx_set(home / "fm", 8, 4)
    for name, params in (("image_folder", {"path": "~/photos"}), ("image_array", {"path": "~/x.npz"}),
                         ("idx", {"dir": "~/fm"})):
        train, test = load_dataset(name, 0, 0, params=params)
        assert len(train) + len(test) in (4, 12), name


def test_too_few_test_rows_fail_before_training_and_the_suggested_fix_runs(tmp_path, monkeypatch, capsys):
    """The case that used to fail at evaluation after training: a file's test split smaller than the
    evaluation needs. Now it fails at once; the sample.n the message suggests then runs."""
    np.save(tmp_path / "x.npy", blobs(400))
    config = vectors(tmp_path / "a.toml", tmp_path / "x.npy", "{ test_fraction = 0.2 }", n_test=0, n=200)
    message = refused(config, tmp_path / "run", "sample.n", "test split holds 80",
                      "data.params.test_fraction")
    fix = int(re.search(r"set sample\.n = (\d+)", message).group(1))
    config.write_text(config.read_text().replace("\nn = 200\n", f"\nn = {fix}\n"))
    metrics = runs(monkeypatch, capsys, config, tmp_path / "run")
    assert metrics["pairs"] * metrics["chunk"] * 2 <= 80


# ----- a dataset function -------------------------------------------------------------------------

USER_MODULE = '''
import numpy as np
import torch


def raises(n_train):
    raise ValueError("boom")


def raises_bare():
    raise ValueError("my loader failed")


def arrays(n_train, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + 300, 2)).astype("float32") * scale
    return x[:n_train], x[n_train:]


def tables(n_test=0):
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    return {"train": x, "test": x[:10] + 0.5, "train_labels": np.arange(20) % 2, "test_labels": np.zeros(10, int)}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3,), float(i)), i % 3


def datasets():
    return Pairs(12), Pairs(6)


def needs_path(path):
    return np.zeros((4, 2)), np.zeros((4, 2))


def bad_labels():
    return {"train": np.zeros((8, 2)), "test": np.zeros((4, 2)), "train_labels": np.zeros(7, int),
            "test_labels": np.zeros(4, int)}


def nan_values():
    return np.zeros((8, 2)), np.full((4, 2), np.nan)


def negative_labels():
    return {"train": np.zeros((8, 2)), "test": np.zeros((4, 2)), "train_labels": np.arange(8) - 1,
            "test_labels": np.zeros(4, int)}


def bool_labels():
    return {"train": np.zeros((8, 2)), "test": np.zeros((4, 2)), "train_labels": np.arange(8) % 2 == 1,
            "test_labels": torch.zeros(4, dtype=torch.bool)}


def other_shapes():
    return np.zeros((8, 2)), np.zeros((4, 3))


def images_0_255(vectors=False):
    x = np.random.default_rng(0).integers(0, 256, (12, 1, 4, 4)).astype("float32")
    return (x.reshape(12, 16), x[:4].reshape(4, 16)) if vectors else (x, x[:4] / 127.5 - 1)


def huge_float64():
    return np.full((8, 2), 1e39), np.zeros((4, 2))


def images_0_1():
    x = np.random.default_rng(0).random((12, 3, 4, 4)).astype("float32")  # torchvision's ToTensor range
    return x, x[:4]


def float_labels():
    return {"train": torch.zeros(8, 2), "test": torch.zeros(4, 2), "train_labels": torch.zeros(8),
            "test_labels": torch.zeros(4)}


def empty_images():
    return np.zeros((8, 3, 0, 4), "float32"), np.zeros((4, 3, 0, 4), "float32")


def grey_pixels():
    return np.zeros((8, 6, 6), np.uint8), np.zeros((4, 6, 6), np.uint8)


def rgb_pixels():
    return torch.zeros(8, 6, 6, 3, dtype=torch.uint8), torch.zeros(4, 6, 6, 3, dtype=torch.uint8)


class Endless(torch.utils.data.Dataset):
    """Items computed from the index, with no IndexError past len (numpy, reading it as a sequence, read it for
    ever); here it gives up after 100 reads past its end, so that the test ends."""

    def __init__(self):
        self.past = 0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.past += i >= 4
        if self.past > 100:
            raise RuntimeError("read past its end")
        return torch.full((2,), float(i))


def datasets_in_a_dict():
    return {"train": Endless(), "test": Endless()}


def object_rows():
    return np.array([np.zeros(2)] * 7 + [np.zeros(3)], dtype=object), np.zeros((4, 2))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """A module of the user's code in tmp_path, on sys.path; its name is unique to the test."""
    name = f"user_data_{request.node.name.split('[')[0]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_dataset_function_runs_end_to_end(tmp_path, monkeypatch, capsys, user_module):
    config = vectors(tmp_path / "f.toml", f"{user_module}:arrays", "{ scale = 2.0 }", n_train=400, n_test=0)
    runs(monkeypatch, capsys, config, tmp_path / "run")
    x = np.random.default_rng(0).normal(size=(700, 2)).astype("float32") * 2.0  # what the function returned
    train = load_tensors(tmp_path / "run" / "data" / "train.safetensors")["x"].numpy()
    test = load_tensors(tmp_path / "run" / "data" / "test.safetensors")["x"].numpy()
    assert np.array_equal(train, x[:400]) and shuffled(test, x[400:])
    # the run folder names the function only as a label: evaluating it again never imports it
    monkeypatch.delitem(sys.modules, user_module)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    code, err = cli("evaluate", tmp_path / "run")
    assert code == 0 and user_module not in sys.modules, err


def test_every_form_a_dataset_function_returns(user_module):
    train, test = load_dataset(f"{user_module}:tables", 100, 0)
    assert train.x.shape == (20, 2) and train.labels.tolist() == [i % 2 for i in range(20)]
    assert shuffled(test.x.numpy(), np.arange(20, dtype=np.float32).reshape(10, 2) + 0.5)
    train, test = load_dataset(f"{user_module}:datasets", 100, 0)
    assert torch.equal(train.x[:, 0], torch.arange(12.0)) and train.labels.tolist() == [i % 3 for i in range(12)]
    assert test.x.shape == (6, 3)
    train, test = load_dataset(f"{user_module}:datasets", 5, 2)  # at most n_train / n_test rows
    assert len(train) == 5 and len(test) == 2


def test_boolean_labels_from_a_function_are_classes_0_and_1_as_from_a_file(user_module):
    """A file's boolean labels were accepted, a function's refused."""
    train, test = load_dataset(f"{user_module}:bool_labels", 100, 100)
    assert train.labels.tolist() == [0, 1] * 4 and test.labels.tolist() == [0] * 4


@pytest.mark.parametrize("function, params, message", [
    ("nan_values", {}, "test split holds NaN"),
    ("other_shapes", {}, "train samples have shape (2,) but test samples (3,)"),
    ("bad_labels", {}, "train_labels has shape (7,); expected (8,), one label per train row"),
    ("float_labels", {}, "train_labels holds torch.float32 values; expected whole numbers 0, 1, 2, ... of an integer "
                         "type: return labels.astype(np.int64) (an array) or labels.long() (a tensor)"),  # said (8,)
    ("negative_labels", {}, "train_labels holds negative values (first rows: [0])"),  # accepted, failing later
    ("needs_path", {}, "its argument 'path' has no default"),
    ("arrays", {"scael": 2.0}, "data.params.scael: "),
    ("arrays", {"scael": 2.0}, "the arguments data.params may set: scale (n_train, n_test, seed come from"),
    ("arrays", {"seed": 3}, "data.params.seed: set by ddmkit"),
    ("missing", {}, "has no 'missing'"),
    ("nope", {}, "has no 'nope'\n"),  # no "did you mean 'np'?", the numpy the module imports
    ("raises", {}, 'py:7 (raise ValueError("boom")) when called with n_train'),  # the user's line that raised
    ("raises_bare", {}, 'py:11 (raise ValueError("my loader failed")) when called with no arguments'),  # it ended
    ("datasets_in_a_dict", {}, "the train split is a torch Dataset (Endless); return both splits as Datasets, "
                               "(train_dataset, test_dataset)"),  # numpy read it as a sequence, for ever
    ("grey_pixels", {}, "the train split is uint8 of shape (8, 6, 6), images by the look of it, which would train "
                        "as vectors of 0 .. 255: return float images (N, C, H, W) in [-1, 1], e.g. x[:, None] / "
                        "127.5 - 1"),  # trained as vectors of 0 .. 255
    ("rgb_pixels", {}, "e.g. x.permute(0, 3, 1, 2) / 127.5 - 1 (an array: x.transpose(0, 3, 1, 2))"),
    ("object_rows", {}, "the train split is ndarray of object; expected a numeric array or tensor (floats or "
                        "integers: e.g. np.stack(rows).astype(np.float32))"),  # "is ndarray": of what?
])
def test_a_bad_dataset_function_is_named(user_module, function, params, message):
    with pytest.raises(DDMError) as info:
        load_dataset(f"{user_module}:{function}", 100, 0, params=params)
    assert message in str(info.value) + "\n" and f"{user_module}" in str(info.value)


def test_images_from_a_function_outside_minus_1_1_are_refused_and_vectors_are_not(tmp_path, monkeypatch, capsys,
                                                                                   user_module):
    """(N, C, H, W) in 0..255 from a function would give FID in the millions: refused at once (exit 2),
    naming the function, the split and the scaling that fixes it; the same values as vectors pass."""
    with pytest.raises(DDMError, match=rf"data.name = '{user_module}:images_0_255': the train split: images "
                                       r"\(N, C, H, W\) must lie in \[-1, 1\]; found values from 0 to 255.*x / 127.5 - 1"):
        load_dataset(f"{user_module}:images_0_255", 0, 0)
    train, _ = load_dataset(f"{user_module}:images_0_255", 0, 0, params={"vectors": True})
    assert train.x.shape == (12, 16) and train.x.max() == 255
    config = vectors(tmp_path / "f.toml", f"{user_module}:images_0_255")
    refused(config, tmp_path / "run", "images_0_255", "[-1, 1]", "x / 127.5 - 1")


def test_samples_of_no_values_are_refused_on_every_route(tmp_path, monkeypatch, capsys, user_module):
    """Samples with an axis of length 0 (a slice past the end) crashed in the image range check (a traceback,
    exit 1) or got a message about the MLP's weights: an array file, an image array and a function are
    refused naming the source and the samples' shape, exit 2, nothing written."""
    np.save(tmp_path / "images.npy", np.zeros((8, 3, 0, 4), "float32"))
    np.save(tmp_path / "vectors.npy", np.zeros((8, 0), "float32"))
    said = "hold no values (an axis of length 0"
    with pytest.raises(DDMError, match=r"data.name: data file .*images.npy'?: its samples, of shape \(3, 0, 4\), "):
        load_dataset(str(tmp_path / "images.npy"), 0, 0)
    with pytest.raises(DDMError, match=r"data.params.path: image array file .*images.npy'?: its samples, of shape"):
        load_dataset("image_array", 0, 0, params={"path": str(tmp_path / "images.npy")})
    with pytest.raises(DDMError, match=rf"data.name = '{user_module}:empty_images': the train split: its samples"):
        load_dataset(f"{user_module}:empty_images", 0, 0)
    refused(vectors(tmp_path / "v.toml", tmp_path / "vectors.npy"), tmp_path / "run", "vectors.npy", said, "(0,)")
    refused(vectors(tmp_path / "i.toml", tmp_path / "images.npy"), tmp_path / "run", "images.npy", said)


def test_an_image_array_file_outside_minus_1_1_is_refused(tmp_path, monkeypatch, capsys):
    """An .npy of (N, C, H, W) images in 0..255, named as data.name or as test_path: refused naming the file;
    a 2-D file of the same values is vectors, and passes."""
    x = np.random.default_rng(0).integers(0, 256, (20, 3, 4, 4)).astype("float32")
    np.save(tmp_path / "images.npy", x)
    np.save(tmp_path / "scaled.npy", x / 127.5 - 1)
    np.save(tmp_path / "vectors.npy", x.reshape(20, -1))
    with pytest.raises(DDMError, match=r"data.name: data file .*images.npy'?: images \(N, C, H, W\) must lie in "
                                       r"\[-1, 1\]; found values from 0 to 255 .*np.save\(path, x / 127.5 - 1\)"):
        load_dataset(str(tmp_path / "images.npy"), 0, 0)
    with pytest.raises(DDMError, match=r"data.params.test_path: data file .*images.npy"):
        load_dataset(str(tmp_path / "scaled.npy"), 0, 0, params={"test_path": str(tmp_path / "images.npy")})
    assert load_dataset(str(tmp_path / "scaled.npy"), 0, 0)[0].x.shape[1:] == (3, 4, 4)
    assert load_dataset(str(tmp_path / "vectors.npy"), 0, 0)[0].x.max() == 255
    config = vectors(tmp_path / "a.toml", tmp_path / "images.npy")
    refused(config, tmp_path / "run", "images.npy", "[-1, 1]", "x / 127.5 - 1")


def test_images_in_0_1_are_warned_of_on_every_route_and_uint8_pixels_are_not(tmp_path, user_module):
    """Float images in [0, 1] (ToTensor's) were taken as [-1, 1] images without a word: an array file, an
    image array and a function warn, naming the source and the mapping; [-1, 1] images, uint8 pixels that
    ddmkit scales itself and vectors do not."""
    import warnings

    x = np.random.default_rng(0).random((20, 3, 4, 4)).astype("float32")
    np.save(tmp_path / "unit.npy", x)
    warning = r"the images' values lie in \[0, 1\] \(from 0.0\d+ to 0.9\d+\); ddmkit images are in \[-1, 1\].*map " \
              r"them with x \* 2 - 1"
    with pytest.warns(UserWarning, match=rf"data.name: data file .*unit.npy'?: {warning}"):
        load_dataset(str(tmp_path / "unit.npy"), 0, 0)
    with pytest.warns(UserWarning, match=rf"image array file .*unit.npy'?: {warning}"):
        load_dataset("image_array", 0, 0, params={"path": str(tmp_path / "unit.npy")})
    with pytest.warns(UserWarning, match=rf"data.name = '{user_module}:images_0_1': the (train|test) split: {warning}"):
        load_dataset(f"{user_module}:images_0_1", 0, 0)
    np.save(tmp_path / "mapped.npy", x * 2 - 1)
    np.save(tmp_path / "pixels.npy", (x * 255).astype(np.uint8).transpose(0, 2, 3, 1))
    np.save(tmp_path / "vectors.npy", x.reshape(20, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(str(tmp_path / "mapped.npy"), 0, 0)
        load_dataset("image_array", 0, 0, params={"path": str(tmp_path / "mapped.npy")})
        load_dataset("image_array", 0, 0, params={"path": str(tmp_path / "pixels.npy")})
        load_dataset(str(tmp_path / "vectors.npy"), 0, 0)


def test_finite_values_beyond_float32_are_named_as_such(tmp_path, user_module):
    """1e39 in a float64 file or function is finite: the message says it exceeds float32's range (not "NaN or
    infinite"), and numpy's overflow warning never shows."""
    import warnings

    np.save(tmp_path / "x.npy", np.concatenate([np.zeros((5, 2)), np.full((3, 2), -1e39)]))
    np.save(tmp_path / "images.npy", np.full((4, 1, 4, 4), 1e39))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DDMError, match=r"data file .*x.npy'?: values exceed float32's range \(up to 1e\+39; .*"
                                           r"first bad rows: \[5, 6, 7\]\)"):
            load_dataset(str(tmp_path / "x.npy"), 0, 0)
        with pytest.raises(DDMError, match="images.npy'?: values exceed float32's range"):
            load_dataset("image_array", 0, 0, params={"path": str(tmp_path / "images.npy")})
        with pytest.raises(DDMError, match="huge_float64': the train split: values exceed float32's range"):
            load_dataset(f"{user_module}:huge_float64", 0, 0)


def test_an_unimportable_function_exits_2_with_the_fix(tmp_path, monkeypatch, capsys):
    config = vectors(tmp_path / "f.toml", "no_such_package.data:load")
    refused(config, tmp_path / "run", "data.name = 'no_such_package.data:load'",
            "there is no module 'no_such_package.data'", "PYTHONPATH")


# ----- image folders of any size ------------------------------------------------------------------

def write_folder(root, sizes=((20, 16), (16, 24), (18, 18)), n=60):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        pixels = np.clip((40 if i % 2 else 200) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "ab"[i % 2] / f"{i:03d}.png")


def test_an_image_folder_of_mixed_sizes_runs_after_the_suggested_fixes(tmp_path, monkeypatch, capsys):
    """A folder of three sizes is refused naming two files and suggesting resize and crop; with them,
    a KID subset larger than the samples is refused with the value to use; with that, it runs."""
    write_folder(tmp_path / "imgs")
    config = tmp_path / "i.toml"
    config.write_text(IMAGES.replace("{params}", f'{{ path = "{tmp_path / "imgs"}" }}')
                      .replace("{kid_subset}", "100"))
    message = refused(config, tmp_path / "run", "different sizes", "a/000.png: 20x16", "a/002.png: 18x18",
                      "data.params.resize", "data.params.crop")
    resize, crop = re.search(r"set data\.params\.resize = (\d+) and data\.params\.crop = (\d+)", message).groups()
    config.write_text(config.read_text().replace(f'"{tmp_path / "imgs"}"',
                                                 f'"{tmp_path / "imgs"}", resize = {resize}, crop = {crop}'))
    message = refused(config, tmp_path / "run", "evaluate.kid_subset = 100", "sample.n = 8")
    kid = re.search(r"set evaluate\.kid_subset = (\d+)", message).group(1)
    config.write_text(config.read_text().replace("kid_subset = 100", f"kid_subset = {kid}"))
    metrics = runs(monkeypatch, capsys, config, tmp_path / "run")
    assert data_info(tmp_path / "run")["data_shape"] == [3, 16, 16] and np.isfinite(metrics["rows"]["top-1"]["fid"])
    assert data_info(tmp_path / "run")["classes"] == ["a", "b"]  # label i is folder classes[i]


PIXELS = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3))


@pytest.mark.parametrize("x, fix, message", [
    (PIXELS, lambda x: x.astype(np.uint8), "got int64 (20, 6, 6, 3) with values 0 .. 255: save them as uint8, "
                                           "x.astype(np.uint8)"),
    (PIXELS.astype(np.uint16) * 257, lambda x: (x / 257).round().astype(np.uint8),
     "16-bit pixels: (x / 257).round().astype(np.uint8)"),
    (np.concatenate([PIXELS, PIXELS[..., :1]], 3).astype(np.uint8), lambda x: x[..., :3],
     r"got (20, 6, 6, 4) (RGBA? drop the alpha channel: x[..., :3])"),
    (PIXELS[..., 0] / 127.5 - 1, lambda x: x[:, None], "(float grey images (N, H, W)? give x[:, None], (N, 1, H, W))"),
])
def test_an_image_array_of_another_layout_is_refused_with_a_fix_that_works(tmp_path, x, fix, message):
    """int64 pixels (np.array of Python ints), 16-bit pixels, RGBA pixels and float grey images without their
    channel axis were refused as not uint8 (N, H, W[, C]) or float (N, C, H, W), with no fix and no field."""
    config = tmp_path / "a.toml"
    config.write_text(f'[data]\nname = "image_array"\nparams = {{ path = "{tmp_path / "a.npy"}" }}\n'
                      "[partition]\nk = 2\n[sample]\nn = 8\n[evaluate]\nkid_subset = 4\n")
    np.save(tmp_path / "a.npy", x)
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 2 and f"data.params.path: image array file '{tmp_path / 'a.npy'}'" in err and message in err, err
    assert not (tmp_path / "run").exists()
    np.save(tmp_path / "a.npy", fix(x))
    code, err = cli("partition", "--config", config, "--out", tmp_path / "run")
    assert code == 0, err


def damaged_images() -> dict[str, bytes]:
    """Files that Pillow raises other errors than OSError for: a PNG whose image data breaks off into a
    chunk of no valid type (SyntaxError), a BMP header claiming 10^10 pixels (DecompressionBombError); and a
    truncated PNG (OSError)."""
    import io
    import struct
    import zlib

    from PIL import Image

    def encoded(pixels, kind):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, kind)
        return out.getvalue()

    png = encoded(np.arange(256, dtype=np.uint8).reshape(16, 16), "PNG")
    at = png.index(b"IDAT") - 4
    half = png[at + 8:at + 8 + struct.unpack(">I", png[at:at + 4])[0] // 2]
    broken = (png[:at] + struct.pack(">I", len(half)) + b"IDAT" + half + struct.pack(">I", zlib.crc32(b"IDAT" + half))
              + b"\x00\x00\x00\x10\xd0\xfa\x1a\xb5")
    bmp = bytearray(encoded(np.zeros((4, 4, 3), np.uint8), "BMP"))
    bmp[18:26] = struct.pack("<ii", 100000, 100000)  # width, height
    return {"broken.png": broken, "bomb.bmp": bytes(bmp), "truncated.png": png[:40]}


def test_damaged_image_files_are_named_together_and_the_folder_runs_without_them(tmp_path, monkeypatch, capsys):
    """A PNG broken inside its image data or a BMP header of billions of pixels stopped the run with a Pillow
    traceback (only OSError was caught); several damaged files were named one per run."""
    write_folder(tmp_path / "imgs", sizes=((16, 16),))
    config = tmp_path / "i.toml"
    config.write_text(IMAGES.replace("{params}", f'{{ path = "{tmp_path / "imgs"}" }}').replace("{kid_subset}", "4"))
    for name, data in damaged_images().items():
        (tmp_path / "imgs" / "a" / name).write_bytes(data)
        if name == "broken.png":
            refused(config, tmp_path / "run", "a/broken.png: not a readable image (broken PNG file",
                    "remove or replace the file")
    message = refused(config, tmp_path / "run", "3 of its 63 image files are not readable images",
                      "a/bomb.bmp: too large to read safely: 10,000,000,000 pixels", "a/broken.png: broken PNG file",
                      "a/truncated.png: ", "remove or replace them")
    for name in re.findall(r"(/[^\s(;]+/a/[^\s;]+\.(?:png|bmp)): ", message):
        os.remove(name)
    assert np.isfinite(runs(monkeypatch, capsys, config, tmp_path / "run")["rows"]["top-1"]["fid"])


def test_class_conditional_networks_are_checked_against_the_labels_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    """Two class folders (labels 0, 1): num_classes = 1 leaves label 1 outside the networks' table (and 2
    rows of the other class would be its "no label" token); a folder without classes has no labels. Each
    message names both networks (it named the expert's alone, and then the router's)."""
    write_folder(tmp_path / "imgs", sizes=((16, 16),))
    config = tmp_path / "c.toml"
    base = IMAGES.replace("{params}", f'{{ path = "{tmp_path / "imgs"}" }}').replace("{kid_subset}", "4")
    conditional = base.replace("attention_res = [] }", "attention_res = [], num_classes = {c} }").replace(
        "kwargs = { channels = [8, 16] }", "kwargs = { channels = [8, 16], num_classes = {c} }")
    config.write_text(conditional.replace("{c}", "1"))
    refused(config, tmp_path / "run", "expert.net.kwargs.num_classes = 1 and router.net.kwargs.num_classes = 1",
            "labels run 0 .. 1", "set num_classes = 2 (--set expert.net.kwargs.num_classes=2 --set "
            "router.net.kwargs.num_classes=2)")
    (tmp_path / "flat").mkdir()
    for png in (tmp_path / "imgs").rglob("*.png"):
        png.rename(tmp_path / "flat" / png.name)
    config.write_text(conditional.replace("{c}", "2").replace(str(tmp_path / "imgs"), str(tmp_path / "flat")))
    refused(config, tmp_path / "run", "no class labels, but these settings need them: expert.net.kwargs.num_classes "
            "= 2 (remove it), router.net.kwargs.num_classes = 2 (remove it);")


def test_resize_and_crop_are_the_centre_and_bicubic_of_pil(tmp_path):
    from PIL import Image

    from ddmkit.data.images import read_image

    pixels = np.arange(40 * 30, dtype=np.uint8).reshape(40, 30)  # every pixel its own value
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png", crop=20), pixels[10:30, 5:25])
    assert np.array_equal(read_image(tmp_path / "a.png", crop=19), pixels[10:29, 5:24])  # odd margins: floor
    assert np.array_equal(read_image(tmp_path / "a.png", resize=30, crop=30), pixels[5:35])  # 30: no scaling
    shrunk = np.asarray(Image.fromarray(pixels).resize((15, 20), Image.Resampling.BICUBIC))
    assert np.array_equal(read_image(tmp_path / "a.png", resize=15), shrunk)
    assert read_image(tmp_path / "a.png", mode="rgb").shape == (40, 30, 3)
    with pytest.raises(DDMError, match=r"^data.params.crop = 32: .*a.png \(height x width: 40x30\) is smaller than 32; "
                                       "set data.params.resize = 32"):
        read_image(tmp_path / "a.png", crop=32)


def test_an_image_array_takes_crop_and_resize(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 12, 20, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    train, test = load_dataset("image_array", 100, 0, params={"path": str(tmp_path / "x.npy"), "crop": 8})
    full, _ = load_dataset("image_array", 100, 0, params={"path": str(tmp_path / "x.npy")})
    assert torch.equal(train.x, full.x[..., 2:10, 6:14])
    train, _ = load_dataset("image_array", 100, 0, params={"path": str(tmp_path / "x.npy"), "resize": 6, "crop": 6})
    assert train.x.shape[1:] == (3, 6, 6) and train.x.abs().max() <= 1
    with pytest.raises(DDMError, match=r"^data.params.crop = 16: the images of image array file '.*x.npy' \(height x "
                                       r"width: 12x20\) are smaller than 16; set data.params.resize = 16"):
        load_dataset("image_array", 100, 0, params={"path": str(tmp_path / "x.npy"), "crop": 16})


def test_a_folder_mixing_grey_and_colour_needs_a_mode(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DDMError, match='data.params.mode = "rgb"'):
        load_dataset("image_folder", 10, 10, params={"path": str(tmp_path)})
    for mode, channels in (("rgb", 3), ("grey", 1)):
        train, test = load_dataset("image_folder", 10, 10, params={"path": str(tmp_path), "mode": mode})
        assert train.x.shape[1] == channels == test.x.shape[1]
    with pytest.raises(DDMError, match="data.params.mode: unknown 'gray'; accepted: auto, rgb, grey"):
        load_dataset("image_folder", 10, 10, params={"path": str(tmp_path), "mode": "gray"})


# ----- the early checks ---------------------------------------------------------------------------

def config(**sections) -> RunConfig:
    return validate(RunConfig, sections)


@pytest.mark.parametrize("n, chunk", [(100, 50), (99, 50), (30, 50), (1, 10), (1000, 300)])
def test_held_out_rows_is_what_the_evaluation_takes(n, chunk):
    """Exactly held_out_rows(n, chunk) test rows let evaluate_all score n samples on all their pairs; with
    one fewer it scores one pair fewer (samples drawn with `ddmkit sample --n` above the config's sample.n),
    and with fewer than one pair's worth it refuses, naming a chunk that fits."""
    from ddmkit.evaluation.sets import evaluate_all

    need = held_out_rows(n, chunk)
    samples = {"a": torch.randn(n, 2, generator=torch.Generator().manual_seed(0))}
    pairs = evaluate_all(samples, {}, torch.randn(need, 2), None, chunk)["pairs"]
    assert 2 * pairs * min(chunk, n) == need
    if pairs > 1:
        assert evaluate_all(samples, {}, torch.randn(need - 1, 2), None, chunk)["pairs"] == pairs - 1
    c = min(chunk, n)
    with pytest.raises(DDMError, match=rf"the test split has {2 * c - 1}; lower evaluate.chunk to {c - 1} or less"):
        evaluate_all(samples, {}, torch.randn(2 * c - 1, 2), None, chunk)
    fix = largest_n(need - 1, chunk, n)
    assert held_out_rows(fix, chunk) <= need - 1 < held_out_rows(fix + 1, chunk)


def test_the_studies_and_the_sweep_are_checked():
    """With smaller extra sets (sweep_n) the main rows need fewer test rows than the studies."""
    sample = {"n": 300, "sweep_n": 100, "stats_router_strategies": ["top-1"], "strategies": ["top-1"]}
    with pytest.raises(DDMError, match=r"studies \(300 samples each\) against 600 .* set sample.n = 249 or lower"):
        check_run_plan(config(sample=sample, evaluate={"chunk": 50}), 100, 400, (2,), False)
    check_run_plan(config(sample={**sample, "n": 249}, evaluate={"chunk": 50}), 100, 400, (2,), False)
    check_run_plan(config(sample=sample, evaluate={"chunk": 50, "missing_experts": False, "stats_router": False}),
                   100, 400, (2,), False)
    sweep = config(sample={"n": 16, "sweep_n": 32, "guidance_sweep": [2.0]})
    with pytest.raises(DDMError, match="sample.sweep_n = 32 is larger than sample.n = 16 .*set sample.sweep_n = 16"):
        check_run_plan(sweep, 100, 100, (1, 8, 8), False)
    with pytest.raises(DDMError, match="sample.strategies: no sample set"):
        check_run_plan(config(sample={"strategies": ["monolith"]}, monolith={"enabled": False}), 100, 100, (2,), False)


def test_small_clusters_warn_and_a_lone_row_needs_no_statistics_router():
    cfg = config(expert={"train": {"batch_size": 64}})
    assert check_clusters(cfg, [100, 100], (2,)) == []
    assert "clusters [1] hold fewer rows than expert.train.batch_size = 64 (the smallest holds 10)" in \
        check_clusters(cfg, [100, 10], (2,))[0]
    with pytest.raises(DDMError, match="evaluate.stats_router = false"):
        check_clusters(cfg, [100, 1], (2,))
    check_clusters(config(evaluate={"stats_router": False}), [100, 1], (2,))


def test_a_lone_row_is_refused_when_a_vector_run_samples_sets_with_the_statistics_only_router():
    """sample.stats_router_strategies draws sets with the statistics-only router on vectors too: a cluster of one row
    was let through with evaluate.stats_router = false and failed after training, at sampling."""
    sets = {"stats_router_strategies": ["top-2"]}
    with pytest.raises(DDMError, match=r"or set sample.stats_router_strategies = \[\]$"):
        check_clusters(config(sample=sets, evaluate={"stats_router": False}), [100, 1], (2,))
    with pytest.raises(DDMError, match=r"set sample.stats_router_strategies = \[\] and evaluate.stats_router = false"):
        check_clusters(config(sample=sets), [100, 1], (2,))
    with pytest.raises(DDMError, match=r"or set sample.stats_router_strategies = \[\]$"):
        check_clusters(config(sample=sets), [100, 1], (1, 8, 8))  # images: evaluate.stats_router is not theirs
    check_clusters(config(evaluate={"stats_router": False}), [100, 1], (2,))
    check_clusters(config(), [100, 1], (1, 8, 8))


def test_partition_settings_the_features_ignore_are_warned_of_before_anything_is_written(tmp_path):
    """partition.pca_dim with features = 'identity' (or encoder_* without the encoder) changed nothing and
    said nothing."""
    from ddmkit.pipeline.checks import unused_partition_settings
    from ddmkit.pipeline.prepare import prepare_run_dir

    assert unused_partition_settings(config()) == []
    assert unused_partition_settings(config(partition={"features": "pca", "pca_dim": 4})) == []
    assert unused_partition_settings(config(partition={"pca_dim": 4, "encoder_pool": "mean", "encoder_batch": 8})) == [
        "partition.pca_dim = 4 only applies with partition.features = 'pca' (it is 'identity'), so it changes "
        "nothing; set features = 'pca' or remove it",
        "partition.encoder_pool = 'mean', partition.encoder_batch = 8 only apply with partition.features = "
        "'encoder' (it is 'identity'), so they change nothing; set features = 'encoder' or remove them"]
    said = []
    cfg = config(data={"name": "ring8", "n_train": 400, "n_test": 400}, partition={"k": 2, "pca_dim": 4},
                 sample={"n": 200})
    prepare_run_dir(tmp_path / "run", cfg, log=said.append)
    assert any(line.startswith("warning: partition.pca_dim = 4 only applies") for line in said), said


def test_a_lone_outlier_fails_at_once_and_the_suggested_setting_runs(tmp_path, monkeypatch, capsys):
    x = blobs(500)
    x[0] = [600.0, 600.0]  # k-means gives it a cluster of its own: no covariance for the statistics router
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", blobs(200, seed=1))
    cfg = vectors(tmp_path / "o.toml", tmp_path / "x.npy", f'{{ test_path = "{tmp_path / "t.npy"}" }}', n_test=0,
                  n_train=1000, stats_router="true")
    message = refused(cfg, tmp_path / "run", "fewer than 2 rows", "evaluate.stats_router")
    setting = re.search(r"set evaluate\.stats_router = (\w+)", message).group(1)
    cfg.write_text(cfg.read_text().replace("stats_router = true", f"stats_router = {setting}"))
    runs(monkeypatch, capsys, cfg, tmp_path / "run")


def test_clusters_without_a_mixture_component_fail_at_once(tmp_path, monkeypatch, capsys):
    """Three clusters of a two-component mixture: the exact rows could not be drawn after training."""
    cfg = vectors(tmp_path / "m.toml", "mixture", "{ means = [[-3.0, 0.0], [3.0, 0.0]], std = 0.3 }", k=3)
    message = refused(cfg, tmp_path / "run", "own no component", "partition.k")
    k = re.search(r"set partition\.k = (\d+)", message).group(1)
    cfg.write_text(cfg.read_text().replace("k = 3", f"k = {k}"))
    assert "exact (full, exact experts + router)" in runs(monkeypatch, capsys, cfg, tmp_path / "run")["rows"]


def test_an_npz_saved_labels_first_gives_its_data_array():
    """np.savez(F, labels=..., points=...) read the labels as the data (the first array): "got shape (N,)"."""
    import tempfile
    from pathlib import Path

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        points, labels = rng.normal(size=(40, 3)).astype(np.float32), np.arange(40) % 2
        np.savez(Path(tmp) / "v.npz", labels=labels, points=points)
        train, test = load_dataset(str(Path(tmp) / "v.npz"), 0, 0, params={"test_fraction": 0.25})
        assert train.data_shape == (3,) and len(train) + len(test) == 40 and train.labels is not None
        images = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
        np.savez(Path(tmp) / "i.npz", labels=np.arange(12) % 3, pictures=images)
        train, test = load_dataset("image_array", 0, 0, 0, path=str(Path(tmp) / "i.npz"))
        assert train.data_shape == (3, 8, 8) and train.labels is not None


def test_an_npz_of_labels_only_says_it_holds_no_samples(tmp_path):
    """An .npz of 'labels' alone was read as the samples, then "save it as (N, 1)"; the missing-key message listed
    'labels' among the arrays to read as data."""
    np.savez(tmp_path / "l.npz", labels=np.arange(10) % 2)
    np.savez(tmp_path / "t.npz", y=np.arange(10) % 2, targets=np.arange(10) % 2)
    np.savez(tmp_path / "v.npz", x=np.ones((10, 2), np.float32), labels=np.arange(10) % 2)
    for name, only, fix in (("l", "'labels'", "labels=labels"), ("t", "'y', 'targets'", "labels=y")):
        said = (rf"data file '.*{name}.npz' holds no sample array, only labels \({only}\): save the samples under "
                rf"'x', np.savez\(path, x=x, {fix}\)")
        with pytest.raises(DDMError, match=said):
            load_dataset(str(tmp_path / f"{name}.npz"), 0, 0)
        with pytest.raises(DDMError, match=said.replace("data file", "image array file")):
            load_dataset("image_array", 0, 0, 0, path=str(tmp_path / f"{name}.npz"))
    for key, said in (("z", "holds no array 'z'"), ("labels", "the array 'labels' of .* holds the labels, not samples")):
        with pytest.raises(DDMError, match=rf"data.params.key: .*{said}; accepted: x$"):
            load_dataset(str(tmp_path / "v.npz"), 0, 0, params={"key": key})
    np.savez(tmp_path / "y.npz", y=np.ones((10, 2), np.float32))  # a 'y' of vectors is still read as the samples
    assert load_dataset(str(tmp_path / "y.npz"), 0, 0)[0].data_shape == (2,)


def test_an_npz_whose_arrays_are_not_all_read_says_which_are_left_out(tmp_path):
    """np.savez(path, train=..., test=...) trained on 'train' alone and np.savez(path, x=..., y=...) without labels,
    without a word; a warning names the arrays left out and the setting that reads them. A file read whole (x and
    labels), or one whose array is chosen by data.params.key, says nothing."""
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    np.savez(tmp_path / "tt.npz", train=x, test=x[:5])
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(20) % 2)
    np.savez(tmp_path / "xl.npz", x=x, labels=np.arange(20) % 2)
    np.savez(tmp_path / "im.npz", train=np.zeros((10, 4, 4), np.uint8), test=np.zeros((5, 4, 4), np.uint8))
    cases = {("tt.npz", None): "holds 2 arrays: 'train' is read as the samples, and 'test' not read; to read another "
                               "as the samples, set data.params.key",
             ("xy.npz", None): "'y' not read; labels are read only from an array named 'labels': np.savez(path, x=x, "
                               "labels=y)",
             ("im.npz", "image_array"): "'test' not read; image_array reads the images of 'x'"}
    for (name, loader), said in cases.items():
        with pytest.warns(UserWarning, match=re.escape(said)):
            if loader:
                load_dataset(loader, 0, 0, params={"path": str(tmp_path / name)})
            else:
                load_dataset(str(tmp_path / name), 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(str(tmp_path / "xl.npz"), 0, 0)[0].labels is not None
        assert load_dataset(str(tmp_path / "tt.npz"), 0, 0, params={"key": "test"})[0].data_shape == (2,)


def test_a_file_of_one_row_is_refused_before_the_split(tmp_path):
    """A one-row file gave a test split of 0 rows and a training split of 1, then a partition.k error; with
    test_path every row trains, so one row is the partition's to judge."""
    np.save(tmp_path / "one.npy", np.ones((1, 2), np.float32))
    with pytest.raises(DDMError, match=r"data file '.*one.npy' holds 1 row; splitting it .* needs 2 rows or more: "
                                       r"add rows, or give the test rows a file of their own"):
        load_dataset(str(tmp_path / "one.npy"), 0, 0)
    np.save(tmp_path / "two.npy", np.ones((2, 2), np.float32))
    assert [len(s) for s in load_dataset(str(tmp_path / "two.npy"), 0, 0)] == [1, 1]
    assert len(load_dataset(str(tmp_path / "one.npy"), 0, 0, params={"test_path": str(tmp_path / "two.npy")})[0]) == 1
    np.save(tmp_path / "image.npy", np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(DDMError, match=r"image array file '.*image.npy' holds 1 row; .*: add images$"):
        load_dataset("image_array", 0, 0, 0, path=str(tmp_path / "image.npy"))
    from ddmkit.data.arrays import check_rows_to_split
    with pytest.raises(DDMError, match=r"^rows given holds 0 rows; "):
        check_rows_to_split(0, "rows given")
