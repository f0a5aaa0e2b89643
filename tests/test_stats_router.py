"""The statistics-only router: the Gaussian posterior of published cluster statistics."""
import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.routing.stats_router import (island_statistics, load_statistics, lowrank_log_prob, save_statistics,
                                         stats_from_partition, stats_router)
from ddmkit.truth import GaussianMixture


def _gmm(d=3, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) * 0.3
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture.from_covariances(torch.tensor([0.2, 0.3, 0.5])[:k], 3 * torch.randn(k, d, generator=g), covs)


def test_exact_statistics_give_the_exact_posterior():
    """With the true counts, means and covariances the router is the truth's posterior."""
    gmm = _gmm()
    stats = [{"count": gmm.weights[k] * 1000, "mean": gmm.means[k], "cov": gmm.covariances[k]} for k in range(gmm.k)]
    router = stats_router(stats)
    x, t = torch.randn(200, 3, dtype=torch.float64) * 2, torch.rand(200, dtype=torch.float64)
    assert torch.allclose(router(x.float(), t.float()), gmm.posterior(x, t).float(), atol=1e-3)


def test_lowrank_plus_diagonal_log_density_matches_the_full_one():
    """log N(x; a mu, a^2 (U L U^T + D) + s^2 I) by Woodbury equals the dense formula, for all t in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    k, d, r = 2, 6, 2
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(k, d, r, generator=g, dtype=torch.float64)).Q
    lam = torch.rand(k, r, generator=g, dtype=torch.float64) + 0.5
    diag = torch.rand(k, d, generator=g, dtype=torch.float64) * 0.2 + 0.01
    covs = u @ torch.diag_embed(lam) @ u.transpose(1, 2) + torch.diag_embed(diag)
    gmm = GaussianMixture.from_covariances(torch.ones(k), means, covs)
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    for tv in (0.0, 0.3, 0.99, 1.0):
        t = torch.full((50,), tv, dtype=torch.float64)
        assert torch.allclose(lowrank_log_prob(x, t, means, u, lam, diag), gmm.component_log_prob(x, t), atol=1e-8)


def test_island_statistics_full_and_lowrank_routers_agree_at_full_rank():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(400, 4, generator=g) * (0.3 + 0.2 * c) + 2 * c for c in range(3)]
    full = stats_router([island_statistics(x) for x in xs])
    low = stats_router([island_statistics(x, rank=4) for x in xs])
    x, t = torch.randn(100, 4) * 2 + 2, torch.rand(100)
    assert torch.allclose(full(x, t), low(x, t), atol=1e-3)
    assert torch.allclose(full(x, t).sum(1), torch.ones(100))


def test_high_dimensional_statistics_are_lowrank_and_route_images(tmp_path):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(60, 1, 20, 20, generator=g) * 0.2 + c for c in range(2)]  # 400 dims > 256
    stats = [island_statistics(x) for x in xs]
    assert "factors" in stats[0] and stats[0]["factors"].shape == (400, 32) and "cov" not in stats[0]
    save_statistics(tmp_path / "s.safetensors", stats[0])
    stats[0] = load_statistics(tmp_path / "s.safetensors")
    p = stats_router(stats)(xs[1][:10], torch.full((10,), 0.2))
    assert p.shape == (10, 2) and (p.argmax(1) == 1).all()


def test_router_from_partition_tensors():
    g = torch.Generator().manual_seed(4)
    t = {"cluster_means": torch.tensor([[0.0, 0.0], [4.0, 0.0]]), "cluster_counts": torch.tensor([10.0, 30.0]),
         "cluster_covs": torch.eye(2).expand(2, 2, 2).clone()}
    p = stats_router(stats_from_partition(t))(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.zeros(2))
    assert p.argmax(1).tolist() == [1, 0]
    t2 = {k: v for k, v in t.items() if k != "cluster_covs"} | {"cluster_vars": torch.ones(2, 2)}
    p2 = stats_router(stats_from_partition(t2))(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.zeros(2))
    assert torch.allclose(p, p2, atol=1e-5)
    # at t = 1 every cluster is N(0, I): the router returns the cluster proportions
    p1 = stats_router(stats_from_partition(t))(torch.randn(5, 2, generator=g), torch.ones(5))
    assert torch.allclose(p1, torch.tensor([[0.25, 0.75]]).expand(5, 2), atol=1e-6)


def test_bad_statistics_are_clear_errors(tmp_path):
    with pytest.raises(DDMError, match="at least 2 samples"):
        island_statistics(torch.zeros(1, 3))
    with pytest.raises(DDMError, match="at least one island"):
        stats_router([])
    save_tensors = __import__("ddmkit.io", fromlist=["save_tensors"]).save_tensors
    save_tensors(tmp_path / "bad.safetensors", {"mean": torch.zeros(2)})
    with pytest.raises(DDMError, match="not island statistics"):
        load_statistics(tmp_path / "bad.safetensors")


def test_a_run_without_a_trained_router_samples_and_scores_by_the_statistics(tmp_path, monkeypatch, capsys):
    """`ddmkit sample --router statistics` draws the same bytes as the run's own statistics-only set (same
    noise), with or without RUN/router; `ddmkit evaluate` then scores it and reports the statistics-only
    router's accuracy alone."""
    import json
    import shutil
    import sys
    from pathlib import Path

    from ddmkit.cli import main
    from ddmkit.io import load_tensors
    from ddmkit.layout import RunFolder

    def ddmkit(*args):
        monkeypatch.setattr(sys, "argv", ["ddmkit", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main()
        return exit.value.code, " ".join(capsys.readouterr().err.split())

    tiny = Path(__file__).parent / "configs" / "tiny.toml"
    run, name = tmp_path / "run", "top-2 (statistics-only router)"
    code, err = ddmkit("run", tiny, "--out", run, "--set", 'sample.strategies=["top-2"]', "--set",
                       'sample.stats_router_strategies=["top-2"]', "--set", "sample.sweep_n=400",
                       "--set", "evaluate.missing_experts=false")
    assert code == 0, err
    drawn_in_the_run = load_tensors(RunFolder(run).sample_set(name))["x"]
    islands = tmp_path / "islands"  # the experts and the partition, no router: a DDM whose router was never trained
    shutil.copytree(run, islands, ignore=shutil.ignore_patterns("router", "samples", "registry.json", "report.md",
                                                                "metrics.json"))
    assert ddmkit("sample", islands, "--strategy", "top-2")[0] == 2  # the learned router is missing
    code, err = ddmkit("sample", islands, "--strategy", "top-2", "--router", "statistics")
    assert code == 0, err
    assert torch.equal(load_tensors(RunFolder(islands).sample_set(name))["x"], drawn_in_the_run)
    site = tmp_path / "site"  # no shard, no data rows: the experts, the partition's two files and config.json
    shutil.copytree(islands, site, ignore=shutil.ignore_patterns("shards", "data", "samples"))
    code, err = ddmkit("sample", site, "--strategy", "top-2", "--router", "statistics")  # said "run ddmkit partition"
    assert code == 2 and "no data/data.json (the data's shape and kind, no rows)" in err and "copy it from" in err, err
    (site / "data").mkdir()
    shutil.copy(islands / "data" / "data.json", site / "data")  # what the message asks for, and all it needs
    code, err = ddmkit("sample", site, "--strategy", "top-2", "--router", "statistics")
    assert code == 0, err
    assert torch.equal(load_tensors(RunFolder(site).sample_set(name))["x"], drawn_in_the_run)
    code, err = ddmkit("evaluate", islands)
    assert code == 0, err
    metrics = json.loads((islands / "metrics.json").read_text())
    assert set(metrics["rows"]) >= {name} and "learned router" not in metrics["router"]
    assert "statistics-only router" in metrics["router"]
    code, err = ddmkit("sample", islands, "--strategy", "monolith", "--router", "statistics")
    assert code == 2 and "not a routing strategy" in err
    assert ddmkit("sample", islands, "--strategy", "top-2", "--router", "stats")[0] == 0  # add-expert's spelling
    code, err = ddmkit("sample", islands, "--strategy", "top-4", "--router", "statistics", "--n", "50")  # K = 4
    assert code == 0 and "note: top-4 on a DDM of K = 4 experts calls every expert" in err, err
    from ddmkit.ddm import load_ddm

    with pytest.warns(UserWarning, match="has no registry.json: its weights are loaded unchecked"):
        load_ddm(islands, router="statistics")
    router = (run / "router" / "model.safetensors").read_bytes()
    code, err = ddmkit("train-router", run, "--set", "router.train.log_every=5")  # how the job runs: may differ
    assert code == 0 and "is trained already; remove that folder" in err
    code, err = ddmkit("train-router", run, "--set", "router.train.steps=5")  # what it trains: refused
    assert code == 2 and "differs in router.train.steps" in " ".join(err.split()), err
    assert (run / "router" / "model.safetensors").read_bytes() == router
    from ddmkit import DDM

    ddm = DDM.from_pretrained(run)  # the Python call has the command line's bounds, each named
    for bad, message in ((dict(n=0), "n: Input should be greater than or equal to 1"), (dict(solver="rk5"), "solver"),
                         (dict(router_every=0), "router_every"), (dict(seed=-1), "seed"),
                         (dict(guidance=2.0), "need class-conditional experts")):
        with pytest.raises(DDMError, match=message):
            ddm.sample("top-2", steps=2, **bad)
    assert ddm.sample("top-2", n=3, steps=2)[0].shape == (3, 2)


def test_island_statistics_rank_is_none_or_at_least_one():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    assert island_statistics(x, rank=1)["factors"].shape == (5, 1)
    assert island_statistics(x, rank=None, max_full_dim=2)["factors"].shape == (5, 5)  # DEFAULT_RANK, cut to d
    assert island_statistics(x)["cov"].shape == (5, 5)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(DDMError, match=f"rank must be None .* or an integer >= 1; got {bad!r}"):
            island_statistics(x, rank=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_island_statistics_refuse_non_finite_data(bad):
    x = torch.randn(6, 3, dtype=torch.float64)
    x[2, 1] = bad
    with pytest.raises(DDMError, match="x: the island's data hold nan or inf"):
        island_statistics(x)
    with pytest.raises(DDMError, match="x: the island's data hold nan or inf"):
        island_statistics(torch.full((5, 3), bad))


@pytest.mark.parametrize("rank", [None, 1])
def test_islands_of_different_dimensions_are_named(rank):
    g = torch.Generator().manual_seed(6)
    stats = [island_statistics(torch.randn(8, d, generator=g), rank=rank) for d in (3, 4, 3, 2)]
    with pytest.raises(DDMError, match=r"island 0 has 3, islands \[1, 3\] have \[4, 2\]"):
        stats_router(stats)


def test_an_island_publication_round_trips_with_its_class_statistics(tmp_path):
    from ddmkit.routing.stats_router import island_class_statistics, island_publication, publication_parts

    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(40, 3, generator=gen), torch.tensor([0] * 20 + [2] * 19 + [1])  # class 1: one sample
    save_statistics(tmp_path / "s.safetensors", island_publication(x, labels, classes=3))
    stats, per_class, counts = publication_parts(load_statistics(tmp_path / "s.safetensors"), classes=3)
    assert all(torch.equal(stats[name], value) for name, value in island_statistics(x).items())
    assert counts.tolist() == [20, 1, 19] and per_class[1] is None  # too few to publish class 1's statistics
    for mine, direct in zip(per_class, island_class_statistics(x, labels, 3)):
        assert (mine is None) == (direct is None)
        assert mine is None or all(torch.equal(mine[name], value) for name, value in direct.items())
    save_statistics(tmp_path / "plain.safetensors", island_publication(x))  # an unconditional expert's
    with pytest.raises(DDMError, match="without counts of 3 class labels.*not class-conditional"):
        publication_parts(load_statistics(tmp_path / "plain.safetensors"), classes=3)
