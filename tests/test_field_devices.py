"""The fields built from Gaussian mixtures (the exact DDM's experts and router, the statistics-only
router) follow their input's device; a mixture given x on another device says so. The CUDA tests run
where there is a GPU (they failed there: the exact DDM's sets could not be drawn by `ddmkit run`)."""
from pathlib import Path

import pytest
import torch

from ddmkit.errors import DDMError
from ddmkit.routing.stats_router import island_statistics, stats_router
from ddmkit.truth import GaussianMixture, follows_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = Path(__file__).parent / "configs" / "tiny.toml"


def mixture() -> GaussianMixture:
    return GaussianMixture.from_covariances([0.3, 0.7], [[0.0, 0.0], [3.0, 0.0]], [[1.0, 0.5], [0.2, 1.0]])


def test_a_mixture_names_the_device_x_should_be_on():
    gm, x = mixture(), torch.zeros(4, 2, dtype=torch.float64, device="meta")
    with pytest.raises(DDMError, match=r"x is on meta and the mixture on cpu: give x.to\('cpu'\), or the mixture on "
                                       r"x's device: mixture.to\('meta'\)"):
        gm.velocity(x, 0.5)
    assert follows_device(gm)(torch.device("cpu")) is gm


def test_a_mixture_is_built_from_tensors_on_any_device():
    """from_covariances read its arguments through numpy, which refuses a CUDA tensor."""
    means = torch.zeros(2, 3, requires_grad=True)  # numpy refuses it, as it refuses a CUDA tensor
    gm = GaussianMixture.from_covariances(torch.tensor([1.0, 1.0]), means, torch.ones(2, 3))
    assert gm.means.device.type == "cpu" and torch.equal(gm.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


@CUDA
def test_a_mixture_on_cuda_samples_and_bounds_there():
    on = follows_device(mixture())
    gm = on(torch.device("cuda", 0))
    assert gm.means.device.type == "cuda" and on(torch.device("cuda", 0)) is gm  # moved once
    assert gm.sample(10).device.type == "cuda" and gm.sample(0).device.type == "cuda"
    bound = gm.velocity_lipschitz_bound(torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(bound.cpu(), mixture().velocity_lipschitz_bound(torch.tensor([0.2, 0.5])))


@CUDA
def test_the_full_covariance_statistics_router_takes_statistics_computed_on_cuda():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(100, 2, generator=g) + 3 * k for k in range(2)]
    x, t = xs[0][:8], torch.full((8,), 0.4)
    want = stats_router([island_statistics(s) for s in xs])(x, t)
    got = stats_router([island_statistics(s.cuda()) for s in xs])(x.cuda(), t.cuda())
    torch.testing.assert_close(got.cpu(), want)


@CUDA
def test_the_exact_ddm_samples_on_cuda_as_on_the_cpu(tmp_path):
    from ddmkit.config import load_config
    from ddmkit.ddm import exact_ddm
    from ddmkit.ddm.sampling import sample_ddm
    from ddmkit.pipeline.prepare import prepare_run_dir

    run = prepare_run_dir(tmp_path / "run", load_config(TINY), log=lambda _: None)
    ddm, x1 = exact_ddm(run), torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for strategy in ("full", "top-2", "oracle"):
        on_cpu, _ = sample_ddm(ddm, strategy, 64, steps=8, device="cpu", x1=x1)
        on_gpu, _ = sample_ddm(ddm, strategy, 64, steps=8, device="cuda", x1=x1.cuda())
        assert on_gpu.device.type == "cuda"
        if strategy != "oracle":  # oracle draws its clusters from a generator of the sampling device
            torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=1e-5)


@CUDA
def test_the_statistics_router_on_cuda_takes_published_and_shard_statistics_together(tmp_path):
    """An expert folder without statistics.safetensors (a replace-expert copy, an older ddmkit) had its
    statistics computed on the GPU beside the published ones on the CPU: torch.stack refused the mix."""
    from ddmkit.config import load_config
    from ddmkit.ddm import load_ddm
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import stage_experts

    cfg = load_config(TINY)
    run = prepare_run_dir(tmp_path / "run", cfg, log=lambda _: None)
    stage_experts(cfg, run, lambda _: None)
    (run / "experts" / "expert_00" / "statistics.safetensors").unlink()
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    on_gpu = load_ddm(run, "cuda", router="statistics").sample("top-2", n=32, steps=4, x1=x1.cuda())[0]
    on_cpu = load_ddm(run, "cpu", router="statistics").sample("top-2", n=32, steps=4, x1=x1)[0]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A tiny trained run (experts and router), trained where there is a GPU."""
    from ddmkit.config import load_config
    from ddmkit.pipeline.prepare import prepare_run_dir
    from ddmkit.pipeline.stages import stage_experts, stage_router

    cfg = load_config(TINY)
    run = prepare_run_dir(tmp_path_factory.mktemp("cuda") / "run", cfg, log=lambda _: None)
    for stage in (stage_experts, stage_router):
        stage(cfg, run, lambda _: None)
    return cfg, run


@CUDA
def test_the_missing_expert_study_router_report_and_cpu_start_rows_run_on_cuda(cuda_run):
    """The studies scored CUDA samples against the CPU truth, router_report drew its times on the CPU, and
    DDM.sample(x1=CPU rows) on a DDM moved to CUDA fed CPU rows to CUDA networks."""
    import warnings

    from ddmkit.accel import SpeedOptions
    from ddmkit.ddm import load_ddm
    from ddmkit.evaluation.routers import router_report
    from ddmkit.evaluation.studies import missing_expert_study
    from ddmkit.pipeline.stages import load_split

    pytest.importorskip("ot")  # the study's W2 (POT)
    cfg, run = cuda_run
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"n": 200, "steps": 4}),
                                 "evaluate": cfg.evaluate.model_copy(update={"chunk": 100})})
    test = load_split(run, "test")
    rows = missing_expert_study(cfg, run, test.x, test.truth, device="cuda")
    assert [r["removed"] for r in rows] == list(range(len(rows))) and rows[0]["w2"] > 0
    ddm = load_ddm(run, "cuda")
    x, labels = test.x[:300], torch.randint(0, ddm.k, (300,))
    on_gpu = router_report({"learned": ddm.router}, x.cuda(), labels.cuda())
    on_cpu = router_report({"learned": load_ddm(run, "cpu").router}, x, labels)
    assert on_gpu["t"] == on_cpu["t"]
    torch.testing.assert_close(torch.tensor(on_gpu["learned"]["accuracy"]), torch.tensor(on_cpu["learned"]["accuracy"]),
                               atol=0.02, rtol=0)
    x1 = torch.randn(16, 2)
    assert ddm.sample("top-2", n=16, steps=3, x1=x1)[0].device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:  # a restricted DDM's masked router is captured
        warnings.simplefilter("always")
        ddm.restrict([0, 1]).sample("top-1", n=64, steps=3, speed=SpeedOptions(cuda_graphs=True))
    assert not [w for w in caught if "capture" in str(w.message)], [str(w.message) for w in caught]


@CUDA
def test_a_latent_run_is_made_analyzed_and_distilled_on_cuda(tmp_path):
    """A latent run on CUDA from the command line, then `analyze` and `distill` on CUDA: both fed the
    autoencoder's CPU latents to CUDA networks (LatentCodec.encode returns CPU tensors)."""
    import json
    import sys

    pytest.importorskip("diffusers")
    pytest.importorskip("ot")  # analyze's W2 floor (POT)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_latent import latent_config, run_cli

    run = tmp_path / "run"
    done = run_cli("run", latent_config(tmp_path), "--out", run, "--device", "cuda")
    assert done.exit_code == 0, done.output
    assert json.loads((run / "config.json").read_text())["config"]["expert"]["train"]["device"] == "cuda"
    done = run_cli("analyze", run, "--device", "cuda", "--n", 16, "--strategy", "top-1", "--strategy", "full",
                   "--max-steps", 2, "--jvp-rows", 4)
    assert done.exit_code == 0, done.output
    assert (run / "analysis" / "analysis.md").exists()
    done = run_cli("distill", run, "--device", "cuda", "--teacher", "top-1", "--steps", 4, "--few-step", 2,
                   "--trajectories", 16, "--teacher-steps", 2)
    assert done.exit_code == 0, done.output
    assert (run / "students" / "report.md").exists()
