"""Partition on a pretrained image encoder (tiny DINOv2 and CLIP folders) and two-stage k-means."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from ddmkit.data import ArrayData
from ddmkit.data.encoder import encode, encoder_spec
from ddmkit.data.partition import compute_partition, feature_map, load_partition, partition_data
from ddmkit.ddm.load import nearest_cluster_fn
from ddmkit.errors import DDMError
from ddmkit.io import sha256_file

transformers = pytest.importorskip("transformers")
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny saved encoders: DINOv2 with its image processor's preprocessor_config.json, a full
    CLIPModel, and a non-vision model (BERT)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(root / "dino")
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=MEAN, image_std=STD).save_pretrained(root / "dino")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = transformers.CLIPConfig(vision_config={**TINY, "image_size": 16}, text_config=text, projection_dim=16)
    transformers.CLIPModel(clip).save_pretrained(root / "clip")
    transformers.BertModel(transformers.BertConfig(**{k: v for k, v in text.items() if "token" not in k}),
                           add_pooling_layer=False).save_pretrained(root / "bert")
    return root


def images(n=12, c=3, side=32, seed=0):
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_dinov2_features_equal_a_direct_transformers_computation(folders):
    """Same-size images: the folder's image processor (no resize, no rescale) and the model's
    pooler_output (cls) or mean patch token (mean), L2-normalised."""
    x = images()
    proc = transformers.AutoImageProcessor.from_pretrained(folders / "dino")
    u = ((x + 1) / 2).permute(0, 2, 3, 1).numpy()
    pixels = proc(images=list(u), do_resize=False, do_center_crop=False, do_rescale=False,
                  return_tensors="pt")["pixel_values"]
    model = transformers.Dinov2Model.from_pretrained(folders / "dino").eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    for pool, ref in (("cls", out.pooler_output), ("mean", out.last_hidden_state[:, 1:].mean(1))):
        spec = encoder_spec(folders / "dino", pool=pool)
        assert spec["size"] == 32 and spec["model_type"] == "dinov2"
        ref = ref / ref.norm(dim=1, keepdim=True)
        assert torch.allclose(encode(spec, x, batch=5), ref, atol=1e-5)
    raw = encode(encoder_spec(folders / "dino", normalize=False), x)
    assert torch.allclose(raw, out.pooler_output, atol=1e-5)


def test_full_clip_folder_uses_its_image_embedding_with_imagenet_defaults(folders):
    """No preprocessor_config.json: ImageNet mean/std, the vision config's image_size (16)."""
    x = images(side=16)
    model = transformers.CLIPModel.from_pretrained(folders / "clip").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=((x + 1) / 2 - mean) / std)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    spec = encoder_spec(folders / "clip", normalize=False)
    assert spec["size"] == 16 and spec["model_type"] == "clip"
    assert torch.allclose(encode(spec, x), ref, atol=1e-5)


def test_grey_images_are_three_equal_channels_and_any_size_is_resized(folders):
    spec = encoder_spec(folders / "dino")
    grey = images(c=1, side=8)
    assert torch.allclose(encode(spec, grey), encode(spec, grey.repeat(1, 3, 1, 1)), atol=1e-6)
    assert encode(spec, grey).shape == (12, 32)


def separable_images(n=24):
    """Two kinds of images: dark with a bright left half, bright with a dark left half."""
    x = -0.8 * torch.ones(n, 1, 16, 16)
    x[: n // 2, :, :, :8] = 0.8
    x[n // 2:] = 0.8
    x[n // 2:, :, :, :8] = -0.8
    return x + 0.05 * torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_manifest_spec_round_trips_and_routes_to_the_nearest_centroid(folders, tmp_path):
    x = separable_images()
    settings = {"folder": str(folders / "dino"), "pool": "mean"}
    m = partition_data(ArrayData("im", x), 2, tmp_path / "p", features="encoder", encoder=settings)
    manifest, tensors = load_partition(tmp_path / "p")
    weights = hashlib.sha256(f"model.safetensors {sha256_file(folders / 'dino' / 'model.safetensors')}\n".encode())
    assert manifest["features"] == {"kind": "encoder", "folder": str((folders / "dino").resolve()), "pool": "mean",
                                    "size": 32, "normalize": True, "model_type": "dinov2",
                                    "weights_sha256": weights.hexdigest()}
    want = encode(encoder_spec(**settings), x)
    assert torch.allclose(feature_map(manifest, tensors)(x), want, atol=1e-6)
    assert torch.equal(nearest_cluster_fn(manifest, tensors)(x), tensors["assignments"])
    assert sorted(m["counts"]) == [12, 12]


def test_refusals_name_the_field(folders, tmp_path):
    x = images(n=6)
    with pytest.raises(DDMError, match="partition.encoder.*does not exist"):
        compute_partition(ArrayData("im", x), 2, "encoder", encoder={"folder": str(tmp_path / "nowhere")})
    with pytest.raises(DDMError, match="partition.encoder.*not a vision encoder"):
        compute_partition(ArrayData("im", x), 2, "encoder", encoder={"folder": str(folders / "bert")})
    with pytest.raises(DDMError, match="partition.features = 'encoder' needs images"):
        compute_partition(ArrayData("v", torch.randn(6, 5)), 2, "encoder", encoder={"folder": str(folders / "dino")})
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((folders / "dino" / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(DDMError, match="partition.encoder.*auto_map"):
        encoder_spec(remote)
    with pytest.raises(DDMError, match=r"partition.encoder_size = 7: .* cannot take images of this size \(its patch "
                                       r"size is 8\).*e\.g\. 32 \(its config.json's image_size\)"):  # was 224
        encoder_spec(folders / "dino", size=7)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DDMError, match="encoder folder .* is a file, not a folder"):
        encoder_spec(tmp_path / "file")


def test_applying_a_partition_whose_encoder_folder_is_gone_says_what_to_do(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "dino", tmp_path / "enc")
    x = separable_images()
    partition_data(ArrayData("im", x), 2, tmp_path / "p", features="encoder", encoder={"folder": str(tmp_path / "enc")})
    manifest, tensors = load_partition(tmp_path / "p")
    shutil.rmtree(tmp_path / "enc")
    with pytest.raises(DDMError, match="nearest-centroid routing needs the partition's encoder folder.*copy"):
        nearest_cluster_fn(manifest, tensors)(x)
    manifest["features"]["folder"] = "relative/enc"
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDMError, match="absolute"):
        load_partition(tmp_path / "p")


def test_an_encoder_folder_holding_a_model_of_another_width_is_named(folders, tmp_path):
    """A DINOv2 of another hidden size saved where the partition's encoder was: nearest-centroid routing
    (sample --strategy nearest, analyze) crashed in torch.cdist (exit 1)."""
    import shutil

    shutil.copytree(folders / "dino", tmp_path / "enc")
    x = separable_images()
    partition_data(ArrayData("im", x), 2, tmp_path / "p", features="encoder", encoder={"folder": str(tmp_path / "enc")})
    manifest, tensors = load_partition(tmp_path / "p")
    shutil.rmtree(tmp_path / "enc")
    transformers.Dinov2Model(transformers.Dinov2Config(**{**TINY, "hidden_size": 48})).save_pretrained(tmp_path / "enc")
    del manifest["features"]["weights_sha256"]  # an older ddmkit's partition, which records no weights' hash
    with pytest.raises(DDMError, match=r"nearest-centroid routing: the encoder folder .*enc now gives features of "
                                       r"shape \(48,\), but the partition's centroids have 32: .*restore it"):
        nearest_cluster_fn(manifest, tensors)(x)


def test_an_encoder_folder_holding_other_weights_of_the_same_shape_is_named(folders, tmp_path):
    """Another DINOv2 of the same shape saved where the partition's encoder was: nearest-centroid routing
    and analyze used its features, silently other than the partition's."""
    import shutil

    shutil.copytree(folders / "dino", tmp_path / "enc")
    x = separable_images()
    partition_data(ArrayData("im", x), 2, tmp_path / "p", features="encoder", encoder={"folder": str(tmp_path / "enc")})
    manifest, tensors = load_partition(tmp_path / "p")
    assert torch.equal(nearest_cluster_fn(manifest, tensors)(x), tensors["assignments"])
    torch.manual_seed(7)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(tmp_path / "enc")
    with pytest.raises(DDMError, match=r"nearest-centroid routing: the encoder folder .*enc now holds other weights "
                                       r"than the partition was made with .*restore that model, or partition again"):
        nearest_cluster_fn(manifest, tensors)(x)


def test_vit_cls_features_are_the_normed_class_token_not_the_pooler_head(tmp_path):
    """ViT's pooler_output is tanh(Linear(CLS)), a head self-supervised backbones do not ship: a backbone saved
    without it was refused as lacking weights, and a folder converted with a random head (AutoModel's
    from_pretrained + save_pretrained) gave a random projection, different for each conversion."""
    vit = dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64)
    torch.manual_seed(0)
    backbone = transformers.ViTModel(transformers.ViTConfig(**vit), add_pooling_layer=False).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    for i in (1, 2):  # two conversions: the backbone's weights, each with another random pooler head
        torch.manual_seed(i)
        transformers.AutoModel.from_pretrained(tmp_path / "backbone").save_pretrained(tmp_path / f"converted{i}")
    classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**vit, num_labels=3))
    classifier.vit.load_state_dict(backbone.state_dict())
    classifier.save_pretrained(tmp_path / "classifier")  # a classification folder: its ViT has no pooler either
    x = images(n=5, side=16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's: no preprocessor_config.json
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():  # the class token after ViT's final layernorm
        want = backbone(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state[:, 0]
    for name in ("backbone", "converted1", "converted2", "classifier"):
        spec = encoder_spec(tmp_path / name, pool="cls", normalize=False)
        assert spec["cls_output"] == "first_token" and spec["model_type"] == "vit"
        assert torch.allclose(encode(spec, x), want, atol=1e-5), name
    m = partition_data(ArrayData("im", x), 2, tmp_path / "p", features="encoder",
                       encoder={"folder": str(tmp_path / "backbone")})
    assert m["features"]["cls_output"] == "first_token"
    manifest, tensors = load_partition(tmp_path / "p")
    assert torch.equal(nearest_cluster_fn(manifest, tensors)(x), tensors["assignments"])
    del manifest["features"]["cls_output"]  # an earlier ddmkit's partition: its cls features were the tanh head
    with pytest.raises(DDMError, match=r"nearest-centroid routing: the partition was made by an earlier ddmkit, whose "
                                       r"encoder_pool = \"cls\" features of this 'vit' model were its pooler head.*"
                                       r"Partition again"):
        nearest_cluster_fn(manifest, tensors)(x)


def test_a_model_missing_weights_other_than_a_pooler_head_is_still_refused(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folders / "dino", tmp_path / "dino")
    weights = load_file(tmp_path / "dino" / "model.safetensors")
    del weights[next(name for name in weights if name.startswith("layernorm."))]
    save_file(weights, tmp_path / "dino" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DDMError, match=r"partition.encoder: .*dino lacks weights of its encoder \(\['layernorm"):
        encoder_spec(tmp_path / "dino")
    spec = encoder_spec(folders / "dino")  # DINOv2's pooler_output is its normed class token: taken as it is
    assert spec["cls_output"] == "pooler_output"


def blobs(n_per=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = np.concatenate([c + rng.normal(size=(n_per, 2)) for c in centres])
    return torch.as_tensor(x, dtype=torch.float32), np.repeat(np.arange(4), n_per)


@pytest.mark.parametrize("minibatch", [False, True])
def test_two_stage_kmeans_recovers_separated_blobs(minibatch, monkeypatch):
    from sklearn.metrics import adjusted_rand_score

    import ddmkit.data.partition as partition

    if minibatch:  # the fine stage of a large data set: MiniBatchKMeans, whose centroids are not exact means
        monkeypatch.setattr(partition, "MINIBATCH_WORK", 0)
    x, truth = blobs()
    plan = compute_partition(ArrayData("blobs", x), 4, fine_k=40, seed=0)
    assert adjusted_rand_score(truth, plan.labels.numpy()) == 1.0
    dist = ((x.double().numpy()[:, None] - plan.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(dist.argmin(1), plan.labels.numpy())  # each point joins its nearest coarse centroid
    if not minibatch:  # exact fine means: here each coarse centroid is the mean of its points
        for c in range(4):
            assert np.allclose(plan.centroids[c], x[plan.labels == c].double().mean(0).numpy(), rtol=0, atol=1e-9)
    balanced = compute_partition(ArrayData("skewed", x[:170]), 4, fine_k=40, balanced=True)
    assert balanced.counts.max() == 43  # ceil(170 / 4)


def test_fine_k_out_of_range_is_refused_with_a_working_value():
    x, _ = blobs(n_per=5)
    with pytest.raises(DDMError, match=r"partition.fine_k = 3 .* e.g. partition.fine_k = 20"):
        compute_partition(ArrayData("blobs", x), 4, fine_k=3)
    with pytest.raises(DDMError, match=r"partition.fine_k = 21 "):
        compute_partition(ArrayData("blobs", x), 4, fine_k=21)
    compute_partition(ArrayData("blobs", x), 4, fine_k=20)


def test_ddmkit_run_on_encoder_features_and_a_missing_encoder(folders, tmp_path, monkeypatch, cli):
    """`ddmkit run` partitions tiny images on the DINOv2 folder's features in two stages, trains,
    samples (nearest routing applies the encoder to x0_hat) and evaluates; a missing folder is
    exit 2 before anything is written."""
    x = separable_images(40)
    np.savez(tmp_path / "im.npz", x=x.numpy().clip(-1, 1))
    config = f"""
[data]
name = "image_array"
n_train = 32
n_test = 8
params = {{ path = "im.npz", test_fraction = 0.2 }}
[partition]
k = 2
features = "encoder"
encoder = "{folders / 'dino'}"
encoder_size = 16
fine_k = 6
[expert.net]
arch = "unet"
kwargs = {{ channels = [8, 16], blocks = 1, attention_res = [] }}
[expert.train]
steps = 2
batch_size = 8
warmup = 1
log_every = 1
device = "cpu"
[monolith]
enabled = false
[router.net]
arch = "router_cnn"
kwargs = {{ channels = [8, 16] }}
[router.train]
steps = 2
batch_size = 8
warmup = 1
log_every = 1
device = "cpu"
[sample]
n = 8
steps = 2
strategies = ["top-1", "nearest"]
[evaluate]
fid_features = "pixels"
kid_subset = 4
missing_experts = false
stats_router = false
"""
    (tmp_path / "c.toml").write_text(config)
    from typer.testing import CliRunner

    from ddmkit.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["run", "c.toml", "--out", "run"])
    assert r.exit_code == 0, r.output[-2000:]
    manifest = json.loads((tmp_path / "run" / "partition" / "manifest.json").read_text())
    assert manifest["features"]["kind"] == "encoder" and manifest["fine_k"] == 6 and manifest["features"]["size"] == 16
    assert (tmp_path / "run" / "report.md").exists()
    (tmp_path / "bad.toml").write_text(config.replace(str(folders / "dino"), str(tmp_path / "no_such_model")))
    r = cli("run", "bad.toml", "--out", "bad_run")  # in tmp_path (monkeypatch.chdir above); exit 2 is main()'s
    assert r.returncode == 2 and "partition.encoder" in r.stderr and not (tmp_path / "bad_run").exists()


def test_an_encoder_saved_again_in_the_same_folder_is_loaded_again(tmp_path):
    """The process keeps loaded encoders, keyed by folder and its files' times: new weights saved over the
    old ones give the new features, not the cached model's."""
    folder, x = tmp_path / "enc", images(n=4)
    features = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(folder)
        features.append(encode(encoder_spec(folder), x))
    assert not torch.allclose(features[0], features[1])


def test_a_pca_dim_above_the_data_is_lowered_with_a_warning():
    """pca_dim = 100 on 42 rows was fitted with 42 components without a word; the default (min(64, D)),
    lowered the same way on small data, is no choice of the user's and is not warned of."""
    import warnings

    from ddmkit.data.features import fit_features

    x = torch.randn(42, 200, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"partition.pca_dim = 100 is lowered to 42: PCA has at most as many "
                                         r"components as the data have dimensions \(200\) and training rows \(42\); "
                                         r"set partition.pca_dim = 42"):
        assert fit_features("pca", x, pca_dim=100)[0]["dim"] == 42
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_features("pca", x)[0]["dim"] == 42
        assert fit_features("pca", x, pca_dim=42)[0]["dim"] == 42
        assert fit_features("pca", x[:, :10], pca_dim=None)[0]["dim"] == 10


def test_a_damaged_encoder_folder_is_named_with_the_fix(folders, tmp_path):
    """A file cut short (an interrupted copy) was named without a fix, or, for a JSON file, to be 're-created with
    the ddmkit command that wrote it', which no ddmkit command did."""
    import shutil
    for name, cut in [("model.safetensors", "cannot load .* as a transformers vision model .*"),
                      ("config.json", "config.json is not valid JSON .*partition.encoder names this folder: "),
                      ("preprocessor_config.json", "preprocessor_config.json is not valid JSON .*partition.encoder "
                                                   "names this folder: ")]:
        damaged = tmp_path / name
        shutil.copytree(folders / "dino", damaged)
        (damaged / name).write_bytes((damaged / name).read_bytes()[:20])
        with pytest.raises(DDMError, match=f"{cut}copy the folder again, whole"):
            encoder_spec(damaged)


def test_a_bad_preprocessor_statistic_is_refused_with_a_fix_that_works(folders, tmp_path, monkeypatch, ddmkit):
    """An image_mean of length 1 (or a std of 0) in preprocessor_config.json was named with no fix: the message gives
    the values that work and says that removing the field takes ImageNet's; `ddmkit run` exits 2, writing nothing."""
    folder = tmp_path / "dino"
    shutil.copytree(folders / "dino", folder)
    file = folder / "preprocessor_config.json"
    good = json.loads(file.read_text())
    np.savez(tmp_path / "im.npz", x=separable_images(16).numpy().clip(-1, 1))
    (tmp_path / "c.toml").write_text(f'[data]\nname = "image_array"\nparams = {{ path = "im.npz" }}\n[partition]\n'
                                     f'k = 2\nfeatures = "encoder"\nencoder = "{folder}"\nencoder_size = 16\n'
                                     '[evaluate]\nkid_subset = 2\n')
    monkeypatch.chdir(tmp_path)
    for key, bad, fix in [("image_mean", [0.5], "[0.485, 0.456, 0.406]"), ("image_std", [0.2, 0, 0.3],
                                                                          "[0.229, 0.224, 0.225]")]:
        file.write_text(json.dumps({**good, key: bad}))
        code, _, err = ddmkit("run", "c.toml", "--out", "run")
        assert code == 2 and f"preprocessor_config.json: {key} must be " in err and f"got {bad!r}; set it to " \
            f"e.g. {fix}, or remove {key} from the file to take ImageNet's" in err, err
        assert not (tmp_path / "run").exists()
        for fixed in ({**good, key: json.loads(fix)}, {k: v for k, v in good.items() if k != key}):
            file.write_text(json.dumps(fixed))
            assert encoder_spec(folder, size=16)["size"] == 16  # each fix it names is taken


def test_a_model_hub_id_is_told_that_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = r"cannot download from a model hub; if 'facebook/dinov2-small' is a model hub id: "
    with pytest.raises(DDMError, match=r"partition.encoder: folder 'facebook/dinov2-small' \(resolved to .*\) does "
                       r"not exist.*" + hub + r".*AutoModel.from_pretrained\('facebook/dinov2-small'\)"):
        encoder_spec("facebook/dinov2-small")
    with pytest.raises(DDMError) as info:  # a path written as one: no hub id's hint
        encoder_spec("./models/dino")
    said = str(info.value)
    assert said.startswith(f"partition.encoder: folder './models/dino' (resolved to {tmp_path / 'models' / 'dino'}) "
                           "does not exist; give the folder a transformers model's save_pretrained wrote"), said
    assert "hub id" not in said and "cannot download from a model hub" in said


def test_an_encoder_of_one_channel_images_is_refused_naming_its_channels(tmp_path):
    """A DINOv2 saved with num_channels = 1 (for grey images) was refused as 'partition.encoder_size = 32 ...
    cannot take images of this size (its patch size is 8)', with encoder_size = 224 as the fix, which fails the
    same way: ddmkit gives every encoder three channels."""
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY, num_channels=1)).save_pretrained(tmp_path / "grey")
    with pytest.raises(DDMError, match=r"^partition.encoder: .*grey takes 1-channel images \(num_channels in its "
                                       r"config.json\); .*give an encoder of 3-channel images") as info:
        encoder_spec(tmp_path / "grey")
    assert "encoder_size" not in str(info.value)


def test_a_relative_encoder_folder_says_where_it_was_looked_for(folders, tmp_path, monkeypatch):
    """Run from another folder, partition.encoder = "models/enc" was only 'does not exist'; latent.pretrained's
    message says that a relative path is read from the folder ddmkit runs in, and what to do."""
    import shutil
    shutil.copytree(folders / "dino", tmp_path / "project" / "models" / "enc")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DDMError, match=r"folder 'models/enc' \(resolved to .*elsewhere/models/enc\) does not exist; "
                                       r".* by its absolute path or one relative to the folder ddmkit runs in"):
        encoder_spec("models/enc")
    monkeypatch.chdir(tmp_path / "project")
    assert encoder_spec("models/enc")["model_type"] == "dinov2"


def test_an_encoder_path_that_is_a_file_is_named_as_given_and_where_it_resolved(tmp_path, monkeypatch):
    """partition.encoder = "models/enc" naming a file said only the resolved path; like a missing folder, it names
    the path as written and where it was looked for (an absolute path that resolves to itself: once)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "enc").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DDMError) as info:
        encoder_spec("models/enc")
    assert str(info.value).startswith(f"partition.encoder: encoder folder 'models/enc' (resolved to "
                                      f"{tmp_path / 'models' / 'enc'}) is a file, not a folder; give a folder"), info
    with pytest.raises(DDMError) as info:
        encoder_spec(tmp_path / "models" / "enc")
    assert f"encoder folder '{tmp_path / 'models' / 'enc'}' is a file" in str(info.value)


def test_a_ddmkit_or_diffusers_folder_is_named_for_what_it_is_and_a_file_for_its_folder(tmp_path, folders,
                                                                                      monkeypatch):
    """A latent run's folder, an expert's folder or a diffusers VAE saved without weights, given as the encoder, was
    'cannot load ... (ValueError: Unrecognized model ...); copy the folder again, whole' or told to convert it
    with AutoModel.from_pretrained, which fails the same way; the encoder's config.json or weights file given for
    its folder was not pointed at the folder that holds it."""
    monkeypatch.chdir(tmp_path)
    configs = {"run": {"config": {}, "digest": "0"}, "expert": {"arch": "dit", "data_shape": [4, 8, 8]},
               "vae": {"_class_name": "AutoencoderKL", "latent_channels": 4}}
    said = {"run": "is a ddmkit run's config", "expert": r"is a ddmkit model's config \(arch 'dit'\)",
            "vae": "describes diffusers' 'AutoencoderKL'"}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "model.safetensors").write_bytes(b"")  # an expert's folder holds one: not read
        with pytest.raises(DDMError, match=f"^partition.encoder: {tmp_path / name / 'config.json'} {said[name]}, not a "
                                           r"transformers model's; give the folder of a transformers vision encoder"):
            encoder_spec(name)
    shutil.copytree(folders / "dino", tmp_path / "models" / "dino")
    for file in ("config.json", "model.safetensors"):
        with pytest.raises(DDMError, match=r"is a file, not a folder; set partition.encoder = \"models/dino\", the "
                                           "folder that holds it$"):
            encoder_spec(f"models/dino/{file}")
    assert encoder_spec("models/dino")["model_type"] == "dinov2"  # the folder it names loads
