"""Can K small experts train on one GPU at the monolith's cost when each expert's whole training step is
one CUDA graph and the K graphs run at once on K streams? (A technique ddmkit's training loop does not use:
fit() trains K experts stacked, or on K streams inside one graph of the whole job's step with
train.cuda_graph, docs/performance.md.)

    python benchmarks/training_streams.py --nets unet dit --steps 100          # CUDA only, a few minutes
    python benchmarks/training_streams.py --nets unet --compiled yes --check   # and whether they race

The experts of configs/fashion_mnist.toml (K = 8 UNets, batch 128 each, 1 x 32 x 32) or of
configs/fashion_mnist_latent.toml (K = 8 DiTs on 4 x 8 x 8), random class data. A job's step: draw a batch, the
flow-matching loss under bf16 autocast, backward, clipping by global norm, fused capturable AdamW (lr a tensor),
EMA lerp; `--warmup` eager steps on a side stream, then the step captured as one graph in a pool of its own, on a
capture stream of the job's own unless `--capture-streams shared` (with `--compiled yes`, the network under
torch.compile's default mode inside the graph). Timed, the median of 3 runs of `--steps` replays: the monolith (one
network, batch K x B, captured the same way); the K experts' graphs one after another on one stream; the K graphs
on K concurrent streams; and (unless `--no-callables`) the K experts' forward and backward graphed by
torch.cuda.make_graphed_callables with each expert on its own stream inside the graphs, the draw, loss, per-expert
clipping, AdamW and EMA eager. Prints a Markdown table: ms per step, each against the monolith, and each variant's
mean loss (a NaN says the variant's training broke). `--check` trains two identical sets of jobs 20 steps, one
set's graphs one after another, the other's on concurrent streams, and prints the largest weight difference (0: the
same to the bit) and whether every weight is finite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddmkit import __version__, load_config
from ddmkit.flow import noise, target_for
from ddmkit.nets import build_seeded

from arguments import positive

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NETS = {"unet": ("fashion_mnist.toml", (1, 32, 32)), "dit": ("fashion_mnist_latent.toml", (4, 8, 8))}


def class_data(shape, n, classes, device):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, max(classes, 1), (n,), generator=gen)
    means = torch.randn(max(classes, 1), *shape, generator=gen)
    return (means[labels] + 0.5 * torch.randn(n, *shape, generator=gen)).to(device), labels.to(device)


class Job:
    """One network's whole training step as a CUDA graph: draw a batch, flow-matching loss under bf16,
    backward, clip by global norm, fused capturable AdamW, EMA lerp."""

    def __init__(self, net, batch, x_all, y_all, classes, compiled, device):
        self.net, self.batch, self.classes = net.to(device).train(), batch, classes
        self.x_all, self.y_all = x_all, y_all
        self.params = [p for p in net.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=torch.tensor(1e-4, device=device), weight_decay=0.0,
                                     fused=True, capturable=True)
        self.fwd = torch.compile(net) if compiled else net
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.graph = None

    def step(self):
        n = self.batch
        idx = torch.randint(0, len(self.x_all), (n,), device=self.device)
        x, y = self.x_all[idx], self.y_all[idx]
        drop = torch.rand(n, device=self.device) < 0.1
        y = torch.where(drop, torch.full_like(y, self.classes), y) if self.classes else None
        u = torch.rand(n, device=self.device)
        eps = torch.randn_like(x)
        state, t, target = noise(x, u, eps), u, target_for("velocity", x, eps)
        with torch.autocast("cuda", torch.bfloat16):
            pred = self.fwd(state, t, y) if y is not None else self.fwd(state, t)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 0.001)
            self.loss_sum.add_(loss.detach())

    def capture(self, warmup: int, own_stream: bool) -> None:
        """`warmup` eager steps on a side stream (compilation among them), then the step captured as one graph,
        in a memory pool of its own; with `own_stream`, captured on a stream of this job's own (so its cuBLAS
        workspace is its own), else on the capture stream all jobs share."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.opt.zero_grad(set_to_none=True)
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=torch.cuda.graph_pool_handle(),
                              stream=torch.cuda.Stream() if own_stream else None):
            self.step()
        torch.cuda.synchronize()
        self.loss_sum.zero_()


def replay_concurrently(jobs: list[Job], streams: list[torch.cuda.Stream]) -> None:
    """Job k's step graph replayed on streams[k], each forked from and joined to the current stream."""
    main = torch.cuda.current_stream()
    for s, j in zip(streams, jobs):
        s.wait_stream(main)
        with torch.cuda.stream(s):
            j.graph.replay()
    for s in streams:
        main.wait_stream(s)


def same_weights_check(net, k, b, compiled, device, warmup, own_stream, steps=20):
    """Two identical sets of K jobs: `steps` replays one after another against on concurrent streams; the
    largest difference between their weights (0: the same to the bit, no race between the concurrent graphs)
    and whether all are finite."""
    sets = []
    for _ in range(2):
        torch.cuda.manual_seed(0)
        jobs = build_jobs(net, k, b, compiled, device)
        for j in jobs:
            j.capture(warmup, own_stream)
        sets.append(jobs)
    torch.cuda.manual_seed(1)
    for _ in range(steps):
        for j in sets[0]:
            j.graph.replay()
    torch.cuda.manual_seed(1)
    streams = [torch.cuda.Stream() for _ in sets[1]]
    for _ in range(steps):
        replay_concurrently(sets[1], streams)
    torch.cuda.synchronize()
    gap = max(float((p - q).abs().max()) for a, c in zip(*sets) for p, q in zip(a.params, c.params))
    finite = all(bool(torch.isfinite(p).all()) for jobs in sets for j in jobs for p in j.params)
    return gap, finite


class StreamedExperts(torch.nn.Module):
    """K networks, each run on its own CUDA stream (forked from and joined to the caller's)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.streams = [torch.cuda.Stream() for _ in nets]

    def forward(self, x, t, y):
        main = torch.cuda.current_stream()
        outs = []
        for k, (net, s) in enumerate(zip(self.nets, self.streams)):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                outs.append(net(x[k], t[k], y[k]))
        for s in self.streams:
            main.wait_stream(s)
        return torch.stack(outs)


def graphed_callable_step(net_name, k, b, compiled, device, warmup):
    """The integrable variant: forward and backward of the K experts graphed (make_graphed_callables) with each
    expert on its own stream inside the graphs; draw, loss, per-expert clipping, fused AdamW and EMA eager."""
    run = load_config(CONFIGS / NETS[net_name][0])
    shape = NETS[net_name][1]
    kwargs = dict(run.expert.net.kwargs)
    classes = kwargs.get("num_classes", 0)
    x_all, y_all = class_data(shape, 4096, classes, device)
    nets = [build_seeded(run.expert.net.arch, i, data_shape=list(shape), **kwargs).to(device).train()
            for i in range(k)]
    if compiled:
        nets = [torch.compile(n) for n in nets]
    module = StreamedExperts(nets)
    params = [list(n.parameters()) for n in nets]
    flat = [p for ps in params for p in ps]
    ema = [p.detach().clone() for p in flat]
    opt = torch.optim.AdamW(flat, lr=1e-4, weight_decay=0.0, fused=True)
    loss_sum = torch.zeros((), device=device)
    sample = (torch.randn(k, b, *shape, device=device), torch.rand(k, b, device=device),
              torch.zeros(k, b, dtype=torch.long, device=device))
    with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=warmup)

    def step():
        idx = torch.randint(0, len(x_all), (k, b), device=device)
        x, y = x_all[idx], y_all[idx]
        drop = torch.rand(k, b, device=device) < 0.1
        y = torch.where(drop, torch.full_like(y, classes), y)
        u = torch.rand(k, b, device=device)
        eps = torch.randn_like(x)
        x, u, eps = x.flatten(0, 1), u.flatten(), eps.flatten(0, 1)
        state, t, target = noise(x, u, eps), u, target_for("velocity", x, eps)
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            pred = graphed(state.reshape(k, b, *shape), t.reshape(k, b), y)
        losses = ((pred.float() - target.reshape(k, b, *shape).float()) ** 2).reshape(k, -1).mean(1)
        losses.sum().backward()
        with torch.no_grad():
            norms = torch.stack([torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in ps])))
                                 for ps in params])
            coef = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            for kk, ps in enumerate(params):
                torch._foreach_mul_([p.grad for p in ps], coef[kk])
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in flat], 0.001)
            loss_sum.add_(losses.detach().mean())

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    loss_sum.zero_()
    return step, loss_sum


def build_jobs(net_name, k, batch, compiled, device):
    run = load_config(CONFIGS / NETS[net_name][0])
    shape = NETS[net_name][1]
    kwargs = dict(run.expert.net.kwargs)
    classes = kwargs.get("num_classes", 0)
    x_all, y_all = class_data(shape, 4096, classes, device)
    return [Job(build_seeded(run.expert.net.arch, i, data_shape=list(shape), **kwargs), batch, x_all, y_all,
                classes, compiled, device) for i in range(k)]


def timed(replay, steps, repeats=3):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return 1e3 * statistics.median(times)


def mean_losses(jobs: list[Job], replays: int) -> str:
    """The jobs' mean losses over their last `replays` replays, as 'lowest-highest' (zeroing the sums)."""
    losses = [float(j.loss_sum) / replays for j in jobs]
    for j in jobs:
        j.loss_sum.zero_()
    return f"{min(losses):.3f}-{max(losses):.3f}"


def measure(net: str, b: int, compiled: bool, own_stream: bool, args, device) -> str:
    """One row of the table: the monolith, the K experts one after another and on streams, the graphed
    callables variant, (--check) the race check."""
    replays = 3 * args.steps
    mono = build_jobs(net, 1, args.k * b, compiled, device)[0]
    mono.capture(args.warmup, own_stream)
    mono_ms = timed(mono.graph.replay, args.steps)
    mono_loss = mean_losses([mono], replays)
    mono = None
    jobs = build_jobs(net, args.k, b, compiled, device)
    for j in jobs:
        j.capture(args.warmup, own_stream)
    serial_ms = timed(lambda: [j.graph.replay() for j in jobs], args.steps)
    serial_loss = mean_losses(jobs, replays)
    streams = [torch.cuda.Stream() for _ in jobs]
    streams_ms = timed(lambda: replay_concurrently(jobs, streams), args.steps)
    streams_loss = mean_losses(jobs, replays)
    jobs = None
    row = (f"| {net} | {'yes' if compiled else 'no'} | {'own' if own_stream else 'shared'} | {args.k} x {b} | "
           f"{mono_ms:.2f} | {serial_ms:.2f} | "
           f"{serial_ms / mono_ms:.3f} | {streams_ms:.2f} | **{streams_ms / mono_ms:.3f}** |")
    if args.no_callables:
        row += " - | - |"
    else:
        try:
            step, loss_sum = graphed_callable_step(net, args.k, b, compiled, device, args.warmup)
            callables_ms = timed(step, args.steps)
            row += f" {callables_ms:.2f} | {callables_ms / mono_ms:.3f} |"
            callables_loss = f"{float(loss_sum) / replays:.3f}"
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is shown, the others kept
            row += f" failed: {type(e).__name__}: {str(e)[:200]} | - |"
            callables_loss = "-"
    row += f" {mono_loss} / {serial_loss} / {streams_loss} / {callables_loss} |"
    if args.check:
        gap, finite = same_weights_check(net, args.k, b, compiled, device, args.warmup, own_stream)
        row += f" largest weight difference: {gap:.3g}, finite: {finite} |"
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive, default=200, help="timed replays per run (3 runs; default 200)")
    p.add_argument("--warmup", type=positive, default=20, help="eager steps before each capture (default 20)")
    p.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["unet", "dit"], help="the configs' experts")
    p.add_argument("--k", type=positive, default=8, help="number of experts (default 8)")
    p.add_argument("--expert-batch", type=positive, nargs="+", default=[128], help="batch of each expert")
    p.add_argument("--compiled", nargs="+", choices=["no", "yes"], default=["no", "yes"],
                   help="networks eager, under torch.compile (default mode) inside the graphs, or both")
    p.add_argument("--capture-streams", nargs="+", choices=["own", "shared"], default=["own"],
                   help="capture each job's graph on a stream of its own (default) or all on one shared stream")
    p.add_argument("--check", action="store_true", help="also: do serial and concurrent replays give the same "
                   "weights to the bit?")
    p.add_argument("--no-callables", action="store_true", help="leave out the make_graphed_callables variant")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this benchmark times CUDA graphs and streams: it needs a CUDA GPU that PyTorch can use")
    device = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64  # 2K + 2 networks compiled: none may fall back to eager
    print(f"# {torch.cuda.get_device_name(device)}; torch {torch.__version__}; ddmkit {__version__}; median of 3 "
          f"runs of {args.steps} replays; every step a CUDA graph\n")
    print("| net | compile | capture streams | batch | monolith ms | experts one after another ms | / monolith "
          "| experts on streams ms | / monolith | graphed callables ms | / monolith "
          "| mean losses: monolith / one after another / streams / callables |" + (" check |" if args.check else ""))
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if args.check else ""), flush=True)
    start = time.perf_counter()
    for net in args.nets:
        for b in args.expert_batch:
            for compiled in args.compiled:
                for capture in args.capture_streams:
                    print(f"[{time.perf_counter() - start:.0f} s] {net}, {args.k} x {b}, compiled {compiled}, "
                          f"capture streams {capture} ...", file=sys.stderr, flush=True)
                    try:
                        print(measure(net, b, compiled == "yes", capture == "own", args, device), flush=True)
                    except Exception as e:  # noqa: BLE001 - a row that fails is shown, the next rows still run
                        print(f"| {net} | {compiled} | {capture} | {args.k} x {b} | failed: {type(e).__name__}: "
                              f"{str(e)[:300]} |", flush=True)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
