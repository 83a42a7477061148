"""Run outputs: metrics.jsonl, results.json (atomic), images, and W&B (offline unless set up otherwise)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a result file follows the umask like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


class Run:
    """One run's outputs under `out_dir`. Metric names are `split/metric`, the same in every sink."""

    def __init__(self, out_dir: Path, config: dict, logger: dict | None = None, device: str | None = None,
                 is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.is_main = is_main
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._wandb = None
        logger = logger or {}
        if is_main and logger.get("backend", "none") == "wandb" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=logger.get("project", "infini-bench"), entity=logger.get("entity"),
                name=logger.get("name"), mode=logger.get("mode", "offline"), dir=str(self.out_dir),
                config=config, resume="allow", id=logger.get("id"), tags=list(logger.get("tags") or []),
            )

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

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

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        if not self.is_main:
            return
        write_json(self.out_dir / "tables" / f"{key.replace('/', '_')}.json", {"columns": columns, "rows": rows})
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self, results: dict) -> None:
        """Write results.json (atomically, with the resolved config) and close W&B."""
        if self.is_main:
            write_json(self.out_dir / "results.json", {"config": self.config, "results": results})
            if self._wandb is not None:
                self._wandb.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
                self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
