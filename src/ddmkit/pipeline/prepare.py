"""The run folder's configuration: create RUN/ for a config, or reuse it for the same run.

RUN/config.json holds the resolved configuration and its digest. A folder that holds a
different run (other data, partition or training) is refused unless force=True; when only
[sample] or [evaluate] changed, the trained networks are kept and what sampling and scoring
wrote is removed, to be drawn again.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ddmkit.config import RunConfig, json_digest, validate
from ddmkit.errors import DDMError
from ddmkit.io import read_json, write_json
from ddmkit.layout import RunFolder

Log = Callable[[str], None]
TRAINED = ("data", "partition", "expert", "router", "monolith")  # the config sections the networks depend on


def trained_digest(config: dict) -> str:
    """Hash of the config sections that decide the data, the partition and the trained networks."""
    return json_digest({name: config.get(name) for name in TRAINED})


def prepare_run_dir(out: str | Path, cfg: RunConfig, force: bool = False, log: Log = print) -> Path:
    """Create RUN/ (or reuse it for the same configuration); returns its path."""
    folder = RunFolder(out)
    run = folder.root
    if run.exists() and not run.is_dir():
        raise DDMError(f"--out {run} is a file, not a folder; choose another --out")
    if folder.config.exists():
        old = read_json(folder.config)
        new = cfg.model_dump()
        if old.get("digest") != cfg.digest():
            if "config" in old and trained_digest(old["config"]) == trained_digest(new):
                changed = [name for name in ("sample", "evaluate") if old["config"].get(name) != new[name]]
                log(f"{run}: the {' and '.join(changed)} settings changed; the trained networks are kept, "
                    "samples and scores are drawn again")
                for path in folder.derived:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            elif not force:
                raise DDMError(f"{run} already holds a different run (its config.json differs in the data, "
                               "partition or training); choose another --out folder or pass --force to replace it")
            else:
                shutil.rmtree(run)
    elif run.exists() and any(run.iterdir()) and not force:
        raise DDMError(f"{run} exists and is not a ddmkit run folder; choose another --out or pass --force")
    run.mkdir(parents=True, exist_ok=True)
    write_json(folder.config, {"digest": cfg.digest(), "config": cfg.model_dump()})
    return run


def run_config(run: str | Path) -> RunConfig:
    """The configuration a run folder was made with."""
    folder = RunFolder(run)
    if not folder.config.exists():
        raise DDMError(f"{folder.root} is not a ddmkit run folder (no config.json); make one with "
                       f"`ddmkit run CONFIG --out {folder.root}` or `ddmkit partition --out {folder.root}`")
    return validate(RunConfig, read_json(folder.config).get("config", {}), f"{folder.config}")
