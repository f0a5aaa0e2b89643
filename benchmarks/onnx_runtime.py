"""Would a faster CPU runtime meet top-1/monolith <= 1.15? The MLP experts, router and monolith of
benchmarks/sampling.py (K = 8, width 128, 3 blocks; router width 32, 1 block) called through PyTorch
and through ONNX Runtime, on the rows each expert gets at batch 1024 from sampling.py's router:

    pip install onnxruntime onnx onnxscript        # not ddmkit dependencies: this benchmark only
    PYTHONPATH=src python benchmarks/onnx_runtime.py

Prints ms per call (median of --repeats, the runtimes interleaved) of the monolith on all rows, the 8
experts on their groups, the router on all rows, and (experts + router) / monolith: the ratio the
routed step would have with no routing bookkeeping at all. One thread, as sampling.py.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddmkit.nets.mlp import RouterMLP, VelocityMLP

GROUPS = [101, 72, 383, 159, 82, 62, 120, 45]  # sampling.py's router at batch 1024, t = 1, K = 8


def onnx_session(net: torch.nn.Module, path: Path, dim: int):
    """net exported with a dynamic batch axis, in an ONNX Runtime session on one CPU thread."""
    import onnxruntime as ort
    torch.onnx.export(net, (torch.randn(16, dim), torch.rand(16)), str(path), input_names=["x", "t"],
                      output_names=["out"], dynamic_axes={"x": {0: "b"}, "t": {0: "b"}, "out": {0: "b"}},
                      dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def as_onnx_call(session):
    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.numpy()})[0])
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args()
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"onnx_runtime.py needs ONNX Runtime and the ONNX exporter ({e.name} is missing): "
                         "pip install onnxruntime onnx onnxscript")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = [VelocityMLP([args.dim], width=128, depth=3).eval() for _ in range(len(GROUPS) + 1)]  # 8 experts, monolith
    router = RouterMLP([args.dim], len(GROUPS), width=32, depth=1).eval()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [onnx_session(n, Path(tmp) / f"net{i}.onnx", args.dim) for i, n in enumerate(nets + [router])]
    runtimes = {"pytorch": nets + [router], "onnxruntime": [as_onnx_call(s) for s in sessions]}

    x = torch.randn(sum(GROUPS), args.dim)
    t = torch.full((len(x),), 0.5)
    groups = list(zip(x.split(GROUPS), t.split(GROUPS)))
    parts = {"monolith": lambda f: f[len(GROUPS)](x, t),
             "8 experts on their groups": lambda f: [f[k](xk, tk) for k, (xk, tk) in enumerate(groups)],
             "router": lambda f: f[-1](x, t)}
    with torch.no_grad():
        err = float((runtimes["onnxruntime"][0](x, t) - nets[0](x, t)).abs().max())
        seconds = {(r, part): [] for r in runtimes for part in parts}
        for i in range(args.repeats + 3):  # 3 warm-up rounds
            for r, fns in runtimes.items():
                for part, run in parts.items():
                    start = time.perf_counter()
                    run(fns)
                    if i >= 3:
                        seconds[(r, part)].append(time.perf_counter() - start)
    ms = {key: statistics.median(v) * 1e3 for key, v in seconds.items()}
    print(f"# batch {len(x)}, groups {' '.join(map(str, GROUPS))}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"ONNX Runtime against PyTorch, one expert: max abs. difference {err:.1e}\n")
    print("| runtime | " + " | ".join(parts) + " | (experts + router) / monolith |")
    print("|---|" + "---:|" * (len(parts) + 1))
    for r in runtimes:
        row = [ms[(r, part)] for part in parts]
        print(f"| {r} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {(row[1] + row[2]) / row[0]:.2f} |")


if __name__ == "__main__":
    main()
