"""The autoencoder of a latent DDM: diffusers' AutoencoderKL, built from a config or loaded from a
local folder, and the codec that maps images to latents and back.

    codec = load_codec("runs/fm-latent/autoencoder", 1)  # a folder written by ddmkit (or diffusers); 1: grey data
    z = codec.encode(x)        # x (N, C, H, W) in [-1, 1]  ->  z (N, c, H/f, W/f)
    x = codec.decode(z)

Latents are the posterior mean, shifted and scaled as diffusers does:

    z = (mean(E(x)) - shift) * scale,        x = D(z / scale + shift)

with scale = config.scaling_factor and shift = config.shift_factor (0 when absent); an autoencoder
that ddmkit trains gets scale = 1 / std and shift = mean of its training latents, so the experts see
latents of unit variance, as they see pixels. A grey data set with an RGB autoencoder is encoded
with its channel repeated and decoded to the mean of the three channels.

Loading runs no code from the folder: only the AutoencoderKL class is built, and only from
safetensors weights (local_files_only, use_safetensors), every weight checked finite.
diffusers is an optional extra (`pip install "ddmkit[latent]"`), imported where it is used.
"""
from __future__ import annotations

import json
import math
import re

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddmkit.config import LatentConfig
from ddmkit.data.arrays import missing_folder_text
from ddmkit.data.datasets import pad_fix
from ddmkit.errors import DDMError
from ddmkit.io import read_json

CLASS_NAME = "AutoencoderKL"
HUB_SAVING = ("AutoencoderKL.from_pretrained(ID).save_pretrained('FOLDER') (for a pipeline, "
              "from_pretrained(ID, subfolder='vae'))")
RECOPY = ("copy the folder again, whole (an interrupted copy leaves damaged or incomplete files), or save the "
          "autoencoder there again with AutoencoderKL.save_pretrained")


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DDMError("latent: diffusers is not installed; install it with `pip install \"ddmkit[latent]\"` "
                       "(or `pip install diffusers`)") from None
    return diffusers


def build_autoencoder(cfg: LatentConfig, channels: int, size: int) -> nn.Module:
    """A small AutoencoderKL for `channels`-channel images of side `size` (latents 2^(len(widths)-1)
    times smaller per side, cfg.channels deep)."""
    diffusers = require_diffusers()
    levels = len(cfg.widths)
    groups = min(32, *cfg.widths)  # LatentConfig checked that every width is a multiple
    return diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=cfg.channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.widths), layers_per_block=cfg.layers_per_block, norm_num_groups=groups,
        sample_size=size)


def folder_config(folder: str | Path) -> dict:
    """The config.json of an AutoencoderKL folder, checked to be one (nothing else is read)."""
    given, folder = folder, Path(folder)
    if folder.is_file():  # config.json or the weights, named for the folder that holds them
        holder = (f"set latent.pretrained = \"{folder.parent}\", the folder that holds it"
                  if (folder.parent / "config.json").is_file() else "give the folder of one")
        raise DDMError(f"latent.pretrained: {folder} is a file, not a diffusers AutoencoderKL folder (config.json + "
                       f"diffusion_pytorch_model.safetensors); {holder}")
    if not folder.exists():  # named as given ("./vae", not "vae"), and where it was looked for
        wanted = "the folder AutoencoderKL.save_pretrained wrote (config.json + diffusion_pytorch_model.safetensors)"
        raise DDMError(missing_folder_text("latent.pretrained", given, folder.resolve(), wanted, HUB_SAVING,
                                           ", or leave latent.pretrained out to let ddmkit train one"))
    if not folder.is_dir():
        raise DDMError(f"latent.pretrained: {folder} is not a folder; give a local diffusers AutoencoderKL folder "
                       "(config.json + diffusion_pytorch_model.safetensors), e.g. one written by "
                       "AutoencoderKL.save_pretrained, or leave it out to let ddmkit train one")
    if not (folder / "config.json").is_file():
        raise DDMError(f"latent.pretrained: {folder} holds no config.json{sub_folder_hint(folder)}; give the folder "
                       "of a diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors), as written "
                       "by AutoencoderKL.save_pretrained")
    config = read_json(folder / "config.json", f"latent.pretrained names this folder: {RECOPY}")
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        what = (f"describes {found!r}" if found else "is a ddmkit run's config" if "config" in config else
                f"is a ddmkit model's config (arch {config['arch']!r})" if "arch" in config else
                "names no diffusers class (_class_name; a transformers model?)")
        raise DDMError(f"latent.pretrained: {folder / 'config.json'} {what}, not an {CLASS_NAME}"
                       f"{sub_folder_hint(folder)}; give the folder of a diffusers VAE itself (for a pipeline, its "
                       "vae/ sub-folder)")
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise DDMError(f"latent.pretrained: {folder} holds no .safetensors weights; ddmkit loads safetensors only "
                       "(never pickled .bin files): convert the weights with AutoencoderKL.save_pretrained")
    if not any(folder.glob("*.safetensors")):
        raise DDMError(f"latent.pretrained: {folder} holds a config.json but no weights "
                       f"(diffusion_pytorch_model.safetensors); {RECOPY}")
    variants = sorted(p.name for p in folder.glob("diffusion_pytorch_model.*.safetensors")
                      if p.name.count(".") == 2)  # diffusion_pytorch_model.fp16.safetensors (not a shard's index)
    if not (folder / "diffusion_pytorch_model.safetensors").exists() and variants:
        variant = variants[0].split(".")[1]
        raise DDMError(f"latent.pretrained: {folder} holds {variants[0]}, a '{variant}' variant, and no "
                       f"diffusion_pytorch_model.safetensors; save it as a plain folder: AutoencoderKL.from_pretrained("
                       f"'{folder}', variant='{variant}').save_pretrained(NEW_FOLDER), and give NEW_FOLDER")
    return config


def check_scale(config: dict, file: Path, given: str) -> None:
    """A DDMError unless config's scaling_factor is a number > 0 and its shift_factor a finite number (each may
    be absent; shift_factor also null): latents are (mean - shift_factor) x scaling_factor."""
    for name, positive in (("scaling_factor", True), ("shift_factor", False)):
        value = config.get(name)
        if value is None and (name not in config or not positive):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (positive and value <= 0):
            fix = ("0.18215 (diffusers' default; the run's note on the latents' std then gives the one that fits "
                   "these images)" if positive else "0 (no shift)")
            raise DDMError(f"{given}: {file}: {name} = {json.dumps(value)} is not a "
                           f"{'number > 0' if positive else 'finite number'} (latents are (mean - shift_factor) x "
                           f"scaling_factor); set it there to a {'positive ' if positive else ''}number, e.g. {fix}")


def sub_folder_hint(folder: Path) -> str:
    """Where an AutoencoderKL lies below `folder`: a pipeline's vae/, a latent run's autoencoder/ (or "")."""
    for sub, what in (("vae", "a pipeline folder"), ("autoencoder", "a latent run's folder")):
        if (folder / sub / "config.json").is_file():
            return f" (it holds {sub}/config.json: {what}; set latent.pretrained to its {sub}/ sub-folder)"
    return ""


def downsampling(config: dict) -> int:
    return 2 ** (len(config.get("block_out_channels", [64])) - 1)


def latent_shape(config: dict, image_shape: tuple[int, ...], data_name: str | None = None,
                 data_params: dict | None = None) -> tuple[int, int, int]:
    """(latent channels, H / f, W / f) of images (C, H, W) under an AutoencoderKL config; a size that f
    does not divide is a DDMError, with the setting of data set `data_name` (data.params `data_params`)
    that pads it."""
    if len(image_shape) != 3:
        raise DDMError(f"latent: latent DDMs need images (C, H, W); this data set's samples have shape "
                       f"{tuple(image_shape)}; set latent.enabled = false")
    channels, h, w = image_shape
    f = downsampling(config)
    if h % f or w % f:
        side = -(-max(h, w) // f) * f  # the smallest multiple of f that holds both sides
        raise DDMError(f"latent: the autoencoder makes images {f}x smaller per side, but they are {h}x{w}; pad or "
                       f"crop them to a multiple of {f}, e.g. {pad_fix(data_name, side, data_params, (h, w))}")
    takes = int(config.get("in_channels", 3))
    if takes not in (channels, 3):
        grey = ""
        if takes == 1:  # only an image folder takes a mode
            grey = (' set data.params.mode = "grey" (every image made grayscale), or' if data_name == "image_folder"
                    else " give grey images (one channel), or")
        fits = "3-channel images" if channels == 3 else \
            f"{channels}- or 3-channel images (grey images go through an RGB one, repeated)"
        raise DDMError(f"latent.pretrained: the autoencoder takes {takes}-channel images, the data have {channels};"
                       f"{grey} give an autoencoder of {fits}, or leave latent.pretrained out to let ddmkit train one")
    return int(config.get("latent_channels", 4)), h // f, w // f


def planned_config(cfg: LatentConfig, image_shape: tuple[int, ...]) -> dict:
    """The autoencoder config a run will use (read from the pretrained folder, or the one ddmkit would
    build), without loading weights: for checks before anything is trained."""
    if cfg.pretrained:
        return folder_config(cfg.pretrained)
    return {"_class_name": CLASS_NAME, "in_channels": image_shape[0] if image_shape else 1,
            "latent_channels": cfg.channels, "block_out_channels": list(cfg.widths)}


def check_pretrained(cfg: LatentConfig, log=print) -> None:
    """Load cfg.pretrained once before a run writes anything (complete, finite weights: load_autoencoder), and
    note a latent.channels of the user's that the folder overrides (channels, widths and [latent.train] are for
    an autoencoder ddmkit trains). The user's is one other than the default: which fields were set does not
    survive the config's copies (model_dump, validated again)."""
    channels = int(load_autoencoder(cfg.pretrained, run_copy=False).config.latent_channels)
    if cfg.channels not in (channels, LatentConfig.model_fields["channels"].default):
        log(f"note: latent.channels = {cfg.channels} is not used: the pretrained autoencoder {cfg.pretrained} has "
            f"{channels} latent channels (latent.channels, widths and [latent.train] are for an autoencoder ddmkit "
            "trains)")


def network_data_shape(cfg: LatentConfig, data_shape: tuple[int, ...], data_name: str | None = None,
                       data_params: dict | None = None) -> tuple[int, ...]:
    """The shape of one sample as the networks will see it: the data's, or its latents' when
    cfg.enabled (checked before anything is trained: size, channels, a readable pretrained folder)."""
    if not cfg.enabled:
        return tuple(data_shape)
    return latent_shape(planned_config(cfg, data_shape), data_shape, data_name, data_params)


def load_autoencoder(folder: str | Path, run_copy: bool = False) -> nn.Module:
    """An AutoencoderKL from a local folder (safetensors only, no hub, no code from the folder), eval mode.
    run_copy: the folder is a run's own copy, RUN/autoencoder, not the config's latent.pretrained folder
    (what the messages name)."""
    given = "RUN/autoencoder" if run_copy else "latent.pretrained"
    check_scale(folder_config(folder), Path(folder) / "config.json", given)
    diffusers = require_diffusers()
    try:
        model, info = diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                           low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        mismatch = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\))"
                             r" from checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", str(e))
        if mismatch:
            name, saved, built = mismatch.groups()
            raise DDMError(f"{given}: {folder}: its weights do not fit its config.json ({name}: {saved} in the "
                           f"weights, {built} as config.json builds it); the config.json (latent_channels, "
                           "block_out_channels, ...) must be the one saved with these weights (save_pretrained writes "
                           "both)") from None
        raise DDMError(f"{given}: {folder} could not be loaded as an {CLASS_NAME} ({type(e).__name__}: "
                       f"{str(e)[:300]}); {RECOPY}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # diffusers leaves them as uninitialised memory, with a console warning only
        raise DDMError(f"{given}: {folder} lacks weights of its {CLASS_NAME} ({', '.join(missing[:3])}"
                       f"{' ...' if len(missing) > 3 else ''}); save the whole model there with save_pretrained")
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise DDMError(f"{given}: {folder} holds NaN or infinite weights (first: {bad[0]}); re-export the autoencoder")
    return model.eval()


@dataclass
class LatentCodec:
    """An autoencoder with its latent shift and scale: encode images, decode latents, in batches."""

    model: nn.Module
    data_channels: int
    batch: int = 256

    @property
    def scale(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift(self) -> float:
        return float(self.model.config.get("shift_factor") or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_images(self, x: torch.Tensor) -> None:
        """A DDMError unless x is (N, C, H, W) floats in [-1, 1] with C the data's or the autoencoder's
        channels and H, W multiples of its downsampling factor."""
        channels = sorted({self.data_channels, self.model.config.in_channels})
        factor = 2 ** (len(self.model.config.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[1] not in channels:
            raise DDMError(f"encode: images (N, C, H, W) with C in {channels} expected, got shape {tuple(x.shape)} "
                           "(latents are decoded with decode)")
        if not x.is_floating_point():
            raise DDMError(f"encode: images as floats in [-1, 1] expected, got {x.dtype} (0..255 images: "
                           "x.float() / 127.5 - 1)")
        if not bool(torch.isfinite(x).all()):
            raise DDMError("encode: the images hold NaN or infinite values")
        if float(x.abs().max()) > 1 + 1e-3:
            raise DDMError(f"encode: images in [-1, 1] expected, values reach {float(x.abs().max()):.4g} "
                           "(0..1 images: 2 * x - 1; 0..255: x / 127.5 - 1)")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise DDMError(f"encode: H and W must be multiples of {factor} (the autoencoder's downsampling), got "
                           f"{x.shape[2]}x{x.shape[3]}")

    def to(self, device) -> "LatentCodec":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, c, h, w) latents (mean of the posterior, shifted and scaled)."""
        self.check_images(x)
        out = []
        for chunk in x.split(self.batch):
            chunk = chunk.to(self.device, torch.float32)
            if chunk.shape[1] != self.model.config.in_channels:
                chunk = chunk.expand(-1, self.model.config.in_channels, -1, -1)  # grey -> RGB
            mean = self.model.encode(chunk).latent_dist.mean
            out.append(((mean - self.shift) * self.scale).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) latents -> (N, C, H, W) images, on the latents' device."""
        c = self.model.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise DDMError(f"decode: latents (N, {c}, h, w) expected, got shape {tuple(z.shape)} (images are "
                           "encoded with encode)")
        out = []
        for chunk in z.split(self.batch):
            x = self.model.decode(chunk.to(self.device, torch.float32) / self.scale + self.shift).sample
            if x.shape[1] != self.data_channels:
                x = x.mean(1, keepdim=True)  # RGB -> grey
            out.append(x.float().to(z.device))
        return torch.cat(out)


def load_codec(folder: str | Path, data_channels: int, batch: int = 256, device="cpu",
               run_copy: bool = True) -> LatentCodec:
    """The codec of an autoencoder folder for images of data_channels channels (1 or 3; grey images go
    through an RGB autoencoder as their channel repeated), coding `batch` images at once on `device`.
    run_copy: the folder is a run's RUN/autoencoder (else a latent.pretrained folder; load_autoencoder)."""
    return LatentCodec(load_autoencoder(folder, run_copy).to(device), data_channels, batch)
