"""Metrics against known answers."""
import math

import pytest

import torch

from ddmkit.evaluation import mmd_rbf, mode_coverage, nll, off_manifold_rate, w2_exact, w2_sliced
from ddmkit.data.synthetic import grid_mixture
from ddmkit.truth import GaussianMixture


def test_w2_of_a_translation_is_its_length(gen):
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    assert math.isclose(w2_exact(x, x + shift), float(shift.norm()), rel_tol=1e-6)
    assert w2_exact(x, x) < 1e-6  # sqrt of a round-off-sized cost


def test_sliced_w2_is_below_exact_and_exact_for_translation_projections(gen):
    x = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 2, generator=gen, dtype=torch.float64) * 2
    assert w2_sliced(x, y) <= w2_exact(x, y) + 1e-9


def test_sliced_w2_of_equal_sizes_is_pots(gen):
    """The sorted-projection shortcut for sets of one size gives POT's sliced W2 (its quantile functions)."""
    import ot

    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(300, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    pot = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=64, seed=7, p=2)
    assert math.isclose(w2_sliced(x, y, projections=64, seed=7), pot, rel_tol=1e-12)
    shift = torch.tensor([0.3, -0.4, 1.2, 0.0, 0.5], dtype=torch.float64)  # a translation projects to <shift, theta>
    theta = ot.sliced.get_random_projections(5, 64, 7)
    assert math.isclose(w2_sliced(x, x + shift, projections=64, seed=7),
                        math.sqrt(float(((shift.numpy() @ theta) ** 2).mean())), rel_tol=1e-12)


def test_mmd_bandwidth_pools_both_sets_at_any_size(gen):
    """Past 1000 points each, the pool (the first 2000 rows of [x, y]) held only x: MMD(x, y) != MMD(y, x)."""
    x = torch.randn(3000, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(3000, 2, generator=gen, dtype=torch.float64) + 6
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-9)
    pool = torch.cat([x[:1000], y[:1000]])
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(x, y, float(torch.cdist(pool, pool).median())), rel=1e-12)


def test_mmd_separates(gen):
    x = torch.randn(500, 2, generator=gen)
    y = torch.randn(500, 2, generator=gen)
    z = torch.randn(500, 2, generator=gen) + 1.0
    assert abs(mmd_rbf(x, y)) < 0.01 < mmd_rbf(x, z)


def test_nll_of_standard_normal_is_its_entropy(gen):
    g = GaussianMixture.from_covariances([1.0], [[0.0, 0.0]], [1.0])
    x = g.sample(100_000, gen)
    assert math.isclose(nll(x, g), 1 + math.log(2 * math.pi), rel_tol=0.01)


def test_mode_coverage_and_off_manifold(gen):
    g = grid_mixture()
    x = g.sample(20000, gen)
    cov = mode_coverage(x, g)
    assert cov["modes_hit"] == 1.0 and cov["mode_kl"] < 0.01
    assert off_manifold_rate(x, g) < 0.003
    half = x[x[:, 0] < 0]  # drops the right columns of modes
    assert mode_coverage(half, g)["modes_hit"] < 0.7
    assert off_manifold_rate(torch.full((10, 2), 0.5, dtype=torch.float64), g) == 1.0


def test_every_set_is_scored_on_chunks_of_one_size_and_a_short_set_is_refused(gen):
    """evaluate cut every set's W2 chunks to the smallest set: one leftover `ddmkit sample --n 10` set scored
    every row on 10-point sets (W2/floor near 1 for poor samplers) and the floor too, with no warning."""
    import pytest

    from ddmkit.errors import DDMError
    from ddmkit.evaluation.sets import evaluate_all

    test = torch.randn(4000, 2, generator=gen)
    good, poor = torch.randn(1000, 2, generator=gen), torch.randn(1000, 2, generator=gen) * 3
    result = evaluate_all({"good": good, "poor": poor}, {}, test, None, chunk=500)
    assert result["chunk"] == 500 and result["pairs"] == 2
    with pytest.raises(DDMError, match=r"sample sets 'tiny' \(10\) hold fewer than the 500 points"):
        evaluate_all({"good": good, "poor": poor, "tiny": good[:10]}, {}, test, None, chunk=500)
    with pytest.raises(DDMError, match=r"delete their files from RUN/samples/ \(sample-2_1.safetensors\)"):
        evaluate_all({"good": good, "sample-2@1": good[:10]}, {}, test, None, chunk=500)  # the file's name
    from ddmkit.pipeline.samplesets import sample_options  # the options that draw a set again (they named
    stats = "oracle (statistics-only router)"               # --strategy 'oracle (statistics-only router)')
    with pytest.raises(DDMError, match=r"`ddmkit sample RUN --strategy oracle --router statistics --n 500`"):
        evaluate_all({"good": good, stats: good[:10]}, {}, test, None, chunk=500, redraw=sample_options)
    small = evaluate_all({"good": good[:300], "poor": poor[:300]}, {}, test, None, chunk=500)
    assert small["chunk"] == 300 and small["pairs"] == 1  # every set smaller than evaluate.chunk: their size
    assert small["rows"]["good"]["w2_sem"] is None  # one pair: no standard error (was 0.0)


def test_the_samples_plot_counts_the_samples_outside_its_panels_and_says_what_it_draws(tmp_path, monkeypatch):
    """Axis limits come from the held-out data: samples beyond them were hidden without a word."""
    import ddmkit.evaluation.plots as plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, crop=True: figures.append(fig))
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 3, generator=gen)
    inside, wild = torch.randn(50, 3, generator=gen) * 0.1, torch.randn(50, 3, generator=gen) * 0.1
    wild[:7] += 100.0  # 7 samples far outside the held-out data
    plots.plot_samples({"good": inside, "wild": wild}, ref, None, tmp_path / "s.png")
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["good", "wild\n7 of 50 outside the panel"]
    assert fig._suptitle.get_text() == ("samples (red) over held-out data (grey); axes: the held-out data's first "
                                        "two principal directions")


def test_w2_pairs_are_each_pairs_exact_w2_in_order_computed_side_by_side(gen, monkeypatch):
    """w2_pairs gives w2_exact of each pair in the pairs' order (a translation by i: W2 = i), and with two
    threads two pairs are solved at once: each call below waits for another to start (serial calls time out)."""
    import threading

    import ddmkit.evaluation.sets as sets

    x = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    pairs = [(x, x + torch.tensor([float(i), 0.0], dtype=torch.float64)) for i in range(5)]
    assert sets.w2_pairs(pairs) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0], abs=1e-6)
    both = threading.Barrier(2, timeout=10)

    def waiting_w2(a, b):
        both.wait()
        return w2_exact(a, b)
    monkeypatch.setattr(sets, "w2_exact", waiting_w2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert sets.w2_pairs(pairs[:4]) == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-6)
