"""Plots of a run: samples over the truth or the data, router accuracy per noise level, training loss."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ddmkit.io import write_bytes_atomic
from ddmkit.truth import GaussianMixture


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed). Imported on first use, not with this
    module: it takes about half a second, which a command that draws nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, crop: bool = True) -> None:
    """Write a figure as PNG at 110 dpi atomically (io.write_bytes_atomic: a killed writer's temporary
    file is removed by the next run) and close it; crop: to what is drawn (else the figure's own size)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight" if crop else None)
    pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _project(x: torch.Tensor, basis: torch.Tensor | None, mean: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(len(x), -1).double()
    if flat.shape[1] == 2 or basis is None:
        return flat[:, :2]
    return (flat - mean) @ basis


def plot_samples(samples: dict[str, torch.Tensor], reference: torch.Tensor, truth: GaussianMixture | None,
                 path: Path, title_extra: dict[str, str] | None = None) -> None:
    """One panel per strategy: samples over the true density (2-D), or over
    the reference data in its first two principal directions (d > 2)."""
    ref = reference.reshape(len(reference), -1).double()
    basis = mean = None
    if ref.shape[1] > 2:
        mean = ref.mean(0)
        basis = torch.linalg.svd(ref - mean, full_matrices=False).Vh[:2].T
    r = _project(ref, basis, mean)
    lo, hi = r.min(0).values - 0.5, r.max(0).values + 0.5
    names = list(samples)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    density = None
    if truth is not None and truth.dim == 2:
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 150), torch.linspace(lo[1], hi[1], 150), indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1).double()
        density = (gx, gy, truth.log_prob(grid, 0.0).exp().reshape(gx.shape))
    for ax, name in zip(axes.flat, names):
        if density is not None:
            ax.contourf(*density, levels=12, cmap="Greys", alpha=0.6)
        else:
            ax.scatter(r[:, 0], r[:, 1], s=1, c="0.75", alpha=0.5)
        p = _project(samples[name], basis, mean)
        ax.scatter(p[:, 0], p[:, 1], s=1.5, c="tab:red", alpha=0.6)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        outside = int(((p < lo) | (p > hi)).any(1).sum())  # drawn beyond the panel: counted, not hidden
        title = name + (f"\n{title_extra[name]}" if title_extra and name in title_extra else "")
        ax.set_title(title + (f"\n{outside} of {len(p)} outside the panel" if outside else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    truth_drawn = "the true density" if density is not None else "held-out data (grey)"
    axes_drawn = "" if basis is None else "; axes: the held-out data's first two principal directions"
    fig.suptitle(f"samples (red) over {truth_drawn}{axes_drawn}", fontsize=9)
    save_figure(fig, path)


def plot_router_accuracy(report: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for name, vals in report.items():
        if name == "t":
            continue
        ax.plot(report["t"], vals["accuracy"], marker="o", label=name)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("routing accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_sweep(panels: dict[str, dict[str, list[tuple[float, float, float, float]]]], metric: str,
               path: Path, floors: dict[str, float] | None = None) -> None:
    """A sweep's metric against training FLOPs, one panel per entry (title -> curves): one curve per
    series (name -> [(FLOPs, mean, lo, hi)], the mean over seeds with its interval as error bars); the
    monolith's dashed; floors (name -> value: what no sample set can beat) as grey lines. The panels
    share their axes, both logarithmic (a metric that spans 20x, as FID over a sweep's budgets and K,
    stays readable at its low end)."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for key, points in curves.items():
            x, mean, lo, hi = zip(*sorted(points))
            err = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=key,
                        linestyle="--" if key == "monolith" else "-")
        for (name, value), style in zip((floors or {}).items(), [":", "-.", "--"]):
            ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = pyplot().FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4 x 10^1, on the metric's axis
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training compute (FLOPs; a DDM: experts + router)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"{metric} (lower is better)")
    save_figure(fig, path)


MONOLITH = "monolith"  # plot_training's curve drawn black, thick and dashed over the experts'
MANY_EXPERTS = 10  # beyond this, the experts' colours are read off a colour bar, not a legend


def spans_a_decade(values: list[float]) -> bool:
    """Whether positive values span a factor of 10 or more: a log-scale axis reads them better."""
    return min(values) > 0 and max(values) >= 10 * min(values)


def plot_training(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path, note: str = "") -> None:
    """Training loss against step, one panel per entry (title -> curves: name -> [(step, loss)]): curves named
    "expert C" coloured by C (a legend up to MANY_EXPERTS experts, a colour bar beyond), MONOLITH black, thick
    and dashed, any other in the default colours; y logarithmic on a panel whose losses span a decade. `note`
    (what is not drawn) goes under the panels."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, layout="constrained")
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")  # 0.3, not 3 x 10^-1, on a log axis
    sparse = plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")  # minor ticks: 0.2, 0.5
    for ax, (title, curves) in zip(axes[0], panels.items()):
        experts = {name: int(name.split()[1]) for name in curves if name.startswith("expert ")}
        many = bool(experts) and max(experts.values()) >= MANY_EXPERTS
        colours = plt.get_cmap("viridis" if many else "tab10")
        for name, curve in curves.items():
            steps, losses = zip(*curve)
            if name in experts:
                shade = experts[name] / max(experts.values()) if many else experts[name]
                style = {"color": colours(shade), "linewidth": 1.2, "label": None if many else name}
            elif name == MONOLITH:
                style = {"color": "black", "linewidth": 2.4, "linestyle": "--", "label": name}
            else:
                style = {"linewidth": 1.5, "label": name}
            ax.plot(steps, losses, marker="o" if len(curve) == 1 else None, **style)  # one row: a dot
        if spans_a_decade([loss for curve in curves.values() for _, loss in curve]):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
        if many:
            scale = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, max(experts.values())))
            fig.colorbar(scale, ax=ax, label="expert")
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2 if len(curves) > 6 else 1)
    fig.suptitle("training loss per logged step (the mean over the steps since the previous row)", fontsize=10)
    if note:
        fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8, wrap=True)
    save_figure(fig, path)
