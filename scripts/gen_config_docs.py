"""Writes docs/configuration.md from the config schemas, so the page cannot drift from the code.

The keys, types and defaults come from the dataclasses in cvae_exp/config.py, the meaning of each key
from the `# comment` at the end of its line there, and the options of each config group from
conf/<group>/*.yaml (their first comment line, and what each sets).

    python scripts/gen_config_docs.py            # (re)write docs/configuration.md   (= make docs)
    python scripts/gen_config_docs.py --check    # exit 1 when the file on disk is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_PY = REPO / "cvae_exp" / "config.py"
CONF_DIR = REPO / "conf"
OUTPUT = REPO / "docs" / "configuration.md"

# Config groups that have no key of their own in the composed config: they set keys anywhere.
GLOBAL_GROUPS = {
    "experiment": "Paper reproductions: each file holds only what it changes, and starts with the command that runs it.",
    "sweep": "Multirun sweeps (`cvae-train -m sweep=NAME`): the parameters each one varies.",
}


# ----------------------------------------------------------------------------- reading the sources


def field_comments(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field name: its trailing comment}} for every class in `source`."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        per_field = found.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                per_field[stmt.target.id] = next((comments[n] for n in lines if n in comments), "")
    return found


def load_config_module():
    sys.path.insert(0, str(REPO))
    try:
        from cvae_exp import config
    finally:
        sys.path.remove(str(REPO))
    return config


def type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "")


def yaml_value(value: Any) -> str:
    """A value as it is written in the YAML files and on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_of(f: dataclasses.Field, missing: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return missing


def header_comment(text: str) -> str:
    """The first comment line at the top of a YAML file, as Markdown.

    Hydra's `# @package` directive is skipped. A line that stops mid-sentence runs on into the next; a line that
    ends with a colon takes the next one too. A line indented after its `#` is a command, shown as code.
    """
    parts = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped[1:]
        if not body.strip() or body.strip().startswith("@package"):
            continue
        if body.startswith("  "):
            parts.append(md_code(body.strip()))
            break
        parts.append(md_text(" ".join(body.split())))
        if body.rstrip().endswith((".", ")", "]")):
            break
    return " ".join(parts)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value}; a dict of Hydra constructor arguments (`_target_`, ...) stays one value."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "_target_" not in v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_options() -> dict[str, str]:
    """{group: option} from the defaults list of conf/config.yaml."""
    chosen = {}
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({str(k): str(v) for k, v in entry.items()})
    return chosen


# ----------------------------------------------------------------------------- Markdown


def md_text(text: str) -> str:
    """Plain text for a table cell: Markdown's special characters escaped outside `code spans`."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        for ch in ("\\", "*", "_", "<", ">", "[", "]"):
            parts[i] = parts[i].replace(ch, "\\" + ch)
    return "`".join(parts).replace("|", "\\|")


def md_code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def schema_table(cls, comments: dict[str, str], prefix: str, missing: Any) -> tuple[list[str], list[str]]:
    """The rows of one schema, and the fields that have no comment to explain them."""
    rows, undocumented = [], []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(default_of(f, missing)):
            continue  # a nested group: it gets its own section
        default = default_of(f, missing)
        shown = "required (`???`)" if default is missing else md_code(yaml_value(default))
        meaning = comments.get(f.name, "")
        if not meaning:
            undocumented.append(prefix + f.name)
        rows.append([md_code(prefix + f.name), md_code(type_name(f.type)), shown, md_text(meaning)])
    return table(["key", "type", "default", "meaning"], rows), undocumented


def option_rows(group: str, schema_defaults: dict[str, Any] | None, chosen: str | None) -> list[list[str]]:
    rows = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        text = path.read_text()
        values = yaml.safe_load(text) or {}
        values.pop("defaults", None)
        flat = flatten(values)
        if schema_defaults is not None:  # show what the option changes from the schema
            flat = {k: v for k, v in flat.items() if k not in schema_defaults or schema_defaults[k] != v}
        sets = ", ".join(md_code(f"{k}={yaml_value(v)}") for k, v in flat.items()) or "(the schema defaults)"
        name = md_code(path.stem) + (" (default)" if path.stem == chosen else "")
        link = f"[{path.name}](../conf/{group}/{path.name})"
        rows.append([name, header_comment(text), sets, link])
    return rows


# Nested groups (conf/<group>/<sub>/): the schema of each option's keys, where it has one.
NESTED_SCHEMAS = {"model/net": {"mlp": "MLPNetConfig", "conv": "ConvNetConfig"}}


def nested_group(config, comments, group: str, chosen, missing, undocumented: list[str]) -> list[str]:
    """A nested group's section: its options, then each option's keys (`model.net.channels`, ...)."""
    key = group.replace("/", ".")
    out = [f"### `{group}` (`{group}=NAME`, from `conf/{group}/`: the keys of `{key}`)", ""]
    out += table(["option", "description", "sets", "file"], option_rows(group, None, chosen.get(group)))
    for option, name in NESTED_SCHEMAS.get(group, {}).items():
        cls = getattr(config, name)
        out += [f"Keys of `{group}={option}` (`cvae_exp/config.py:{name}`):", ""]
        rows, missing_here = schema_table(cls, comments.get(name, {}), f"{key}.", missing)
        out += rows
        undocumented += missing_here
    return out


def render() -> tuple[str, list[str]]:
    """(the page, the dotted keys whose schema field has no comment)."""
    config = load_config_module()
    comments = field_comments(CONFIG_PY.read_text())
    missing = getattr(config, "MISSING", "???")
    chosen = default_options()
    undocumented: list[str] = []

    out = [
        "<!-- Generated by scripts/gen_config_docs.py from cvae_exp/config.py and conf/: do not edit by hand. -->",
        "",
        "# Configuration",
        "",
        "Generated from the dataclass schemas in [cvae_exp/config.py](../cvae_exp/config.py) (keys, types, defaults,",
        "and the comment on each field's line as its meaning) and from the YAML options in [conf/](../conf).",
        "Do not edit this page: change the schemas or the YAML files, then regenerate it with `make docs`",
        "(`python scripts/gen_config_docs.py`); `tests/test_docs.py` fails while it is out of date.",
        "",
        "Every key can be overridden on the command line, e.g. `cvae-train model=hybrid model.alpha=0.3 data.n_given=2`.",
        "A group option (`model=hybrid`) loads `conf/<group>/<option>.yaml` over the schema defaults; the *default*",
        "column below is the schema's, and each option's table says what that option changes from it.",
        "Which option each group starts from is set in [conf/config.yaml](../conf/config.yaml). Impossible values",
        "(a negative learning rate, `data.n_given=4`, ...) are refused before any work by",
        "`cvae_exp/config.py:validate`.",
        "",
        "## Top-level keys (`cvae_exp/config.py:Config`)",
        "",
    ]
    top_rows, missing_top = schema_table(config.Config, comments.get("Config", {}), "", missing)
    out += top_rows
    undocumented += missing_top

    for f in dataclasses.fields(config.Config):
        node = default_of(f, missing)
        if not dataclasses.is_dataclass(node):
            continue
        cls = type(node)
        out += [f"## `{f.name}` (`cvae_exp/config.py:{cls.__name__}`)", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [md_text(" ".join(cls.__doc__.split())), ""]
        rows, missing_here = schema_table(cls, comments.get(cls.__name__, {}), f"{f.name}.", missing)
        out += rows
        undocumented += missing_here
        if (CONF_DIR / f.name).is_dir():
            schema_defaults = flatten(dataclasses.asdict(node))
            out += [f"Options (`{f.name}=NAME`, from `conf/{f.name}/`):", ""]
            out += table(
                ["option", "description", "sets", "file"], option_rows(f.name, schema_defaults, chosen.get(f.name))
            )
        for sub in sorted(p for p in (CONF_DIR / f.name).glob("*") if p.is_dir()):
            out += nested_group(config, comments, f"{f.name}/{sub.name}", chosen, missing, undocumented)

    for group in sorted(GLOBAL_GROUPS):
        if not (CONF_DIR / group).is_dir():
            continue
        out += [f"## `{group}` (option group, no keys of its own)", "", GLOBAL_GROUPS[group], ""]
        out += table(["option", "description", "sets", "file"], option_rows(group, None, chosen.get(group)))

    app = config.EvalApp
    out += [
        "## `cvae-eval` (`cvae_exp/config.py:EvalApp`, [conf/eval.yaml](../conf/eval.yaml))",
        "",
        md_text(" ".join((app.__doc__ or "").split())) + " Its `eval` keys are those of the `eval` section above.",
        "",
        "conf/eval.yaml: " + header_comment((CONF_DIR / "eval.yaml").read_text()),
        "",
    ]
    rows, missing_app = schema_table(app, comments.get(app.__name__, {}), "", missing)
    out += rows
    undocumented += [k for k in missing_app if k not in undocumented]
    return "\n".join(out).rstrip("\n") + "\n", undocumented


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the generated page")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where the page goes (default: %(default)s)")
    args = parser.parse_args(argv)
    page, undocumented = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != page:
            print(
                f"{args.output} is out of date: run `make docs` (python scripts/gen_config_docs.py).", file=sys.stderr
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(f"wrote {args.output}")
    if undocumented:
        print(f"note: no comment in cvae_exp/config.py for: {', '.join(undocumented)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
