"""Image features from a pretrained vision encoder (DINOv2, CLIP, ...) saved as a transformers folder.

    spec = encoder_spec("dinov2-small/", pool="cls", size=None, normalize=True)   # checks the folder
    feats = encode(spec, x)                                                        # (N, F) float32

The folder is a `save_pretrained` model (config.json + model.safetensors, optionally the
preprocessor_config.json of its image processor). It is loaded with transformers' own classes only:
`from_pretrained(folder, local_files_only=True, trust_remote_code=False, use_safetensors=True)`, so
loading runs no code from the folder and reads no pickle; a config that asks for remote code
(`auto_map`) or names a model type that is not a vision encoder is refused. A full dual encoder
(a CLIPModel folder) contributes its vision tower and projection.

Preprocessing of ddmkit images x (N, C, H, W) in [-1, 1], C = 1 or 3:

    u = (x + 1) / 2                 in [0, 1]; grey repeated to 3 channels
    u = resize(u, size x size)      bilinear, antialiased (no crop)
    p = (u - image_mean) / image_std   the folder's preprocessor_config.json, else ImageNet's

Pooling: "cls" is the model's image embedding: `image_embeds` where the model has a projection,
else `pooler_output` (DINOv2's and CLIP's normed class token, SigLIP's attention head, a convolutional
network's pooled map), else the first token of the last hidden state. A pooler that is a dense layer on
the first token (ViT's and DeiT's tanh(Linear(CLS)), a head that self-supervised backbones neither train
nor ship) is not an image embedding: "cls" then takes the first token itself (after ViT's final
layernorm), and a folder saved without that head loads. The spec records which output "cls" took
(`cls_output`). "mean" averages the last hidden state over the patch
tokens (those after the class and register tokens; over space for convolutional encoders).
With normalize, each row is divided by its L2 norm, so Euclidean k-means on the features is
k-means in cosine geometry (spherical k-means, as in the DDM paper).

transformers is an optional extra (`pip install 'ddmkit[latent]'`), imported only here, only when
an encoder is used. A loaded encoder is kept per process, by folder.
"""
from __future__ import annotations

import contextlib
import hashlib
from inspect import signature
from pathlib import Path

import torch
import torch.nn.functional as F

from ddmkit.errors import DDMError
from ddmkit.data.arrays import missing_folder_text, named_as_given
from ddmkit.io import read_json, sha256_file
from ddmkit.progress import progress_bar

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
POOLS = ("cls", "mean")
_LOADED: dict[tuple, tuple[torch.nn.Module, str]] = {}  # (folder, its files' times) -> (model on its device, type)
_DIGESTS: dict[tuple, str] = {}  # (folder, its files' times) -> weights_sha256


def _transformers(field: str):
    try:
        import transformers
    except ImportError:
        raise DDMError(f"{field}: encoder features need transformers; install it with "
                       "`pip install 'ddmkit[latent]'`") from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' own load reports and progress bars off while loading (restored after)."""
    log = transformers.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def _vision_class(transformers, config, field: str):
    """(the transformers class that loads the folder's image encoder, by model type (no code from
    the folder): an image model of AutoModel, a `*_vision_model` tower, or a dual encoder's tower
    with its projection; the config to build it with)."""
    auto = transformers.models.auto.modeling_auto
    model_type = config.model_type
    vision = getattr(config, "vision_config", None)
    dual = model_type in auto.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES and vision is not None
    tower = vision.model_type if dual else model_type
    name = auto.MODEL_FOR_IMAGE_MAPPING_NAMES.get(tower)
    if name is None and tower.endswith("_vision_model"):
        name = auto.MODEL_MAPPING_NAMES.get(tower)
    if name is None or not hasattr(transformers, name):
        raise DDMError(f"{field}: the model type {model_type!r} is not a vision encoder (e.g. dinov2, "
                       "clip_vision_model, clip, vit, siglip_vision_model); save an image encoder there")
    archs = getattr(config, "architectures", None) or []
    projection = f"{name}WithProjection"  # CLIP's image embedding space
    if hasattr(transformers, projection) and (dual or projection in archs):
        name = projection
    if not dual:
        return getattr(transformers, name), config
    if getattr(config, "projection_dim", None) is not None:  # the dual model's projection, not the tower default
        vision.projection_dim = config.projection_dim
    return getattr(transformers, name), vision


def _cache_key(path: Path) -> tuple:
    """The folder with its files' times and sizes: a model saved there again is loaded again."""
    files = sorted(f for f in path.glob("*") if f.is_file()) if path.is_dir() else []
    return (str(path), *((f.name, st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()]))


def weights_sha256(folder: Path) -> str:
    """One SHA-256 of the folder's weight files (model*.safetensors, by name), computed once per process
    for the same files: the identity of the encoder a partition was made with."""
    key = _cache_key(folder)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for file in sorted(folder.glob("model*.safetensors")):
            h.update(f"{file.name} {sha256_file(file)}\n".encode())
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


HUB_SAVING = ("AutoModel.from_pretrained(ID).save_pretrained('FOLDER') and "
              "AutoImageProcessor.from_pretrained(ID).save_pretrained('FOLDER') (transformers)")
RECOPY = ("copy the folder again, whole (an interrupted copy leaves damaged or incomplete files), or save the "
          "model there again with save_pretrained")


def load_encoder(folder: str | Path, field: str = "partition.encoder") -> tuple[torch.nn.Module, str]:
    """(model in eval mode on CUDA when available, else CPU; its model type), loaded once per process."""
    path = Path(folder).expanduser().resolve()
    key = _cache_key(path)
    if key in _LOADED:
        return _LOADED[key]
    if not path.exists():  # named as given, and where it was looked for
        wanted = "the folder a transformers model's save_pretrained wrote (config.json + model.safetensors)"
        raise DDMError(missing_folder_text(field, folder, path, wanted, HUB_SAVING))
    if not path.is_dir():  # config.json or the weights, named for the folder that holds them
        holder = (f'set {field} = "{Path(folder).expanduser().parent}", the folder that holds it'
                  if (path.parent / "config.json").is_file() else
                  "give a folder saved with a transformers model's save_pretrained (config.json + model.safetensors)")
        raise DDMError(f"{field}: encoder folder {named_as_given(folder, path)} is a file, not a folder; {holder}")
    if not (path / "config.json").is_file():
        raise DDMError(f"{field}: {path} has no config.json, so it is not a saved transformers model; save one "
                       "there with model.save_pretrained(folder)")
    raw = read_json(path / "config.json", f"{field} names this folder: {RECOPY}")
    if not isinstance(raw, dict):
        raise DDMError(f"{field}: {path}/config.json is not a JSON object; save the model there again")
    if "auto_map" in raw:
        raise DDMError(f"{field}: {path}/config.json asks for code shipped with the model (auto_map); ddmkit "
                       "loads only transformers' own classes: use a model that transformers supports natively")
    if (path / "diffusion_pytorch_model.safetensors").is_file():
        raise DDMError(f"{field}: {path} is a diffusers model folder (e.g. a VAE), not a transformers vision "
                       "encoder; give a folder saved by a transformers model (DINOv2, CLIP, ViT, ...)")
    what = "" if "model_type" in raw else (  # (an old config without it may load by its folder's name)
        f"describes diffusers' {raw['_class_name']!r}" if "_class_name" in raw else
        "is a ddmkit run's config" if "config" in raw else
        f"is a ddmkit model's config (arch {raw['arch']!r})" if "arch" in raw else "")
    if what:  # transformers' AutoConfig said 'Unrecognized model', and the fix given was to copy the folder again
        raise DDMError(f"{field}: {path}/config.json {what}, not a transformers model's; give the folder of a "
                       "transformers vision encoder (DINOv2, CLIP, ViT, ...), as its save_pretrained wrote it")
    if not any(path.glob("model*.safetensors")):
        raise DDMError(f"{field}: {path} holds no model.safetensors (ddmkit reads no pickle weights); convert it "
                       "with AutoModel.from_pretrained(folder).save_pretrained(folder)")
    transformers = _transformers(field)
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            cls, build = _vision_class(transformers, config, field)
            model, info = cls.from_pretrained(path, config=build, local_files_only=True, trust_remote_code=False,
                                              use_safetensors=True, output_loading_info=True)
    except DDMError:
        raise
    except Exception as e:  # an unknown model type, a corrupt file, weights of another shape
        raise DDMError(f"{field}: cannot load {path} as a transformers vision model "
                       f"({type(e).__name__}: {str(e)[:300]}); {RECOPY}") from None
    missing = sorted(info.get("missing_keys") or [])
    if first_token_head(model):  # a head ddmkit never uses: a backbone saved without it is whole
        missing = [name for name in missing if not name.startswith("pooler.")]
    if missing:
        raise DDMError(f"{field}: {path} lacks weights of its encoder ({missing[:3]} ...); "
                       "save the full model there")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _LOADED[key] = (model.float().eval().to(device), config.model_type)
    return _LOADED[key]


def first_token_head(model: torch.nn.Module) -> bool:
    """Whether the model's pooler is a dense layer on the first token (ViT's and DeiT's tanh(Linear(CLS)),
    BERT's pooler): a head that is not the image embedding, which "cls" skips."""
    return isinstance(getattr(getattr(model, "pooler", None), "dense", None), torch.nn.Linear)


def _side(value) -> int | None:
    """A square side from an image processor's size field: an int, {height, width} or {shortest_edge}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return value["height"]
        if isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"]
    return None


def _preprocessor(path: Path) -> dict:
    file = path / "preprocessor_config.json"
    raw = read_json(file, f"partition.encoder names this folder: {RECOPY}") if file.is_file() else {}
    return raw if isinstance(raw, dict) else {}


def default_size(path: Path, model: torch.nn.Module) -> int | None:
    """The folder's input side: preprocessor crop_size (or size), else the model config's image_size."""
    pre = _preprocessor(path)
    side = _side(pre.get("crop_size")) if pre.get("do_center_crop", True) else None
    side = side or _side(pre.get("size"))
    if side is None:
        side = getattr(model.config, "image_size", None)
    return side if isinstance(side, int) and side >= 1 else None


def normalisation(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, 3, 1, 1): the folder's image_mean / image_std, else ImageNet's."""
    pre = _preprocessor(path)
    stats = []
    for key, default in (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)):
        v = pre.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) else v
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(a, (int, float)) for a in v)):
            raise DDMError(f"{path}/preprocessor_config.json: {key} must be 3 numbers (one per RGB channel, an "
                           f"encoder's input) or one for all three, got {pre[key]!r}; set it to e.g. {default}, or "
                           f"remove {key} from the file to take ImageNet's")
        stats.append(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1))
    if not bool((stats[1] > 0).all()):
        raise DDMError(f"{path}/preprocessor_config.json: image_std must be positive, got {pre['image_std']!r}; set "
                       f"it to e.g. {IMAGENET_STD}, or remove image_std from the file to take ImageNet's")
    return stats[0], stats[1]


def check_images(x: torch.Tensor, field: str = "partition.features") -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DDMError(f"{field} = 'encoder' needs images (N, C, H, W) with C = 1 or 3; the data have shape "
                       f"{tuple(x.shape)}: use 'identity' or 'pca' for other data")


def encoder_spec(folder: str | Path, pool: str = "cls", size: int | None = None, normalize: bool = True) -> dict:
    """The feature map's closed description, after loading (and so checking) the encoder folder:
    {"kind": "encoder", "folder": absolute path, "pool", "size", "normalize", "model_type", "weights_sha256"},
    and with pool "cls" "cls_output", the output it takes (CLS_OUTPUTS)."""
    if pool not in POOLS:
        raise DDMError(f"partition.encoder_pool: {pool!r}; accepted: {', '.join(POOLS)}")
    path = Path(folder).expanduser().resolve()
    model, model_type = load_encoder(folder)  # as given: a missing one is named as the user wrote it
    channels = getattr(model.config, "num_channels", 3)
    if channels != 3:  # its first layer would refuse the three channels of every image (grey ones repeated)
        raise DDMError(f"partition.encoder: {path} takes {channels}-channel images (num_channels in its config.json); "
                       "ddmkit gives an encoder RGB images, grey ones repeated to three channels: give an encoder of "
                       "3-channel images (DINOv2, CLIP, ...), or set partition.features = 'pca' and remove "
                       "partition.encoder")
    size = size or default_size(path, model)
    if size is None:
        raise DDMError(f"partition.encoder_size: {path} gives no input size (no preprocessor_config.json size, no "
                       "image_size in config.json); set it, e.g. partition.encoder_size = 224")
    spec = {"kind": "encoder", "folder": str(path), "pool": pool, "size": int(size), "normalize": bool(normalize),
            "model_type": model_type, "weights_sha256": weights_sha256(path)}
    try:  # one image through it: a size the encoder cannot take is refused here, not after loading the data
        taken, _ = run_encoder(model, path, pool, int(size), torch.zeros(1, 3, int(size), int(size)))
    except DDMError:
        raise
    except Exception as e:
        patch = getattr(model.config, "patch_size", None)
        hint = f" (its patch size is {patch})" if isinstance(patch, int) else ""
        trained = getattr(model.config, "image_size", None)
        example = trained if isinstance(trained, int) and trained != int(size) else 224
        source = " (its config.json's image_size)" if example == trained else ""
        raise DDMError(f"partition.encoder_size = {size}: {path} cannot take images of this size{hint} "
                       f"({type(e).__name__}: {str(e)[:200]}); set partition.encoder_size to the size it was trained "
                       f"on, e.g. {example}{source}") from None
    if pool == "cls":
        spec["cls_output"] = taken
    return spec


def preprocess(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ddmkit images in [-1, 1] -> the encoder's pixel_values (see the module docstring)."""
    u = (x.float() + 1) / 2
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    if tuple(u.shape[-2:]) != (size, size):
        u = F.interpolate(u, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (u - mean.to(u.device)) / std.to(u.device)


CLS_OUTPUTS = ("image_embeds", "pooler_output", "first_token")  # what pool = "cls" takes, in this order


def pool_output(out, pool: str, patches: int | None = None, skip_pooler: bool = False) -> tuple[str, torch.Tensor]:
    """(what was taken: one of CLS_OUTPUTS, or "mean"; (B, F) features) from a transformers model output (see
    the module docstring); `patches` is the number of patch tokens, which come after the class and register
    tokens (None: all tokens); `skip_pooler`: pooler_output is not the embedding (first_token_head)."""
    if pool == "cls":
        for name in CLS_OUTPUTS[:1] if skip_pooler else CLS_OUTPUTS[:2]:
            v = getattr(out, name, None)
            if v is not None:
                return name, v.flatten(1)
        return "first_token", out.last_hidden_state[:, 0]
    h = out.last_hidden_state
    if h.ndim == 4:  # convolutional: (B, C, H, W)
        return "mean", h.mean((2, 3))
    return "mean", h[:, -patches:].mean(1) if patches and h.shape[1] > patches else h.mean(1)


def _patch_tokens(model: torch.nn.Module, size: int) -> int | None:
    """The number of patch tokens at this input size, for ViT-like configs (None when unknown)."""
    p = getattr(model.config, "patch_size", None)
    return (size // p) ** 2 if isinstance(p, int) and p >= 1 and size >= p else None


@torch.no_grad()
def run_encoder(model: torch.nn.Module, path: Path, pool: str, size: int, x: torch.Tensor,
                batch: int = 256) -> tuple[str | None, torch.Tensor]:
    """(what pool_output took, None for no rows; features (N, F) float32 on the CPU) of images x through a
    loaded encoder: preprocessed with the folder's statistics, in batches of `batch`."""
    mean, std = normalisation(path)
    device = next(model.parameters()).device
    patches, skip_pooler = _patch_tokens(model, size), first_token_head(model)
    kwargs = {}  # ViT and CLIP interpolate their position embeddings only when asked
    if (size != getattr(model.config, "image_size", size)
            and "interpolate_pos_encoding" in signature(model.forward).parameters):
        kwargs["interpolate_pos_encoding"] = True
    taken, feats = None, []
    with progress_bar("encoder features", len(x)) as advance:
        for i in range(0, len(x), batch):
            chunk = preprocess(x[i:i + batch].to(device), size, mean, std)
            taken, f = pool_output(model(pixel_values=chunk, **kwargs), pool, patches, skip_pooler)
            feats.append(f.float().cpu())
            advance(len(chunk))
    return taken, torch.cat(feats) if feats else torch.zeros(0, 1)


@torch.no_grad()
def encode(spec: dict, x: torch.Tensor, batch: int = 256, what: str = "partition.encoder") -> torch.Tensor:
    """Features (N, F) float32 of images x under an encoder spec, on x's device. The folder is loaded
    again (once per process); a missing folder is a DDMError saying what to do."""
    check_images(x)
    path = Path(spec["folder"])
    if not path.is_dir():
        raise DDMError(f"{what} needs the partition's encoder folder {str(path)!r}, which does not exist here; "
                       "copy the same saved model to that path (the partition's features come from it), or "
                       "re-partition with partition.encoder naming where it is now")
    model, model_type = load_encoder(path, what)
    if model_type != spec["model_type"]:
        raise DDMError(f"{what}: the encoder folder {path} now holds a {model_type!r} model, but the partition was "
                       f"made with a {spec['model_type']!r} one; restore that model or re-partition")
    recorded = spec.get("weights_sha256")  # absent from an older ddmkit's partition
    if recorded is not None and recorded != weights_sha256(path):
        raise DDMError(f"{what}: the encoder folder {path} now holds other weights than the partition was made with "
                       f"(their SHA-256 differs from the manifest's features.weights_sha256); restore that model, or "
                       "partition again (`ddmkit partition --config CONFIG --out NEW_RUN`)")
    pool, cls_output = spec["pool"], spec.get("cls_output")  # cls_output: absent from an older ddmkit's partition
    if pool == "cls" and cls_output is None and first_token_head(model):
        raise DDMError(f"{what}: the partition was made by an earlier ddmkit, whose encoder_pool = \"cls\" features "
                       f"of this {model_type!r} model were its pooler head, tanh(Linear(first token)); ddmkit now "
                       "takes the first token itself, so these centroids do not match its features. Partition again "
                       "(`ddmkit partition --config CONFIG --out NEW_RUN`)")
    taken, f = run_encoder(model, path, pool, spec["size"], x, batch)
    if pool == "cls" and cls_output is not None and len(x) and taken != cls_output:
        raise DDMError(f"{what}: the partition's encoder_pool = \"cls\" features were the model's {cls_output}, but "
                       f"the encoder folder {path} now gives {taken}; restore the transformers version the partition "
                       "was made with, or partition again (`ddmkit partition --config CONFIG --out NEW_RUN`)")
    if spec["normalize"]:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if not bool(torch.isfinite(f).all()):
        raise DDMError(f"{what}: the encoder gave NaN or infinite features; check the folder {path}")
    return f.to(x.device)
