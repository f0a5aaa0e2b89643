"""`ddmkit study misalignment` on image data: the labelled sampler on a field with a closed form (amplification
and Delta_refine of a linear flow), labels bound for held-out diagnostics, the FID verdict on given numbers,
and a tiny class-conditional Fashion-MNIST study from the command line on the CPU with pixel features (its
samples are the ones `ddmkit run` draws; router modifiers share their base run and never write it; `exact`
is refused before anything is written)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddmkit.analysis.misalignment import bind_labels, image_condition, measure_image_strategy, routed_samples
from ddmkit.ddm.model import DDM
from ddmkit.errors import DDMError
from ddmkit.evaluation.fid import feature_extractor, fid_kid
from ddmkit.pipeline.misalignment_report import fid_word, full_vs_best, image_verdict
from ddmkit.pipeline.prepare import run_config
from ddmkit.pipeline.sampling import draw_set
from ddmkit.pipeline.samplesets import named_set
from ddmkit.pipeline.stages import load_split

ROOT = Path(__file__).resolve().parents[1]
ALPHA, BETA = (0.5, 2.0), 0.3  # expert k: v = ALPHA[k] x + BETA y; the router sends label y to expert y % 2
T975 = {2: 12.706204736174698, 3: 4.302652729911275}  # t quantiles (0.975, n - 1 degrees of freedom)


def linear_ddm() -> DDM:
    """Two class-conditional experts with a closed-form flow and a label-conditional router (one-hot on y % 2)."""
    def expert(a):
        return lambda x, t, y: a * x + BETA * y.to(x.dtype).reshape(-1, 1, 1, 1)

    def router(x, t, y):
        return torch.nn.functional.one_hot(y % 2, 2).to(x.dtype)

    return DDM([expert(a) for a in ALPHA], router, torch.full((2,), 0.5), (1, 2, 2), router_conditional=True,
               num_classes=4)


def euler_flow(x1, y, steps):
    """Euler from t = 1 to 0 of v = a x + b y: x_N = q^N x_1 - b y (1 - q^N) / a, q = 1 - a / N (a per row)."""
    a = torch.tensor(ALPHA, dtype=torch.float64)[y % 2].reshape(-1, 1, 1, 1)
    q = (1 - a / steps) ** steps
    return q * x1.double() - BETA * y.double().reshape(-1, 1, 1, 1) * (1 - q) / a, q.flatten()


def test_labelled_sampling_amplification_and_refinement_gap_of_a_linear_flow():
    ddm, steps, scale = linear_ddm(), 4, 2.5
    x1 = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    seen = []

    def score(images):
        seen.append(images)
        return {"fid": float(images.sum()), "kid": 0.5, "kid_std": 0.0}

    for strategy in ("full", "top-1"):
        want, q = euler_flow(x1, y, steps)
        x0 = routed_samples(ddm, strategy, x1, steps, "euler", 0, y)
        assert torch.allclose(x0.double(), want, atol=1e-5), strategy  # each row's label reached router and expert
        m = measure_image_strategy(ddm, strategy, x1, score, scale, steps, "euler", 0, y, rows=4, n_boot=12)
        v = m["value"]
        assert torch.allclose(seen[-1].double(), want.clamp(-1, 1), atol=1e-5)  # scored: the samples in [-1, 1]
        assert v["fid"] == pytest.approx(float(want.clamp(-1, 1).sum()), abs=1e-4) and v["kid"] == 0.5
        assert v["amp"] == pytest.approx(float(np.median(q[:4])), rel=1e-3)  # linear: A = q^N (|d| = 1e-3)
        x0_2n, _ = euler_flow(x1, y, 2 * steps)
        gap = (want - x0_2n)[:4].reshape(4, -1).norm(dim=1) / scale  # only the first `rows` trajectories
        assert v["delta_refine"] == pytest.approx(float(gap.mean()), rel=1e-4)
        assert v["stability_rows"] == 4 and sorted(m["boot"]) == ["amp", "delta_refine"]
        assert len(m["boot"]["amp"]) == 12 and min(m["boot"]["delta_refine"]) <= v["delta_refine"]


def test_bound_labels_reach_every_field_on_the_whole_batch_only():
    ddm = linear_ddm()
    x, t, y = torch.randn(5, 1, 2, 2), torch.full((5,), 0.3), torch.tensor([3, 0, 1, 2, 2])
    bound = bind_labels(ddm, y)
    assert torch.equal(bound.experts[1](x, t), 2.0 * x + BETA * y.float().reshape(-1, 1, 1, 1))
    assert torch.equal(bound.router(x, t), torch.nn.functional.one_hot(y % 2, 2).float())
    assert not bound.router_conditional and ddm.router_conditional  # the original DDM is kept
    with pytest.raises(ValueError, match="5 labels are bound"):
        bound.experts[0](x[:3], t[:3])
    assert bind_labels(ddm, None) is ddm


def test_exact_is_refused_on_images_with_the_accepted_conditions():
    assert image_condition("overlap-0.25+tempered-3").router == (("tempered", 3.0),)
    for name in ("exact", "random+exact", "exact+tempered-3"):
        with pytest.raises(DDMError, match=r"--conditions .*accepted on images: disjoint.*\+permuted-A") as e:
            image_condition(name)
        assert "exact" not in str(e.value).split("accepted on images:")[1]  # not offered


def measures(full, other):
    """Per-seed measurements of two strategies on images (no bootstrap replicates for FID)."""
    return [{"strategies": {"full": {"value": {"fid": f}, "boot": {}}, "top-1": {"value": {"fid": o}, "boot": {}}}}
            for f, o in zip(full, other)]


def test_the_paired_fid_difference_and_the_image_verdict_on_given_numbers():
    d = full_vs_best(measures([11.0, 12.2, 13.4], [10.0, 11.0, 12.0]), ["full", "top-1"], "fid", "top-1")
    assert d["per_seed"] == pytest.approx([1.0, 1.2, 1.4]) and "samples" not in d  # FID: no interval over samples
    half = T975[3] * 0.2 / math.sqrt(3)  # sd of (1.0, 1.2, 1.4) is 0.2
    assert (d["mean"], d["seeds"]["lo"], d["seeds"]["hi"]) == pytest.approx((1.2, 1.2 - half, 1.2 + half))
    assert fid_word(d) == "worse"
    two = full_vs_best(measures([11.0, 9.0], [10.0, 10.0]), ["full", "top-1"], "fid", "top-1")  # +1, -1
    assert two["seeds"]["hi"] == pytest.approx(T975[2] * math.sqrt(2) / math.sqrt(2)) and fid_word(two) == \
        "no clear difference"
    one = full_vs_best(measures([15.0], [10.0]), ["full", "top-1"], "fid", "top-1")
    assert fid_word(one) == "one seed: no interval"  # however large the difference
    better = {"seeds": {"n": 3, "lo": -2.0, "hi": -0.5}}
    table = {"full": {"delta_refine": {"mean": 0.1}, "amp": {"mean": 2.0}},
             "top-1": {"delta_refine": {"mean": 0.2}, "amp": {"mean": 1.0}}}
    verdict = image_verdict(table, ["full", "top-1"], {"fid": d})
    assert verdict.startswith("reproduced (most stable by Delta_refine: full, by amplification: top-1")
    assert image_verdict(table, ["full", "top-1"], {"fid": one}).startswith("one seed: no interval")
    assert image_verdict(table, ["full", "top-1"], {"fid": better}).startswith("contradicted")
    assert image_verdict(table, ["full", "top-1"], {"fid": two}).startswith(
        "not reproduced: full is the most stable, its FID no different")
    table["full"]["delta_refine"]["mean"] = 0.3  # full is no longer the most stable
    assert image_verdict(table, ["full", "top-1"], {"fid": d}).startswith(
        "not reproduced: full generates worse but is not the most stable")
    assert image_verdict(table, ["full", "top-1"], {"fid": one}).startswith(
        "not reproduced: full is not the most stable")


def image_config(tmp_path: Path) -> Path:
    """configs/fashion_mnist_tiny.toml on a small IDX folder (class-conditional UNet experts, a label-conditional
    router, pixel features), sampled in 2 steps (not 3)."""
    from test_images import write_idx_set

    data = write_idx_set(tmp_path / "fm", 160, 48)
    text = (ROOT / "configs" / "fashion_mnist_tiny.toml").read_text()
    for old, new in (("params = {}", f"params = {{ dir = {json.dumps(str(data))} }}"),
                     ("n_train = 256", "n_train = 160"), ("n_test = 64", "n_test = 48"),
                     ("\nsteps = 3\n", "\nsteps = 2\n")):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "fm.toml"
    path.write_text(text)
    return path


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_tiny_image_study_from_the_command_line(tmp_path, cli):
    out = tmp_path / "study"
    base = ("study", "misalignment", image_config(tmp_path), "--out", out, "--seeds", "2", "--strategy", "full",
            "--strategy", "top-1", "--n", "16", "--n-boot", "10", "--stability-rows", "4", "--device", "cpu",
            "--set", "sample.guidance=2")
    done = cli(*base, "--conditions", "disjoint,random")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "study.json").read_text())
    assert report["kind"] == "images" and report["condition_names"] == ["disjoint", "random"]
    assert report["floor"]["n"] == 16 and report["floor"]["n_test"] == 48 and report["device"] == "cpu"
    for c in report["conditions"].values():
        assert c["seeds"] == [0, 1] and set(c["mechanism"]) == {"expert_own_mean", "expert_other_mean"}  # no TV
        for cell in c["table"].values():
            assert set(cell) == {"fid", "kid", "amp", "delta_refine"}  # no NLL, W2, L_top or field error
            assert len(cell["fid"]["per_seed"]) == 2 and "samples" not in cell["fid"] and "samples" in cell["amp"]
        assert len(c["full_vs_best"]["fid"]["per_seed"]) == 2 and c["verdict"].split(" (")[0] in {
            "reproduced", "not reproduced: full is the most stable, its FID no different",
            "contradicted: full is the most stable and also generates better",
            "not reproduced: full is not the most stable",
            "not reproduced: full generates worse but is not the most stable"}
    cell = json.loads((out / "measure" / "disjoint_s0.json").read_text())
    assert cell["device"] == "cpu" and cell["mechanism"]["heldout_rows"] == 16
    full = cell["strategies"]["full"]
    assert full["value"]["stability_rows"] == 4 and sorted(full["boot"]) == ["amp", "delta_refine"]
    assert len(full["boot"]["amp"]) == 10
    text = (out / "report.md").read_text()
    assert "| condition | strategy | seeds | FID | KID x 1e3 | amplification | Delta_refine |" in text
    assert "no interval over samples" in text and "first 4 trajectories" in text and "| NLL" not in text
    assert "| condition | seeds | expert error, own cluster | expert error, other clusters | other / own |" in text

    # the samples are the ones `ddmkit run` draws: the same noise, labels and guidance (2), so the same FID
    run = out / "runs" / "disjoint_s0"
    cfg = run_config(run)
    x0, _, _ = draw_set(cfg, run, named_set("full", cfg.sample.n, cfg.sample.guidance), True, "cpu", {})
    extractor = feature_extractor("pixels")
    want = fid_kid(extractor(load_split(run, "test").x), extractor(x0), cfg.evaluate.kid_subset)
    assert cfg.sample.guidance == 2.0
    assert full["value"]["fid"] == pytest.approx(want["fid"], rel=1e-6, abs=1e-9)
    assert full["value"]["kid"] == pytest.approx(want["kid"], rel=1e-6, abs=1e-9)

    runs = sorted(p.name for p in (out / "runs").iterdir())
    before = {name: tree(out / "runs" / name) for name in runs}  # bytes and modification times of every file
    again = cli(*base, "--conditions", "tempered-3,uniform-0.5+permuted-0.5")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs  # no run folder of their own
    assert {name: tree(out / "runs" / name) for name in runs} == before  # and nothing written into the base
    for name in ("tempered-3", "uniform-0.5_permuted-0.5"):
        for seed in (0, 1):
            m = json.loads((out / "measure" / f"{name}_s{seed}.json").read_text())
            assert m["run"] == str(out / "runs" / f"disjoint_s{seed}")
    again_report = json.loads((out / "study.json").read_text())
    assert again_report["condition_names"] == ["tempered-3", "uniform-0.5+permuted-0.5"]

    # measurements brought back from another machine: the report needs no run folder (the floor is kept)
    shutil.rmtree(out / "runs")
    kept = cli(*base, "--conditions", "disjoint,random")
    assert kept.returncode == 0, kept.stderr
    assert not (out / "runs").exists()
    assert json.loads((out / "study.json").read_text())["floor"] == report["floor"]


@pytest.mark.parametrize("args, words", [
    (("--conditions", "disjoint,exact"), ["--conditions", "accepted on images", "+tempered-T"]),
    (("--conditions", "overlap-0.25+exact"), ["--conditions", "accepted on images"]),
    (("--stability-rows", "0"), ["--stability-rows"]),
    (("--device", "cuda:99"), ["--device"]),
    (("--n", "4", "--set", "evaluate.kid_subset=8"), ["--n 4", "evaluate.kid_subset"]),
])
def test_exact_and_bad_options_on_images_exit_2_before_anything_is_written(tmp_path, args, words, cli):
    out = tmp_path / "study"
    done = cli("study", "misalignment", image_config(tmp_path), "--out", out, *args)
    assert done.returncode == 2 and all(w in done.stderr for w in words), done.stderr
    assert not out.exists()


def test_a_kid_subset_above_sample_sweep_n_refuses_run_but_not_the_study_which_draws_no_sweep_sets():
    """The study's runs draw no guidance-sweep or statistics-only router sets, yet their configs kept a sweep_n
    below evaluate.kid_subset, which refused the study for sets it never draws; `ddmkit run` still refuses it.
    Where sweep_n is no smaller than kid_subset the cells' configs (and so their measurement keys) are unchanged."""
    from ddmkit.config import RunConfig, load_config
    from ddmkit.pipeline.checks import check_run_plan
    from ddmkit.pipeline.misalignment import cell_config

    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()  # guidance_sweep [2.0], top-2
    raw["sample"]["sweep_n"], raw["evaluate"]["kid_subset"] = 8, 12
    cfg = RunConfig(**raw)
    with pytest.raises(DDMError, match="evaluate.kid_subset = 12 is larger than sample.sweep_n = 8"):
        check_run_plan(cfg, 160, 48, (1, 28, 28), False)  # `ddmkit run` draws those sets: refused
    cell = cell_config(cfg, image_condition("disjoint"), 0, 16, ["full"])
    assert (cell.sample.n, cell.sample.sweep_n) == (16, 12)
    check_run_plan(cell, 160, 48, (1, 28, 28), False)
    raw["evaluate"]["kid_subset"] = 8  # sweep_n no smaller: kept as it was
    assert cell_config(RunConfig(**raw), image_condition("disjoint"), 0, 16, ["full"]).sample.sweep_n == 8


def test_train_now_measure_later_and_a_missing_scorer_is_found_before_training(tmp_path, monkeypatch, cli):
    out = tmp_path / "study"
    base = ("study", "misalignment", image_config(tmp_path), "--out", out, "--seeds", "1", "--strategy", "top-1",
            "--n", "16", "--n-boot", "10", "--stability-rows", "4", "--device", "cpu",
            "--conditions", "disjoint,tempered-3")
    monkeypatch.setenv("DDMKIT_FID_WEIGHTS", str(tmp_path / "absent.pt"))
    no_scorer = cli(*base, "--set", 'evaluate.fid_features="inception"')
    assert no_scorer.returncode == 2 and "absent.pt" in no_scorer.stderr and not out.exists()
    bad = cli(*base, "--stages", "measure")
    assert bad.returncode == 2 and "--stages" in bad.stderr and not out.exists()

    trained = cli(*base, "--stages", "train")
    assert trained.returncode == 0, trained.stderr
    weights = out / "runs" / "disjoint_s0" / "experts" / "expert_01" / "model.safetensors"
    assert weights.exists() and not (out / "measure").exists() and not (out / "report.md").exists()
    before = weights.stat().st_mtime_ns
    measured = cli(*base)
    assert measured.returncode == 0, measured.stderr
    assert weights.stat().st_mtime_ns == before  # measured, nothing trained again
    assert sorted(p.name for p in (out / "measure").iterdir()) == ["disjoint_s0.json", "tempered-3_s0.json"]
    assert (out / "report.md").exists()

    # the report alone, from the kept measurements: a seed never measured is named and left out, nothing trained
    shutil.rmtree(out / "runs")
    (out / "report.md").unlink()
    brought = out / "measure" / "disjoint_s0.json"  # as if measured on a GPU machine
    brought.write_text(json.dumps({**json.loads(brought.read_text()), "device": "cuda:0"}))
    reported = cli(*base, "--seeds", "2", "--stages", "report")
    assert reported.returncode == 0, reported.stderr
    assert "not measured" in reported.stderr and "disjoint seed 1" in reported.stderr
    assert not (out / "runs").exists() and (out / "report.md").exists()
    study = json.loads((out / "study.json").read_text())
    assert [c["seeds"] for c in study["conditions"].values()] == [[0], [0]]
    assert study["device"] == "cpu, cuda:0" and "measured on cpu, cuda:0" in (out / "report.md").read_text()
    assert study["not_measured"] == ["disjoint seed 1", "tempered-3 seed 1"]  # said on the console alone
    assert "**Not measured, left out of this report:** disjoint seed 1, tempered-3 seed 1." in \
        (out / "report.md").read_text()
    none_kept = cli(*base[:-2], "--conditions", "random", "--stages", "report")
    assert none_kept.returncode == 2 and "--stages report" in none_kept.stderr
    assert not (out / "runs").exists()

