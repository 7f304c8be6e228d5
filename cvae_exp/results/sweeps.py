"""A sweep on disk, read once for every report: its jobs (`RecordedJob`, `load_job`), what was swept, and the
table formatting both reports print with. `cvae_exp.report` (the sweep table and plot) and
`cvae_exp.results.sohn2015` (Sohn et al. 2015 Table 1) sit above this module and never import each other's
reading. No JAX here.

A job is a subfolder holding `.hydra/` (Hydra's numbered job dirs; any depth, any launcher). Each one is read
once: `.hydra/overrides.yaml`, `.hydra/config.yaml`, `metrics.json`, and `eval.json`, `eval_val.json`,
`eval_test.json` when present.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cvae_exp.errors import UserError
from cvae_exp.runs.rundir import is_locked

EVAL_FILES = ("eval", "eval_val", "eval_test")  # <name>.json -> keys "<name>/<field>"
SKIP_DIRS = {"checkpoints", "tb", "samples", ".submitit", ".hydra", "__pycache__"}
MAX_DEPTH = 4


@dataclass
class RecordedJob:
    name: str  # path relative to the sweep dir, e.g. "3"
    path: Path
    overrides: dict[str, str]  # key -> value, as given on the command line / by the sweeper
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    saved: dict = field(default_factory=dict)  # metrics.json as written, every field (booleans, lists too)
    config: dict | None = None  # .hydra/config.yaml as plain YAML (None: missing or unreadable)
    evals: dict[str, dict] = field(default_factory=dict)  # EVAL_FILES stem -> that JSON file, as written
    status: str = "ok"  # ok | running | failed/unfinished (...)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def override_string(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


# ----------------------------------------------------------------------------- reading a sweep


def find_jobs(root: Path) -> list[Path]:
    """Job dirs under `root` (folders holding `.hydra/`), in job-number order; `root` itself if it is a run."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if depth and ".hydra" in dirnames:
            found.append(here)
            dirnames[:] = []  # a job's own folders (checkpoints, tb) hold no further jobs
            continue
        dirnames[:] = [] if depth >= MAX_DEPTH else [d for d in dirnames if d not in SKIP_DIRS]
    if not found and (root / ".hydra").is_dir():
        found = [root]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def natural_key(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("/"))


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def _numbers(data: dict, prefix: str = "") -> dict:
    """The numeric (and short string) fields of a JSON object, keys prefixed."""
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) or (isinstance(v, str) and k in ("data_source", "hardware")):
            out[f"{prefix}{k}"] = v
    return out


class Unreadable(Exception):
    """A job directory the report cannot read as a job (the message says why); it is skipped, with one line."""


def _text(file: Path) -> str:
    """A job file's text; one that is not UTF-8 makes the job unreadable (OSError: a missing file passes on)."""
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        shown = f".hydra/{file.name}" if file.parent.name == ".hydra" else file.name
        raise Unreadable(f"{shown} is not UTF-8 text") from None


def _json_object(file: Path) -> dict:
    data = json.loads(_text(file))
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def load_job(root: Path, path: Path) -> RecordedJob:
    """The job in `path`; raises Unreadable for a directory that cannot be reported (a name or an
    overrides.yaml that is not UTF-8, overrides that are not a list)."""
    name = path.relative_to(root).as_posix() if path != root else path.name
    if _surrogates(name):  # undecodable bytes in a folder name: it could not be printed or written in a table
        raise Unreadable("its name is not UTF-8")
    try:
        listed = yaml.safe_load(_text(path / ".hydra" / "overrides.yaml")) or []
    except (OSError, yaml.YAMLError):
        listed = []
    if not isinstance(listed, list):
        raise Unreadable(f".hydra/overrides.yaml holds a {type(listed).__name__}, not a list of overrides")
    overrides = dict(_split_override(o) for o in listed if not str(o).startswith("hydra."))
    job = RecordedJob(name, path, overrides)
    try:
        job.saved = _json_object(path / "metrics.json")
        job.metrics = _numbers(job.saved)
    except FileNotFoundError:
        job.status = _unfinished(path)
    except (OSError, ValueError, Unreadable) as err:
        why = str(err) if isinstance(err, Unreadable) or "JSON" in str(err) else type(err).__name__
        job.status = f"failed (unreadable metrics.json: {why})"
    try:
        job.config = yaml.safe_load(_text(path / ".hydra" / "config.yaml")) or {}
    except (OSError, yaml.YAMLError, Unreadable):
        job.config = None
    if not isinstance(job.config, dict):
        job.config = None
    for stem in EVAL_FILES:
        try:
            job.evals[stem] = _json_object(path / f"{stem}.json")
        except (OSError, ValueError, Unreadable):
            continue
        job.metrics |= _numbers(job.evals[stem], f"{stem}/")
    return job


def _unfinished(path: Path) -> str:
    """`running` while a live process holds the run's lock, else failed/unfinished (with its last checkpoint)."""
    if is_locked(path):  # asks the kernel's lock (cvae_exp.runs.rundir.RunLock), not a PID in the file
        return "running"
    steps = [int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit()]
    return "failed/unfinished" + (f" (last checkpoint: step {max(steps)})" if steps else " (no metrics.json)")


def multirun_info(root: Path) -> tuple[list[str], str | None]:
    """(keys swept according to multirun.yaml, the command that launched the sweep) or ([], None)."""
    try:
        hydra_cfg = (yaml.safe_load((root / "multirun.yaml").read_text()) or {}).get("hydra", {})
    except (OSError, yaml.YAMLError):
        return [], None
    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    keys = [str(k).lstrip("+~") for k in params]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(task)
    except HydraException:  # an override this Hydra cannot parse: the jobs' differing values still tell
        parsed = []
    keys += [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    command = "cvae-train -m " + " ".join(task) if task else None
    return list(dict.fromkeys(keys)), command


def varied_keys(jobs: list[RecordedJob], declared: list[str]) -> list[str]:
    """Keys whose values differ across jobs, plus the declared ones, in first-seen order."""
    seen = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    differ = {k for k in seen if len({job.overrides.get(k) for job in jobs}) > 1}
    return [k for k in dict.fromkeys(seen + declared) if k in differ or k in declared]


# ----------------------------------------------------------------------------- table formatting


def typed(value):
    """'8' -> 8, '1e-3' -> 0.001, other strings unchanged (for sorting and plotting)."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.2f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_sweep(sweep_dir: str | Path) -> tuple[Path, list[RecordedJob], list[str], str | None]:
    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"The sweep directory {root} does not exist (pass the folder a multirun wrote).")
    root = root.resolve()
    paths = find_jobs(root)
    if not paths:
        raise UserError(f"{root} holds no job directories (subfolders with a .hydra/ folder); is it a multirun dir?")
    jobs = []
    for path in paths:
        try:
            jobs.append(load_job(root, path))
        except Unreadable as why:
            where = ascii(str(path)) if _surrogates(str(path)) else str(path)
            print(f"skipped {where}: {why}.", file=sys.stderr)
    if not jobs:
        raise UserError(f"{root} holds no job directory that can be read (each was skipped, above).")
    declared, command = multirun_info(root)
    return root, jobs, varied_keys(jobs, declared), command
