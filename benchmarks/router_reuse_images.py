"""Router reuse on the image DDM: what calling the router only every m steps saves in time
and costs in FID, on a trained run.

    PYTHONPATH=src python benchmarks/router_reuse_images.py configs/fashion_mnist.toml runs/fmnist --every 1 2 4

For each strategy and m, sample_ddm(router_every=m) draws the config's sample.n images from
the same noise and labels as the evaluate stage (bf16 autocast on a GPU), and the run's
evaluator scores them against the test split (FID, KID; cached in RUN/eval/ under the
names "top-1 m=2" and so on). With m > 1 the router and the dispatch plan of evaluation i
are reused for evaluations i+1 .. i+m-1, so the routing is up to m - 1 steps old. Before
the timed sets, each strategy samples a short warm-up run (10 steps), so that the first
timed set does not pay for cuDNN's first plans of the bucket sizes alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ddmkit.config import load_config
from ddmkit.io import save_tensors
from ddmkit.pipeline.images import SetEvaluator, data_shape_of, load_image_ddm, sample_labels, sample_path
from ddmkit.ddm.sampling import sample_ddm, start_noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("run", help="a run folder whose train stage is done")
    p.add_argument("--every", type=int, nargs="+", default=[1, 2, 4], help="router_every values")
    p.add_argument("--strategies", nargs="+", default=["top-1", "top-2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cfg, run, device = load_config(args.config), Path(args.run), args.device
    s = cfg.sample
    autocast = "bfloat16" if torch.device(device).type == "cuda" else None
    evaluator = SetEvaluator(cfg, run, print, device)
    x1 = start_noise(s.n, data_shape_of(run), s.seed, device)
    y = sample_labels(run, s.n, s.seed, device)
    cond = {"y": y} if y is not None else None
    ddm = load_image_ddm(run, device, s.guidance)
    rows = []
    for strategy in args.strategies:
        sample_ddm(ddm, strategy, s.n, 10, s.solver, s.seed, device, x1=x1.clone(), autocast=autocast, cond=cond,
                   batch_size=s.batch_size)  # warm-up
        for m in args.every:
            x0, info = sample_ddm(ddm, strategy, s.n, s.steps, s.solver, s.seed, device, x1=x1.clone(),
                                  autocast=autocast, cond=cond, router_every=m, batch_size=s.batch_size)
            name = f"{strategy} m={m}"
            save_tensors(sample_path(run, name), {"x": x0.float().clamp(-1, 1).cpu()})
            metrics = evaluator(name)
            rows.append((strategy, m, info["router_calls"] / max(1, len(range(0, s.n, s.batch_size or s.n))),
                         info["wall_time"], metrics["fid"], metrics["kid"] * 1e3))
            print(f"{name}: {info['wall_time']:.2f} s, FID {metrics['fid']:.2f}", flush=True)
    print(f"\n{s.n} samples, {s.steps} {s.solver} steps, guidance {s.guidance}, on {device}\n")
    print("| strategy | router every m steps | router calls per trajectory | sampling (s) | FID | KID x 1e3 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for strategy, m, calls, seconds, fid, kid in rows:
        print(f"| {strategy} | {m} | {calls:.0f} | {seconds:.2f} | {fid:.2f} | {kid:.2f} |")


if __name__ == "__main__":
    main()
