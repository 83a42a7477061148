"""The runs a report reads: every results.json below some folders, a rerun counted once (`find_results`), the runs
that `--task`, `--experiment` and `--only` keep (`select`), the CSV of them (`csv_table`), and a run's record as
the tables show it (its data source, scale, command and link)."""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
from pathlib import Path

import yaml

# Keys that say how a run was launched or logged, not what it computed: runs differing only there are one run.
_NOT_IDENTITY = {"hydra", "logger", "device", "cache_dir"}
_NOT_IDENTITY_TRAINER = {"progress", "resume"}
# Keys added after some runs were recorded, each with the value that does what those runs did: a run recorded
# without the key is the same run as one with this value.
# Each key is its path in the config; it is added only where its parent section was recorded.
_ADDED_KEYS = {("task", "window_start"): "any", ("task", "limit"): None, ("task", "train_documents"): "package",
               ("task", "synthetic", "train_cut_min"): None}
CONF = Path(__file__).resolve().parents[2] / "conf"


def _with_default(config: dict, path: tuple[str, ...], value) -> dict:
    """config with the key at `path` set to `value` where its parent section exists and lacks it (a copy: the run's
    own config is left as recorded)."""
    head, *rest = path
    if not rest:
        return config if head in config else {**config, head: value}
    if not isinstance(config.get(head), dict):
        return config
    return {**config, head: _with_default(config[head], tuple(rest), value)}


def _identity(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
    if isinstance(kept.get("trainer"), dict):
        kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in _NOT_IDENTITY_TRAINER}
    for path, value in _ADDED_KEYS.items():
        kept = _with_default(kept, path, value)
    # Runs recorded when the tiny/paper choice was `task.setting` (with `model.scale`, and the values of both
    # scales under `presets` in task and trainer) name it `scale` now; the values themselves are unchanged.
    if isinstance(kept.get("task"), dict) and "setting" in kept["task"]:
        kept.setdefault("scale", kept["task"]["setting"])
    for section, keys in (("task", ("setting", "presets")), ("trainer", ("setting", "presets")), ("model", ("scale",))):
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return json.dumps(kept, sort_keys=True, default=str)


def read_run(folder: Path) -> dict:
    """A run folder's results.json, with the folder (`path`) and when the file was written (`mtime`)."""
    path = Path(folder) / "results.json"
    data = json.loads(path.read_text())
    data["path"], data["mtime"] = str(path.parent), path.stat().st_mtime
    return data


def all_runs(roots: list[Path]) -> list[dict]:
    """Every results.json below the roots, with its folder, in folder order."""
    return [read_run(path.parent) for root in roots for path in sorted(Path(root).rglob("results.json"))]


def merge_reruns(runs: list[dict]) -> list[dict]:
    """Runs with the same config count once: the latest results.json wins, and `merged` says how many it stands
    for."""
    latest: dict[str, dict] = {}
    for data in runs:
        key = _identity(data.get("config", {}))
        if key in latest:
            data = {**data, "merged": latest[key].get("merged", 1) + 1}
            if data["mtime"] < latest[key]["mtime"]:
                data = {**latest[key], "merged": data["merged"]}
        latest[key] = data
    return sorted(latest.values(), key=lambda r: r["path"])


def find_results(roots: list[Path]) -> list[dict]:
    """Every run below the roots, a rerun counted once (`merge_reruns`)."""
    return merge_reruns(all_runs(roots))


# ---- choosing runs, and the CSV of them ------------------------------------------------------------------------------


def options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group: the names of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def overrides(r: dict) -> list[str]:
    """The command-line overrides that made a run, as its results.json recorded them; for a run that predates that
    record, its .hydra/overrides.yaml (second best: every later command on the folder rewrites it)."""
    recorded = (r["config"].get("hydra") or {}).get("overrides")
    if recorded is not None:
        return list(recorded)
    path = Path(r["path"]) / ".hydra" / "overrides.yaml"
    return [str(a) for a in yaml.safe_load(path.read_text()) or []] if path.exists() else []


# Overrides that say where a run wrote and how it logged, not what it ran.
NOT_RECIPE_OVERRIDES = ("seed=", "memory=", "logger=", "trainer.progress=", "hydra.")


def shared_overrides(runs: list[dict]) -> list[str]:
    """The command-line overrides every run of a recipe was made with, in the first run's order, leaving out its
    seed, memory and where it wrote."""
    first = [a for a in overrides(runs[0]) if not a.startswith(NOT_RECIPE_OVERRIDES)]
    return [a for a in first if all(a in overrides(r) for r in runs[1:])]


def experiment_of(r: dict) -> str | None:
    """The experiment a run was made with (Hydra's choice, else its experiment= override), or None."""
    choices = (r["config"].get("hydra") or {}).get("choices") or {}
    if "experiment" in choices:
        return choices["experiment"]
    return next((a.split("=", 1)[1] for a in overrides(r) if a.startswith("experiment=")), None)


def select(runs: list[dict], task: str | None = None, experiment: str | None = None,
           only: list[str] | None = None) -> list[dict]:
    """The runs of `task`, made with `experiment`, whose folder matches one of the `only` patterns: each a glob
    matched anywhere in the path, so a plain word matches as a substring (`mini`, `table2*/tiny-linear`).
    None or empty: no filter."""
    return [r for r in runs
            if (task is None or r["config"]["task"]["name"] == task)
            and (experiment is None or experiment_of(r) == experiment)
            and (not only or any(fnmatch.fnmatch(r["path"], f"*{pattern}*") for pattern in only))]


def csv_table(runs: list[dict]) -> str:
    """One CSV row per run: its folder, task, model and memory, then one column per override key (empty where a
    run did not set it) and one per numeric metric (`val/ppl`, `passkey/acc`, ...)."""
    rows, metrics = [], set()
    for r in runs:
        c = r["config"]
        row = {"path": r["path"], "task": c["task"]["name"], "model": c["model"]["name"],
               "memory": c["memory"]["name"]}
        for arg in overrides(r):
            key, _, value = arg.lstrip("+~").partition("=")
            row[key] = value
        numbers = {k: v for k, v in r["results"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics |= set(numbers)
        rows.append({**row, **numbers})
    fixed = ["path", "task", "model", "memory"]
    keys = sorted({k for row in rows for k in row} - set(fixed) - metrics)
    text = io.StringIO()
    writer = csv.DictWriter(text, fixed + keys + sorted(metrics), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


# ---- a run as a table shows it ---------------------------------------------------------------------------------------


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x):
    return None if x is None else 100 * x


def sources(results: dict) -> dict[str, str]:
    """`data/source` as {data set asked for: data set used}: "pg19=embedded_pg19, c4=None", or a bare name."""
    text = str(results.get("data/source") or "")
    if not text:
        return {}
    if "=" not in text:
        return {text: text}
    return dict(part.strip().split("=", 1) for part in text.split(","))


def fallbacks(results: dict) -> list[str]:
    """The hub data sets a run asked for but did not get ("pg19 -> embedded_pg19", "c4 -> left out")."""
    return [f"{asked} -> {'left out' if used in ('None', '') else used}" for asked, used in sources(results).items()
            if asked != used]


def command(r: dict) -> str:
    """The command that made a run (as run.py recorded it), else the one that would."""
    c = r["config"]
    if (c.get("hydra") or {}).get("command"):
        return c["hydra"]["command"]
    return f"python run.py task={c['task']['name']} model={c['model']['name']} memory={c['memory']['name']}"


def _link(r: dict, out: Path | None) -> str:
    """The W&B run online, else its offline folder (for `wandb sync`), else the run folder."""
    w = r.get("wandb") or {}
    if w.get("url"):
        return f"[W&B]({w['url']})"
    target = Path(w.get("dir") or r["path"])
    rel = os.path.relpath(target, out.parent) if out is not None else str(target)
    return f"[{'W&B offline' if w.get('dir') else 'run'}]({rel})"


def _scale(r: dict, steps: str | None = None) -> str:
    """Model, its size, the training sequence in segments, and the steps (`steps` in place of r's own: a range)."""
    c, res = r["config"], r["results"]
    seq = c["task"].get("seq_len") or c["task"].get("train_input_len")
    n = c["model"].get("segment_len")
    parts = [c["model"]["name"]]
    if res.get("model/params"):
        parts.append(f"{res['model/params'] / 1e6:.1f}M params")
    if seq and n:
        parts.append(f"{seq // n} x {n} tokens")
    parts.append(f"{steps or res.get('train/steps') or 0} steps")
    if r.get("merged", 1) > 1:
        parts.append(f"latest of {r['merged']} runs")
    return ", ".join(parts)


def _ours(r: dict, out: Path | None) -> str:
    return f"`{command(r)}`<br>{_scale(r)}; {_link(r, out)}"


def _by_task(results: list[dict], task: str) -> list[dict]:
    return [r for r in results if r["config"]["task"]["name"] == task]


def _split(res: dict) -> str:
    return "test" if "test/ppl" in res else "val"


def footprint(res: dict) -> tuple[int | None, int | None, int | None]:
    """(the paper's formula in floats, the floats our state carries, its bytes), from the footprint keys the run
    wrote, or the formula alone (model/memory_floats) from runs that predate them."""
    paper = res.get("footprint/paper_floats", res.get("model/memory_floats"))
    return paper, res.get("footprint/state_floats"), res.get("footprint/state_bytes")
