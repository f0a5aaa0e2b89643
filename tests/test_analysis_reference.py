"""The reference x0* of hit*, rank* and same (exact posterior mean, or the monolith's x_t - t v_monolith(x_t)),
and `ddmkit analyze --device`, against known answers."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.analysis.alignment import EXACT_KEYS, exact_x0, trajectory_alignment, velocity_reference
from ddmkit.analysis.trace import trace_strategy
from ddmkit.config import RunConfig, load_config, validate
from ddmkit.data.partition import feature_map, load_partition
from ddmkit.ddm import DDM, load_ddm, start_noise
from ddmkit.ddm.load import monolith_field
from ddmkit.errors import DDMError
from ddmkit.pipeline.analyze import analyze_run
from ddmkit.pipeline.checks import checked_device
from ddmkit.pipeline.prepare import prepare_run_dir, run_config
from ddmkit.pipeline.stages import stage_data, stage_experts, stage_monolith, stage_partition, stage_router
from ddmkit.truth import GaussianMixture

TINY_IMAGES = Path(__file__).parent / "configs" / "tiny_images.toml"
# the third mean at (0, 4), not (0, 3): at t = 1 every x0 estimate is the mixture mean, equally far from
# (-3, 0) and (0, 3) (a tie that rounding would break)
GMM = GaussianMixture.from_covariances([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], [0.3, 0.2, 0.4])


def always_cluster_1(gmm: GaussianMixture) -> DDM:
    """Exact component experts and a router that always puts all its mass on cluster 1."""
    experts = [lambda x, t, k=k: gmm.component_velocities(x.double(), t.double())[:, k].float() for k in range(gmm.k)]

    def router(x, t):
        return torch.nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), gmm.k).float()

    return DDM(experts, router, gmm.weights.float(), (2,), lambda x: torch.cdist(x.double(), gmm.means).argmin(1))


def test_a_reference_equal_to_the_exact_posterior_mean_gives_the_exact_keys():
    """A reference callable that returns E[x0 | x_t] gives exactly what the truth gives, and the values of a
    direct computation: hit* = [argmax_k w_k = argmin_k |x0* - mu_k|], same = [argmin of x0_hat = argmin of x0*].
    With every row routed to cluster 1 the strategy's own x0_hat (expert 1's estimate) hits by construction;
    at t = 1 x0* is the mixture's mean (-0.6, 0.8), nearest to cluster 0's mean, so hit* = same = 0 there."""
    ddm = always_cluster_1(GMM)
    tr = trace_strategy(ddm, "top-1", torch.randn(300, 2, generator=torch.Generator().manual_seed(0)), 6)
    by_truth = trajectory_alignment(ddm, tr, lambda x: x, GMM.means, truth=GMM)
    by_ref = trajectory_alignment(ddm, tr, lambda x: x, GMM.means, reference=lambda x, t: exact_x0(GMM, x, t))
    for k in EXACT_KEYS:
        assert torch.equal(by_ref[k], by_truth[k]), k
    for i in range(len(tr.t)):
        t = tr.t[i].expand(300)
        x0_star = GMM.x0_mean(tr.x[i].double(), t.double()).float()
        near_star = torch.cdist(x0_star.double(), GMM.means).argmin(1)
        near_hat = torch.cdist((tr.x[i] - tr.t[i] * tr.v[i]).double(), GMM.means).argmin(1)
        assert torch.equal(by_ref["hit_exact"][i], (near_star == 1).double())  # every row's weight is on cluster 1
        assert torch.equal(by_ref["same"][i], (near_hat == near_star).double())
        assert torch.allclose(by_ref["dist_nearest_exact"][i], torch.cdist(x0_star.double(), GMM.means).min(1).values)
    assert float(tr.t[0]) == 1.0 and float(by_ref["hit"].min()) == 1.0
    assert float(by_ref["hit_exact"][0].max()) == 0.0 and float(by_ref["same"][0].max()) == 0.0
    with pytest.raises(ValueError, match="not both"):
        trajectory_alignment(ddm, tr, lambda x: x, GMM.means, truth=GMM, reference=lambda x, t: x)


def test_the_reference_of_an_exact_velocity_field_is_the_exact_posterior_mean():
    """x0 = x_t - t v with v the mixture's exact velocity is E[x0 | x_t], row by row at different t, in any
    data shape (the field sees and returns x's shape)."""
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(50, 2, generator=g, dtype=torch.float64)
    t = torch.rand(50, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ref = velocity_reference(lambda x, t: GMM.velocity(x, t))
    assert torch.allclose(ref(x, t), exact_x0(GMM, x, t), atol=1e-10)
    shaped = velocity_reference(lambda x, t: GMM.velocity(x.reshape(len(x), 2), t).reshape(x.shape))
    assert torch.allclose(shaped(x.reshape(50, 1, 2, 1), t).reshape(50, 2), exact_x0(GMM, x, t), atol=1e-10)


def test_the_device_option_is_checked_and_resolved():
    assert checked_device("cpu") == torch.device("cpu")
    assert checked_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DDMError, match=r"--device: 'tpu' is not a device; accepted: auto, cpu, cuda, cuda:N or mps"):
        checked_device("tpu")
    with pytest.raises(DDMError, match=r"--device: 'cuda:99' \(the run's expert.train.device\), but this machine"):
        checked_device("cuda:99", from_run=True)


def separable_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 uint8 images bright in the top or in the bottom half (two clusters), with 3 random class labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    top = rng.integers(0, 2, n).astype(bool)
    x[top, :4] += 180
    x[~top, 4:] += 180
    return x, rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny class-conditional image run with a monolith (tests/configs/tiny_images.toml), a few seconds."""
    root = tmp_path_factory.mktemp("images")
    x, labels = separable_images(150)
    np.savez(root / "images.npz", x=x, labels=labels)
    raw = load_config(TINY_IMAGES).model_dump()
    raw["data"]["params"]["path"] = str(root / "images.npz")
    cfg = validate(RunConfig, raw)
    run = prepare_run_dir(root / "run", cfg, log=lambda m: None)
    for stage in (stage_data, stage_partition, stage_experts, stage_monolith, stage_router):
        stage(cfg, run, lambda m: None)
    return run


def test_analyze_an_image_run_with_the_monolith_as_reference(image_run, tmp_path, cli):
    """`ddmkit analyze` on an image run with a monolith writes hit*, rank*, same of the monolith's estimate,
    and says so; the numbers are those of the monolith's x_t - t v_monolith(x_t) on the recorded trajectories."""
    r = cli("analyze", image_run, "--strategy", "top-1", "--n", 12, "--max-steps", 2, "--jvp-rows", 4,
            "--device", "cpu", "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "a" / "analysis.md").read_text()
    assert "| hit* (monolith x0) | rank* (monolith x0) | same nearest |" in md
    assert "x0 reference of hit*, rank* and same nearest: the monolith's estimate" in md
    assert "With the monolith's estimate x0* = x_t - t v_monolith(x_t)" in md
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["x0_reference"] == {"kind": "monolith", "name": "the monolith's estimate"}
    assert saved["settings"]["device"] == "cpu"
    summary = saved["strategies"]["top-1"]["summary"]
    assert all(k in summary for k in EXACT_KEYS)
    # the same measures computed here, on the same trajectories, from the monolith's estimate
    ddm, s = load_ddm(image_run), run_config(image_run).sample
    manifest, tensors = load_partition(image_run / "partition")
    tr = trace_strategy(ddm, "top-1", start_noise(max(s.n, 12), ddm.data_shape, s.seed)[:12], s.steps, s.solver, s.seed)
    al = trajectory_alignment(ddm, tr, feature_map(manifest, tensors), tensors["centroids"],
                              reference=velocity_reference(monolith_field(image_run)))
    by_step = saved["strategies"]["top-1"]["by_step"]
    assert by_step["hit_exact"] == pytest.approx(al["hit_exact"].mean(1).tolist())
    assert by_step["dist_nearest_exact"] == pytest.approx(al["dist_nearest_exact"].mean(1).tolist(), rel=1e-9)
    assert summary["rank_exact"] == pytest.approx(float(al["rank_exact"].mean()))
    assert summary["same"] == pytest.approx(float(al["same"].mean()))


def test_without_a_monolith_there_is_no_reference(image_run, tmp_path):
    run = Path(shutil.copytree(image_run, tmp_path / "run"))
    shutil.rmtree(run / "monolith")
    res = analyze_run(run, strategies=["top-1"], n=8, max_steps=1, jvp_rows=2, n_boot=10, log=lambda m: None)
    assert res["x0_reference"] is None and "hit_exact" not in res["strategies"]["top-1"]["summary"]
    md = (run / "analysis" / "analysis.md").read_text()
    assert "x0 reference: none (no Gaussian-mixture truth, no trained monolith)" in md and "hit*" not in md.split(
        "x0 reference: none")[0]


@pytest.mark.parametrize("value, words", [("tpu", "--device: 'tpu' is not a device"),
                                          ("cuda:99", "--device: 'cuda:99', but this machine has")])
def test_a_bad_device_exits_2_naming_the_option(image_run, tmp_path, value, words, cli):
    r = cli("analyze", image_run, "--strategy", "top-1", "--n", 4, "--device", value, "--out", tmp_path / "a")
    assert r.returncode == 2 and words in " ".join(r.stderr.split()), r.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_analyze_on_cuda_follows_the_cpu_path(image_run, tmp_path):
    """On a GPU the deterministic passes (same noise, same networks) give the CPU's samples up to rounding."""
    kw = dict(strategies=["top-1", "full"], n=12, max_steps=2, jvp_rows=4, n_boot=10, log=lambda m: None)
    on_cpu = analyze_run(image_run, out=tmp_path / "cpu", device="cpu", **kw)
    on_gpu = analyze_run(image_run, out=tmp_path / "gpu", device="cuda", **kw)
    assert on_gpu["settings"]["device"] == "cuda" and on_gpu["x0_reference"]["kind"] == "monolith"
    for name in ("top-1", "full"):
        cpu, gpu = on_cpu["strategies"][name]["summary"], on_gpu["strategies"][name]["summary"]
        assert gpu["q"] == pytest.approx(cpu["q"], rel=2e-2) and gpu["delta_refine"] == pytest.approx(
            cpu["delta_refine"], rel=0.1, abs=1e-4)
        assert all(np.isfinite(gpu[k]) for k in ("L_top", "amp_median", "err_routed", "hit_exact", "rank_exact"))
