"""plots/training.png: the loss curves read from train_log.jsonl files (resumed and restarted logs), and the plot.
The plot of a whole run, and of a run with a network lacking a log, is tested on the tiny run in test_pipeline.py."""
import json

from PIL import Image

from ddmkit.evaluation.plots import plot_training, spans_a_decade
from ddmkit.pipeline.models import expert_seconds, log_seconds, loss_curve, seconds_sentence


def write_log(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def row(step, loss, seconds):
    return {"step": step, "lr": 0.001, "seconds": seconds, "loss": loss, "grad_norm": 1.0}


def test_a_resumed_log_is_read_as_written_though_its_seconds_restart(tmp_path):
    """fit resumed from a checkpoint at step 40 rewrites the checkpoint's rows, then goes on: the steps continue,
    the seconds count from the restart."""
    rows = [row(20, 3.0, 1.1), row(40, 2.0, 2.2), row(60, 1.5, 0.9), row(80, 1.2, 2.0)]
    assert loss_curve(write_log(tmp_path / "train_log.jsonl", rows)) == [(20, 3.0), (40, 2.0), (60, 1.5), (80, 1.2)]


def test_a_log_that_starts_over_keeps_the_later_rows_from_where_it_restarted(tmp_path):
    """A job run again that appended to its old log: the rows it repeats are replaced by the later ones, the old
    rows before its first step kept; a damaged line and a row without a loss are skipped."""
    old = [row(20, 3.0, 1.0), row(40, 2.0, 2.0), row(60, 1.5, 3.0)]
    again = [row(40, 2.5, 0.5), row(60, 1.8, 1.0), row(80, 1.4, 1.5)]
    log = write_log(tmp_path / "train_log.jsonl", old + again,
                    ['{"step": 100, "lr": 0.001}', '{"step": 100, "lo'])
    assert loss_curve(log) == [(20, 3.0), (40, 2.5), (60, 1.8), (80, 1.4)]
    from_the_start = write_log(tmp_path / "again.jsonl", old + [row(20, 9.0, 0.1)])
    assert loss_curve(from_the_start) == [(20, 9.0)]


def test_the_y_axis_is_logarithmic_only_for_losses_spanning_a_decade():
    assert spans_a_decade([0.05, 0.5, 0.2]) and not spans_a_decade([1.0, 3.0, 9.9])
    assert not spans_a_decade([0.0, 1.0])  # a zero cannot go on a log axis


def test_the_plot_of_many_experts_is_a_png(tmp_path):
    """Twelve experts (a colour bar, no legend of twelve), the monolith and a router on a second panel."""
    experts = {f"expert {c}": [(50, 2.0 + c / 10), (100, 1.0), (150, 0.9)] for c in range(12)}
    panels = {"experts and monolith": {**experts, "monolith": [(50, 2.5), (1800, 0.8)]},
              "router": {"router": [(50, 2.4), (100, 0.1)]}}
    plot_training(panels, tmp_path / "plots" / "training.png", "Not drawn: expert 12 (no train_log.jsonl).")
    with Image.open(tmp_path / "plots" / "training.png") as image:
        assert image.format == "PNG" and image.width > 1000
        image.verify()


def expert_folder(path, seconds, config=None):
    """A model folder whose train_log.jsonl has rows of those seconds (and config.json, when given)."""
    path.mkdir(parents=True)
    write_log(path / "train_log.jsonl", [row(20 * (i + 1), 1.0, t) for i, t in enumerate(seconds)])
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_experts_training_time_is_every_experts_not_the_first_ones(tmp_path):
    """The image report gave expert_00's last row as the experts' training time: their sum and the longest, now; a
    resumed log's seconds restart, and its parts add up; an expert without a log is said."""
    folders = [expert_folder(tmp_path / "e0", [1.0, 2.0]), expert_folder(tmp_path / "e1", [3.0, 7.5]),
               expert_folder(tmp_path / "e2", [2.0, 4.0, 0.5, 1.5]), tmp_path / "e3"]  # e2 resumed; e3: no log
    assert log_seconds(folders[2] / "train_log.jsonl") == 5.5 and log_seconds(folders[3] / "train_log.jsonl") is None
    seconds = expert_seconds(folders)
    assert seconds == {"experts": 15.0, "longest_expert": 7.5, "each_expert": [2.0, 7.5, 5.5, None], "expert_jobs": 3}
    assert seconds_sentence({**seconds, "monolith": 20.04, "router": 1.0}) == (
        "Training wall time: experts 15.0 s in all (the longest 7.5 s; 1 of 4 experts have no train_log.jsonl), "
        "monolith 20.0 s, router 1.0 s.")
    assert expert_seconds([folders[3]]) == {} and seconds_sentence({}) == (
        "Training wall time: no network has a train_log.jsonl.")


def test_experts_trained_together_count_their_one_job_once(tmp_path):
    """expert.concurrent: each of the K folders logs the stacked job's seconds; the sum is that job's, not K x it.
    An expert trained on its own beside them (add-expert) adds its own."""
    job = {"trained_concurrently_with": 3, "train_seconds_all": 9.1}
    folders = [expert_folder(tmp_path / f"e{c}", [4.0, 9.0], job) for c in range(3)]
    folders.append(expert_folder(tmp_path / "added", [2.0], {"role": "expert"}))
    seconds = expert_seconds(folders)
    assert (seconds["experts"], seconds["longest_expert"], seconds["expert_jobs"]) == (11.0, 9.0, 2)
    assert seconds_sentence(seconds) == ("Training wall time: experts 11.0 s in all (the longest 9.0 s; 4 experts "
                                         "trained in 2 job(s), expert.concurrent).")
