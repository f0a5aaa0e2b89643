"""The text run's report: report.json (everything) and report.md (tables and samples)."""
from __future__ import annotations

import unicodedata
from pathlib import Path

from ddmkit.io import write_bytes_atomic, write_json


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def visible(text: str) -> str:
    """The text with control characters other than newline and tab written as \\xNN (ESC: \\x1b),
    so that a sample in report.md is plain text."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else f"\\x{ord(ch):02x}" for ch in text)


def bpb_table(bpb: dict, k: int) -> list[str]:
    lines = ["| model | " + " | ".join(f"cluster {c}" for c in range(k)) + " | all |",
             "|---" * (k + 2) + "|"]
    for name, row in bpb.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in row["per_cluster"]) + f" | {_fmt(row['all'])} |")
    return lines


def accuracy_table(acc: dict, axis: str) -> list[str]:
    names = list(acc)
    if not names:
        return ["(no router)"]
    keys = list(acc[names[0]])
    lines = [f"| {axis} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key:g} | " + " | ".join(f"{acc[n][key]:.3f}" for n in names) + " |")
    return lines


def markdown(r: dict, training: str = "") -> str:
    """report.md of the report `r`; `training`: its lines on the training plot, under the compute."""
    what = "autoregressive experts" if r["kind"] == "text_ar" else "masked discrete flow matching"
    c = r["compute"]
    lines = [f"# Decentralized text model: {what}", "",
             f"K = {r['k']} clusters; cluster prior (bytes) {', '.join(f'{p:.3f}' for p in r['prior'])}; "
             f"{r['manifest']['n']} training and {r['manifest']['n_test']} held-out documents; "
             f"{r['eval_windows']} held-out window{'s' * (r['eval_windows'] != 1)}.", "",
             "| cluster | documents | train bytes | test bytes | examples |", "|---|---|---|---|---|"]
    for cl in r["clusters"]:
        lines.append(f"| {cl['cluster']} | {cl['documents']} | {cl['train_bytes']} | {cl['test_bytes']} | "
                     f"{', '.join(cl['examples'][:3])} |")
    lines += ["", f"Training compute: {c['expert_steps_each']} steps per expert, "
              f"{c['decentralized_train_tokens']} tokens for all experts together, "
              f"{c['centralized_train_tokens']} for the centralized model; "
              f"{c['parameters_per_model']} parameters per model.", "", *([training, ""] if training else []),
              "## Held-out bits per byte" + (" (ELBO, an upper bound)" if r["kind"] == "text_dfm" else ""), "",
              *bpb_table(r["bits_per_byte"], r["k"]), "",
              f"## Router accuracy against {r['router_axis']}", "",
              *accuracy_table(r["router_accuracy"], r["router_axis"].split(" (")[0]), "", "## Samples", ""]
    for name, texts in r["samples"].items():
        lines += [f"### {name}", ""]
        for text in texts:
            lines += ["```", visible(text).replace("```", "'''"), "```", ""]
    lines.append(f"Time: {r['seconds']['train']} s training (or loading), {r['seconds']['total']} s in all.")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, report: dict, training: str = "") -> None:
    out = Path(out)
    write_json(out / "report.json", report)
    write_bytes_atomic(out / "report.md", markdown(report, training).encode())
