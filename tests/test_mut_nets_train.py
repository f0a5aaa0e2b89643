"""Known-answer tests of the built-in networks (time features, residual blocks, zero-initialised outputs, the
'no label' class, DiT's patches, causal attention), the latent autoencoder's fitted scale and shift, and the
concurrent experts' batches, losses and isolation."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ddmkit.nets import DiT, RouterCNN, UNet, timestep_embedding
from ddmkit.nets.mlp import ResidualBlock
from ddmkit.nets.transformer import BidirectionalTransformer, CausalTransformer
from ddmkit.nets.unet import Attention, ResBlock


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn anew (so zero-initialised output layers let the rest of the network show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# ----- time features and residual blocks ----------------------------------------------------------------------------


def test_the_time_features_are_cos_then_sin_of_1000_t_times_geometric_frequencies():
    """dim 6: frequencies 1000^(-i/3) = 1, 0.1, 0.01 of 1000 t; an odd dim appends one zero."""
    t = torch.tensor([0.0, 0.5, 0.002])
    args = (1000 * t)[:, None] * torch.tensor([1.0, 0.1, 0.01])
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 6), expected, rtol=1e-5, atol=1e-5)
    odd = timestep_embedding(t, 7)
    torch.testing.assert_close(odd[:, :6], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(odd[:, 6], torch.zeros(3))


def test_an_mlp_residual_block_with_a_zero_last_layer_adds_its_bias_to_its_input():
    block = ResidualBlock(4, 3)
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    out = block(h, torch.randn(5, 3))
    torch.testing.assert_close(out, h + torch.tensor([1.0, -2.0, 0.5, 0.0]))


def test_an_mlp_residual_block_adds_silu_of_its_embedding_when_its_layers_pass_it_through():
    """fc1 = 0, emb = I, fc2 = I (biases 0): h + silu(emb), whatever h."""
    block = ResidualBlock(3, 3)
    with torch.no_grad():
        for layer in (block.fc1, block.emb, block.fc2):
            layer.weight.copy_(torch.eye(3) if layer is not block.fc1 else torch.zeros(3, 3))
            layer.bias.zero_()
    h, emb = torch.randn(4, 3), torch.tensor([[1.0, -1.0, 0.0]] * 4)
    torch.testing.assert_close(block(h, emb), h + F.silu(emb))


# ----- UNet and the CNN router --------------------------------------------------------------------------------------


def test_a_unet_resblock_with_a_zero_second_conv_is_its_skip_and_its_embedding_reaches_it():
    block = ResBlock(8, 8, 6)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    torch.testing.assert_close(block(x, emb), x)
    _randomise(block)
    assert not torch.allclose(block(x, emb), block(x, emb + 1.0))  # the time embedding is added in between


def test_unet_attention_is_its_input_plus_softmax_attention_scaled_by_one_over_root_d():
    attn = Attention(8, heads=2)
    _randomise(attn)
    x = torch.randn(2, 8, 2, 3, generator=torch.Generator().manual_seed(2))
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 2, 4, 6).unbind(1)  # (B, heads, d, pixels)
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    expected = x + attn.proj(out.transpose(-1, -2).reshape(2, 8, 2, 3))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_an_untrained_unet_predicts_zero_and_its_no_label_class_is_num_classes():
    net = UNet([1, 8, 8], channels=[8, 8], attention_res=[4], num_classes=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    assert torch.equal(net(x, t, torch.tensor([0, 2])), torch.zeros(2, 1, 8, 8))
    _randomise(net)
    none = net(x, t)
    torch.testing.assert_close(net(x, t, torch.tensor([3, 3])), none, rtol=0, atol=0)
    assert not torch.allclose(net(x, t, torch.tensor([2, 2])), none)
    assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))


def test_the_label_router_takes_num_classes_as_no_label_and_uses_the_label():
    router = RouterCNN([1, 8, 8], num_experts=3, channels=[8, 8], time_dim=8, num_classes=4)
    _randomise(router)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.9])
    torch.testing.assert_close(router(x, t, torch.tensor([4, 4])), router(x, t), rtol=0, atol=0)
    assert not torch.allclose(router(x, t, torch.tensor([3, 3])), router(x, t))
    assert not torch.allclose(router(x, t, torch.tensor([0, 0])), router(x, t, torch.tensor([1, 1])))


def test_the_router_pools_the_output_of_its_last_strided_convolution():
    """With the last down-sampling convolution's weight zero, its output is its bias: logits do not depend on x."""
    router = RouterCNN([1, 8, 8], num_experts=3, channels=[8, 8], time_dim=8)
    _randomise(router)
    with torch.no_grad():
        router.downs[-1].weight.zero_()
    t = torch.tensor([0.2, 0.9])
    first, second = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(router(first, t), router(second, t), rtol=1e-5, atol=1e-6)


# ----- DiT ----------------------------------------------------------------------------------------------------------


def test_an_untrained_dit_predicts_zero_and_each_of_its_blocks_is_the_identity():
    net = DiT([2, 4, 4], patch=2, width=8, depth=2, heads=2, num_classes=3)
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([0.1, 0.6])
    assert torch.equal(net(x, t), torch.zeros(2, 2, 4, 4))
    h, emb = torch.randn(2, 4, 8), torch.randn(2, 8)
    for block in net.blocks:
        assert torch.equal(block(h, emb), h)


def test_dit_unpatchifies_token_features_row_column_channel_within_each_patch():
    """depth 0, a zero output weight and bias b: pixel (c, I p + a, J p + j) of every patch (I, J) is
    b[(a p + j) C + c]."""
    net = DiT([2, 4, 6], patch=2, width=8, depth=0, heads=2)
    with torch.no_grad():
        net.out.bias.copy_(torch.arange(8.0))
    out = net(torch.randn(1, 2, 4, 6), torch.tensor([0.5]))
    for c in range(2):
        for a in range(2):
            for j in range(2):
                assert torch.equal(out[0, c, a::2, j::2], torch.full((2, 3), float((a * 2 + j) * 2 + c)))


def test_dit_modulates_its_last_norm_by_one_plus_scale_plus_shift():
    net = DiT([1, 4, 4], patch=2, width=8, depth=0, heads=2)
    _randomise(net)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.25, 0.75])
    h = net.embed_patches(x).flatten(2).transpose(1, 2) + net.pos
    emb = net.time_mlp(timestep_embedding(t, 8))
    shift, scale = net.ada_out(F.silu(emb))[:, None].chunk(2, dim=-1)
    tokens = net.out(F.layer_norm(h, (8,)) * (1 + scale) + shift)  # (B, 4 patches, 4 pixels)
    expected = tokens.reshape(2, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(2, 1, 4, 4)
    torch.testing.assert_close(net(x, t), expected, rtol=1e-5, atol=1e-5)


def test_dit_takes_num_classes_as_no_label():
    net = DiT([1, 4, 4], patch=2, width=8, depth=1, heads=2, num_classes=3)
    _randomise(net)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.25, 0.75])
    torch.testing.assert_close(net(x, t, torch.tensor([3, 3])), net(x, t), rtol=0, atol=0)
    assert not torch.allclose(net(x, t, torch.tensor([2, 2])), net(x, t))


# ----- byte transformers --------------------------------------------------------------------------------------------


def test_the_causal_transformer_sees_no_later_token_and_the_bidirectional_one_does():
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    later = tokens.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 256
    causal = CausalTransformer(6, 5, width=8, depth=2, heads=2)
    torch.testing.assert_close(causal(later)[:, :4], causal(tokens)[:, :4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(causal(later)[:, 4:], causal(tokens)[:, 4:])
    both = BidirectionalTransformer(6, 5, width=8, depth=2, heads=2)
    assert not torch.allclose(both(later)[:, :4], both(tokens)[:, :4])


def test_a_transformer_block_with_zero_output_layers_is_the_identity():
    net = CausalTransformer(6, 5, width=8, depth=1, heads=2)
    block = net.blocks[0]
    with torch.no_grad():
        for layer in (block.proj, block.mlp[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    h = torch.randn(2, 6, 8)
    torch.testing.assert_close(block(h), h)


def test_the_pooled_router_without_positions_ignores_the_tokens_order():
    net = BidirectionalTransformer(6, 3, width=8, depth=1, heads=2, pool=True)
    with torch.no_grad():
        net.pos.zero_()
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    out = net(tokens)
    assert out.shape == (2, 3)
    torch.testing.assert_close(net(tokens.flip(1)), out, rtol=1e-5, atol=1e-5)


# ----- the latent autoencoder's scale and shift --------------------------------------------------------------------


def test_a_trained_autoencoder_gets_scale_one_over_std_and_shift_mean_of_its_training_latents(tmp_path):
    pytest.importorskip("diffusers")
    from ddmkit.config import LatentConfig, TrainConfig
    from ddmkit.latent import LatentCodec, load_autoencoder
    from ddmkit.train.autoencoder import train_autoencoder
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = LatentConfig(enabled=True, channels=2, widths=[8, 8, 8], encode_batch=8,
                       train=TrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, device="cpu"))
    model = load_autoencoder(train_autoencoder(x, cfg, tmp_path / "vae"))
    scale, shift = float(model.config.scaling_factor), float(model.config.shift_factor)
    model.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    raw = LatentCodec(model, 1, 8).encode(x)
    assert shift == pytest.approx(float(raw.mean()), rel=1e-5, abs=1e-6)
    assert scale == pytest.approx(1.0 / float(raw.std()), rel=1e-5)
    assert shift != 0.0 and scale != pytest.approx(1.0, abs=1e-3)  # the check can tell them from the defaults


# ----- concurrent experts -------------------------------------------------------------------------------------------


def test_the_stacked_sampler_draws_each_rows_own_label():
    from ddmkit.train.concurrent import stacked_sampler
    parts = [torch.arange(5.0), torch.arange(5.0, 12.0)]
    labels = [torch.arange(5), torch.arange(5, 12)]
    x, y = stacked_sampler(parts, labels, 400, "cpu")(torch.Generator().manual_seed(0))
    assert torch.equal(x.long(), y)
    assert set(x[0].long().tolist()) == set(range(5)) and set(x[1].long().tolist()) == set(range(5, 12))


def test_the_stacked_loss_is_each_experts_own_flow_matching_loss_on_its_own_draws():
    """t (K, B) then eps (K, B, ...) from the generator; expert k's loss is mean (v_k(x_t, t) - (eps - x))^2 over
    its own rows alone."""
    from ddmkit.nets import build_seeded
    from ddmkit.train.concurrent import stacked_loss
    from ddmkit.train.stacked import StackedExperts
    nets = [build_seeded("mlp", s, data_shape=[2], width=8, depth=1) for s in (0, 1, 2)]
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(5))
    loss = stacked_loss(StackedExperts(nets), x, None, torch.Generator().manual_seed(7), "velocity")
    gen = torch.Generator().manual_seed(7)
    t, eps = torch.rand(3, 4, generator=gen), torch.randn(3, 4, 2, generator=gen)
    for k, net in enumerate(nets):
        xt = (1 - t[k, :, None]) * x[k] + t[k, :, None] * eps[k]
        expected = (net(xt, t[k]) - (eps[k] - x[k])).pow(2).mean()
        torch.testing.assert_close(loss[k], expected, rtol=1e-5, atol=1e-6)


def _label_shards(folder, count: int = 2):
    """`count` shards of 1x4x4 images, shard c's labels all c."""
    from ddmkit.io import save_tensors
    folder.mkdir(parents=True)
    paths = []
    for c in range(count):
        paths.append(folder / f"cluster_{c:02d}.safetensors")
        x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(c)) + 3 * c
        save_tensors(paths[-1], {"x": x, "labels": torch.full((12,), c)}, {"cluster": c, "k": count})
    return paths


def _expert_config(arch: str = "mlp", net: dict | None = None, **kwargs):
    from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
    return ExpertConfig(net=NetConfig(arch=arch, kwargs=net or {"width": 8, "depth": 1}), **kwargs,
                        train=TrainConfig(steps=6, batch_size=4, warmup=1, log_every=3, device="cpu"))


def test_a_concurrent_job_drops_labels_to_the_no_label_class(tmp_path, monkeypatch):
    import ddmkit.train.concurrent as conc
    from ddmkit.data.partition import read_shard
    from ddmkit.train.jobs import PUBLISHED_STATISTICS, publish_statistics
    seen = []
    real = conc.stacked_loss
    monkeypatch.setattr(conc, "stacked_loss", lambda m, x, y, *a: seen.append(y) or real(m, x, y, *a))
    cfg = _expert_config("unet", {"channels": [4], "attention_res": [], "num_classes": 3}, label_dropout=1.0)
    outs = [tmp_path / f"expert_{k}" for k in range(2)]
    shards = _label_shards(tmp_path / "shards")
    conc.train_experts_concurrently(shards, cfg, outs, log=lambda m: None)
    assert len(seen) == 6 and all(torch.equal(y, torch.full((2, 4), 3)) for y in seen)
    for k, (shard, out) in enumerate(zip(shards, outs)):  # each folder publishes its own shard's statistics
        x, labels, _ = read_shard(shard)
        publish_statistics(tmp_path / f"alone_{k}", x, labels, 3)
        name = PUBLISHED_STATISTICS
        assert (out / name).read_bytes() == (tmp_path / f"alone_{k}" / name).read_bytes()


def test_a_concurrent_experts_weights_do_not_change_when_another_shard_does(tmp_path):
    import ddmkit.train.concurrent as conc
    from ddmkit.io import save_tensors
    weights = []
    for scale in (1.0, 4.0):
        folder = tmp_path / f"shards_{scale}"
        folder.mkdir()
        shards = []
        for c in range(2):
            shards.append(folder / f"cluster_{c:02d}.safetensors")
            x = torch.randn(30, 2, generator=torch.Generator().manual_seed(c)) * (scale if c else 1.0)
            save_tensors(shards[-1], {"x": x}, {"cluster": c, "k": 2})
        outs = [tmp_path / f"run_{scale}" / f"expert_{k}" for k in range(2)]
        conc.train_experts_concurrently(shards, _expert_config(), outs, log=lambda m: None)
        weights.append([(out / "model.safetensors").read_bytes() for out in outs])
    assert weights[0][0] == weights[1][0] and weights[0][1] != weights[1][1]
