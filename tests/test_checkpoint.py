"""The checkpointer on its own: a save loads back exactly, an interrupted swap keeps the old checkpoint or
finishes, damaged files are refused, and a resumed run's config is compared key by key."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from infini_bench import checkpoint
from infini_bench.checkpoint import (
    MANIFEST, Checkpointer, check_same_config, has_checkpoint, recover_run, stored_config, verify_checkpoint,
)
from infini_bench.errors import ConfigError
from infini_bench.model import build_model
from infini_bench.train import lm_loss


class Crash(Exception):
    pass


def trained(seed: int = 0, steps: int = 1):
    """A tiny model and its AdamW after `steps` steps on random tokens: every optimizer state is filled."""
    torch.manual_seed(seed)
    model = build_model("tiny", segment_len=16, n_layers=1, memory="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
        lm_loss(model, ids, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def fresh():
    torch.manual_seed(123)  # other weights than any saved model's
    model = build_model("tiny", segment_len=16, n_layers=1, memory="linear")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


RUN = SimpleNamespace(config={"memory": "linear", "trainer": {"steps": 4}}, metrics_rows=lambda: 7)


def test_save_then_load_round_trips_exactly(tmp_path):
    model, optimizer = trained()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(model, optimizer, 3, {"steps": 4}, {"train/loss": 2.5}, RUN)
    assert ckpt.exists() and ckpt.path == tmp_path / "ckpt" / "last"
    model2, optimizer2 = fresh()
    extra = ckpt.load(model2, optimizer2)
    assert extra == {"step": 3, "trainer": {"steps": 4}, "summary": {"train/loss": 2.5},
                     "config": RUN.config, "metrics_rows": 7}
    assert same_weights(model, model2)
    for a, b in zip(optimizer.state_dict()["state"].values(), optimizer2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """A crash while the new checkpoint is written, before its checksums: `last` is still the old one, and
    before the first checkpoint there is none to resume from."""
    old_model, old_opt = trained(steps=1)
    new_model, new_opt = trained(steps=2)
    ckpt = Checkpointer(tmp_path / "ckpt")
    write = checkpoint.atomic_write_text

    def dies_at_the_manifest(path: Path, text: str) -> None:
        if Path(path).name == MANIFEST:
            raise Crash
        write(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", dies_at_the_manifest)
    with pytest.raises(Crash):
        ckpt.save(old_model, old_opt, 1, {})
    ckpt.recover()
    assert not ckpt.exists() and ckpt.complete_step() is None
    monkeypatch.undo()
    ckpt.save(old_model, old_opt, 1, {})
    monkeypatch.setattr(checkpoint, "atomic_write_text", dies_at_the_manifest)
    with pytest.raises(Crash):
        ckpt.save(new_model, new_opt, 2, {})
    monkeypatch.undo()
    assert (tmp_path / "ckpt" / "last.tmp").exists()  # the half-written one, without checksums
    ckpt.recover()  # never takes an incomplete folder for the checkpoint
    assert ckpt.complete_step() == 1
    model, optimizer = fresh()
    assert ckpt.load(model, optimizer)["step"] == 1
    assert same_weights(model, old_model) and not same_weights(model, new_model)
    ckpt.save(new_model, new_opt, 2, {})  # the next save replaces the leftover
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]
    assert ckpt.load(model, optimizer)["step"] == 2


def crash_between_renames(monkeypatch) -> None:
    def fault(point: str) -> None:
        if point == "between_checkpoint_renames":
            raise Crash
    monkeypatch.setattr(checkpoint, "fault", fault)


def test_a_crash_between_the_renames_is_finished_by_recover(tmp_path, monkeypatch):
    model, optimizer = trained()
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert not ckpt.exists() and ckpt.complete_step() is None
    ckpt.save(model, optimizer, 1, {})
    crash_between_renames(monkeypatch)
    with pytest.raises(Crash):
        ckpt.save(model, optimizer, 2, {})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.old", "last.tmp"]
    assert not ckpt.exists() and ckpt.complete_step() == 2  # the newer, complete one
    ckpt.recover()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]
    assert ckpt.load(*fresh())["step"] == 2


def test_recover_run_finishes_every_phase(tmp_path, monkeypatch):
    model, optimizer = trained()
    phases = [Checkpointer.of_run(tmp_path), Checkpointer.of_run(tmp_path, "warmup")]
    assert [c.path for c in phases] == [tmp_path / "checkpoints" / "last", tmp_path / "checkpoints" / "warmup" / "last"]
    assert not has_checkpoint(tmp_path)
    for ckpt in phases:
        ckpt.save(model, optimizer, 1, {})
    crash_between_renames(monkeypatch)
    for ckpt in phases:
        with pytest.raises(Crash):
            ckpt.save(model, optimizer, 2, {})
    assert has_checkpoint(tmp_path) and not any(c.exists() for c in phases)
    recover_run(tmp_path)
    assert [c.load(*fresh())["step"] for c in phases] == [2, 2]
    assert not any(p.name.endswith((".old", ".tmp")) for p in (tmp_path / "checkpoints").rglob("*"))


@pytest.mark.parametrize("damage, refusal", [
    (lambda last: (last / "extra.json").write_text("{}"), "is corrupt: extra.json does not match"),
    (lambda last: (last / "stray").write_text(""), f"holds other files than {MANIFEST} lists"),
    (lambda last: (last / MANIFEST).unlink(), f"has no readable {MANIFEST}"),
])
def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path, damage, refusal):
    model, optimizer = trained()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(model, optimizer, 1, {})
    verify_checkpoint(ckpt.path)
    damage(ckpt.path)
    with pytest.raises(ConfigError) as err:
        ckpt.load(*fresh())
    assert err.value.key == "trainer.resume" and refusal in str(err.value) and "\n" not in str(err.value)


def test_stored_config_prefers_the_results_then_a_checkpoint(tmp_path):
    assert stored_config(tmp_path) == (None, False)
    model, optimizer = trained()
    Checkpointer.of_run(tmp_path, "warmup").save(model, optimizer, 1, {}, run=RUN)
    assert stored_config(tmp_path) == (RUN.config, False)
    (tmp_path / "results.json").write_text(json.dumps({"config": {"memory": "delta"}}))
    assert stored_config(tmp_path) == ({"memory": "delta"}, True)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^trainer.resume: .*results.json is corrupt"):
        stored_config(tmp_path)


CONFIG = {"model": {"segment_len": 32, "n_layers": 2}, "trainer": {"steps": 10, "resume": True, "progress": True,
          "time_budget_s": None}, "task": {"train_segments": None}, "logger": {"name": "none"}, "seed": 0}


def changed(**keys) -> dict:
    config = json.loads(json.dumps(CONFIG))
    for key, value in keys.items():
        group, _, field = key.partition("__")
        if field:
            config[group][field] = value
        else:
            config[group] = value
    return config


def test_a_config_mismatch_names_the_differing_key_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_same_config(changed(model__segment_len=64), CONFIG, tmp_path)
    assert err.value.key == "model.segment_len"
    assert str(err.value) == (f"model.segment_len: 64 differs from 32, which the run in {tmp_path} used; "
                              "trainer.resume=false starts it over, or pick another hydra.run.dir")
    with pytest.raises(ConfigError, match=r"^model.n_layers: 3 differs from 2, .* used \(and 1 more\);") as err:
        check_same_config(changed(model__segment_len=64, model__n_layers=3), CONFIG, tmp_path)
    assert "\n" not in str(err.value)


def test_keys_that_train_nothing_may_change_and_more_steps_extend(tmp_path):
    assert check_same_config(changed(trainer__resume=False, trainer__progress=False, logger={"name": "wandb"}),
                             CONFIG, tmp_path) is None
    assert check_same_config(changed(trainer__steps=20), CONFIG, tmp_path) == 10
    with pytest.raises(ConfigError, match=r"^trainer.steps: 5 is fewer than the 10 steps"):
        check_same_config(changed(trainer__steps=5), CONFIG, tmp_path)
    budget = changed(trainer__time_budget_s=60.0)  # the budget decides the length: more steps extend nothing
    with pytest.raises(ConfigError, match=r"^trainer.steps: 20 differs from 10"):
        check_same_config({**budget, "trainer": {**budget["trainer"], "steps": 20}},
                          {**budget, "trainer": {**budget["trainer"], "steps": 10}}, tmp_path)
