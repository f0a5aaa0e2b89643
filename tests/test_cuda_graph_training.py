"""Concurrent experts on CUDA streams (ddmkit.train.streamed) and the training step as one CUDA graph
(train.cuda_graph, ddmkit.accel.step_graph): what holds on the CPU, and (CUDA only) that a graphed job
resumes to the bytes of one never stopped, with its eager steps and its replays the same to the bit."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.errors import DDMError
from ddmkit.io import read_metadata, save_tensors
from ddmkit.nets import build_seeded
import ddmkit.train.concurrent as conc
import ddmkit.train.loop as loop
from ddmkit.train.checkpoint import as_numbers, load_checkpoint, save_checkpoint
from ddmkit.train.distributed import Distributed
from ddmkit.train.loop import EMA, fit, job_fingerprint, lr_lambda
from ddmkit.train.streamed import StreamedExperts
from conftest import raising_after

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _nets(k: int = 3) -> list[torch.nn.Module]:
    return [build_seeded("mlp", seed, data_shape=[5], width=16, depth=2) for seed in range(k)]


class _Labelled(torch.nn.Module):
    """A network that takes labels: net(x, t) + y."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y):
        return self.net(x, t) + y[:, None]


@pytest.mark.parametrize("labelled", [False, True])
def test_streamed_experts_give_each_networks_own_output(labelled):
    nets = [_Labelled(net) for net in _nets()] if labelled else _nets()
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 7, 5, generator=gen), torch.rand(3, 7, generator=gen), torch.randint(0, 4, (3, 7))
    out = StreamedExperts(nets)(x, t, y) if labelled else StreamedExperts(nets)(x, t)
    assert out.shape == (3, 7, 5)
    for k, net in enumerate(nets):
        assert torch.equal(out[k], net(x[k], t[k], y[k]) if labelled else net(x[k], t[k]))


def test_streamed_experts_clip_each_expert_as_torch_clips_one_network():
    """Known answer: each expert's norm and clipped gradient are torch.nn.utils.clip_grad_norm_'s on a copy of
    that expert alone, with the same gradient."""
    import copy

    nets = _nets()
    streamed = StreamedExperts(nets)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 9, 5, generator=gen), torch.rand(3, 9, generator=gen)
    (streamed(x, t) * torch.randn(3, 9, 5, generator=gen)).sum().backward()
    alone = [copy.deepcopy(net) for net in nets]
    for net, copied in zip(nets, alone):
        for p, q in zip(net.parameters(), copied.parameters()):
            q.grad = p.grad.clone()
    norms = streamed.clip_grad_norms_(0.05)
    for k, net in enumerate(alone):
        expected = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        assert norms[k] == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0.05
        for mine, theirs in zip(nets[k].parameters(), net.parameters()):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=0)
    assert streamed.unstack()[1].state_dict().keys() == nets[1].state_dict().keys()


def _shards(folder: Path, scale: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(3):
        x = torch.randn(40, 2, generator=torch.Generator().manual_seed(c)) + 3 * c
        paths.append(folder / f"cluster_{c:02d}.safetensors")
        save_tensors(paths[-1], {"x": x * (scale if c == 2 else 1.0)}, {"cluster": c, "k": 3})
    return paths


def _config(networks: str = "streams", **train) -> ExpertConfig:
    return ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 8, "depth": 1}), concurrent=True,
                        concurrent_networks=networks,
                        train=TrainConfig(**{"steps": 20, "batch_size": 8, "warmup": 2, "log_every": 5,
                                             "checkpoint_every": 5, "device": "cpu", **train}))


def _train(shards, config, root: Path) -> list[Path]:
    return conc.train_experts_concurrently(shards, config, [root / f"expert_{c:02d}" for c in range(len(shards))],
                                           log=lambda m: None)


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def _log(folder: Path) -> str:
    return re.sub(r'"seconds": [0-9.e+-]+', '"seconds": 0', (folder / "train_log.jsonl").read_text())


def test_streamed_and_stacked_jobs_train_the_same_experts_and_each_on_its_own_shard(tmp_path):
    """The same draws and the same arithmetic (float32 on the CPU): the two ways give the same experts to
    float tolerance; and changing shard 2 changes no other streamed expert's bytes."""
    from ddmkit.io import load_tensors

    shards = _shards(tmp_path / "shards")
    streamed = _train(shards, _config(), tmp_path / "streams")
    stacked = _train(shards, _config("stacked"), tmp_path / "stacked")
    for a, b in zip(streamed, stacked):
        mine, theirs = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5)
    other = _train(_shards(tmp_path / "other", scale=3.0), _config(), tmp_path / "other_run")
    assert [_weights(a) == _weights(b) for a, b in zip(streamed, other)] == [True, True, False]


def test_a_killed_streamed_job_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    shards = _shards(tmp_path / "shards")
    reference = _train(shards, _config(), tmp_path / "ref")
    with monkeypatch.context() as m:
        m.setattr(loop, "check_stop", raising_after(loop.check_stop, 13, KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            _train(shards, _config(), tmp_path / "run")
    names = read_metadata(conc.stacked_checkpoint_path([tmp_path / "run" / "expert_00"]))
    from ddmkit.io import load_tensors
    checkpoint = load_tensors(conc.stacked_checkpoint_path([tmp_path / "run" / "expert_00"]))
    assert names["step"] == 10 and any(name.startswith("model.experts.2.") for name in checkpoint)
    outs = _train(shards, _config(), tmp_path / "run")
    for out, ref in zip(outs, reference):
        assert _weights(out) == _weights(ref) and _log(out) == _log(ref)


@pytest.mark.parametrize("before, after", [("stacked", "streams"), ("streams", "stacked")])
def test_a_checkpoint_of_experts_trained_as_other_networks_is_refused_naming_concurrent_networks(
        tmp_path, monkeypatch, before, after):
    """A stacked job's checkpoint continued as streams was refused as 'parameter shapes differ (... absent ...):
    other net kwargs', the same kwargs: its networks are other ones, by concurrent_networks."""
    shards = _shards(tmp_path / "shards")
    with monkeypatch.context() as m:
        m.setattr(loop, "check_stop", raising_after(loop.check_stop, 13, KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            _train(shards, _config(before), tmp_path / "run")
    with pytest.raises(DDMError, match=rf"belongs to a different training run: another network: other "
                                       rf"expert.concurrent_networks \('{before}', asked '{after}'\)\. Delete it"):
        _train(shards, _config(after), tmp_path / "run")


def test_train_cuda_graph_changes_nothing_on_the_cpu(tmp_path):
    shards = _shards(tmp_path / "shards")
    plain = _train(shards, _config(), tmp_path / "plain")
    graphed = _train(shards, _config(cuda_graph=True), tmp_path / "graphed")
    assert [_weights(a) for a in plain] == [_weights(b) for b in graphed]


def test_cuda_graph_is_refused_with_reduce_overhead_and_with_several_processes():
    with pytest.raises(ValueError, match=r"cuda_graph = true captures the whole step.*compile_mode = 'default'"):
        TrainConfig(cuda_graph=True, compile=True, compile_mode="reduce-overhead")
    TrainConfig(cuda_graph=True, compile_mode="reduce-overhead")  # not compiled: nothing captured twice
    net = _nets(1)[0]
    with pytest.raises(DDMError, match=r"train.cuda_graph captures one process's whole step.*cuda_graph = false"):
        fit(net, lambda m, step, gen: (m(torch.zeros(2, 5), torch.zeros(2)).sum(), {}),
            TrainConfig(cuda_graph=True, steps=2), device=torch.device("cuda"), dist=Distributed(rank=0, world=2))


def test_max_autotune_inside_the_step_graph_tunes_kernels_without_capturing_graphs_of_its_own():
    """compile_mode = 'max-autotune' makes torch.compile capture CUDA graphs, which cannot be captured inside
    train.cuda_graph's graph of the whole step: there it runs as max-autotune without them (the same tuning)."""
    from torch._inductor import list_mode_options
    graphed = TrainConfig(compile=True, compile_mode="max-autotune", cuda_graph=True)
    options = list_mode_options(loop.compile_mode(graphed, graphed=True))
    assert options == {k: v for k, v in list_mode_options("max-autotune").items() if k != "triton.cudagraphs"}
    assert list_mode_options(loop.compile_mode(graphed, graphed=False))["triton.cudagraphs"]  # not graphed: as asked
    assert loop.compile_mode(TrainConfig(compile=True, cuda_graph=True), graphed=True) == "default"


def test_a_checkpoint_holds_a_rate_kept_in_a_tensor_as_a_number(tmp_path):
    """A graphed job's AdamW reads its rate from a tensor, and its scheduler's state holds it too: the
    checkpoint's JSON takes them as numbers, and they load back as such."""
    assert as_numbers({"lr": torch.tensor(0.25), "betas": (0.9, torch.tensor([0.5])), "params": [0, 1]}) == \
        {"lr": 0.25, "betas": [0.9, 0.5], "params": [0, 1]}
    cfg = TrainConfig(steps=10, warmup=4, lr=0.01)
    net = _nets(1)[0]
    opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(cfg.lr), foreach=False)
    opt.param_groups[0]["initial_lr"] = cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    net(torch.zeros(2, 5), torch.zeros(2)).sum().backward()
    opt.step()
    sched.step()
    ema, path = EMA(net, 0.9), tmp_path / "c.safetensors"
    fp = job_fingerprint(net, cfg)
    save_checkpoint(path, step=1, model=net.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                    sched=sched, generator=torch.Generator(), history=[], running={}, fp=fp)
    meta = read_metadata(path)
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr / 2)  # step 1 of a 4-step warm-up
    assert json.dumps(meta["scheduler"])
    opt2 = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda(cfg))
    load_checkpoint(path, model=net, ema=EMA(net, 0.9), opt=opt2, sched=sched2, generator=torch.Generator(),
                    fp=fp, device=torch.device("cpu"))
    assert opt2.param_groups[0]["lr"] == pytest.approx(cfg.lr / 2) and sched2.last_epoch == 1


# ----- CUDA: the step as one graph ----------------------------------------------------------------------------------


def _counting_captures(monkeypatch) -> list:
    captured = []

    def counted(*args, **kwargs):
        captured.append(1)
        return real(*args, **kwargs)

    real = loop.capture_step
    monkeypatch.setattr(loop, "capture_step", counted)
    return captured


@gpu
@pytest.mark.parametrize("networks", ["streams", "stacked"])
def test_a_graphed_job_killed_and_resumed_ends_with_the_bytes_of_one_never_stopped(tmp_path, monkeypatch, networks):
    """The reference replays its graph from step 3 on; the resumed job runs steps 10 to 12 eagerly, then
    captures: eager steps and replays must be the same to the bit (RNG, rate, EMA weight, clipping)."""
    shards = _shards(tmp_path / "shards")
    config = _config(networks, device="cuda", cuda_graph=True)
    captured = _counting_captures(monkeypatch)
    reference = _train(shards, config, tmp_path / "ref")
    assert captured == [1]
    with monkeypatch.context() as m:
        m.setattr(loop, "check_stop", raising_after(loop.check_stop, 13, KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            _train(shards, config, tmp_path / "run")
    outs = _train(shards, config, tmp_path / "run")
    assert len(captured) == 3
    for out, ref in zip(outs, reference):
        assert _weights(out) == _weights(ref) and _log(out) == _log(ref)


@gpu
def test_a_graphed_job_learns_what_the_eager_job_learns_and_each_expert_from_its_own_shard(tmp_path):
    """Against the job without a graph (AdamW not capturable, the EMA a lerp): the same learning rates and
    the same weights to float tolerance; changing shard 2 changes no other expert's bytes (the K streams do
    not race)."""
    from ddmkit.io import load_tensors

    shards = _shards(tmp_path / "shards")
    graphed = _train(shards, _config(device="cuda", cuda_graph=True, steps=40), tmp_path / "graphed")
    eager = _train(shards, _config(device="cuda", steps=40), tmp_path / "eager")
    for a, b in zip(graphed, eager):
        rows_a, rows_b = [json.loads(x) for x in _log(a).splitlines()], [json.loads(x) for x in _log(b).splitlines()]
        assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
        mine, theirs = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-3, atol=1e-4)
    other = _train(_shards(tmp_path / "other", scale=3.0), _config(device="cuda", cuda_graph=True, steps=40),
                   tmp_path / "other_run")
    assert [_weights(a) == _weights(b) for a, b in zip(graphed, other)] == [True, True, False]


@gpu
def test_a_job_shorter_than_the_warm_up_is_never_captured(tmp_path, monkeypatch):
    captured = _counting_captures(monkeypatch)
    _train(_shards(tmp_path / "shards"), _config(device="cuda", cuda_graph=True, steps=3, log_every=1,
                                                 checkpoint_every=0), tmp_path / "run")
    assert captured == []


@gpu
def test_streamed_experts_compile_inside_the_graph(tmp_path):
    """train.compile with streams: each expert's forward is compiled (the fork between streams is not: inductor
    cannot take record_stream), inside the captured step; the experts are those of the uncompiled job to float
    tolerance."""
    from ddmkit.io import load_tensors

    shards = _shards(tmp_path / "shards")
    compiled = _train(shards, _config(device="cuda", cuda_graph=True, compile=True), tmp_path / "compiled")
    plain = _train(shards, _config(device="cuda", cuda_graph=True), tmp_path / "plain")
    for a, b in zip(compiled, plain):
        mine, theirs = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-3, atol=1e-4)


def test_the_ema_weight_computed_on_the_device_averages_as_the_lerp_does():
    """weight_on_device (a graphed step's EMA): ema += w (model - ema) with w = 1 - min(decay, (1 + n) / (10 + n))
    computed from n_averaged, against the lerp with the weight computed on the host: the same averages to float
    rounding over 300 updates."""
    net = _nets(1)[0]
    host, device = EMA(net, 0.99), EMA(net, 0.99, weight_on_device=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        host.update_parameters(net)
        device.update_parameters(net)
    assert int(device.n_averaged) == 300
    for a, b in zip(host.module.parameters(), device.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_cli_and_the_training_package_do_not_import_torch_dynamo():
    """torch.compiler.disable (StreamedExperts' fork outside torch.compile) imports torch._dynamo, a second's
    work: once at import, every ddmkit process paid it, and a spawned worker's Ctrl-C could land in it. It is
    imported only with the streamed experts."""
    import subprocess
    import sys

    code = ("import sys, ddmkit.cli, ddmkit.train, ddmkit.train.concurrent, ddmkit.accel.streams; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_streams_without_a_concurrent_job_are_refused_naming_both_fields(tmp_path, ddmkit):
    """expert.concurrent_networks = "streams" with concurrent = false did nothing, silently."""
    with pytest.raises(ValueError, match=r"concurrent_networks = 'streams' says how the experts of one concurrent "
                                         r"job run.*set concurrent = true"):
        ExpertConfig(concurrent_networks="streams")
    ExpertConfig(concurrent=True, concurrent_networks="streams")
    code, _, err = ddmkit("run", "demo", "--out", str(tmp_path / "run"), "--set", "expert.concurrent_networks=streams")
    assert code == 2 and "set concurrent = true" in err and not (tmp_path / "run").exists()


def test_cuda_graph_in_a_job_of_several_processes_is_refused_before_they_start(tmp_path, monkeypatch):
    """train-expert --nproc 2 with expert.train.cuda_graph = true on CUDA spawned its processes, which each loaded
    the shard and then refused 'train.cuda_graph' in fit, naming neither the option nor the section. Now refused
    before any process starts, naming --nproc (or torchrun) and the field; on the CPU cuda_graph is ignored."""
    import ddmkit.train.jobs as jobs

    graphed = ExpertConfig(train=TrainConfig(cuda_graph=True, steps=2))
    monkeypatch.setattr(jobs, "field_device", lambda field, name: torch.device("cpu"))
    jobs.check_graph_processes(graphed, 2)  # the CPU: nothing is captured (a GPU machine's CPU field alike)
    monkeypatch.setattr(jobs, "field_device", lambda field, name: torch.device("cuda"))
    jobs.check_graph_processes(graphed, 1)
    jobs.check_graph_processes(ExpertConfig(), 2)
    monkeypatch.setattr(jobs.distributed, "run", lambda *a, **k: pytest.fail("processes started"))
    with pytest.raises(DDMError, match=r"^--nproc 2: expert.train.cuda_graph = true captures one process's whole "
                                       r"training step.*\(leave --nproc out\), or add --set "
                                       r"expert.train.cuda_graph=false$"):
        jobs.train_expert_once(tmp_path / "cluster_00.safetensors", graphed, tmp_path / "expert", nproc=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # alone, not a launcher's job (ddmkit would not join one)
    jobs.check_graph_processes(graphed, 1)
    for name, value in {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DDMError, match=r"^torchrun's 2 processes: .*\(run it without torchrun\)"):
        jobs.check_graph_processes(graphed, 1)


def test_a_step_that_cannot_be_captured_is_one_error_naming_cuda_graph(monkeypatch):
    """A network that waits for the host (say, .item()) failed at the capture with CUDA's RuntimeError; it is
    a DDMError saying what to look for and to set cuda_graph = false. (CUDA's capture simulated here.)"""
    import contextlib

    from ddmkit.accel import step_graph

    class Graph:
        def register_generator_state(self, generator):
            pass

    @contextlib.contextmanager
    def capturing(graph, stream=None):
        yield

    def step():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    with pytest.raises(DDMError, match=r"train.cuda_graph: the training step could not be captured as one CUDA "
                                       r"graph \(CUDA error: operation not permitted when stream is capturing\); "
                                       r"something in it waits for the host .* set cuda_graph = false"):
        step_graph.capture_step(step, torch.Generator(), None)
