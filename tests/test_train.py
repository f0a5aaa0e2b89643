"""The training loop, expert folders and isolation."""
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, PathConfig, TrainConfig
from ddmkit.data import load_dataset
from ddmkit.data.partition import partition_data
from ddmkit.errors import DDMError
from ddmkit.flow import flow_matching_loss, to_velocity
from ddmkit.nets import from_pretrained
from ddmkit.train.jobs import monolith_config, train_expert, train_expert_once
from ddmkit.train import fit

SMALL = ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 32, "depth": 1}),
                     train=TrainConfig(steps=80, batch_size=64, log_every=20))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("part")
    train, _ = load_dataset("ring8", 800, 10)
    partition_data(train, 4, root / "p")
    return root / "p"


def test_fit_learns_a_known_velocity():
    """A single Gaussian N(m, s^2 I): the trained net approaches the closed-form velocity."""
    from ddmkit.nets import VelocityMLP
    from ddmkit.truth import GaussianMixture

    g = GaussianMixture.from_covariances([1.0], [[1.5, -0.5]], [0.09])
    data = g.sample(4000, torch.Generator().manual_seed(0)).float()
    model = VelocityMLP([2], width=64, depth=2)

    def batch_loss(m, step, gen):
        idx = torch.randint(0, len(data), (256,), generator=gen)
        return flow_matching_loss(m, data[idx], gen), {}

    ema, hist = fit(model, batch_loss, TrainConfig(steps=600, batch_size=256, lr=3e-3, ema_decay=0.99,
                                                         device="cpu"))  # the data are CPU rows
    assert hist[-1]["loss"] < hist[0]["loss"]
    t = torch.rand(500) * 0.9 + 0.05  # evaluate where the path puts mass
    x = (1 - t[:, None]) * data[:500] + t[:, None] * torch.randn(500, 2)
    with torch.no_grad():
        err = (ema(x, t) - g.velocity(x.double(), t.double()).float()).pow(2).sum(1).mean()
    scale = g.velocity(x.double(), t.double()).pow(2).sum(1).mean()
    assert float(err) < 0.01 * float(scale)


def test_expert_folder_round_trip_and_determinism(shards, tmp_path):
    shard = shards / "shards" / "cluster_00.safetensors"
    train_expert(shard, SMALL, tmp_path / "a")
    train_expert(shard, SMALL, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [20, 40, 60, 80]
    model, cfg = from_pretrained(tmp_path / "a")
    assert cfg["role"] == "expert" and cfg["cluster"] == 0 and cfg["time_convention"].startswith("linear")
    x, t = torch.randn(5, 2), torch.rand(5)
    model2, _ = from_pretrained(tmp_path / "b")
    assert torch.equal(model(x, t), model2(x, t))
    other = SMALL.model_copy(update={"train": SMALL.train.model_copy(update={"seed": 1})})
    train_expert(shard, other, tmp_path / "c")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_expert_job_reads_only_its_shard(shards, tmp_path):
    """Run the job in a fresh process with an audit hook that records every
    file opened under the partition folder: only the given shard may appear."""
    script = textwrap.dedent(f"""
        import sys, json
        opened = []
        root = {str(shards)!r}
        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].startswith(root):
                opened.append(args[0])
        sys.addaudithook(hook)
        from ddmkit.train.jobs import train_expert
        from ddmkit.config import ExpertConfig
        cfg = ExpertConfig.model_validate({json.dumps(SMALL.model_dump())!r} and json.loads({json.dumps(json.dumps(SMALL.model_dump()))}))
        train_expert(root + "/shards/cluster_02.safetensors", cfg, {str(tmp_path / "e")!r})
        print(json.dumps(sorted(set(opened))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"DDMKIT_QUIET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    opened = json.loads(out.stdout.strip().splitlines()[-1])
    assert opened == [str(shards / "shards" / "cluster_02.safetensors")]
    assert (tmp_path / "e" / "model.safetensors").exists()


def test_monolith_is_flop_matched():
    m = monolith_config(SMALL, 8)
    assert m.train.steps * m.train.batch_size == 8 * SMALL.train.steps * SMALL.train.batch_size
    assert m.net == SMALL.net


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
def test_parameterisations_convert_to_velocity(prediction, gen):
    x, eps = torch.randn(10, 3, generator=gen), torch.randn(10, 3, generator=gen)
    t = torch.rand(10, generator=gen) * 0.8 + 0.1
    xt = (1 - t[:, None]) * x + t[:, None] * eps
    pred = eps if prediction == "epsilon" else x
    assert torch.allclose(to_velocity(pred, prediction, xt, t), eps - x, atol=1e-5)


def test_missing_and_corrupt_weights(shards, tmp_path):
    train_expert(shards / "shards" / "cluster_01.safetensors", SMALL, tmp_path / "x")
    weights = tmp_path / "x" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DDMError, match="corrupt"):
        from_pretrained(tmp_path / "x")
    weights.unlink()
    with pytest.raises(DDMError, match="missing"):
        from_pretrained(tmp_path / "x")


def test_failed_training_leaves_no_folder(tmp_path):
    with pytest.raises(DDMError):
        train_expert(tmp_path / "nope.safetensors", SMALL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- train-expert on a folder holding a finished expert: the same training, or refused naming what differs -----

QUICK = SMALL.model_copy(update={"train": TrainConfig(steps=5, batch_size=16, log_every=5, device="cpu")})
VP = PathConfig(kind="vp")


@pytest.mark.parametrize("made, asked, field", [
    ({"path": VP, "prediction": "v"}, {"path": PathConfig(kind="vp", schedule="cosine"), "prediction": "v"},
     "path.schedule"),
    ({"prediction": "epsilon"}, {"path": VP, "prediction": "epsilon"}, "path.kind"),
    ({"path": VP, "prediction": "v"}, {"path": PathConfig(kind="vp", beta_start=2e-4), "prediction": "v"},
     "path.beta_start"),
    ({"path": VP, "prediction": "epsilon"}, {"path": PathConfig(kind="vp", steps=500), "prediction": "epsilon"},
     "path.steps"),
])
def test_an_expert_trained_on_another_path_is_refused_naming_the_field(shards, tmp_path, made, asked, field):
    """train-expert over an expert of another path (vp linear betas vs cosine; the linear path vs vp) said
    "trained already (the same settings and shard); nothing to do"; how the job runs still changes nothing."""
    shard, out = shards / "shards" / "cluster_00.safetensors", tmp_path / "e"
    assert train_expert_once(shard, QUICK.model_copy(update=made), out, log=lambda m: None)
    with pytest.raises(DDMError, match=rf"{re.escape(str(out))} holds an expert trained with other settings "
                                       rf"\({re.escape(field)}\); choose another --out, or pass --force"):
        train_expert_once(shard, QUICK.model_copy(update=asked), out)
    runs_otherwise = QUICK.train.model_copy(update={"threads": 2, "log_every": 1, "device": "auto"})
    said = []
    assert not train_expert_once(shard, QUICK.model_copy(update={**made, "train": runs_otherwise}), out,
                                 log=said.append)
    assert "trained already (the same settings and shard)" in said[0]


def test_another_clusters_shard_given_to_an_expert_folder_names_both_clusters(shards, tmp_path):
    """cluster_01's shard given to expert_00's folder said 'other settings (the shard) ... pass --force', and
    --force replaced the good expert of cluster 0 with a copy of cluster 1's."""
    out = tmp_path / "experts" / "expert_00"
    assert train_expert_once(shards / "shards" / "cluster_00.safetensors", QUICK, out, log=lambda m: None)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(DDMError, match=rf"{re.escape(str(out))} holds the expert of cluster 0, and .*cluster_01"
                                       rf".safetensors is the shard of cluster 1: train it into cluster 1's expert "
                                       rf"folder \({re.escape(str(out.with_name('expert_01')))} in a run folder\)"):
        train_expert_once(shards / "shards" / "cluster_01.safetensors", QUICK, out)
    assert (out / "model.safetensors").read_bytes() == before


def test_a_conditional_expert_of_another_label_dropout_is_refused(shards, tmp_path):
    """config.json records label_dropout, and train-expert compares it for a class-conditional network (for
    another there are no labels to drop: the same expert). An expert folder that does not record it (written
    before) is refused the same way: --force trains it again."""
    from test_resume import DIT, _labelled_shard

    shard, out = _labelled_shard(tmp_path / "labelled.safetensors"), tmp_path / "e"
    conditional = QUICK.model_copy(update={"net": DIT, "label_dropout": 0.1})
    assert train_expert_once(shard, conditional, out, log=lambda m: None)
    assert json.loads((out / "config.json").read_text())["label_dropout"] == 0.1
    with pytest.raises(DDMError, match=r"trained with other settings \(label_dropout\)"):
        train_expert_once(shard, conditional.model_copy(update={"label_dropout": 0.3}), out)
    saved = json.loads((out / "config.json").read_text())
    del saved["label_dropout"]
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(DDMError, match=r"trained with other settings \(label_dropout\)"):
        train_expert_once(shard, conditional, out)

    ring = shards / "shards" / "cluster_00.safetensors"
    assert train_expert_once(ring, QUICK, tmp_path / "u", log=lambda m: None)
    said = []
    assert not train_expert_once(ring, QUICK.model_copy(update={"label_dropout": 0.5}), tmp_path / "u",
                                 log=said.append)
    assert "trained already" in said[0]


def test_the_logged_learning_rate_is_the_one_its_step_used():
    """Warm-up over 4 steps from lr 1: steps 1..4 use 0.25, 0.5, 0.75, 1 (the row was read after the scheduler
    stepped, one step ahead), then the cosine decay from 1 at step 5."""
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(steps=6, batch_size=1, lr=1.0, warmup=4, log_every=1, device="cpu")
    _, history = fit(model, lambda m, step, g: (m(torch.ones(1, 2)).square().sum(), {}), cfg)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 2))]
    assert [row["lr"] for row in history] == pytest.approx(expected)


def test_fit_stops_at_the_step_after_its_stop_flag_is_set_when_the_keyboardinterrupt_is_lost(tmp_path):
    """A stopped job whose KeyboardInterrupt was lost (Python drops one raised in a __del__) trained on to its
    end: the flag its stopper sets (here alone, as if the exception was lost) ends it before the next step, with
    the checkpoint of its last one kept. Outside a stop scope nothing is stopped, and the next job's scope
    starts unstopped."""
    from ddmkit.io import read_metadata
    from ddmkit.train.stop import request_stop, stop_scope

    steps = []

    def batch_loss(m, step, g):
        steps.append(step)
        if step == 3:
            request_stop()
        return m(torch.ones(1, 2)).square().sum(), {}

    cfg = TrainConfig(steps=1000, batch_size=1, log_every=1, checkpoint_every=1, device="cpu")
    with stop_scope():
        with pytest.raises(KeyboardInterrupt):
            fit(torch.nn.Linear(2, 2), batch_loss, cfg, checkpoint=tmp_path / "c.safetensors")
    assert steps == [0, 1, 2, 3] and read_metadata(tmp_path / "c.safetensors")["step"] == 4
    request_stop()  # outside any stop scope: nothing to stop
    try:
        with stop_scope():
            _, history = fit(torch.nn.Linear(2, 2), lambda m, step, g: (m(torch.ones(1, 2)).sum(), {}),
                             cfg.model_copy(update={"steps": 5}))
    except KeyboardInterrupt:  # as a failure of this test, not pytest's Ctrl-C
        pytest.fail("a job in a fresh stop scope was stopped")
    assert len(history) == 5


def test_a_stop_flag_stops_only_the_thread_of_its_scope():
    """in_thread stops the thread training beside the process pool while this thread raises the error that
    stopped it: one thread's stop flag is not another's, and an inner scope's is not the outer one's."""
    import threading

    from ddmkit.train.stop import stop_requested, stop_scope

    inside, leave, seen = threading.Event(), threading.Event(), []

    def other():
        with stop_scope() as theirs:
            theirs.set()
            inside.set()
            leave.wait(60)
            seen.append(stop_requested())
    with stop_scope() as mine:
        thread = threading.Thread(target=other)
        thread.start()
        assert inside.wait(60)
        try:
            assert not stop_requested()  # while the other thread's scope is stopped
        finally:
            leave.set()
            thread.join()
        assert seen == [True] and not mine.is_set()
        with stop_scope() as inner:
            inner.set()
            assert stop_requested()
        assert not stop_requested()  # the scope around it is restored


@pytest.mark.parametrize("conditional", [False, True])
def test_an_expert_builds_one_batch_sampler_so_its_shard_is_on_the_device_once(tmp_path, monkeypatch, conditional):
    """Each sampler moves the shard to the training device; a class-conditional expert built the unlabelled one
    too, which it never used, and held its shard there twice."""
    import ddmkit.train.jobs as jobs
    from test_resume import DIT

    built = []
    for name in ("_batches", "_labelled_batches"):
        monkeypatch.setattr(jobs, name, lambda *a, real=getattr(jobs, name), name=name: built.append(name) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(40, 2, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    net = DIT if conditional else DIT.model_copy(update={"kwargs": {**DIT.kwargs, "num_classes": 0}})
    config = QUICK.model_copy(update={"net": net})
    jobs.train_velocity_model(x, config, tmp_path / "e", "expert", labels=labels if conditional else None)
    assert built == (["_labelled_batches"] if conditional else ["_batches"])
