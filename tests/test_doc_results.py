"""The docs' measured numbers agree with the results files they come from (docs/results/): every table cell and
quoted sentence checked here equals the file's value rounded as the page rounds it (half a unit of the page's
last digit; a value the file holds on a tie may read either way). Numbers that no results file holds (stage
times, earlier trainings, CPU benchmarks) are not checked; grow.md and distill.md give no time that is not."""
import functools
import json
import re
from pathlib import Path

from ddmkit.theory.report import t_interval

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results"

# A number as the pages write it: not part of a word ("top-1", "K=8" label aside, "10k") nor of a longer number.
NUMBER = r"(?<![\w.,+\-])[-+]?\d+(?:\.\d+)?(?![\w.])"


@functools.cache
def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@functools.cache
def page_text(page: str) -> str:
    return (DOCS / page).read_text()


def numbers(text: str) -> list[str]:
    return re.findall(NUMBER, text.replace("**", ""))


def agrees(said: str, value: float) -> bool:
    """Whether the page's number `said` is `value` rounded to said's digits (ties read either way)."""
    digits = len(said.split(".")[1]) if "." in said else 0
    return abs(float(said) - value) <= 0.5 * 10 ** -digits * (1 + 1e-9) + 1e-12


def read_table(page: str, after: str, keys: int = 1) -> dict:
    """The first Markdown table after the text `after` on a page: {row label: {column header: cell}}. The label is
    the first cell (the first `keys` cells joined by " | "), bold marks dropped; a header repeated in the table
    gets " (2)", " (3)" ... in its later columns."""
    text = page_text(page)
    assert after in text, f"{page}: no '{after}' to find the table after"
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")])
    header, seen = [], {}
    for name in block[0]:
        seen[name] = seen.get(name, 0) + 1
        header.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return {" | ".join(row[:keys]): dict(zip(header, row)) for row in block[2:]}


def table_problems(page: str, after: str, expected: dict, keys: int = 1) -> list[str]:
    """What disagrees between a page's table and `expected`: {row label: {column: value or list of values}}, a
    list for a cell of several numbers (a mean and its interval, per-seed values), None for one left unchecked."""
    table, problems = read_table(page, after, keys), []
    for label, columns in expected.items():
        if label not in table:
            problems.append(f"{page}, table after '{after}': no row '{label}' (rows: {list(table)})")
            continue
        for column, want in columns.items():
            wants = want if isinstance(want, (list, tuple)) else [want]
            where = f"{page}, table after '{after}', row '{label}', column '{column}'"
            if column not in table[label]:
                problems.append(f"{where}: no such column (columns: {list(table[label])})")
                continue
            said = numbers(table[label][column])
            if len(said) != len(wants):
                problems.append(f"{where}: the page says '{table[label][column]}', the file holds {wants}")
            problems += [f"{where}: the page says {s}, the file holds {w:.6g}"
                         for s, w in zip(said, wants) if w is not None and not agrees(s, w)]
    return problems


def quote_problems(page: str, quotes: list[tuple[str, list[float]]]) -> list[str]:
    """What disagrees between a page's sentences and the files: each quote is the page's text with '#' for each
    number (line breaks and runs of spaces read as one space) and the file's values of those numbers (None: a
    number no file holds, not checked; a list: a number several values share, each of which it must agree with)."""
    text, problems = re.sub(r"\s+", " ", page_text(page)), []
    for quote, values in quotes:
        assert quote.count("#") == len(values), f"{quote}: {quote.count('#')} numbers, {len(values)} values"
        pattern = re.escape(quote).replace("\\#", "#").replace("#", r"([-+]?\d+(?:\.\d+)?)")
        found = re.search(pattern, text)
        if not found:
            problems.append(f"{page}: no sentence '{quote}' ('#' a number)")
            continue
        shared = [(i, s, v) for i, (s, vs) in enumerate(zip(found.groups(), values))
                  for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
        problems += [f"{page}, '{quote}', number {i + 1}: the page says {s}, the file holds {v:.6g}"
                     for i, s, v in shared if v is not None and not agrees(s, v)]
    return problems


def assert_none(problems: list[str]) -> None:
    assert not problems, "the page disagrees with its results file:\n" + "\n".join(problems)


# ---- the image runs: fashion_mnist_metrics.json, fashion_mnist_latent_metrics.json -------------------------------

def image_columns(rows: dict, name: str) -> dict:
    """The columns of RESULTS.md's image tables for a row of an image run's metrics (a floor has the first three)."""
    row, monolith = rows[name], rows["monolith"]["fid"]
    columns = {"FID": row["fid"], "FID / monolith": row["fid"] / monolith, "KID x 1e3": row["kid"] * 1e3}
    if "wall_time" in row:
        columns |= {"expert calls/sample": row["expert_calls_per_sample"], "sampling (s)": row["wall_time"]}
    return columns


def test_results_md_the_image_table_is_fashion_mnist_metrics_json():
    rows = results("fashion_mnist_metrics.json")["rows"]
    labels = {"train images (floor, vs test)": "train images (floor)", "oracle (cluster from p(k given y))": "oracle",
              **{name: name for name in ("monolith", "full", "top-1", "top-2", "sample-1", "sample-2",
                                         "threshold-0.05", "nucleus-0.9", "switch")}}
    assert_none(table_problems("RESULTS.md", "## The table (K = 8)",
                               {label: image_columns(rows, name) for label, name in labels.items()}))


def test_results_md_the_statistics_only_router_table_is_fashion_mnist_metrics_json():
    rows = results("fashion_mnist_metrics.json")["rows"]
    labels = {f"{strategy}, learned CNN router": strategy for strategy in ("top-2", "full")} | {
        f"{strategy}, statistics-only router": f"{strategy} (statistics-only router)" for strategy in ("top-2", "full")}
    assert_none(table_problems("RESULTS.md", "### Statistics-only router",
                               {label: image_columns(rows, name) for label, name in labels.items()}))


def test_results_md_the_guidance_sweep_table_is_fashion_mnist_metrics_json():
    rows = results("fashion_mnist_metrics.json")["rows"]
    expected = {}
    for label, suffix in {"1 (the table)": "", "1.5": " @ cfg 1.5", "2": " @ cfg 2", "3": " @ cfg 3"}.items():
        monolith, top2 = rows["monolith" + suffix], rows["top-2" + suffix]
        expected[label] = {"monolith FID": monolith["fid"], "monolith KID x 1e3": monolith["kid"] * 1e3,
                           "top-2 FID": top2["fid"], "top-2 KID x 1e3": top2["kid"] * 1e3,
                           "top-2 / monolith FID": top2["fid"] / monolith["fid"]}
    assert_none(table_problems("RESULTS.md", "### Guidance sweep", expected))


def test_results_md_the_latent_table_is_fashion_mnist_latent_metrics_json():
    rows = results("fashion_mnist_latent_metrics.json")["rows"]
    labels = {"train images (floor, vs test)": "train images (floor)", "oracle (cluster from p(k given y))": "oracle",
              **{name: name for name in ("autoencoder reconstructions (latent floor)", "monolith", "full", "top-1",
                                         "top-2", "sample-2", "threshold-0.05", "nucleus-0.9")}}
    assert_none(table_problems("RESULTS.md", "## Latent space",
                               {label: image_columns(rows, name) for label, name in labels.items()}))


# ---- the sweep grids: sweep_fashion_mnist/, sweep_fashion_mnist_latent/ (a metrics.json per cell) ---------------

def cell(grid: str, k: int, budget: float, seed: int, steps: bool = False) -> dict:
    """A cell's rows, e.g. cell("sweep_fashion_mnist", 8, 0.125, 0) reads k8_b0.125_s0.json ('_steps': equal batch)."""
    return results(f"{grid}/k{k}_b{budget:g}_s{seed}{'_steps' if steps else ''}.json")["rows"]


def over_seeds(grid: str, k: int, budget: float, series: str, seeds=(0, 1, 2), key: str = "fid",
               steps: bool = False) -> list[float]:
    """A series' mean over the seeds' cells with its 95% t-interval ([mean, low, high]; [value] for one seed); the
    monolith's cells are K = 8's; KID in units of 1e-3."""
    scale = 1e3 if key == "kid" else 1
    values = [cell(grid, 8 if series == "monolith" else k, budget, seed, steps)[series][key] * scale for seed in seeds]
    if len(values) == 1:
        return values
    interval = t_interval(values)
    return [interval["mean"], interval["ci_low"], interval["ci_high"]]


def mean_fid(grid: str, k: int, budget: float, series: str) -> float:
    """The FID the sweep pages give a (K, budget) point: the mean over 3 seeds at budgets 0.125 and 1, else seed 0."""
    return over_seeds(grid, k, budget, series, seeds=(0, 1, 2) if budget in (0.125, 1) else (0,))[0]


PIXELS, LATENT, BUDGETS = "sweep_fashion_mnist", "sweep_fashion_mnist_latent", (0.125, 0.25, 0.5, 1)
SERIES = {2: ("full", "top-1"), 4: ("full", "top-1", "top-2"), 8: ("full", "top-1", "top-2"),
          16: ("full", "top-1", "top-2")}  # K = 2's top-2 is its full routing
LABELS = {"monolith": (8, "monolith")} | {f"K={k} {name}": (k, name) for k, names in SERIES.items() for name in names}


def test_results_md_the_table_over_training_seeds_is_the_k8_budget_1_cells():
    expected = {}
    for series in ("monolith", "full", "top-1", "top-2"):
        rows = [cell(PIXELS, 8, 1, seed) for seed in (0, 1, 2)]
        expected[series] = {**{f"FID seed {seed}": rows[seed][series]["fid"] for seed in (0, 1, 2)},
                            "mean [95% interval], n = 3 seeds": over_seeds(PIXELS, 8, 1, series),
                            "KID x 1e3, seeds 0 / 1 / 2": [row[series]["kid"] * 1e3 for row in rows],
                            "FID / monolith, seeds 0 / 1 / 2": [row[series]["fid"] / row["monolith"]["fid"]
                                                                for row in rows]}
    assert_none(table_problems("RESULTS.md", "### Over training seeds", expected))


def test_sweep_md_the_k8_table_at_four_budgets_is_the_k8_cells():
    expected = {("monolith" if series == "monolith" else f"K=8 {series}"): {
        f"budget {budget:g}": over_seeds(PIXELS, 8, budget, series, (0, 1, 2) if budget in (0.125, 1) else (0,))
        for budget in BUDGETS} for series in ("monolith", "full", "top-1", "top-2")}
    assert_none(table_problems("sweep.md", "## Measured: Fashion-MNIST, K = 8 at four budgets", expected))


def test_sweep_md_every_k_at_the_smallest_and_largest_budget_is_the_cells():
    expected = {label: {"FID, budget 0.125": over_seeds(PIXELS, k, 0.125, series),
                        "KID": over_seeds(PIXELS, k, 0.125, series, key="kid")[0],
                        "FID, budget 1": over_seeds(PIXELS, k, 1, series),
                        "KID (2)": over_seeds(PIXELS, k, 1, series, key="kid")[0]}
                for label, (k, series) in LABELS.items()}
    assert_none(table_problems("sweep.md", "## Measured: every K at four budgets", expected))


def test_sweep_md_the_best_strategy_over_the_monolith_is_the_cells():
    expected = {"monolith FID": {f"budget {b:g}": mean_fid(PIXELS, 8, b, "monolith") for b in BUDGETS}}
    for k in SERIES:
        ratios = {b: mean_fid(PIXELS, k, b, "top-1") / mean_fid(PIXELS, k, b, "monolith") for b in BUDGETS}
        expected[f"K={k}"] = {f"budget {b:g}": [ratio, mean_fid(PIXELS, k, b, "top-1")] if b > 0.125
                              else [ratio] for b, ratio in ratios.items()}  # "0.849 (36.44)": top-1's FID after 0.125
    assert_none(table_problems("sweep.md", "The best strategy (top-1 at every K and budget)", expected))


def test_sweep_md_the_equal_batch_table_is_the_steps_cells():
    seeds = {2: (0, 1, 2), 4: (0, 1, 2), 8: (0, 1, 2), 16: (0,)}
    expected = {"monolith (batch 1,024)": {"FID, budget 0.125": over_seeds(PIXELS, 8, 0.125, "monolith"),
                                           "KID x 1e3 (mean)": over_seeds(PIXELS, 8, 0.125, "monolith", key="kid")[0]}}
    for k, names in SERIES.items():
        for series in names:  # the K = 8 cells are the same in both modes: kept once, without '_steps'
            fid = over_seeds(PIXELS, k, 0.125, series, seeds[k], steps=k != 8)
            kid = over_seeds(PIXELS, k, 0.125, series, seeds[k], key="kid", steps=k != 8)[0]
            expected[f"K={k} {series}"] = {"FID, budget 0.125": fid, "KID x 1e3 (mean)": kid}
    assert_none(table_problems("sweep.md", "## Measured: every K at the smallest budget, with equal batch", expected))


def test_sweep_md_the_latent_tables_are_the_latent_cells():
    def cell_text(k, budget, series):
        if budget in (0.125, 1):
            return [*over_seeds(LATENT, k, budget, series), 3]  # "75.76 [69.44, 82.09] (n=3)"
        return over_seeds(LATENT, k, budget, series, seeds=(0,))

    expected = {label: {f"budget {b:g}": cell_text(k, b, s) for b in BUDGETS} for label, (k, s) in LABELS.items()}
    problems = table_problems("sweep.md", "FID (mean over seeds, 95% t-interval where n > 1)", expected)
    best = read_table("sweep.md", "the training compute at which it reaches the")
    ratios = {f"K={k}": {f"budget {b:g}": mean_fid(LATENT, k, b, best[f"K={k}"]["best strategy"])
                         / mean_fid(LATENT, 8, b, "monolith") for b in BUDGETS} for k in SERIES}
    assert_none(problems + table_problems("sweep.md", "the training compute at which it reaches the", ratios))


# ---- analysis.md: analysis_fashion_mnist/analysis.json, misalignment_fashion_mnist/study.json --------------------

def test_analysis_md_the_fashion_mnist_analysis_tables_are_analysis_json():
    analysis = results("analysis_fashion_mnist/analysis.json")
    columns = {"calls/sample": "calls", "q": "q", "W2": "w2", "L_top": "L_top", "amplification": "amp_median",
               "Delta_refine": "delta_refine", "hit": "hit", "rank": "rank", "hit* (monolith x0)": "hit_exact",
               "rank* (monolith x0)": "rank_exact"}
    expected = {name: {column: strategy["summary"][key] for column, key in columns.items()}
                for name, strategy in analysis["strategies"].items()}
    problems = table_problems("analysis.md", "## Fashion-MNIST (an image DDM)", expected)
    by_cluster = analysis["heldout"]["by_cluster"]
    errors = {label: {f"{t:.2f}": band[key] for t, band in zip(analysis["heldout"]["t"], by_cluster)}
              for label, key in (("own cluster", "own"), ("other clusters", "other"))}
    assert_none(problems + table_problems("analysis.md", "Every expert's held-out error |v_k(x_t)", errors))


def test_analysis_md_the_misalignment_tables_are_study_json():
    conditions = results("misalignment_fashion_mnist/study.json")["conditions"]

    def mean_and_interval(measure: dict, scale: float = 1) -> list[float]:
        return [scale * measure["seeds"][key] for key in ("mean", "lo", "hi")]

    expected = {f"{name} | {strategy}": {"FID": mean_and_interval(cells["fid"]),
                                         "KID x 1e3": mean_and_interval(cells["kid"], 1e3),
                                         "amplification": mean_and_interval(cells["amp"]),
                                         "Delta_refine": mean_and_interval(cells["delta_refine"])}
                for name, condition in conditions.items() for strategy, cells in condition["table"].items()}
    problems = table_problems("analysis.md", "#### Measured: Fashion-MNIST over training seeds", expected, keys=2)
    full_vs_best = {name: {"full - best (FID)": mean_and_interval(condition["full_vs_best"]["fid"]),
                           "per seed": condition["full_vs_best"]["fid"]["per_seed"]}
                    for name, condition in conditions.items()}
    assert_none(problems + table_problems("analysis.md", "Full routing against the best other strategy, the paired",
                                          full_vs_best))


# ---- distill.md, grow.md, distributed.md: fashion_mnist_distill_report.json, fashion_mnist_grow_convert_metrics.json

def test_distill_md_the_fashion_mnist_table_is_the_distill_report():
    scores = results("fashion_mnist_distill_report.json")["scores"]
    expected = {"train images (floor)": {"FID": scores["floor"]["fid"], "KID x 1e3": scores["floor"]["kid"] * 1e3}}
    for name, row in scores["rows"].items():
        expected[name] = {"network calls/sample": row["expert_calls_per_sample"],
                          "router calls/sample": row["router_calls_per_sample"], "FID": row["fid"],
                          "KID x 1e3": row["kid"] * 1e3, "to teacher's samples": row["to_teacher_samples"]}
    assert_none(table_problems("distill.md", "## Measured: Fashion-MNIST", expected))


def test_grow_md_the_adding_an_island_table_is_the_grow_convert_metrics():
    runs = results("fashion_mnist_grow_convert_metrics.json")["runs"]

    def scores(run: str, full: bool = False) -> dict:
        rows = runs[run]["rows"]
        return {"top-1 FID": rows["top-1"]["fid"], "top-2 FID": rows["top-2"]["fid"],
                "top-1 KID x 1e3": rows["top-1"]["kid"] * 1e3} | ({"full FID": rows["full"]["fid"]} if full else {})

    seconds = {run: runs[run]["train_seconds"] for run in runs}
    floor, monolith = runs["fm"]["rows"]["train images (floor)"], runs["fm"]["rows"]["monolith"]
    expected = {
        "training images (floor)": {"top-1 FID": floor["fid"], "top-1 KID x 1e3": floor["kid"] * 1e3},
        "without (no ankle boots)": scores("without", full=True) | {
            "training (s)": [seconds["without"]["experts"], seconds["without"]["router"]]},
        "grown (`add-expert`)": scores("grown") | {  # the new expert's seconds are not in the file: the page gives none
            "training (s)": [seconds["grown"]["router"]]},
        "everything, trained again": scores("fm") | {
            "training (s)": [seconds["fm"]["experts"], seconds["fm"]["router"]]},
        "everything: its FLOP-matched monolith (one network, no routing)": {
            "top-1 FID": monolith["fid"], "top-1 KID x 1e3": monolith["kid"] * 1e3,
            "training (s)": seconds["fm"]["monolith"]}}
    assert_none(table_problems("grow.md", "FID and KID against the test set, 10,000 samples per row", expected))


def test_distributed_md_the_vp_and_flow_matching_table_is_the_grow_convert_metrics():
    runs = results("fashion_mnist_grow_convert_metrics.json")["runs"]
    labels = {"8 flow-matching experts": "fm", "4 VP + 4 flow-matching experts": "mixed", "8 VP experts": "vp"}
    expected = {label: {f"{strategy} {measure}": runs[run]["rows"][strategy][key] * scale
                        for strategy in ("top-1", "top-2")
                        for measure, key, scale in (("FID", "fid", 1), ("KID x 1e3", "kid", 1e3))}
                for label, run in labels.items()}
    monolith = runs["fm"]["rows"]["monolith"]
    expected["FLOP-matched flow-matching monolith"] = {"top-1 FID": monolith["fid"],
                                                        "top-1 KID x 1e3": monolith["kid"] * 1e3}
    assert_none(table_problems("distributed.md", "### Measured: a DDM of VP and flow-matching experts", expected))


def test_distributed_md_the_statistics_only_router_table_is_fashion_mnist_metrics_json():
    rows = results("fashion_mnist_metrics.json")["rows"]
    expected = {strategy: {"FID, learned router": rows[strategy]["fid"],
                           "FID, statistics-only": rows[f"{strategy} (statistics-only router)"]["fid"],
                           "KID x 1e3, learned": rows[strategy]["kid"] * 1e3,
                           "KID x 1e3, statistics-only": rows[f"{strategy} (statistics-only router)"]["kid"] * 1e3}
                for strategy in ("top-2", "full")}
    assert_none(table_problems("distributed.md", "Sample quality on the image config", expected))


# ---- the sentences that quote the files --------------------------------------------------------------------------

def spread(values) -> list[float]:
    """The smallest and the largest of some values, as a page's "A-B" or "A to B" quotes them."""
    values = list(values)
    return [min(values), max(values)]


def test_results_md_the_image_sentences_quote_fashion_mnist_metrics_json():
    metrics = results("fashion_mnist_metrics.json")
    rows = metrics["rows"]
    fid, kid, wall = ({name: row.get(key) for name, row in rows.items()} for key in ("fid", "kid", "wall_time"))
    strategies = [name for name, row in rows.items() if row.get("router") in ("learned", "statistics")
                  and row["guidance"] == 1 and "statistics" not in name]
    routed = [wall[name] for name in strategies if rows[name]["expert_calls_per_sample"] < 400]
    guided = {network: [wall[f"{network} @ cfg {g}"] for g in ("1.5", "2", "3")] for network in ("monolith", "top-2")}
    ratio = {name: fid[name] / fid["monolith"] for name in strategies}
    assert_none(quote_problems("RESULTS.md", [
        ("cluster sizes #, #, #, #, #, #, #, #;", metrics["cluster_counts"]),
        ("the training loops' own: experts # s, monolith # s, router # s.)",
         [metrics["train_seconds"][name] for name in ("experts", "monolith", "router")]),
        ("Top-1 reaches #x the monolith's FID (# against #), and every strategy lands between #x and #x",
         [ratio["top-1"], fid["top-1"], fid["monolith"], *spread(ratio.values())]),
        ("KID agrees: top-1 has #e-3 against the monolith's #e-3", [kid["top-1"] * 1e3, kid["monolith"] * 1e3]),
        ("its sampling takes #x as long (# s against # s)", [wall["top-1"] / wall["monolith"], wall["top-1"],
                                                            wall["monolith"]]),
        ("calls no router (# s)", [wall["oracle"]]),
        ("Top-1 takes #x the monolith's time for the same number of expert calls (# against # s",
         [wall["top-1"] / wall["monolith"], wall["top-1"], wall["monolith"]]),
        ("Top-2 with it makes # expert calls per sample",
         [rows["top-2 (statistics-only router)"]["expert_calls_per_sample"]]),
        ("the monolith is best at g = 1.5 (# -> #; # at g = 2) and top-2 at g = 2 (# -> #)",
         [fid["monolith"], fid["monolith @ cfg 1.5"], fid["monolith @ cfg 2"], fid["top-2"], fid["top-2 @ cfg 2"]]),
        ("Guidance helps the monolith more than the DDM (-# FID against -#): the best DDM row (top-2 at g = 2, #) is "
         "#x the best monolith row (#)",
         [fid["monolith"] - fid["monolith @ cfg 1.5"], fid["top-2"] - fid["top-2 @ cfg 2"], fid["top-2 @ cfg 2"],
          fid["top-2 @ cfg 2"] / fid["monolith @ cfg 1.5"], fid["monolith @ cfg 1.5"]]),
        ("#-# s for the monolith and #-# s for top-2 per 10k", [*spread(guided["monolith"]), *spread(guided["top-2"])]),
        ("| monolith (FID #) | top-1 (#) | top-2 (#) |", [fid["monolith"], fid["top-1"], fid["top-2"]]),
        ("| full (#) | oracle (#) |", [fid["full"], fid["oracle"]]),
        ("Sampling dominates: full takes # s per 10k, the routed strategies #-# s, the monolith # s, the guided sets "
         "#-# s", [wall["full"], *spread(routed), wall["monolith"], *spread(guided["monolith"] + guided["top-2"])]),
        ("FID + KID of a 10k set takes #-# s; the 10k test features take # s",
         [*spread(row["fid_seconds"] for row in rows.values() if "fid_seconds" in row), metrics["reference_seconds"]]),
        ("FID of 10k training images against the 10k test images (32x32, padded): #", [fid["train images (floor)"]]),
    ]))


def test_results_md_the_latent_sentences_quote_fashion_mnist_latent_metrics_json():
    latent = results("fashion_mnist_latent_metrics.json")
    fid = {name: row["fid"] for name, row in latent["rows"].items()}
    seconds, floor = latent["train_seconds"], fid["autoencoder reconstructions (latent floor)"]
    pixels = results("fashion_mnist_metrics.json")["rows"]
    assert_none(quote_problems("RESULTS.md", [
        ("trained concurrently in # s; the FLOP-matched latent monolith is the same DiT with 2000 steps x batch 1024 "
         "(# s); router CNN 32/64 on latents, 1500 steps x 256 (# s)",
         [seconds["experts"], seconds["monolith"], seconds["router"]]),
        ("top-1 is best again, at #x (# against #)", [fid["top-1"] / fid["monolith"], fid["top-1"], fid["monolith"]]),
        ("The autoencoder sets a floor of FID # that no latent sampler can go below (pixel space: #)",
         [floor, pixels["train images (floor)"]["fid"]]),
        ("top-1 removes #% of the monolith's excess (# - # against # - #)",
         [100 * (fid["monolith"] - fid["top-1"]) / (fid["monolith"] - floor), fid["top-1"], floor, fid["monolith"],
          floor]),
        ("Sampling in latent space is cheaper: # s for top-1 (# s in pixels",
         [latent["rows"]["top-1"]["wall_time"], pixels["top-1"]["wall_time"]]),
        ("| top-1 (#) | monolith (#) | reconstructions (#) |", [fid["top-1"], fid["monolith"], floor]),
    ]))


def test_results_md_the_sentences_over_seeds_quote_the_sweep_and_the_studies():
    budget_1 = [cell(PIXELS, 8, 1, seed) for seed in (0, 1, 2)]
    gaps = {(a, b): [row[a]["fid"] - row[b]["fid"] for row in budget_1]
            for a, b in (("monolith", "top-1"), ("full", "top-1"), ("top-2", "top-1"))}
    ranges = [max(values) - min(values) for values in
              ([row[series]["fid"] for row in budget_1] for series in ("monolith", "full", "top-1", "top-2"))]
    smallest = {series: mean_fid(PIXELS, 8, 0.125, series) for series in ("monolith", "full", "top-2", "top-1")}
    top1 = {budget: [mean_fid(PIXELS, k, budget, "top-1") for k in SERIES] for budget in (0.125, 1)}
    to_monolith = {budget: [fid / mean_fid(PIXELS, 8, budget, "monolith") for fid in top1[budget]]
                   for budget in (0.125, 1)}
    equal_batch = [over_seeds(PIXELS, k, 0.125, "top-1", seeds, steps=k != 8)[0]
                   for k, seeds in ((2, (0, 1, 2)), (4, (0, 1, 2)), (8, (0, 1, 2)), (16, (0,)))]
    latent_16 = [mean_fid(LATENT, 16, b, "top-1") / mean_fid(LATENT, 8, b, "monolith") for b in BUDGETS]
    floor = cell(LATENT, 8, 1, 0)["autoencoder reconstructions (latent floor)"]["fid"]
    conditions = results("misalignment_fashion_mnist/study.json")["conditions"]
    full_vs_best = {name: [conditions[name]["full_vs_best"]["fid"]["seeds"][key] for key in ("mean", "lo", "hi")]
                    for name in ("disjoint", "undertrained-0.1", "random")}
    assert_none(quote_problems("RESULTS.md", [
        ("top-1 is #, # and # FID below the monolith, full #, # and # above top-1, top-2 #, # and # above top-1",
         [*gaps["monolith", "top-1"], *gaps["full", "top-1"], *gaps["top-2", "top-1"]]),
        ("The seed-to-seed spread of a row (# to # FID)", spread(ranges)),
        ("Seed 0 on the H200 gives # for top-1", [budget_1[0]["top-1"]["fid"]]),
        ("the order is the same: monolith #, full #, top-2 #, top-1 #", list(smallest.values())),
        ("top-1 #, #, # and # for K = 2, 4, 8 and 16 (3 seeds), #, #, # and # of the monolith's FID",
         top1[0.125] + to_monolith[0.125]),
        ("(budget 1: #, #, # and #)", to_monolith[1]),
        ("FID follows the steps (top-1 #, #, # and #;", equal_batch),
        ("K = 16's top-1 is #, #, # and # of the monolith's FID at budgets 0.125 to 1 (# against # at budget 1, above "
         "the autoencoder's floor of #)", [*latent_16, mean_fid(LATENT, 16, 1, "top-1"),
                                           mean_fid(LATENT, 8, 1, "monolith"), floor]),
        ("full routing is # FID [#, #] worse than top-1 in every seed", full_vs_best["disjoint"]),
        ("under-trained experts (+# FID [#, #])", full_vs_best["undertrained-0.1"]),
        ("no expert specialises (+# [#, #])", full_vs_best["random"]),
    ]))


def test_sweep_md_the_sentences_quote_the_cells():
    kid = {series: [over_seeds(PIXELS, 8, b, series, (0, 1, 2) if b in (0.125, 1) else (0,), key="kid")[0]
                    for b in BUDGETS] for series in ("monolith", "full", "top-1", "top-2")}
    lead = [mean_fid(PIXELS, 8, b, "monolith") - mean_fid(PIXELS, 8, b, "top-1") for b in BUDGETS]
    ratio = {k: [mean_fid(PIXELS, k, b, "top-1") / mean_fid(PIXELS, 8, b, "monolith") for b in BUDGETS] for k in SERIES}
    seeds_1 = {k: [cell(PIXELS, k, 1, s)["top-1"]["fid"] for s in (0, 1, 2)] for k in SERIES}
    monolith_1 = [cell(PIXELS, 8, 1, s)["monolith"]["fid"] for s in (0, 1, 2)]
    latent_ratio = {k: [mean_fid(LATENT, k, b, "top-1") / mean_fid(LATENT, 8, b, "monolith") for b in BUDGETS]
                    for k in (8, 16)}
    floor = cell(LATENT, 8, 1, 0)["autoencoder reconstructions (latent floor)"]["fid"]
    above = {k: (mean_fid(LATENT, k, 1, "top-1") - floor) / (mean_fid(LATENT, 8, 1, "monolith") - floor)
             for k in (8, 16)}
    latent_top1 = [cell(LATENT, k, 0.125, s)["top-1"]["fid"] for k in SERIES for s in (0, 1, 2)]
    assert_none(quote_problems("sweep.md", [
        ("KID x 1e3 of the same samples: monolith #, #, # and #; full #, #, # and #; top-1 #, #, # and #; top-2 #, "
         "#, # and #", [value for series in kid.values() for value in series]),
        ("The DDM's lead in FID units shrinks as the budget grows (#, #, # and #)", lead),
        ("(top-1 / monolith #, #, # and #)", ratio[8]),
        ("reaches the monolith's final FID, #, interpolated in log compute between # at 7.96e14 FLOPs and # at 1.56e15",
         [mean_fid(PIXELS, 8, 1, "monolith"), mean_fid(PIXELS, 8, 0.25, "top-1"), mean_fid(PIXELS, 8, 0.5, "top-1")]),
        ("leads by # to # of the monolith's FID", spread(r8 - r16 for r8, r16 in zip(ratio[8][1:], ratio[16][1:]))),
        ("(K = 2 # to #, K = 4 # to #, K = 8 # to #, K = 16 # to #)",
         [value for k in SERIES for value in (min(ratio[k]), ratio[k][-1])]),
        ("full routing gains least from more experts (budget 0.125: #, #, #, #)",
         [mean_fid(PIXELS, k, 0.125, "full") for k in SERIES]),
        ("top-1's three seeds span # FID at K = 2 (# to #), # at K = 4 (# to #), # at K = 8 (# to #) and # at K = 16 "
         "(# to #), the monolith's # (# to #)",
         [value for fids in [*seeds_1.values(), monolith_1] for value in (max(fids) - min(fids), *spread(fids))]),
        ("gave the same FIDs to 3e-5 (full #, top-1 #)", [cell(PIXELS, 2, 1, 1)["full"]["fid"],
                                                         cell(PIXELS, 2, 1, 1)["top-1"]["fid"]]),
        ("(FID #; the report flags this point)", [cell(PIXELS, 16, 0.125, 0, steps=True)["full"]["fid"]]),
        ("K = 2 at budget 0.125 (FID #) is level with the monolith at budget 0.5 (#, batch 1,024), and K = 8 at "
         "budget 0.5 (#,", [over_seeds(PIXELS, 2, 0.125, "top-1", steps=True)[0], mean_fid(PIXELS, 8, 0.5, "monolith"),
                            mean_fid(PIXELS, 8, 0.5, "top-1")]),
        ("The autoencoder's reconstructions of the training images score FID #", [floor]),
        ("(K = 8: #, #, #, #; pixel space # to #)", [*latent_ratio[8], ratio[8][0], ratio[8][-1]]),
        ("above FID #, K = 16's top-1 is # of the monolith's distance at budget 1 (# against #), K = 8's #",
         [floor, above[16], mean_fid(LATENT, 16, 1, "top-1") - floor, mean_fid(LATENT, 8, 1, "monolith") - floor,
          above[8]]),
        ("the monolith varies most from seed to seed (FID #, # and #)",
         sorted(cell(LATENT, 8, 0.125, s)["monolith"]["fid"] for s in (0, 1, 2))),
        ("every seed of every K's top-1 (# to #)", spread(latent_top1)),
        ("(top-1 # both times)", [cell(LATENT, 16, 0.125, 1)["top-1"]["fid"]]),
    ]))


def train_seconds(grid: str, where: tuple, key: str = "total", steps: bool = False) -> float:
    """A cell's training loops' seconds as its metrics.json holds them: "experts", "monolith", "router" or their
    "total", the time the sweep pages quote for a cell's training (its stage, loading and saving, takes longer).
    `where` is the cell's (K, budget, seed)."""
    k, budget, seed = where
    seconds = results(f"{grid}/k{k}_b{budget:g}_s{seed}{'_steps' if steps else ''}.json")["train_seconds"]
    return sum(seconds.values()) if key == "total" else seconds[key]


def sampling_seconds(grid: str, where: tuple, steps: bool = False, series: str = "") -> float:
    """The seconds a cell (K, budget, seed) took to sample its sets (one series' set if named), FID and KID not
    included."""
    rows = cell(grid, *where, steps)
    return sum(row.get("wall_time", 0) for name, row in rows.items() if not series or name == series)


def trained(grid: str, cells: list, key: str = "total", steps: bool = False) -> list[float]:
    """The shortest and the longest training time of some cells, as a page's "A-B s" quotes them."""
    return spread(train_seconds(grid, where, key, steps) for where in cells)


def sampled(grid: str, cells: list, steps: bool = False, series: str = "") -> list[float]:
    """The shortest and the longest sampling time of some cells."""
    return spread(sampling_seconds(grid, where, steps, series) for where in cells)


def seeds(k: int, budget: float, chosen=(0, 1, 2)) -> list[tuple]:
    """The cells (K, budget, seed) of some seeds."""
    return [(k, budget, seed) for seed in chosen]


def test_sweep_md_the_k8_times_quote_the_cells():
    k8 = {b: seeds(8, b, (0, 1, 2) if b in (0.125, 1) else (0,)) for b in BUDGETS}
    fid_seconds = [row["fid_seconds"] for k in SERIES for s in (0, 1, 2) for row in cell(PIXELS, k, 1, s).values()
                   if "fid_seconds" in row]
    assert_none(quote_problems("sweep.md", [
        ("trained its networks in #-# s at budget 0.125 and #-# s at budget 1",
         [*trained(PIXELS, k8[0.125]), *trained(PIXELS, k8[1])]),
        ("at budget 1 sampled its sets in #-#, #, #-# and #-# s at K = 2, 4, 8 and 16",
         [*sampled(PIXELS, seeds(2, 1)), sampled(PIXELS, seeds(4, 1)), *sampled(PIXELS, seeds(8, 1)),
          *sampled(PIXELS, seeds(16, 1))]),
        ("FID and KID adding #-# s a set", spread(fid_seconds)),
        ("budget 0.125 #-# s (three seeds), budget 0.25 # s, budget 0.5 # s (experts # s, monolith # s, router # s), "
         "budget 1 #-# s (experts #-# s, monolith #-# s, router #-# s)",
         [*trained(PIXELS, k8[0.125]), train_seconds(PIXELS, (8, 0.25, 0)), train_seconds(PIXELS, (8, 0.5, 0)),
          *(train_seconds(PIXELS, (8, 0.5, 0), key) for key in ("experts", "monolith", "router")),
          *trained(PIXELS, k8[1]),
          *(value for key in ("experts", "monolith", "router") for value in trained(PIXELS, k8[1], key))]),
        ("took #-# s at budget 0.125 (three seeds), # s at 0.25, # s at 0.5 and #-# s at budget 1",
         [*sampled(PIXELS, k8[0.125]), sampled(PIXELS, k8[0.25]), sampled(PIXELS, k8[0.5]), *sampled(PIXELS, k8[1])]),
    ]))


def test_sweep_md_the_times_over_k_quote_the_cells():
    default = {k: [(k, b, s) for b in BUDGETS for s in ((0, 1, 2) if b in (0.125, 1) else (0,))] for k in SERIES}
    small = seeds(2, 0.125) + seeds(4, 0.125)
    steps = {k: seeds(k, 0.125, (0,) if k == 16 else (0, 1, 2)) for k in (2, 4, 16)}
    assert_none(quote_problems("sweep.md", [
        ("at budget 0.125 #-# s at K = 2 and 4 (experts #-# s, router #-# s) and #-# s at K = 16 (experts #-# s)",
         [*trained(PIXELS, small), *trained(PIXELS, small, "experts"), *trained(PIXELS, small, "router"),
          *trained(PIXELS, seeds(16, 0.125)), *trained(PIXELS, seeds(16, 0.125), "experts")]),
        ("at budget 0.25 # s (K = 2), # s (K = 4) and # s (K = 16); at budget 0.5 # s (K = 2), # s (K = 4) and # s",
         [train_seconds(PIXELS, (k, b, 0)) for b in (0.25, 0.5) for k in (2, 4, 16)]),
        ("at budget 1 #-# s (K = 2, experts #-# s), #-# s (K = 4, experts #-# s) and #-# s (K = 16, experts #-# s)",
         [value for k in (2, 4, 16) for key in ("total", "experts") for value in trained(PIXELS, seeds(k, 1), key)]),
        ("Sampling costs the same at every budget: #-# s at K = 2, #-# s at K = 4 and #-# s at K = 16 (full routing "
         "calls every expert at every step: #-# s of it",
         [*sampled(PIXELS, default[2]), *sampled(PIXELS, default[4]), *sampled(PIXELS, default[16]),
          *sampled(PIXELS, default[16], series="full")]),
        ("K = 2 #-# s (experts #-# s, router #-# s), K = 4 #-# s (experts #-# s, router #-# s) and K = 16 # s "
         "(experts # s, router # s)",  # equal batch: the '_steps' cells
         [*(value for k in (2, 4) for key in ("total", "experts", "router")
            for value in trained(PIXELS, steps[k], key, steps=True)),
          *(train_seconds(PIXELS, (16, 0.125, 0), key, steps=True) for key in ("total", "experts", "router"))]),
        ("sampling took # s at K = 2, #-# s at K = 4 and # s at K = 16 (full routing calls all 16 experts at every "
         "step: # s of it)",  # K = 2's three cells all round to the one number the page gives
         [sampled(PIXELS, steps[2], steps=True), *sampled(PIXELS, steps[4], steps=True),
          sampling_seconds(PIXELS, (16, 0.125, 0), steps=True),
          sampling_seconds(PIXELS, (16, 0.125, 0), steps=True, series="full")]),
    ]))


def test_sweep_md_the_latent_times_quote_the_cells():
    budget_0125, budget_1 = [(k, 0.125, 0) for k in SERIES], [(k, 1, 0) for k in (2, 4, 8)]  # seed 0, on the H200
    h100 = seeds(16, 1, (1, 2))
    assert_none(quote_problems("sweep.md", [
        ("at budget 0.125 #-# s (experts #-# s, router #-# s; the monolith # s), and sampling #, #, # and # s",
         [*trained(LATENT, budget_0125), *trained(LATENT, budget_0125, "experts"),
          *trained(LATENT, budget_0125, "router"), train_seconds(LATENT, (8, 0.125, 0), "monolith"),
          *(sampling_seconds(LATENT, where) for where in budget_0125)]),
        ("at budget 1 # s at K = 2 (experts # s), # s at K = 4 (experts # s) and # s at K = 8 (experts # s, monolith "
         "# s), and sampling #, # and # s",
         [*(train_seconds(LATENT, where, key) for where in budget_1 for key in ("total", "experts")),
          train_seconds(LATENT, (8, 1, 0), "monolith"), *(sampling_seconds(LATENT, where) for where in budget_1)]),
        ("K = 16 at budget 1 took #-# s to train (experts #-# s, router #-# s) and # s to sample (full routing # s",
         [*(value for key in ("total", "experts", "router") for value in trained(LATENT, h100, key)),
          sampled(LATENT, h100), sampled(LATENT, h100, series="full")]),  # both cells round to the page's number
    ]))


def test_analysis_md_the_fashion_mnist_sentences_quote_analysis_json():
    analysis = results("analysis_fashion_mnist/analysis.json")
    strategies, link = analysis["strategies"], analysis["link"]
    summary = {name: strategy["summary"] for name, strategy in strategies.items()}
    heldout = analysis["heldout"]
    ratios = {t: band["other"] / band["own"] for t, band in zip(heldout["t"], heldout["by_cluster"])}
    full_rank = strategies["full"]["bands"]["rank"]  # the bands [0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1]
    versus = analysis["compare"]["full"]["vs"]["top-1"]
    pair_links = [strategy["link"]["disagreement"]["rho"] for strategy in strategies.values()]
    assert_none(quote_problems("analysis.md", [
        ("Time: # s for the five strategies (full # s, top-1 # s, top-2 # s, sample-2 # s, oracle # s)",
         [analysis["wall_time"], *(strategies[name]["wall_time"] for name in ("full", "top-1", "top-2", "sample-2",
                                                                              "oracle"))]),
        ("on 1000 samples against 1000 test images (floor #, against", [analysis["w2_floor"]]),
        ("An expert is #x worse off its cluster at t = 0.05 and # to #x worse at t >= 0.75",
         [ratios[0.05], *spread(ratio for t, ratio in ratios.items() if t >= 0.75)]),
        ("its mean rank among the nearest clusters is # at t >= 0.75 against # below t = 0.5",
         [full_rank[3], max(full_rank[:2])]),
        ("full has the smallest Delta_refine (#, against # for top-1 and # for top-2)",
         [summary[name]["delta_refine"] for name in ("full", "top-1", "top-2")]),
        ("(q # [#, #] against top-1", [versus["mean"], versus["lo"], versus["hi"]]),
        ("rho(Delta_refine, q) = # with 95% CI [#, #] is inconclusive",
         [link["refine_vs_q"][key] for key in ("rho", "lo", "hi")]),
        ("By amplification the five are within 5% of each other (# to #)",
         spread(s["amp_median"] for s in summary.values())),
        ("(rho(rank, q) = # [#, #])", [link["rank_vs_q"][key] for key in ("rho", "lo", "hi")]),
        ("top-1's hit falls from # with its own x0_hat to # with the monolith's x0*",
         [summary["top-1"]["hit"], summary["top-1"]["hit_exact"]]),
        ("(hit* # at t >= 0.75)", [strategies["oracle"]["bands"]["hit_exact"][3]]),
        ("(rho(q, D_pair) # to #, every 95% CI above 0)", spread(pair_links)),
        ("full's W2 is # below top-1's", [summary["top-1"]["w2"] - summary["full"]["w2"]]),
    ]))


def test_analysis_md_the_misalignment_sentences_quote_study_json():
    study = results("misalignment_fashion_mnist/study.json")
    conditions, floor, links = study["conditions"], study["floor"], study["links"]
    table = {name: {strategy: cells["fid"]["mean"] for strategy, cells in condition["table"].items()}
             for name, condition in conditions.items()}
    own_other = []  # per condition: own, other, other / own
    for name in ("disjoint", "random", "undertrained-0.1"):
        own, other = (conditions[name]["mechanism"][f"expert_{side}_mean"]["mean"] for side in ("own", "other"))
        own_other += [own, other, other / own]
    kid = conditions["disjoint"]["full_vs_best"]["kid"]["seeds"]
    assert_none(quote_problems("analysis.md", [
        ("FID floor (2000 training images against the test split) #, KID x 1e3 #", [floor["fid"], floor["kid"] * 1e3]),
        ("averaged over t (own / other, then their ratio): disjoint # / # (#), random # / # (#), undertrained-0.1 # / # (#)", own_other),
        ("KID +# x 1e-3 [#, #]", [kid["mean"] * 1e3, kid["lo"] * 1e3, kid["hi"] * 1e3]),
        ("costs full routing # FID", [conditions["tempered-3"]["full_vs_best"]["fid"]["mean"]]),
        ("hurts top-1 least (# against # for full)", [table["permuted-0.5"]["top-1"], table["permuted-0.5"]["full"]]),
        ("The experts are #x worse off their own cluster", [own_other[2]]),
        ("The random partition costs # FID against the k-means partition at the same training budget (# against # for "
         "top-1)", [table["random"]["top-1"] - table["disjoint"]["top-1"], table["random"]["top-1"],
                    table["disjoint"]["top-1"]]),
        ("are poor everywhere (FID # to #)", spread(table["undertrained-0.1"].values())),
        ("Their experts are #x worse off their own cluster", [own_other[8]]),
        ("(Spearman rho of the means #; KID #)", [links["fid_vs_delta_refine"], links["kid_vs_delta_refine"]]),
    ]))


def test_distill_md_the_sentences_quote_the_distill_report_and_the_run():
    report = results("fashion_mnist_distill_report.json")
    to_teacher, rows = report["field"]["to_teacher"], report["scores"]["rows"]
    student, monolith = to_teacher["dense student"], to_teacher["monolith"]
    fid = {name: row["fid"] for name, row in rows.items()}
    run = results("fashion_mnist_grow_convert_metrics.json")["runs"]["fm"]["rows"]  # the run distilled: runs/gcd/fm
    assert_none(quote_problems("distill.md", [
        ("the few-step student on # teacher trajectories", [report["students"][1][5]]),
        ("the run's own report gives this monolith # and top-1 #", [run["monolith"]["fid"], run["top-1"]["fid"]]),
        ("mean over t # for the dense student and # for the monolith; at t = 0.95 # and #, at t = 0.05 # and #",
         [student["mean"], monolith["mean"], student["per_t"][-1], monolith["per_t"][-1], student["per_t"][0],
          monolith["per_t"][0]]),
        ("FID # against its teacher's # at the same 50 steps, and worse than the monolith (#)",
         [fid["dense student, 50 euler steps"], fid["teacher top-1, 50 euler steps"], fid["monolith, 50 euler steps"]]),
        ("(# against # from the same noise)", [rows["dense student, 50 euler steps"]["to_teacher_samples"],
                                               rows["monolith, 50 euler steps"]["to_teacher_samples"]]),
        ("the few-step student (FID #) beats both single networks sampled with 4 Euler steps (the dense student #, "
         "the monolith #), but not the teacher at 4 Euler steps (#)",
         [fid["few-step student, S = 4, lambda grid"], fid["dense student, 4 euler steps"],
          fid["monolith, 4 euler steps"], fid["teacher top-1, 4 euler steps"]]),
        ("The few-step fine-tuning is worth # FID over the dense student",
         [fid["dense student, 4 euler steps"] - fid["few-step student, S = 4, lambda grid"]]),
    ] + distill_md_time_quotes()))


def grow_md_time_quotes() -> list[tuple[str, list]]:
    """grow.md's sentences that quote training seconds (the training loops' own, as the runs' metrics hold them)."""
    seconds = {run: values["train_seconds"] for run, values in
               results("fashion_mnist_grow_convert_metrics.json")["runs"].items()}
    return [("and the router (# s, where training everything again took # s for the experts and the router)",
             [seconds["grown"]["router"], seconds["fm"]["experts"] + seconds["fm"]["router"]])]


def distill_md_time_quotes() -> list[tuple[str, list]]:
    """distill.md's sentences that quote seconds: the Fashion-MNIST report's sampling wall times of its sets."""
    rows = results("fashion_mnist_distill_report.json")["scores"]["rows"]
    wall = {name: row["wall_time"] for name, row in rows.items()}
    four_calls = [seconds for name, seconds in wall.items() if name.endswith(("4 euler steps", "S = 4, lambda grid"))]
    return [("sampling a set took # s for the teacher at 50 steps, # s for the dense student and the monolith at 50 "
             "steps, and #-# s for each 4-call row",
             [wall["teacher top-1, 50 euler steps"],
              [wall["dense student, 50 euler steps"], wall["monolith, 50 euler steps"]],
              *spread(four_calls)])]


# A time as the pages write it: "17 s", "0.21-0.83 s", "3 min", "2 hours".
TIME = r"(?<![\w.,])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)? ?(?:s|ms|min|minutes?|seconds?|h|hours?)\b"


def test_grow_and_distill_md_quote_no_time_that_is_not_checked():
    """Every time grow.md and distill.md quote in their sentences is one the quotes above check against its file
    (their tables' time columns are checked by the table tests): a time no results file holds is not given."""
    for page, quotes in (("grow.md", grow_md_time_quotes()), ("distill.md", distill_md_time_quotes())):
        said = re.findall(TIME, re.sub(r"\s+", " ", page_text(page)))
        checked = sum(len(re.findall(r"# ?(?:s|ms|min|minutes?|seconds?|h|hours?)\b", quote)) for quote, _ in quotes)
        assert len(said) == checked, f"{page} quotes the times {said}; the tests check {checked} of them"


def test_grow_and_distributed_md_the_sentences_quote_the_grow_convert_metrics():
    runs = results("fashion_mnist_grow_convert_metrics.json")["runs"]
    top1 = {run: runs[run]["rows"]["top-1"]["fid"] for run in ("without", "grown", "fm", "vp")}
    pixels = results("fashion_mnist_metrics.json")["rows"]
    assert_none(quote_problems("grow.md", [
        ("The training images of *without* score # against the full test set",
         [runs["without"]["rows"]["train images (floor)"]["fid"]]),
        ("The statistics-only router on *without*, `full`: #",
         [runs["without"]["rows"]["full (statistics-only router)"]["fid"]]),
        ("top-1 FID # -> #, as good as training everything again (#)", [top1["without"], top1["grown"], top1["fm"]]),
    ]) + quote_problems("grow.md", grow_md_time_quotes()) + quote_problems("distributed.md", [
        ("(# against # for all eight)", [top1["vp"], top1["fm"]]),
        ("monolith (#; #-# with guidance 1.5-3)", [pixels["monolith"]["fid"], *spread(
            pixels[f"monolith @ cfg {g}"]["fid"] for g in ("1.5", "2", "3"))]),
    ]))


def test_the_summaries_of_other_pages_quote_the_image_metrics():
    pixels = results("fashion_mnist_metrics.json")["rows"]
    latent = results("fashion_mnist_latent_metrics.json")["rows"]
    fid = {name: row["fid"] for name, row in pixels.items()}
    latent_fid = {name: row["fid"] for name, row in latent.items()}
    floor = latent_fid["autoencoder reconstructions (latent floor)"]
    wall = {name: pixels[name]["wall_time"] for name in ("top-1", "monolith")}
    assert_none(quote_problems("../README.md", [
        ("top-1 routing reaches FID # against # for the FLOP-matched monolith, #x",
         [fid["top-1"], fid["monolith"], fid["top-1"] / fid["monolith"]]),
        ("top-1 FID # against # for the latent monolith, #x; the autoencoder's floor #",
         [latent_fid["top-1"], latent_fid["monolith"], latent_fid["top-1"] / latent_fid["monolith"], floor]),
    ]) + quote_problems("latent.md", [
        ("Top-1 reaches FID # against the latent monolith's # (#x); the autoencoder's own reconstructions score #",
         [latent_fid["top-1"], latent_fid["monolith"], latent_fid["top-1"] / latent_fid["monolith"], floor]),
    ]) + quote_problems("images.md", [
        ("the monolith in [RESULTS.md](RESULTS.md) (FID #x;", [fid["top-1"] / fid["monolith"]]),
    ]) + quote_problems("performance.md", [
        ("In the image pipeline (10k images at once) top-1 samples at #x the monolith (# against # s",
         [wall["top-1"] / wall["monolith"], wall["top-1"], wall["monolith"]]),
    ]))
