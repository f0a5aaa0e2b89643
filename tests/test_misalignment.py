"""Controlled misalignment studies: the conditions on known answers (exact experts and router give the true
field under full routing, router modifiers, overlapping shares), and a tiny study from the command line."""
import json
import math
from pathlib import Path

import pytest
import torch

from ddmkit.analysis.misalignment import (
    apply_router,
    exact_shard_ddm,
    field_error,
    measure_strategy,
    mixed_uniform,
    nearest_clusters,
    overlap_members,
    parse_condition,
    permuted,
    random_partition,
    share_matrix,
    tempered,
)
from ddmkit.analysis.trace import trace_strategy
from ddmkit.data.synthetic import ring_mixture
from ddmkit.errors import DDMError
from ddmkit.pipeline.misalignment_report import cell_summary, condition_verdict
from ddmkit.routing import combine, parse_strategy
from ddmkit.routing.strategies import RoutingState
from ddmkit.truth import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.toml"
RING = GaussianMixture.from_covariances(torch.arange(1.0, 9.0), ring_mixture(8).means, torch.full((8,), 0.04))
# 8 components on a circle (component j is next to j - 1 and j + 1) with unequal weights 1 : 2 : ... : 8


def states(n=400, seed=0):
    """Noised mixture samples at times spread over (0, 1), float64."""
    gen = torch.Generator().manual_seed(seed)
    x0 = RING.sample(n, gen)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    return (1 - t[:, None]) * x0 + t[:, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64), t


def field(ddm, strategy, x, t):
    """The routed velocity of a strategy at states x (not on a trajectory)."""
    probs = ddm.router(x, t)
    w = parse_strategy(strategy).weights(probs, RoutingState(generator=torch.Generator().manual_seed(0)))
    return combine(ddm.experts, w, x, t)


def pairs_partition():
    """Components {0, 1}, {2, 3}, ... in 4 shards, the 4 pair centroids, and 800 component labels."""
    labels = torch.arange(800) % 8
    clusters = labels // 2
    centroids = torch.stack([RING.means[2 * k:2 * k + 2].mean(0) for k in range(4)])
    return labels, clusters, centroids


def test_exact_experts_and_router_give_the_true_field_under_full_routing():
    labels, clusters, _ = pairs_partition()
    x, t = states()
    truth = RING.velocity(x, t)
    disjoint = [(clusters == k).nonzero().flatten() for k in range(4)]  # two components per shard
    overlap = overlap_members(labels, RING.means, 0.25)  # one per shard, and 25 of the 100 rows of each neighbour:
    # every component is held 1 + 2 x 0.25 times, so the pooled shards are the mixture itself
    for members in (disjoint, overlap):
        ddm = exact_shard_ddm(RING, share_matrix([labels[i] for i in members], labels, 8), (2,))
        assert torch.allclose(field(ddm, "full", x, t), truth, atol=1e-10)
        assert torch.allclose(field(apply_router(ddm, parse_condition("tempered-1")), "full", x, t), truth, atol=1e-10)
        assert (field(ddm, "top-1", x, t) - truth).abs().max() > 0.1  # sparse routing is not exact here
        flat = apply_router(ddm, parse_condition("tempered-3"))
        assert (field(flat, "full", x, t) - truth).abs().max() > 0.1  # the mechanism: wrong experts mixed in
        assert torch.equal(field(flat, "top-1", x, t), field(ddm, "top-1", x, t))  # the argmax is unchanged
    # experts that all hold the same data (a random partition's expectation): every strategy is exact
    same = exact_shard_ddm(RING, torch.full((8, 4), 0.25, dtype=torch.float64), (2,))
    for strategy in ("full", "top-1", "top-2", "sample-2", "switch"):
        assert torch.allclose(field(same, strategy, x, t), truth, atol=1e-10), strategy


def test_measure_strategy_sees_no_field_error_for_exact_full_routing():
    labels, clusters, _ = pairs_partition()
    ddm = exact_shard_ddm(RING, share_matrix([labels[clusters == k] for k in range(4)], labels, 8), (2,))
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    ref = RING.sample(64, torch.Generator().manual_seed(2)).float()
    kw = {"steps": 8, "jvp_rows": 8, "max_steps": 2, "n_boot": 20, "w2_boot": 3}
    full = measure_strategy(ddm, "full", x1, RING, ref, 2.0, **kw)
    top1 = measure_strategy(ddm, "top-1", x1, RING, ref, 2.0, **kw)
    hot = measure_strategy(apply_router(ddm, parse_condition("tempered-3")), "full", x1, RING, ref, 2.0, **kw)
    assert full["value"]["field_error"] < 1e-10 and max(full["boot"]["field_error"]) < 1e-10
    assert top1["value"]["field_error"] > 1e-2 and hot["value"]["field_error"] > 1e-2
    assert len(full["boot"]["nll"]) == 20 and len(full["boot"]["w2"]) == 3
    assert full["value"]["nll"] == pytest.approx(float(-RING.log_prob(ddm_samples(ddm, x1), 0.0).mean()), rel=1e-5)


def ddm_samples(ddm, x1):
    return trace_strategy(ddm, "full", x1, 8, record=False).x0.double()


def test_the_field_error_of_each_sample_against_a_loop():
    labels, clusters, _ = pairs_partition()
    ddm = exact_shard_ddm(RING, share_matrix([labels[clusters == k] for k in range(4)], labels, 8), (2,))
    tr = trace_strategy(ddm, "top-1", torch.randn(16, 2, generator=torch.Generator().manual_seed(3)), 6)
    got = field_error(tr, RING)
    for b in (0, 7, 15):
        steps = [((tr.v[i, b].double() - RING.velocity(tr.x[i, b:b + 1].double(), float(tr.t[i]))[0]) ** 2).mean()
                 for i in range(6)]
        assert float(got[b]) == pytest.approx(float(sum(steps) / 6), rel=1e-9)


def test_router_modifiers_on_known_answers():
    r = torch.tensor([[0.8, 0.2, 0.0], [0.5, 0.25, 0.25]], dtype=torch.float64)
    router = lambda x, t: r
    x, t = torch.zeros(2, 2), torch.zeros(2)
    assert torch.allclose(tempered(router, 1.0)(x, t), r, atol=1e-12)  # T = 1 is the identity
    assert torch.allclose(tempered(router, 2.0)(x, t)[0], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert torch.allclose(tempered(router, 1e6)(x, t)[1], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(mixed_uniform(router, 1.0)(x, t), torch.full((2, 3), 1 / 3, dtype=torch.float64))
    assert torch.equal(mixed_uniform(router, 0.0)(x, t), r)
    assert torch.equal(permuted(router, 1.0)(x, t)[0], torch.tensor([0.0, 0.8, 0.2], dtype=torch.float64))
    assert torch.allclose(permuted(router, 0.5)(x, t)[0], torch.tensor([0.4, 0.5, 0.1], dtype=torch.float64))


def test_a_permuted_router_routes_to_the_permuted_experts():
    labels, clusters, _ = pairs_partition()
    ddm = exact_shard_ddm(RING, share_matrix([labels[clusters == k] for k in range(4)], labels, 8), (2,))
    x = RING.means.clone()  # component j's mean at t = 0.01: the exact posterior picks cluster j // 2
    t = torch.full((8,), 0.01, dtype=torch.float64)
    own = ddm.router(x, t).argmax(1)
    assert own.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    moved = apply_router(ddm, parse_condition("permuted-1"))
    w = parse_strategy("top-1").weights(moved.router(x, t), RoutingState())
    assert w.argmax(1).tolist() == ((own + 1) % 4).tolist()
    assert moved.meta["router"] == "exact+permuted-1" and ddm.meta["router"] == "exact"  # the original is kept
    assert torch.equal(ddm.router(x, t).argmax(1), own)


def test_overlapping_shards_hold_the_stated_share_of_their_neighbours_rows():
    labels = torch.cat([torch.full((100 + 10 * j,), j) for j in range(8)])  # clusters = components, of unequal sizes
    sizes = torch.bincount(labels)
    members = overlap_members(labels, RING.means, 0.25, seed=3)
    near = nearest_clusters(RING.means)
    assert [sorted(near[k]) for k in (0, 3)] == [[1, 7], [2, 4]]  # the two ring neighbours
    for k, idx in enumerate(members):
        held = torch.bincount(labels[idx], minlength=8)
        want = torch.zeros(8, dtype=torch.long)
        want[k] = sizes[k]
        want[near[k]] = torch.tensor([round(0.25 * int(sizes[j])) for j in near[k]])
        assert torch.equal(held, want), k
        assert len(idx.unique()) == len(idx)
    m = share_matrix([labels[i] for i in members], labels, 8)
    assert m[2, 2] == 1 and m[2, 1] == round(0.25 * 120) / 120 and m[2, 5] == 0
    assert torch.equal(overlap_members(labels, RING.means, 0.25, seed=3)[2], members[2])  # fixed by the seed


def test_random_partitions_are_balanced_and_fixed_by_the_seed():
    a = random_partition(1003, 4, seed=5)
    assert sorted(torch.bincount(a).tolist()) == [250, 251, 251, 251]
    assert torch.equal(a, random_partition(1003, 4, seed=5)) and not torch.equal(a, random_partition(1003, 4, seed=6))


def test_condition_names():
    c = parse_condition("overlap-0.25+tempered-3+permuted-0.5")
    assert (c.partition, c.share, c.router, c.run_name) == ("overlap", 0.25, (("tempered", 3.0), ("permuted", 0.5)),
                                                             "overlap-0.25")
    assert parse_condition("tempered-2").run_name == "disjoint" and parse_condition("exact").trained is False
    assert parse_condition("undertrained-0.1").run_name == "undertrained-0.1"
    assert parse_condition("random+exact").exact and parse_condition("random").partition == "random"
    for bad in ("wobble", "overlap-2", "tempered-0", "uniform-1.5", "exact+random", "disjoint+", "undertrained-x",
                "exact+exact"):
        with pytest.raises(DDMError, match="--conditions"):
            parse_condition(bad)


@pytest.mark.parametrize("name, words", [
    ("tempered-3+disjoint", "--conditions 'tempered-3+disjoint': 'disjoint' is a base; write it first, once "
                            "(BASE[+MOD...]), e.g. disjoint+tempered-3"),
    ("overlap-0.25+random", "--conditions 'overlap-0.25+random': 'random' is a base; write it first, once "
                            "(BASE[+MOD...]), e.g. random+tempered-3"),
    ("disjoint tempered-3", "--conditions 'disjoint tempered-3': separate conditions with commas, e.g. "
                            "--conditions disjoint,tempered-3")])
def test_a_misplaced_base_or_a_list_with_spaces_is_named_with_its_fix(name, words):
    """Both were 'unknown part' followed by the accepted forms, which list the very part called unknown."""
    with pytest.raises(DDMError) as refused:
        parse_condition(name)
    assert str(refused.value) == words
    assert parse_condition("disjoint + tempered-3").router == (("tempered", 3.0),)  # spaces around a + are fine


def test_intervals_and_verdicts():
    c = cell_summary([1.0, 2.0, 3.0], [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]])
    assert c["mean"] == 2.0 and c["seeds"]["hi"] - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert c["samples"] == {"lo": pytest.approx(2.05), "hi": pytest.approx(3.95)}  # replicate means over seeds: 2, 3, 4
    normal = cell_summary([2.0], [[1.0, 3.0]], normal=True)
    assert normal["samples"]["lo"] == pytest.approx(2.0 - 1.96 * math.sqrt(2))
    table = {"full": {"delta_refine": {"mean": 0.1}, "amp": {"mean": 2.0}},
             "top-2": {"delta_refine": {"mean": 0.2}, "amp": {"mean": 1.0}}}
    worse = {"seeds": {"n": 3, "lo": 0.1, "hi": 0.3}}
    better = {"seeds": {"n": 3, "lo": -0.3, "hi": -0.1}}
    unclear = {"seeds": {"n": 1}, "samples": {"lo": -0.1, "hi": 0.1}}
    noisy = {"seeds": {"n": 3, "lo": 0.1, "hi": 0.3}, "samples": {"lo": -0.1, "hi": 0.4}}  # training says worse only
    assert condition_verdict(table, ["full", "top-2"], {"w2": noisy, "nll": worse}).startswith("not reproduced")
    assert condition_verdict(table, ["full", "top-2"], {"w2": worse, "nll": better}).startswith("reproduced")
    assert condition_verdict(table, ["full", "top-2"], {"w2": better, "nll": worse}).startswith("contradicted")
    assert condition_verdict(table, ["full", "top-2"], {"w2": unclear, "nll": worse}).startswith("not reproduced")
    table["full"]["delta_refine"]["mean"] = 0.3
    assert condition_verdict(table, ["full", "top-2"], {"w2": worse, "nll": worse}).startswith("not reproduced")


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_tiny_study_from_the_command_line(tmp_path, cli):
    out = tmp_path / "study"
    short = ("--set", "expert.train.steps=15")  # a quarter of tiny.toml's 60: what is trained is not measured here
    base = ("study", "misalignment", TINY, "--out", out, "--seeds", "2", "--strategy", "full", "--strategy", "top-2",
            "--n", "100", "--n-boot", "20", "--w2-boot", "3", *short)
    done = cli(*base, "--conditions", "disjoint,overlap-0.5,exact")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "study.json").read_text())
    assert report["condition_names"] == ["disjoint", "overlap-0.5", "exact"]  # in the order given
    assert report["conditions"]["disjoint"]["seeds"] == [0, 1] and report["conditions"]["exact"]["seeds"] == [0]
    assert report["conditions"]["exact"]["table"]["full"]["field_error"]["mean"] < 1e-8  # exact: the true field
    assert (out / "report.md").read_text().startswith("# ddmkit misalignment study")
    assert (out / "plots" / "quality_vs_stability.png").exists()
    manifest = json.loads((out / "runs" / "overlap-0.5_s1" / "partition" / "manifest.json").read_text())
    assert manifest["condition"] == "overlap-0.5" and sum(manifest["counts"]) > 1600  # shards overlap
    seeds = [json.loads((out / "runs" / f"disjoint_s{s}" / "experts" / "expert_00" / "config.json").read_text())
             ["train"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    run = tree(out / "runs" / "disjoint_s0")  # bytes and modification times of every file
    measured = (out / "measure" / "disjoint_s0.json").stat().st_mtime_ns
    again = cli(*base, "--conditions", "disjoint", "--conditions", "tempered-3+permuted-0.5")
    assert again.returncode == 0, again.stderr
    assert tree(out / "runs" / "disjoint_s0") == run  # resumed, and the router modifiers wrote nothing into it
    assert (out / "measure" / "disjoint_s0.json").stat().st_mtime_ns == measured  # not measured again
    assert json.loads((out / "study.json").read_text())["condition_names"] == ["disjoint", "tempered-3+permuted-0.5"]
    weights = {p: p.stat().st_mtime_ns for p in (out / "runs" / "disjoint_s0").rglob("model.safetensors")}
    other = cli("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--strategy", "top-2", "--strategy",
                "full", "--n", "80", "--n-boot", "20", "--w2-boot", "3", "--conditions", "disjoint", *short, "--set",
                "expert.train.threads=1")  # was refused ("holds a run of another config"; --force retrained)
    assert other.returncode == 0, other.stderr
    assert {p: p.stat().st_mtime_ns for p in weights} == weights and len(weights) == 5  # measured, not trained
    bad = cli("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--n", "80", "--conditions", "disjoint",
              "--set", "expert.train.steps=7")
    assert bad.returncode == 2 and "disjoint_s0 holds a run trained otherwise (expert.train.steps (" in bad.stderr, \
        bad.stderr


@pytest.mark.parametrize("args, words", [
    (("--conditions", "wobble"), "--conditions"),
    (("--conditions", ",,"), "--conditions ',,': names nothing"),  # it ran the whole default study
    (("--seeds", "0"), "--seeds"),
    (("--seeds", "99999999999999999999"), "--seeds 99999999999999999999: give a whole number, from 1 to 1000"),  # was
    # an OverflowError's traceback (range(N) made into a list)
    (("--strategy", "top-0"), "--strategy"),
    (("--n", "5000"), "data.n_test"),
    (("--set", "data.name=moons"), "data.name"),
    (("--set", "sample.solver=adaptive", "--set", 'sample.strategies=["top-1"]'),
     "pass --set sample.solver=rk4"),  # a traceback from the analysis sampler after the training
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, args, words, cli):
    out = tmp_path / "study"
    done = cli("study", "misalignment", TINY, "--out", out, *args)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert not out.exists()


def test_an_out_inside_a_file_is_refused_naming_out_before_any_work(tmp_path, cli):
    """--out under a file was found only when the first run folder was made, after the study had begun, by a
    message that named no option."""
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "study"
    done = cli("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--strategy", "full", "--strategy",
               "top-2", "--n", "100", "--conditions", "exact")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"--out {out}: {tmp_path / 'afile'} is a file, not a folder" in said, said
    assert "misalignment: exact" not in said and (tmp_path / "afile").read_text() == "mine", said


OTHER_REPORT = "holds a report.md that no misalignment study wrote"


@pytest.mark.parametrize("theirs, words", [
    ({"report.md": "# theory distill", "results.json": '{"runs": []}'},
     "holds a theory distill study's results (report.md, results.json)"),
    ({"report.md": "# my notes"}, OTHER_REPORT),
    ({"sweep.json": '{"cells": []}', "sweep.md": "# ddmkit sweep"}, "holds a sweep's results (sweep.json, cell"),
    ({"k2_b1_s0/metrics.json": "{}"}, "holds a sweep's results (sweep.json, cell")])
def test_an_out_holding_another_report_is_refused_before_any_work(tmp_path, theirs, words, cli):
    """A report.md the study did not write (a theory study's, a user's) was replaced by the study's own; a sweep's
    folder (reported, or its cells alone) took the study's runs beside its cells."""
    out = tmp_path / "theirs"
    for name, text in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    done = cli("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--strategy", "full", "--strategy",
               "top-2", "--n", "100", "--conditions", "exact")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"--out {out} {words}" in said, said
    assert "give the misalignment study a folder of its own, e.g. --out" in said, said
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(theirs)


def test_each_stage_checks_only_the_devices_it_uses(tmp_path, cli):
    """A study measured on a GPU is reported on a machine without one by the same command line: --stages
    report uses no device (it was refused: "--device: 'cuda:99', but this machine has 0 CUDA device(s)").
    Measuring there is still refused before any work, naming --device; and a run to train on a device this
    machine lacks names the field and a fix that works (--device, which it named, moves no training)."""
    out = tmp_path / "study"
    base = ("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--strategy", "full", "--strategy", "top-2",
            "--n", "100", "--n-boot", "20", "--w2-boot", "3", "--conditions", "exact")
    assert cli(*base).returncode == 0
    (out / "report.md").unlink()
    measured = (out / "measure" / "exact_s0.json").read_bytes()
    reported = cli(*base, "--stages", "report", "--device", "cuda:99")
    assert reported.returncode == 0, reported.stderr
    assert (out / "report.md").exists() and (out / "measure" / "exact_s0.json").read_bytes() == measured
    measure = cli(*base, "--device", "cuda:99", "--conditions", "exact+tempered-3")
    assert measure.returncode == 2 and "--device: 'cuda:99', but this machine has" in measure.stderr, measure.stderr
    assert "give --device cpu" in measure.stderr and not (out / "measure" / "exact_tempered-3_s0.json").exists()
    typo = cli(*base, "--stages", "report", "--device", "gpu")
    assert typo.returncode == 2 and "--device: 'gpu' is not a device" in typo.stderr, typo.stderr
    other = tmp_path / "other"
    train = cli(*base[:3], "--out", other, *base[5:-1], "disjoint", "--stages", "train", "--device", "cpu",
                "--set", "router.train.device=cuda:99")
    said = " ".join(train.stderr.split())
    assert train.returncode == 2 and "router.train.device = 'cuda:99'" in said, said
    assert "pass --set router.train.device=cpu" in said and not other.exists()


def test_an_interrupted_measurement_resumes_at_the_next_strategy_with_the_same_numbers(tmp_path, monkeypatch):
    import ddmkit.pipeline.misalignment as study
    from ddmkit.config import load_config

    cfg, measured = load_config(TINY), []
    real = study.measure_strategy

    def counted(ddm, name, *args, **kw):
        measured.append(name)
        if name == "top-2" and len(measured) == 2:
            raise KeyboardInterrupt  # the call's time ran out after full
        return real(ddm, name, *args, **kw)

    monkeypatch.setattr(study, "measure_strategy", counted)
    options = dict(seeds=[0], conditions=["exact"], strategies=["full", "top-2"], n=100, n_boot=20, w2_boot=3,
                   log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        study.study_misalignment(cfg, tmp_path / "cut", **options)
    parts = tmp_path / "cut" / "measure" / "exact_s0.parts.json"
    assert list(json.loads(parts.read_text())["strategies"]) == ["full"]
    resumed = study.study_misalignment(cfg, tmp_path / "cut", **options)
    assert measured == ["full", "top-2", "top-2"] and not parts.exists()  # full was not measured again
    whole = study.study_misalignment(cfg, tmp_path / "whole", **options)
    assert resumed["conditions"]["exact"]["table"] == whole["conditions"]["exact"]["table"]


def test_a_study_without_verdicts_says_so_before_any_work(tmp_path):
    """--strategy full alone trained (and measured) everything, then reported "needs full and another strategy"."""
    from ddmkit.config import load_config
    from ddmkit.pipeline.misalignment import study_misalignment

    lines = []
    result = study_misalignment(load_config(TINY), tmp_path / "s", seeds=[0], conditions=["exact"], strategies=["full"],
                                n=100, n_boot=20, w2_boot=3, log=lines.append)
    assert lines[0] == ("note: --strategy full: each condition's verdict compares full with the best other strategy, "
                        "so this study gives the tables without verdicts; add --strategy full and another (e.g. top-1)")
    assert result["conditions"]["exact"]["verdict"] == "needs full and another strategy"


def test_a_cells_run_config_is_valid_for_any_n_the_study_accepts():
    """--n below evaluate.chunk's minimum (10) or below sample.sweep_n made the cells' configs invalid, naming
    settings the user never touched; settings not bounded by n stay as they were (the cells' keys with them)."""
    from ddmkit.config import RunConfig, load_config
    from ddmkit.pipeline.checks import check_run_plan
    from ddmkit.pipeline.misalignment import cell_config

    raw = load_config(TINY).model_dump()
    raw["sample"].update(sweep_n=50, stats_router_strategies=["top-1"])
    cfg = RunConfig(**raw)
    for n, chunk, sweep_n in ((4, 10, 4), (30, 30, 30), (400, 200, 50)):
        cell = cell_config(cfg, parse_condition("exact"), 0, n, ["full"])
        assert (cell.sample.n, cell.evaluate.chunk, cell.sample.sweep_n) == (n, chunk, sweep_n)
        check_run_plan(cell, 1000, 2 * n + 2 * chunk, (2,), True)


def test_a_measurement_recorded_under_typed_strategy_names_is_kept_under_their_one_names(tmp_path):
    """Earlier ddmkit keyed a cell's measurement on the --strategy names as typed (sample-2@1); writing them
    by their one names (sample-2) changed the key, and every cell of such a study was measured again."""
    from ddmkit.pipeline.misalignment import kept_measurement

    path = tmp_path / "disjoint_s0.json"
    cell = {"key": "typed", "condition": "disjoint", "strategies": {"full": {"v": 1}, "sample-2@1": {"v": 2}}}
    path.write_text(json.dumps(cell))
    kept = kept_measurement(path, "now", "typed")
    assert kept["key"] == "now" and kept["strategies"] == {"full": {"v": 1}, "sample-2": {"v": 2}}
    assert kept_measurement(path, "now", "other")["key"] == "typed"  # another key: measured again, as before
    assert kept_measurement(tmp_path / "none.json", "now", "typed") == {}


def test_an_out_in_a_run_folder_is_refused_naming_out_before_anything_is_written(tmp_path, cli):
    """--out a run folder, or a folder inside one: the first condition's run was refused by the run's own check,
    naming OUT/runs/disjoint_s0 and, as the fix, the run folder itself (the folder given). Now the study exits 2
    before any work, naming --out and a folder of its own."""
    run = tmp_path / "run"
    (run / "partition").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for out, words in ((run, f"--out {run} is a ddmkit run folder"),
                       (run / "study", f"--out {run / 'study'} is inside the run folder {run}")):
        done = cli("study", "misalignment", TINY, "--out", out, "--seeds", "1", "--conditions", "disjoint",
                   "--strategy", "full", "--strategy", "top-1", "--n", "20")
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and words in said and "give a folder of its own outside any run" in said, said
        assert "misalignment: disjoint" not in said
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "partition"]
    assert not any((run / "partition").iterdir())


def test_a_conditions_run_draws_no_sample_sets_not_even_the_configs_extra_ones(tmp_path, monkeypatch):
    """The study trains each condition's run (run_pipeline's train stages) and measures its --strategy sets
    itself: the config's sample.stats_router_strategies are never drawn into the run (so they cost no time, and
    the cells' configs, whose digests key the kept measurements, keep them as they are)."""
    import ddmkit.pipeline.misalignment as study
    import ddmkit.pipeline.run as pipeline
    from ddmkit.config import RunConfig, load_config

    raw = load_config(TINY).model_dump()
    raw["sample"]["stats_router_strategies"] = ["top-1"]
    drawn = []
    monkeypatch.setattr(pipeline, "sample_and_evaluate", lambda *args, **kw: drawn.append(args))
    result = study.study_misalignment(RunConfig(**raw), tmp_path / "s", seeds=[0], conditions=["disjoint"],
                                      strategies=["full", "top-1"], n=100, n_boot=20, w2_boot=3, log=lambda line: None)
    run = tmp_path / "s" / "runs" / "disjoint_s0"
    assert drawn == [] and (run / "registry.json").exists() and not (run / "samples").exists()
    assert list(result["conditions"]["disjoint"]["table"]) == ["full", "top-1"]
