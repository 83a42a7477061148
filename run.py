"""infini-bench command line: `python run.py task=passkey model=tiny memory=delta model.segment_len=64`.

Bad input (an unknown option, a bad value) gets one line naming the key and the accepted values, exit code 2,
and no results written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent / "conf"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra does, to turn its multi-line errors into one line.

    A sweep (`python run.py -m memory=linear,none model.segment_len=range(32,97,32)`) is checked one value at
    a time: every group choice it names must exist and the config must compose with each value. Values only a
    job can judge (a segment length the model rejects) the job checks, with the same one line. Sweeps the
    sweeper draws itself (`interval(...)`, for Optuna and the like) are left to it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    multirun = bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(argv))
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not a.startswith("hydra")]
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        fail(str(err).strip().splitlines()[0])
    fixed, sweeps = [], []  # sweeps: one list of single-valued overrides per swept key
    for arg, override in zip(overrides, parsed):
        key, prefix = override.key_or_group, arg[: len(arg) - len(arg.lstrip("+~"))]
        if not override.is_sweep_override():
            values, fixed = [arg.partition("=")[2]], fixed + [arg]
        elif not multirun:
            fail(f"{key}: {arg.partition('=')[2]!r} is a sweep; run it with -m (python run.py -m {arg})")
        elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
            values = list(override.sweep_string_iterator())
        elif override.value_type == ValueType.GLOB_CHOICE_SWEEP and key in groups:
            values = override.value().filter(groups[key])
        else:
            values = []
        if override.is_sweep_override() and values:
            sweeps.append([f"{prefix}{key}={v}" for v in values])
        for value in values if key in groups and not override.is_delete() else ():
            if value not in groups[key] and value != "null":
                fail(f"{key}={value!r} is not one of {', '.join(groups[key])}")
    firsts = [values[0] for values in sweeps]
    variants = [fixed + firsts] + [fixed + firsts[:i] + [v] + firsts[i + 1:]
                                   for i, values in enumerate(sweeps) for v in values[1:]]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for variant in variants:
                compose("config", overrides=variant)
    except HydraException as err:
        fail(str(err).strip().splitlines()[0])
    except Exception as err:  # e.g. an override that is not valid Hydra syntax
        fail(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")


def hydra_info() -> dict:
    """What Hydra chose and was told, for W&B's config and the report: the group choices, the overrides, the
    command that reruns the run, and in a sweep the sweep's own arguments (W&B's group)."""
    hc = HydraConfig.get()
    info = {"choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "overrides": list(hc.overrides.task), "command": " ".join(["python run.py", *hc.overrides.task]),
            "mode": hc.mode.name if hc.mode is not None else "RUN"}
    if info["mode"] == "MULTIRUN":
        swept = [a for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "hydra"))]
        info["sweep"] = " ".join(swept)[:120] if swept else hc.sweep.dir  # another launcher's argv is not ours
    return info


def print_results(out_dir: Path, config: dict) -> None:
    """The results table a run ends with, and a line to the log file."""
    import logging

    from infini_bench.report import results_table

    text = results_table(json.loads((out_dir / "results.json").read_text()), out_dir)
    print(text)
    logging.getLogger("run").info("results: %s", out_dir / "results.json")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from infini_bench.errors import ConfigError
    from infini_bench.tracking import Run
    from infini_bench.train import TrainingDiverged
    from tasks import get_task

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    had_results = any(out_dir.glob("checkpoints/*")) or (out_dir / "results.json").exists()
    run = None
    try:
        OmegaConf.resolve(cfg)
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"{cfg.device!r} is not one of auto, cpu, cuda")
        task = get_task(cfg.task.name)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["hydra"] = hydra_info()
        from infini_bench.distributed import init_distributed

        info = init_distributed()  # torchrun: one process per GPU, each on its own device; else a no-op
        device = str(info.device) if info.world_size > 1 else (None if cfg.device == "auto" else cfg.device)
        run = Run(out_dir, config, dict(cfg.logger), device=device, is_main=info.is_main)
        results = task.run_task(cfg, run)
        run.finish(results)
        if run.is_main:
            print_results(out_dir, config)
    except ConfigError as err:
        if not had_results:  # nothing of value was written: leave no half-made run folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        fail(str(err))
    except TrainingDiverged as err:
        fail(str(err), code=1)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
