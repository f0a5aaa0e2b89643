"""Latent DDMs: the autoencoder (diffusers AutoencoderKL) that maps images to latents and back."""
from ddmkit.latent.autoencoder import LatentCodec, build_autoencoder, latent_shape, load_autoencoder, load_codec

__all__ = ["LatentCodec", "build_autoencoder", "latent_shape", "load_autoencoder", "load_codec"]
