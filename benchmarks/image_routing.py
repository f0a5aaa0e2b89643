"""Routed sampling with the image pipeline's own networks: what a top-1 step costs
against the monolith, where the time goes, and what a smaller router saves.

    PYTHONPATH=src:benchmarks python benchmarks/image_routing.py --device cuda          # the config's sizes, random weights
    PYTHONPATH=src:benchmarks python benchmarks/image_routing.py --device cuda --router-channels 32,64,128 16,32,64
    PYTHONPATH=src:benchmarks python benchmarks/image_routing.py --device cuda --run runs/fmnist   # a trained run
    PYTHONPATH=src:benchmarks python benchmarks/image_routing.py --device cuda --fresh   # new group sizes per step

The networks are those the config builds (default configs/fashion_mnist.toml:
K label-conditional UNet experts, a label-conditional RouterCNN, the monolith
of one expert's size), called as the pipeline calls them (`guided_field`,
`router_field`, class labels as conditioning), under bf16 autocast on a GPU.
With random weights a router sends most rows to one or two experts, so each
row gets a fixed random cluster whose logit is raised by 10: rows spread
evenly, as the trained router spreads them (the measured run's clusters hold
6-16% of the data each). With --run the trained networks route as trained.

Every cell is ms per Euler step, the median of --repeats runs of --steps
steps, the methods interleaved. Per router: top-1 and top-2 steps, and top-1
cut into its parts, each timed alone on the same inputs: the router alone,
the K expert calls alone (on the rows top-1 gave them), and the rest of the
step (strategy, plan, gather, scatter, update) as the difference. Those runs
repeat the same noise, so the experts see the same group sizes every time.

--fresh instead starts every run from new noise and labels, as sampling does,
so the group sizes are new at almost every step, and times top-1 and top-2
three ways: the networks as they are (eager), as sample_ddm calls them on a
GPU (every expert call padded to a bucket size: cuDNN plans each new batch
size anew, benchmarks/new_shapes.py), and with cuda_graphs (with random
weights the router stays eager: the spreading wrapper draws on the host).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from ddmkit.config import load_config
from ddmkit.nets import build_model
from ddmkit.pipeline.ddm import router_field
from ddmkit.pipeline.images import guided_field, load_image_ddm, load_image_monolith
from ddmkit.accel import accelerate
from ddmkit.routing.combine import plan_selection, routed_velocity
from ddmkit.routing import RoutingState, parse_strategy
from ddmkit.sample.solvers import sample_euler, time_grid
from sampling import time_methods


def random_networks(config_path: str, router_channels: list[list[int]], shape: tuple, device):
    """Experts, monolith and routers of the config's sizes, random weights, as the pipeline calls them."""
    cfg = load_config(config_path)
    k, net = cfg.partition.k, cfg.expert.net
    spec = {"prediction": cfg.expert.prediction, "kwargs": net.kwargs}
    torch.manual_seed(0)

    def expert():
        return guided_field(build_model(net.arch, data_shape=list(shape), **net.kwargs).to(device).eval(), spec)

    experts, monolith = [expert() for _ in range(k)], expert()
    rnet = cfg.router.net
    conditional = bool(rnet.kwargs.get("num_classes", 0))
    routers = {}
    for channels in router_channels or [rnet.kwargs.get("channels")]:
        kwargs = {**rnet.kwargs, **({"channels": channels} if channels else {})}
        model = build_model(rnet.arch, data_shape=list(shape), num_experts=k, **kwargs).to(device).eval()
        routers[f"router {'/'.join(map(str, kwargs['channels']))}"] = (router_field(model, conditional), model)
    return experts, monolith, routers, k


def spread(router, k: int, batch: int, device, redraw: bool = False):
    """The router with each row's logit of a random cluster raised by 10 (random weights route unevenly):
    one draw per row for the run, or (redraw) a new draw at every call, so that the group sizes change
    from step to step as a trained router's do."""
    gen = torch.Generator().manual_seed(batch)
    fixed = torch.randint(k, (batch,), generator=gen).to(device)

    def f(x, t, y=None):
        cluster = torch.randint(k, (len(x),), generator=gen).to(device) if redraw else fixed
        bias = 10.0 * torch.nn.functional.one_hot(cluster, k).float()
        return torch.softmax(torch.log(router(x, t, y=y).clamp_min(1e-30)) + bias, dim=1)

    return f


def measure_fresh(experts, monolith, routers: dict, k: int, shape, args, device, precision) -> None:
    """Steps as the pipeline takes them: every run from new noise and labels, so the experts' group sizes
    are new at every step. The networks as they are (eager), as sample_ddm calls them on a GPU (every
    expert call padded to a bucket size), and with cuda_graphs (calls up to 256 rows replayed from
    graphs, larger ones padded, the router graphed)."""
    ts = time_grid(args.steps).to(device)
    variants = ["eager", "padded", "graphs"]
    cols = ["monolith"] + [f"{s} {v}" for s in ("top-1", "top-2") for v in variants]
    print("\n### New group sizes at every step, ms per step\n")
    print("| batch | router | " + " | ".join(cols) + " | top-1 eager/monolith | top-1 padded/monolith"
          " | top-1 graphs/monolith |\n|---:|---|" + "---:|" * (len(cols) + 3))
    with torch.no_grad():
        for b in args.batches:
            for rname, (router, _) in routers.items():
                route = router if args.run else spread(router, k, b, device, redraw=True)
                graphs = dispatch_networks(experts, route, device, cuda_graphs=True)
                if not args.run:  # the spreading wrapper draws on the host: it cannot be captured
                    graphs = (graphs[0], route)
                nets = {"eager": (experts, route), "padded": dispatch_networks(experts, route, device),
                        "graphs": graphs}
                draws = iter(range(10 ** 6))

                def fresh_inputs():
                    gen = torch.Generator().manual_seed(next(draws))
                    return (torch.randn(b, *shape, generator=gen).to(device),
                            torch.randint(10, (b,), generator=gen).to(device))

                def routed(strategy, variant):
                    strat, (ex, ro) = parse_strategy(strategy), nets[variant]

                    def run():
                        x1, y = fresh_inputs()
                        cond = {"y": y}
                        sample_euler(routed_velocity(ex, ro, strat, RoutingState(), cond=cond, router_cond=cond), x1, ts)
                    return run

                def mono():
                    x1, y = fresh_inputs()
                    sample_euler(lambda x, t: monolith(x, t, y), x1, ts)

                parts = {"monolith": mono, **{f"{s} {v}": routed(s, v) for s in ("top-1", "top-2") for v in variants}}
                methods = {n: (lambda x1_, ts_, f=f: [f(), 0][1]) for n, f in parts.items()}
                x1 = torch.zeros(b, *shape, device=device)  # only its length is read by the timer
                r = {n: v[0] * 1e3 for n, v in time_methods(methods, x1, ts, args.repeats, device, precision).items()}
                print(f"| {b} | {rname} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " | "
                      + " | ".join(f"{r['top-1 ' + v] / r['monolith']:.2f}" for v in variants) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist.toml")
    p.add_argument("--run", help="a trained run folder: time its networks (routers as trained)")
    p.add_argument("--router-channels", nargs="+", default=None,
                   help="random mode: router channel lists to compare, e.g. 32,64,128 16,32,64")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 32, 32], help="random mode: image shape C H W")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 10000])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fresh", action="store_true",
                   help="only the table of steps from new noise at every run (new group sizes): eager, padded, graphs")
    args = p.parse_args()
    device = torch.device(args.device)
    precision = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                 else contextlib.nullcontext)
    channels = [[int(c) for c in s.split(",")] for s in args.router_channels or []]
    if args.run:
        from pathlib import Path
        ddm = load_image_ddm(Path(args.run), device)
        experts, monolith, k, shape = ddm.experts, load_image_monolith(Path(args.run), device), len(ddm.experts), ddm.data_shape
        routers = {"trained router": (ddm.router, None)}
    else:
        shape = tuple(args.shape)
        experts, monolith, routers, k = random_networks(args.config, channels, shape, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# image routing benchmark: {name}; torch {torch.__version__}; K = {k}; image {shape}; "
          f"{'trained run ' + args.run if args.run else 'random weights, ' + args.config}; "
          f"{args.steps} steps x {args.repeats} repeats; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if not args.run:
        from torch.utils.flop_counter import FlopCounterMode
        x, t, y = torch.randn(8, *shape, device=device), torch.rand(8, device=device), torch.zeros(8, dtype=torch.long, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            monolith(x, t, y)
        expert_flops = fc.get_total_flops()
        for rname, (_, model) in routers.items():
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                model(x, t, y)
            print(f"{rname}: {fc.get_total_flops() / expert_flops:.3f} of an expert's FLOPs", flush=True)
    if args.fresh:
        return measure_fresh(experts, monolith, routers, k, shape, args, device, precision)
    ts = time_grid(args.steps).to(device)
    top1 = parse_strategy("top-1")
    print("\n| batch | router | rows per expert (top-1) | monolith | top-1 | top-2 | router alone | experts alone"
          " | rest | top-1/monolith | top-2/monolith |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for b in args.batches:
            gen = torch.Generator().manual_seed(b)
            x1 = torch.randn(b, *shape, generator=gen).to(device)
            y = torch.randint(10, (b,), generator=gen).to(device)
            cond = {"y": y}
            t1 = ts[0].expand(b)
            for rname, (router, _) in routers.items():
                route = router if args.run else spread(router, k, b, device)
                with precision():
                    idx, w = top1.select(route(x1, t1, y=y), RoutingState())
                plan = plan_selection(idx, w, k, True)
                xs = x1.index_select(0, plan.rows).split(plan.counts)
                ys = y.index_select(0, plan.rows).split(plan.counts)
                counts = [plan.counts[plan.experts.index(j)] if j in plan.experts else 0 for j in range(k)]

                def routed(strategy):
                    strat = parse_strategy(strategy)
                    return lambda: sample_euler(routed_velocity(experts, route, strat, RoutingState(), cond=cond,
                                                         router_cond=cond), x1, ts)

                def experts_alone():
                    return [experts[j](xj, t1[:len(xj)], yj) for j, xj, yj in zip(plan.experts, xs, ys)]

                parts = {"monolith": lambda: sample_euler(lambda x, t: monolith(x, t, y), x1, ts),
                         "top-1": routed("top-1"), "top-2": routed("top-2"),
                         "router alone": lambda: [route(x1, t1, y=y) for _ in ts[1:]],
                         "experts alone": lambda: [experts_alone() for _ in ts[1:]]}
                methods = {n: (lambda x1_, ts_, f=f: [f(), 0][1]) for n, f in parts.items()}
                r = {n: v[0] * 1e3 for n, v in time_methods(methods, x1, ts, args.repeats, device, precision).items()}
                rest = r["top-1"] - r["router alone"] - r["experts alone"]
                print(f"| {b} | {rname} | {' '.join(map(str, counts))} | {r['monolith']:.1f} | {r['top-1']:.1f} | "
                      f"{r['top-2']:.1f} | {r['router alone']:.1f} | {r['experts alone']:.1f} | {rest:.1f} | "
                      f"{r['top-1'] / r['monolith']:.2f} | {r['top-2'] / r['monolith']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
