"""The autoencoder job of a latent DDM: train a small AutoencoderKL on the training images.

    train_autoencoder(x, cfg.latent, out_dir)    # writes a diffusers folder (save_pretrained)

Loss per batch (x in [-1, 1], z drawn from the posterior q(z | x) = N(mu, sigma^2)):

    L = mean (D(z) - x)^2 + kl_weight * KL(q(z | x) || N(0, I)) / (latent numbers per image)

trained by ddmkit's one loop (AdamW, warm-up, EMA, checkpoints: latent.train.checkpoint_every steps
to OUT.checkpoint.safetensors beside the folder, continued from when the job is run again with the
same settings and images, as a monolith or router job is). The EMA weights are saved, with
scaling_factor = 1 / std and shift_factor = mean of the posterior means of (up to 10,000)
training images, so latents have zero mean and unit variance.

Every island of a latent DDM must use the same autoencoder. Training it on the pooled training
images breaks the islands' isolation for this one network; a pretrained autoencoder (or one
trained on public data) keeps it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from ddmkit.config import LatentConfig, field_device
from ddmkit.io import staging_dir
from ddmkit.latent.autoencoder import LatentCodec, build_autoencoder
from ddmkit.train.jobs import checkpoint_path
from ddmkit.train.loop import fit

STATS_ROWS = 10_000  # training images that set the latents' shift and scale


def _images_hash(x: torch.Tensor) -> str:
    """The SHA-256 of the images' bytes: a checkpoint is continued only on the same images."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def train_autoencoder(x: torch.Tensor, cfg: LatentConfig, out_dir: str | Path, resume: bool = True,
                      resumed: Callable[[], None] | None = None) -> Path:
    """Train an AutoencoderKL on images x (N, C, H, W) in [-1, 1]; write it to out_dir (diffusers format,
    plus train_log.jsonl). Deterministic for cfg.train.seed. Checkpoints (cfg.train.checkpoint_every)
    go to checkpoint_path(out_dir), continued from with resume (refused when written with other
    settings or images) and removed once the folder is written; resumed: see fit."""
    device = field_device("latent.train.device", cfg.train.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_autoencoder(cfg, x.shape[1], x.shape[-1])
    data = x.float().to(device)

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(data), (cfg.train.batch_size,), generator=gen, device=device)
        xb = data[idx]
        posterior = m.encode(xb).latent_dist
        recon = m.decode(posterior.sample(generator=gen)).sample
        mse = (recon.float() - xb).pow(2).mean()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return mse + cfg.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}

    settings = {"latent": cfg.model_dump(include={"channels", "widths", "layers_per_block", "kl_weight"}),
                "train": cfg.train.model_dump()}
    with staging_dir(out_dir) as tmp:
        ema, _ = fit(model, batch_loss, cfg.train, tmp / "train_log.jsonl", "autoencoder", device,
                     checkpoint_path(out_dir), resume, data=[_images_hash(x)], settings=settings, resumed=resumed)
        ema.register_to_config(scaling_factor=1.0, shift_factor=0.0)
        latents = LatentCodec(ema, x.shape[1], cfg.encode_batch).encode(x[:STATS_ROWS])
        ema.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
        ema.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
    checkpoint_path(out_dir).unlink(missing_ok=True)
    return Path(out_dir)
