"""What a resumed run trains with: the run's own config, with the resuming command's overrides on top.

`cvae-train hydra.run.dir=<run> resume=true|auto [overrides]` on a directory that holds checkpoints starts
from the config the run recorded (the newest checkpoint whose JSON item reads and verifies; else
`.hydra/config.yaml`), not from the defaults, and applies what the command line overrides:

- `key=value` (also `+key=value`, `++key=value`, `~key`): the composed value of that key, on top;
- a config-group choice (`model=vae`, `experiment=sohn2015`): nothing when it is the run's own choice
  (recorded in `.hydra/hydra.yaml`); a different one replaces that group's node (model, data, ...), and
  a different global one (experiment, sweep) is refused, since it would change keys all over;
- `resume`, `resume_data_change`, `cluster.*`, `verbose` and `trust_modules` describe this launch and always come
  from the command (a run built with a user's network resumes only when the command trusts its package again).

Then the rules: what the arrays' shapes depend on (checkpoint.SHAPE_KEYS) may not change, and neither may
the data (`data.*`; after loading, the source and split sizes the checkpoint recorded) unless the command
asks for it with `resume_data_change=true`. Train(cfg) called without Hydra trains `cfg` as given, under
the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cvae_exp.config import differing, onto_schema, resolved_record, saved_value
from cvae_exp.errors import UserError

log = logging.getLogger("cvae_exp")
# From the command, never from the saved run: trust_modules above all (a saved config never grants trust).
PER_LAUNCH = ("resume", "resume_data_change", "cluster", "verbose", "trust_modules")
GROUP_NODES = (
    "model",
    "data",
    "optimizer",
    "trainer",
    "checkpoint",
    "logger",
    "model/net",
)  # groups that fill one node


@dataclass
class SavedRun:
    """A run directory's record, as trained."""

    config: dict  # the config the newest checkpoint recorded (else .hydra/config.yaml)
    step: int | None  # that checkpoint's step (None: the config came from .hydra/)
    data: dict | None  # the data the checkpoint was trained on: source and split sizes (None: not recorded)
    overrides: list[str] = field(default_factory=list)  # the overrides it was launched with (.hydra/)
    choices: dict = field(default_factory=dict)  # its config-group choices (.hydra/hydra.yaml)


@dataclass
class Resumed:
    cfg: DictConfig  # what this launch trains
    saved: SavedRun | None  # the run it continues (None: a fresh run)
    overrides: list[str] | None = None  # the run's overrides with this command's merged in (None: this launch's)
    choices: dict | None = None


def _yaml(file: Path):
    try:
        return OmegaConf.to_container(OmegaConf.load(file)) if file.is_file() else None
    except Exception:  # unreadable: treated as absent, the checkpoint's config decides
        return None


def saved_run(run_dir: Path) -> SavedRun | None:
    """The run in `run_dir`, or None when it holds no checkpoint (nothing to resume)."""
    folder = run_dir / "checkpoints"
    if not (folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())):
        return None
    from cvae_exp.runs import checkpoint  # Orbax and JAX: only where there is a checkpoint to read

    manager = checkpoint.make_manager(run_dir, keep=1)  # only reads here (a read-only one logs warnings)
    found = checkpoint.newest_meta(manager)
    manager.close()
    record = run_dir / ".hydra"
    hydra_cfg = (_yaml(record / "hydra.yaml") or {}).get("hydra", {})
    overrides = _yaml(record / "overrides.yaml") or hydra_cfg.get("overrides", {}).get("task") or []
    choices = hydra_cfg.get("runtime", {}).get("choices") or {}
    if found is not None:
        step, meta = found
        return SavedRun(meta.get("config", {}), step, meta.get("data"), list(overrides), dict(choices))
    config = _yaml(record / "config.yaml")
    if config is None:
        raise UserError(
            f"{folder} holds checkpoints, but neither they nor {record / 'config.yaml'} record a readable config."
        )
    return SavedRun(config, None, None, list(overrides), dict(choices))


def _key(override) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def resumed_config(cfg: DictConfig, saved: SavedRun, overrides: list[str], choices: dict) -> Resumed:
    """The saved config with the command's `overrides` on top (`cfg`: this launch's composed config,
    `choices`: its config-group choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        out = onto_schema(saved.config)
    except Exception as err:  # a key this version does not know, a wrong type
        raise UserError(
            f"The run's saved config cannot be read by this version ({type(err).__name__}: {str(err).splitlines()[0]})."
        ) from None
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    try:
        merged = {_key(o): o.input_line for o in parser.parse_overrides(saved.overrides)}
    except Exception:  # an overrides.yaml this Hydra cannot parse: kept as it is, the new ones after it
        merged = {f"<saved {i}>": line for i, line in enumerate(saved.overrides)}
    applied_choices = {}
    with open_dict(out):
        for o in parsed:
            merged[_key(o)] = o.input_line
            name = o.key_or_group
            if name in choices and o.package is None:  # a config-group choice
                applied_choices[name] = choices[name]
                if saved.choices.get(name, "<unknown>") == choices[name]:
                    continue  # the run's own choice: already in its config
                if name not in GROUP_NODES:
                    was = saved.choices.get(name, "unknown (no .hydra/hydra.yaml)")
                    raise UserError(
                        f"{o.input_line} changes keys all over the run's config (it was launched with {name}={was}); "
                        f"resume without it, or start a new run directory."
                    )
                node = name.replace("/", ".")  # model/net fills model.net
                OmegaConf.update(out, node, OmegaConf.select(cfg, node), merge=False, force_add=True)
            elif o.type == OverrideType.DEL:
                parent, _, leaf = name.rpartition(".")
                node = OmegaConf.select(out, parent) if parent else out
                if isinstance(node, DictConfig) and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(out, name, OmegaConf.select(cfg, name), merge=False, force_add=True)
        for key in PER_LAUNCH:
            if key in cfg:
                out[key] = cfg[key]
    return Resumed(out, saved, list(merged.values()), {**saved.choices, **applied_choices})


def _launch_overrides() -> tuple[list[str], dict] | None:
    """This launch's command-line task overrides and config-group choices (None without Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return list(hc.overrides.task), OmegaConf.to_container(hc.runtime.choices)


def settle(cfg: DictConfig, run_dir: Path, mode: str) -> Resumed:
    """The config this launch trains: a fresh run's own, or (resume) the run's with the command's overrides
    on top. Checked by the caller (cvae_exp.runs.preflight); refuses a resume=true with nothing to resume."""
    saved = saved_run(run_dir) if mode in ("true", "auto") else None
    if saved is None and mode == "true":
        raise UserError(
            f"resume=true, but {run_dir / 'checkpoints'} holds no checkpoint: there is nothing to resume "
            "(check hydra.run.dir; resume=auto starts a new run when there is none)."
        )
    launch = _launch_overrides() if saved is not None else None
    return resumed_config(cfg, saved, *launch) if launch is not None else Resumed(cfg, saved)


def check_resumable(resumed: Resumed, run_dir: Path) -> None:
    """Refuses, naming the keys, a resume that changes what the arrays' shapes depend on or (not asked for
    with resume_data_change=true) the data."""
    saved, new = resumed.saved, resumed.cfg
    if saved is None:
        return
    from cvae_exp.runs import checkpoint

    plain = OmegaConf.to_container(new, resolve=True)
    where = (
        f"The checkpoint at step {saved.step} in {run_dir / 'checkpoints'}" if saved.step else f"The run in {run_dir}"
    )
    record = resolved_record(saved.config)  # as written: compared resolved, once for every key below
    changed = checkpoint.changed_shape_keys(record, plain)
    if changed:
        raise UserError(
            f"{where} was trained with different {', '.join(changed)}; resume it with the same values or "
            "start a new run directory."
        )
    changed_data = differing(record, plain, [f"data.{k}" for k in sorted(plain["data"])])
    data = [key.removeprefix("data.") for key in changed_data]
    if data and not new.resume_data_change:
        now = plain["data"]
        listed = ", ".join(f"data.{k}={now[k]} (trained with {saved_value(saved.config, f'data.{k}')})" for k in data)
        raise UserError(
            f"Resuming the run in {run_dir} with {listed} would change the data it trains on: resume without "
            "them, or pass resume_data_change=true to change it deliberately."
        )


def check_data(saved: SavedRun | None, cfg: DictConfig, fingerprint: dict) -> None:
    """Refuses data of another geometry than the checkpoint's (its networks would not fit; a checkpoint without
    one was trained on MNIST), and (unless resume_data_change=true) data that differs in any other way: another
    source or split sizes, or other contents at the same path. Only what both record is compared: a checkpoint
    from before the content digest resumes on its source and sizes."""
    from cvae_exp.data.geometry import Geometry

    if saved is None or not saved.data:
        return
    was, now = Geometry.from_record(saved.data.get("geometry")), Geometry.from_record(fingerprint.get("geometry"))
    if not was.same_shape(now):
        raise UserError(
            f"The data's images are {now.describe()}, but the checkpoint at step {saved.step} was trained on "
            f"{was.describe()}: point data.path at data of that geometry, or start a new run directory."
        )
    if cfg.resume_data_change:
        return
    # a record-less checkpoint (MNIST's shapes) names no classes: the data's own names stand for them
    recorded = {**saved.data, "geometry": saved.data.get("geometry") or fingerprint.get("geometry")}
    differ = sorted(k for k in set(fingerprint) & set(recorded) if fingerprint[k] != recorded[k])
    if not differ:
        return
    if differ == ["content_sha256"]:
        path = OmegaConf.select(cfg, "data.path", default=None)
        where = f"data.path={path}" if path is not None else f"the data ({fingerprint.get('source')})"
        raise UserError(
            f"The contents of {where} differ from the data the checkpoint at step {saved.step} was trained on "
            "(the same source and split sizes, other images or labels); point data.path at the run's data, or pass "
            "resume_data_change=true to change it deliberately."
        )
    diff = "; ".join(f"{k} {fingerprint.get(k)} instead of {recorded.get(k)}" for k in differ if k != "content_sha256")
    raise UserError(
        f"The data differs from what the checkpoint at step {saved.step} was trained on ({diff}); "
        "point data.path at the run's data, or pass resume_data_change=true to change it deliberately."
    )
