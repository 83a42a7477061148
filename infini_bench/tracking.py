"""Run outputs: metrics.jsonl, results.json (atomic), images, and W&B (offline unless set up otherwise)."""
from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from infini_bench.errors import check_choice
from infini_bench.files import atomic_write_text

LOGGER_MODES = ("offline", "online", "disabled")


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _git(*args: str) -> str | None:
    """A git command's output in this checkout, or None (no git, or not a clone)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> tuple[str | None, bool | None]:
    """(the checkout's git commit, whether tracked files differ from it), or (None, None) outside a clone."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, None if status is None else bool(status)


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a run's numbers: the code (git commit, and whether the tree had uncommitted changes),
    the versions, the device and the time the results were written."""
    import platform

    commit, dirty = code_version()
    return {"git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


STEP = "trainer/step"  # every W&B panel's x axis (define_metric), logged beside each row
RUN_ID_FILE = "wandb_run_id"  # in the run folder: a rerun of the same command continues the same W&B run


class Run:
    """One run's outputs under `out_dir`. Metric names are `split/metric`, the same in every sink.

    W&B gets a name, group, job type and tags from the config (`config["hydra"]`, when run.py adds it, says
    which choices and overrides made the run); its own step counter only ever grows, and each row carries
    `trainer/step` as its x axis, so a row logged late (a table after the final metrics, a resumed run going
    over steps again) is never dropped.
    """

    def __init__(self, out_dir: Path, config: dict, logger: dict | None = None, device: str | None = None,
                 is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.is_main = is_main
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._wandb = None
        self.logger = dict(logger or {})
        wandb_backend = self.logger.get("backend", "none") == "wandb"
        if wandb_backend:  # checked before wandb.init, so no failed W&B run
            check_choice("logger.mode", self.logger.get("mode", "offline"), LOGGER_MODES)
        if is_main and wandb_backend and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=self.logger.get("project", "infini-bench"), entity=self.logger.get("entity"),
                mode=self.logger.get("mode", "offline"), dir=str(self.out_dir), config=config, resume="allow",
                id=self._run_id(), **wandb_identity(config, self.logger),
            )
            self._wandb.define_metric(STEP)
            self._wandb.define_metric("*", step_metric=STEP, step_sync=True)

    def _run_id(self) -> str:
        """The W&B run id kept in the run folder: a rerun resumes it; trainer.resume=false starts a new one."""
        path = self.out_dir / RUN_ID_FILE
        resume = (self.config.get("trainer") or {}).get("resume", True)
        if path.exists() and resume and not self.logger.get("id"):
            return path.read_text().strip()
        run_id = self.logger.get("id") or secrets.token_hex(6)
        atomic_write_text(path, run_id + "\n")
        return run_id

    def _wandb_log(self, row: dict, step: int | None) -> None:
        self._wandb.log(row if step is None else {**row, STEP: step})

    def log(self, metrics: dict[str, float], step: int | None = None, to_wandb: bool = True,
            file_only: dict[str, float] | None = None) -> None:
        """A row of metrics.jsonl, and of W&B unless `to_wandb` is false (values too many for a panel each, which
        W&B gets as a table instead); `file_only` joins the file's row and never W&B."""
        if not self.is_main:
            return
        row = {"step": step, **{k: float(v) for k, v in {**metrics, **(file_only or {})}.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        if self._wandb is not None and to_wandb:
            self._wandb_log(metrics, step)

    def metrics_rows(self) -> int:
        """How many rows metrics.jsonl holds (a checkpoint records it, so a resume can drop the rows after)."""
        if not self.is_main or not self.metrics_path.exists():
            return 0
        return sum(1 for line in self.metrics_path.read_text().splitlines() if line.strip())

    def truncate_metrics(self, after_step: int, rows: int | None = None) -> None:
        """Keep the first `rows` rows (the rows a checkpoint recorded), else drop the rows logged after
        `after_step`: a resumed or restarted run logs them again, and no step may appear twice."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        if rows is not None:
            kept = kept[:rows]
        else:
            kept = [line for line in kept
                    if json.loads(line).get("step") is None or json.loads(line)["step"] <= after_step]
        atomic_write_text(self.metrics_path, "".join(r + "\n" for r in kept))

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self.is_main and self._wandb is not None:
            import wandb

            self._wandb_log({key: wandb.Image(str(path))}, step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
                  save: bool = True) -> None:
        """A table to W&B and, when `save`, to tables/<key>.json (the last one logged under the key)."""
        if not self.is_main:
            return
        if save:
            write_json(self.out_dir / "tables" / f"{key.replace('/', '_')}.json", {"columns": columns, "rows": rows})
        if self._wandb is not None:
            import wandb

            self._wandb_log({key: wandb.Table(columns=columns, data=rows)}, step)

    def finish(self, results: dict) -> None:
        """Write results.json (atomically, with the resolved config and where the W&B run is), draw the loss
        curves, and close W&B with the results in its summary and results.json as an artifact."""
        if not self.is_main:
            return
        from infini_bench.plots import loss_curves

        if self.metrics_path.exists():
            loss_curves(read_metrics(self.metrics_path), self.out_dir / "loss_curves.png",
                        title=str(self.config.get("name", "")))
        record = {"config": self.config, "results": results, "environment": environment(self.device)}
        if self._wandb is not None:
            record["wandb"] = {"id": self._wandb.id, "project": self._wandb.project, "url": self._wandb.url,
                               "dir": str(Path(self._wandb.dir).parent)}
        write_json(self.out_dir / "results.json", record)
        if self._wandb is None:
            return
        import wandb

        self._wandb.summary.update(wandb_summary(results))
        if (self.out_dir / "loss_curves.png").exists():
            self._wandb_log({"train/loss_curves": wandb.Image(str(self.out_dir / "loss_curves.png"))}, None)
        artifact = wandb.Artifact(f"results-{self._wandb.id}", type="results")
        artifact.add_file(str(self.out_dir / "results.json"))
        self._wandb.log_artifact(artifact)
        weights = self.out_dir / "model.safetensors"
        if self.logger.get("log_model") and weights.exists():
            model = wandb.Artifact(f"model-{self._wandb.id}", type="model")
            model.add_file(str(weights))
            self._wandb.log_artifact(model)
        self._wandb.finish()


def wandb_identity(config: dict, logger: dict) -> dict:
    """W&B's name, group, job_type and tags for a run, unless logger.* sets them: the name from the run's
    overrides, the group from its experiment or sweep, the job type from its task, tags for the memory, model
    and segment length."""
    hydra = config.get("hydra") or {}
    task = (config.get("task") or {}).get("name")
    memory = (config.get("memory") or {}).get("name")
    model = config.get("model") or {}
    choices = hydra.get("choices") or {}
    shown = [o for o in hydra.get("overrides", []) if o.split("=")[0].lstrip("+~") not in ("task", "model", "memory")]
    name = " ".join(x for x in (task, config.get("name"), *shown) if x)
    group = choices.get("experiment") or hydra.get("sweep")
    tags = [f"memory={memory}", f"model={model.get('name')}", f"N={model.get('segment_len')}"]
    return {"name": logger.get("name") or name or None, "group": logger.get("group") or group,
            "job_type": logger.get("job_type") or task, "tags": tags + list(logger.get("tags") or [])}


def wandb_summary(results: dict) -> dict:
    """The final results as W&B summary values: numbers and text as they are, lists as tables."""
    import wandb

    out = {}
    for key, value in results.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(c for row in value for c in row))
            out[key] = wandb.Table(columns=columns, data=[[_jsonable(row.get(c)) for c in columns] for row in value])
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out[key] = wandb.Table(columns=["index", "value"], data=[[i, v] for i, v in enumerate(value)])
    return out


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
