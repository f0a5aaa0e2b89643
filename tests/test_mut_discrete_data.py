"""Known answers for the text pipelines (byte tokens, masked flow matching, autoregressive mixtures, text shards
and their evaluation), the vector partition and the latent codec: exact values, identities, round trips and
byte comparisons that a one-point change of the code breaks."""
from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddmkit.data.arrays import ArrayData
from ddmkit.data.partition import (balanced_assign, check_fine_k, cluster, cluster_statistics, compute_partition,
                                   load_partition, partition_data, read_shard, shard_cluster)
from ddmkit.discrete.ar import (ar_inputs, ar_loss, bayes_posterior, bayes_router, learned_router, sample_ar,
                                token_logprobs, total_bits)
from ddmkit.discrete.config import TextPartitionConfig
from ddmkit.discrete.corpus import Document
from ddmkit.discrete.dfm import dfm_loss, elbo_bits, mixture_denoiser, model_denoiser, sample_dfm
from ddmkit.discrete.evaluate import Tally, evaluate_ar, prefix_lengths
from ddmkit.discrete.features import sklearn_seed
from ddmkit.discrete.shards import (cluster_prior, load_streams, mixed_windows, nearest_centroid, partition_text,
                                   sample_windows)
from ddmkit.discrete.tokens import MASK, decode
from ddmkit.errors import DDMError
from ddmkit.io import save_tensors, sha256_file
from ddmkit.nets.transformer import CausalTransformer
from ddmkit.routing import RoutingState, parse_strategy

LN2, LN255 = math.log(2), math.log(255)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def byte_logp(probs: dict[int, float]) -> torch.Tensor:
    """(256,) log-probabilities: the given bytes' probabilities, the rest shared evenly by the other bytes."""
    rest = (1 - sum(probs.values())) / (256 - len(probs))
    p = torch.full((256,), rest, dtype=torch.float64)
    for b, q in probs.items():
        p[b] = q
    return p.log()


class Constant(torch.nn.Module):
    """An autoregressive expert with the same next-byte law after every prefix."""

    def __init__(self, probs: dict[int, float]):
        super().__init__()
        self.register_buffer("logp", byte_logp(probs).float())

    def forward(self, tokens):
        return self.logp.expand(*tokens.shape, 256)


# ----- byte tokens ------------------------------------------------------------------------------------------
def test_invalid_utf8_decodes_to_the_replacement_character_before_and_after_a_special_token():
    assert decode([0xFF, MASK, 0xFF]) == "\ufffd_\ufffd"
    assert decode([104, 0xC3]) == "h\ufffd"


# ----- masked discrete flow matching --------------------------------------------------------------------------
def test_dfm_loss_is_the_cross_entropy_of_the_masked_positions_only():
    """A denoiser giving the true byte probability 1/2 on masked positions and a uniform law on the others: the loss
    is ln 2 exactly; t ~ U(0, 1) masks some windows lightly."""
    x0 = torch.arange(64 * 256).reshape(64, 256) % 256
    fractions = []

    def model(xt):
        fractions.append((xt == MASK).double().mean(1))
        logits = torch.zeros(*xt.shape, 256)
        masked = xt == MASK
        return logits.scatter(-1, x0[..., None], LN255 * masked[..., None].float())  # 255 / (255 + 255) = 1/2

    assert dfm_loss(model, x0, gen()).item() == pytest.approx(LN2, abs=1e-6)
    assert fractions[0].min() < 0.3 and fractions[0].max() > 0.7


def test_model_denoiser_is_the_log_softmax_of_the_byte_outputs_alone():
    logits = torch.linspace(-3, 3, 258).expand(2, 5, -1).clone()
    logits[..., 256:] = 50.0  # outputs beyond the bytes never take probability
    out = model_denoiser(lambda xt: logits)(torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(out, logits[..., :256].log_softmax(-1))


def test_mixture_denoiser_weights_each_row_by_its_own_router_probabilities():
    experts = [lambda xt, b=b: byte_logp({b: 0.9}).expand(*xt.shape, -1) for b in (65, 66)]
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]], dtype=torch.float64)
    den = mixture_denoiser(experts, lambda xt: probs, parse_strategy("full"), RoutingState())
    out = den(torch.full((3, 4), MASK)).exp()
    p0, p1 = byte_logp({65: 0.9}).exp(), byte_logp({66: 0.9}).exp()
    for row, want in enumerate((p0, p1, 0.25 * p0 + 0.75 * p1)):
        torch.testing.assert_close(out[row], want.expand(4, -1))


def test_elbo_is_the_midpoint_rule_of_masked_bits_over_t():
    """One bit per masked byte: the bound is sum_j m_j / (t_j J) with t_j = (j + 1/2) / J, m_j the masked count."""
    x0 = torch.randint(0, 256, (1, 20000), generator=gen(1))
    seen = []

    def one_bit(xt):
        seen.append(int((xt == MASK).sum()))
        return torch.full((*xt.shape, 256), -LN2)

    bits = elbo_bits(one_bit, x0, 4, gen()).item()
    t = [(j + 0.5) / 4 for j in range(4)]
    assert bits == pytest.approx(sum(m / (tj * 4) for m, tj in zip(seen, t)), rel=1e-6)  # float32 sums
    assert [m / 20000 for m in seen] == pytest.approx(t, abs=0.015)


def test_sampler_takes_its_steps_keeps_revealed_bytes_and_leaves_s_masked_at_time_s():
    calls = []

    def den(xt):
        calls.append(xt.clone())
        return byte_logp({65: 0.5, 66: 0.5}).expand(*xt.shape, -1)

    x = sample_dfm(den, 50, 40, steps=4, generator=gen())
    states = calls + [x]
    assert len(calls) == 4 and (x != MASK).all()
    for before, after in zip(states, states[1:]):
        shown = before != MASK
        assert torch.equal(after[shown], before[shown])
    assert [(s == MASK).double().mean().item() for s in states] == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=0.03)


def test_a_low_temperature_samples_the_most_likely_byte():
    den = lambda xt: byte_logp({65: 0.6, 66: 0.4 - 1e-6}).expand(*xt.shape, -1)
    assert (sample_dfm(den, 10, 20, steps=3, generator=gen(), temperature=0.01) == 65).all()
    experts = [Constant({97: 0.6, 98: 0.4 - 1e-6})]
    x, _ = sample_ar(experts, lambda x, lp: torch.ones(len(x), 1), parse_strategy("full"), 10, 20, gen(),
                     temperature=0.01)
    assert (x == 97).all()


# ----- autoregressive experts ----------------------------------------------------------------------------------
def copy_model(tokens):
    """p(next = the input byte) = 1/2, the rest 1/510 each; after BOS, uniform."""
    logits = torch.zeros(*tokens.shape, 256)
    is_byte = (tokens < 256)[..., None].float()
    return logits.scatter(-1, tokens.clamp_max(255)[..., None], LN255 * is_byte)


def test_ar_loss_and_token_logprobs_score_each_byte_given_the_bytes_before_it():
    w = torch.tensor([[97, 97, 98]])  # inputs BOS a a: uniform, a -> a (1/2), a -> b (1/510)
    want = torch.tensor([[-math.log(256), -LN2, -math.log(510)]])
    torch.testing.assert_close(token_logprobs(copy_model, w), want)
    assert ar_loss(copy_model, w).item() == pytest.approx(-want.mean().item(), abs=1e-6)


def test_bayes_posterior_known_values():
    """Expert 0 gives each byte 1/2, expert 1 gives 1/4 (row 0) or 1 (row 1): P(k | x_<n) ∝ pi_k prod_{i<n} q_k."""
    half = torch.full((2, 3), 0.5, dtype=torch.float64)
    other = torch.tensor([[0.25] * 3, [1.0] * 3], dtype=torch.float64)
    post = bayes_posterior(torch.stack([half, other]).log(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert post.shape == (2, 3, 2)
    torch.testing.assert_close(post[0, :, 0], torch.tensor([1 / 2, 2 / 3, 4 / 5], dtype=torch.float64))
    torch.testing.assert_close(post[1, :, 0], torch.tensor([1 / 2, 1 / 3, 1 / 5], dtype=torch.float64))


def test_total_bits_is_minus_log2():
    assert total_bits(torch.full((2, 4), math.log(0.5))) == pytest.approx(8.0)


def test_sample_ar_routes_with_the_bayes_posterior_of_its_own_bytes_and_draws_from_the_mixture():
    """The weights sample_ar used at step m are the prefix posterior of the bytes it drew, computed again from the
    finished sample; at a low temperature each byte is the argmax of the weighted mixture of the experts."""
    torch.manual_seed(0)
    nets = [CausalTransformer(seq_len=16, out_dim=256, width=16, depth=1, heads=2).eval() for _ in range(2)]
    experts = [lambda t, m=m: m(t) * 20 for m in nets]  # sharp laws: no near ties for the argmax
    prior = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x, used = sample_ar(experts, bayes_router(prior), parse_strategy("full"), 3, 10, gen(), temperature=1e-3)
    assert x.shape == (3, 10) and used.shape == (3, 10, 2)
    with torch.no_grad():
        logq = torch.stack([token_logprobs(e, x) for e in experts]).double()
        torch.testing.assert_close(used.double(), bayes_posterior(logq, prior), atol=1e-5, rtol=1e-5)
        full = torch.stack([e(ar_inputs(x)).log_softmax(-1).exp() for e in experts])  # (K, n, L, 256)
    assert torch.equal(torch.einsum("nlk,knlv->nlv", used.float(), full).argmax(-1), x)


def test_a_learned_router_reads_its_last_position():
    router = lambda t: torch.stack([torch.arange(t.shape[1]).float(), torch.zeros(t.shape[1])], -1).expand(
        len(t), -1, -1)  # position i: logits (i, 0)
    experts = [Constant({97: 0.5}), Constant({98: 0.5})]
    _, used = sample_ar(experts, learned_router(router), parse_strategy("full"), 2, 5, gen())
    torch.testing.assert_close(used[0, :, 0], torch.sigmoid(torch.arange(5).float()))


# ----- text shards, routing evaluation -----------------------------------------------------------------------
def test_sample_windows_reach_the_last_offset_and_a_stream_of_exactly_one_window():
    x = torch.arange(5, dtype=torch.uint8)
    starts = set(sample_windows(x, 4, 200, gen())[:, 0].tolist())
    assert starts == {0, 1}
    assert sample_windows(x[:4], 4, 3, gen()).tolist() == [[0, 1, 2, 3]] * 3


def test_mixed_windows_come_from_their_labels_cluster_drawn_by_bytes():
    streams = [torch.full((30,), 97, dtype=torch.uint8), torch.full((10,), 98, dtype=torch.uint8)]
    assert cluster_prior(streams).tolist() == [0.75, 0.25]
    x, labels = mixed_windows(streams, 4, 4000, gen())
    assert torch.equal(x, (97 + labels)[:, None].expand(-1, 4))
    assert (labels == 0).double().mean().item() == pytest.approx(0.75, abs=0.03)


def test_nearest_centroid_known_answer():
    c = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    assert nearest_centroid(torch.tensor([[1.0, 0.0], [9.0, 1.0], [4.0, 0.0]]), c).tolist() == [0, 1, 0]


def test_sklearn_seed_is_the_seed_modulo_2_to_the_32():
    assert [sklearn_seed(s) for s in (5, 2**32 - 1, 2**32 + 5)] == [5, 2**32 - 1, 5]


def docs(kind: str, n: int, start: int = 0) -> list[Document]:
    texts = {"prose": "the cat sat on the mat and the dog lay by the door {} ",
             "code": "x{0} = [{0}, {0} * 7, 0x{0}] ; y{0} = x{0}[-1] // 3 ; "}
    return [Document(f"{kind}{i}", (texts[kind].format(i) * 12).encode()) for i in range(start, start + n)]


def test_two_training_documents_go_to_two_clusters(tmp_path):
    """Features of at least 2 dimensions: one SVD dimension (all a corpus of 2 documents had) scales every
    document to the same unit vector, and k-means left a cluster empty."""
    m = partition_text(docs("prose", 1) + docs("code", 1), [], TextPartitionConfig(k=2), tmp_path / "p")
    assert sorted(s["count"] for s in m["shards"]) == [1, 1] and m["features"]["svd_dim"] == 2


def test_copies_of_one_document_are_not_partitioned_into_empty_clusters(tmp_path):
    """A folder of copies of one file: the fix named is more, different text, not a scikit-learn warning and an
    empty cluster."""
    train = docs("prose", 1) * 3 + docs("code", 1)
    with pytest.raises(DDMError, match=r"partition.k = 3 is larger than the number of distinct training documents "
                                       r"\(2 of 4; the others are copies\); lower partition.k or use more, different"):
        partition_text(train, [], TextPartitionConfig(k=3), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_text_partition_of_two_kinds_of_text_writes_known_shards_and_hashes(tmp_path):
    train = [d for pair in zip(docs("prose", 4), docs("code", 4)) for d in pair]
    test = docs("code", 1, 10) + docs("prose", 2, 10)
    m = partition_text(train, test, TextPartitionConfig(k=2, svd_dim=4), tmp_path / "p")
    names = [{n[:4] for n in s["examples"]} for s in m["shards"]]
    assert sorted(map(sorted, names)) == [["code"], ["pros"]]
    prose = 0 if names[0] == {"pros"} else 1
    held = {"prose": docs("prose", 2, 10), "code": docs("code", 1, 10)}
    manifest, streams = load_streams(tmp_path / "p")
    _, tests = load_streams(tmp_path / "p", split="test")
    for c, kind in ((prose, "prose"), (1 - prose, "code")):
        shard, t = m["shards"][c], m["test_shards"][c]
        assert bytes(streams[c].tolist()) == b"".join(d.text + b"\n\n" for d in docs(kind, 4))
        assert bytes(tests[c].tolist()) == b"".join(d.text + b"\n\n" for d in held[kind])
        assert shard["bytes"] == len(streams[c]) and t["bytes"] == len(tests[c]) and t["count"] == len(held[kind])
        for entry in (shard, t):
            assert entry["sha256"] == hashlib.sha256((tmp_path / "p" / entry["path"]).read_bytes()).hexdigest()
    assert m["data_hash"] == hashlib.sha256(b"".join(hashlib.sha256(d.text).digest() for d in train)).hexdigest()
    shard = tmp_path / "p" / m["test_shards"][0]["path"]
    save_tensors(shard, {"x": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(DDMError, match="SHA-256 differs"):
        load_streams(tmp_path / "p", split="test")


def test_prefix_lengths_and_byte_weighted_tally():
    assert prefix_lengths(16) == [0, 1, 2, 4, 8, 15] and prefix_lengths(9) == [0, 1, 2, 4, 8]
    tally = Tally(2)
    tally.add("r", 0, 10.0, 10)
    tally.add("r", 1, 60.0, 20)
    assert tally.table() == {"r": {"per_cluster": [1.0, 3.0], "all": pytest.approx(70 / 30)}}


def test_evaluate_ar_of_two_constant_experts_known_answers():
    """Cluster 0 is all 'a', cluster 1 all 'b'; expert k gives its cluster's byte probability 1/2."""
    experts = [Constant({97: 0.5}), Constant({98: 0.5})]
    streams = [torch.full((32,), 97, dtype=torch.uint8), torch.full((32,), 98, dtype=torch.uint8)]
    cfg = SimpleNamespace(model=SimpleNamespace(seq_len=8), seed=0,
                          evaluate=SimpleNamespace(windows_per_cluster=4, strategies=["full"]))
    r = evaluate_ar(experts, None, {"bayes": None}, torch.tensor([0.5, 0.5], dtype=torch.float64), streams, cfg)
    bpb = r["bits_per_byte"]
    assert bpb["own expert (true cluster)"]["per_cluster"] == pytest.approx([1.0, 1.0])
    mixture = -math.log2(0.5 * 0.5**8 + 0.5 * (0.5 / 255) ** 8) / 8  # chain rule: the Bayes mixture's bits
    assert bpb["bayes / full"]["per_cluster"] == pytest.approx([mixture, mixture], rel=1e-6)
    assert r["eval_windows"] == 8
    assert r["router_accuracy"]["bayes"] == pytest.approx({0: 0.5, 1: 1.0, 2: 1.0, 4: 1.0, 7: 1.0})


# ----- vector partition ----------------------------------------------------------------------------------------
def test_balanced_assign_lets_the_clearest_preferences_choose_first():
    dist = np.array([[0.0, 10.0], [0.0, 1.0], [0.0, 9.0], [5.0, 0.0]])  # rows 0, 2 prefer column 0 most clearly
    assert balanced_assign(dist).tolist() == [0, 1, 0, 1]


def test_two_stage_kmeans_weights_fine_centroids_by_their_points():
    """Points at 0, 3.2 and 100 copies at 6: weighted by counts, the coarse pair is {0, 3.2} | {6}; unweighted, it
    would be {0} | {3.2, 6}."""
    x = torch.tensor([[0.0], [3.2]] + [[6.0]] * 100)
    labels, centroids = cluster(x, 2, False, seed=0, fine_k=3)
    assert labels[0] == labels[1] != labels[2] and len(set(labels[2:].tolist())) == 1
    np.testing.assert_allclose(np.sort(centroids[:, 0]), [1.6, 6.0])


def test_a_balanced_partition_s_centroids_are_its_clusters_means():
    x = torch.cat([torch.randn(300, 2, generator=gen()), torch.randn(60, 2, generator=gen(1)) + 8])
    plan = compute_partition(ArrayData("skewed", x), 3, balanced=True, seed=0)
    for c in range(3):
        np.testing.assert_allclose(plan.centroids[c], x[plan.labels == c].double().mean(0).numpy(), atol=1e-12)


def test_cluster_statistics_are_the_unbiased_covariance_and_variances():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [5.0, 1.0], [5.0, 3.0]])
    stats = cluster_statistics(x, torch.tensor([0, 0, 1, 1]), 2)
    want = torch.tensor([[[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(stats["cluster_covs"], want)
    wide = torch.zeros(3, 300)
    wide[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    assert cluster_statistics(wide, torch.zeros(3, dtype=torch.long), 1)["cluster_vars"][0, 0] == 1.0


def test_the_limits_of_k_and_fine_k_are_allowed():
    plan = compute_partition(ArrayData("three", torch.tensor([[0.0], [5.0], [9.0]])), 3)
    assert sorted(plan.counts.tolist()) == [1, 1, 1]
    check_fine_k(2, 2, 10)
    check_fine_k(10, 2, 10)


def test_partition_files_are_recorded_by_their_sha256_and_name_their_cluster(tmp_path):
    x = torch.cat([torch.randn(30, 2, generator=gen()), torch.randn(30, 2, generator=gen(1)) + 8])
    m = partition_data(ArrayData("two", x), 2, tmp_path / "p")
    for c, s in enumerate(m["shards"]):
        path = tmp_path / "p" / s["path"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard_cluster(path, read_shard(path)[2]) == c
    assert m["tensors_sha256"] == hashlib.sha256((tmp_path / "p" / "partition.safetensors").read_bytes()).hexdigest()


def test_centroids_of_another_k_are_refused(tmp_path):
    x = torch.cat([torch.randn(30, 2, generator=gen()), torch.randn(30, 2, generator=gen(1)) + 8])
    folder = tmp_path / "p"
    partition_data(ArrayData("two", x), 2, folder)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "partition.safetensors"))
    tensors["centroids"] = torch.zeros(3, 2)
    save_tensors(folder / "partition.safetensors", tensors)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tensors_sha256"] = sha256_file(folder / "partition.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDMError, match=r"'centroids' must be a float \(k, F\) = \(2, F\) tensor"):
        load_partition(folder)


def test_a_shard_holding_nan_is_refused(tmp_path):
    save_tensors(tmp_path / "s.safetensors", {"x": torch.tensor([[0.0, 1.0], [float("nan"), 2.0]])})
    with pytest.raises(DDMError, match=r"rows hold NaN or infinite values \(first bad rows: \[1\]\)"):
        read_shard(tmp_path / "s.safetensors")


def test_k_means_takes_the_partition_seed(monkeypatch):
    from sklearn.cluster import KMeans

    seeds, fit = [], KMeans.fit
    monkeypatch.setattr(KMeans, "fit", lambda self, *a, **kw: seeds.append(self.random_state) or fit(self, *a, **kw))
    cluster(torch.randn(20, 2, generator=gen()), 2, False, seed=7)
    assert seeds == [7]


# ----- latent codec --------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")

from ddmkit.config import LatentConfig  # noqa: E402
from ddmkit.latent import LatentCodec, build_autoencoder, latent_shape, load_autoencoder  # noqa: E402
from ddmkit.latent.autoencoder import check_pretrained, network_data_shape  # noqa: E402


def tiny_autoencoder(in_channels: int = 1):
    torch.manual_seed(0)
    return build_autoencoder(LatentConfig(channels=2, widths=[8, 8]), in_channels, 8).eval()


def test_shift_and_scale_cancel_in_an_encode_decode_round_trip():
    ae = tiny_autoencoder()
    ae.register_to_config(scaling_factor=2.0, shift_factor=0.5)
    x = torch.rand(3, 1, 8, 8, generator=gen()) * 2 - 1
    codec = LatentCodec(ae, 1)
    with torch.no_grad():
        mean = ae.encode(x).latent_dist.mean
        want = ae.decode(mean).sample
    torch.testing.assert_close(codec.encode(x), (mean - 0.5) * 2.0)
    torch.testing.assert_close(codec.decode(codec.encode(x)), want, atol=1e-5, rtol=1e-4)


def test_images_below_minus_one_are_refused():
    with pytest.raises(DDMError, match="values reach 2"):
        LatentCodec(tiny_autoencoder(), 1).encode(torch.full((1, 1, 8, 8), -2.0))


def test_latent_shape_of_a_wide_image_and_the_planned_config():
    config = {"in_channels": 3, "latent_channels": 4, "block_out_channels": [8, 8, 8]}
    assert latent_shape(config, (3, 32, 64)) == (4, 8, 16)
    cfg = LatentConfig(enabled=True, channels=2, widths=[8, 8])
    assert network_data_shape(cfg, (1, 8, 16)) == (2, 4, 8)
    from ddmkit.latent.autoencoder import planned_config

    assert planned_config(cfg, (1, 8, 8))["in_channels"] == 1


def test_an_autoencoder_with_nan_weights_is_refused_and_a_user_channels_setting_is_noted(tmp_path):
    ae = tiny_autoencoder()
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    notes = []
    check_pretrained(LatentConfig(enabled=True, pretrained=str(tmp_path / "vae"), channels=3), notes.append)
    assert len(notes) == 1 and "latent.channels = 3 is not used" in notes[0] and "2 latent channels" in notes[0]
    check_pretrained(LatentConfig(enabled=True, pretrained=str(tmp_path / "vae"), channels=2), notes.append)
    assert len(notes) == 1
    with torch.no_grad():
        next(ae.parameters()).view(-1)[0] = float("nan")
    ae.save_pretrained(tmp_path / "nan", safe_serialization=True)
    with pytest.raises(DDMError, match="NaN or infinite weights"):
        load_autoencoder(tmp_path / "nan")
