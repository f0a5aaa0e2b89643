"""The image pipeline's trained DDM sampled as its sample stage does (same noise, labels, bf16, 50 Euler
steps), in chunks of --batch-sizes rows, without and with cuda_graphs (the experts' graphs shared):
seconds per set, top-1 and the monolith, and the largest difference between the two samplings.

    PYTHONPATH=src python benchmarks/image_graphs.py configs/fashion_mnist.toml runs/fmnist --device cuda

A GPU benchmark (on the CPU cuda_graphs changes nothing). Each pair is run twice and the second
run timed: the first pays the cuDNN plans and graph captures of its batch sizes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ddmkit.config import load_config
from ddmkit.pipeline.images import data_shape_of, load_image_ddm, load_image_monolith, sample_labels
from ddmkit.ddm.sampling import sample_ddm, sample_single, start_noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--strategy", default="top-1")
    args = p.parse_args()
    cfg, run = load_config(args.config), Path(args.run)
    s = cfg.sample
    shape = data_shape_of(run)
    x1 = start_noise(args.n, shape, s.seed, args.device)
    y = sample_labels(run, args.n, s.seed, args.device)
    cond = {"y": y} if y is not None else None
    ddm, monolith = load_image_ddm(run, args.device, s.guidance), load_image_monolith(run, args.device, s.guidance)

    def routed(batch: int, graphs: bool):
        return sample_ddm(ddm, args.strategy, args.n, s.steps, s.solver, s.seed, args.device, x1=x1.clone(),
                          autocast="bfloat16", cond=cond, batch_size=batch, cuda_graphs=graphs)

    def single(batch: int, graphs: bool):
        with torch.autocast("cuda", torch.bfloat16, enabled=torch.device(args.device).type == "cuda"):
            return sample_single(monolith, shape, args.n, s.steps, s.solver, s.seed, args.device, x1=x1.clone(),
                                 cond=cond, batch_size=batch, cuda_graphs=graphs)

    print(f"# {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; {args.n} images, "
          f"{s.steps} {s.solver} steps, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"| batch size | {args.strategy} (s) | {args.strategy}, graphs (s) | monolith (s) | monolith, graphs (s) "
          f"| {args.strategy} / monolith | with graphs | max difference, graphs against not |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        seconds, samples = {}, {}
        for name, run_it in (("routed", routed), ("single", single)):
            for graphs in (False, True):
                run_it(batch, graphs)  # the first run pays the new sizes' plans and captures
                samples[(name, graphs)], info = run_it(batch, graphs)
                seconds[(name, graphs)] = info["wall_time"]
        diff = max(float((samples[(n, True)] - samples[(n, False)]).abs().max()) for n in ("routed", "single"))
        r, m = seconds[("routed", False)], seconds[("single", False)]
        rg, mg = seconds[("routed", True)], seconds[("single", True)]
        print(f"| {batch} | {r:.2f} | {rg:.2f} | {m:.2f} | {mg:.2f} | {r / m:.2f} | {rg / mg:.2f} | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
