"""Faults in what a run reads and writes: bad values, corrupt or crafted checkpoints and token records, disks."""
import hashlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from infini_bench.errors import ConfigError
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.tracking import Run, write_json
from infini_bench.train import TrainConfig, train
from test_faults import ENV, ROOT, TINY_LM, cli, setup


# 8. Every trainer value is checked.
@pytest.mark.parametrize("key, value", [("grad_clip", 0), ("warmup_steps", -5), ("lr", float("nan")),
                                        ("gate_lr", float("inf")), ("batch_size", 2.5), ("min_lr_ratio", 2.0),
                                        ("weight_decay", -0.1), ("betas", (0.9, 1.0)), ("seed", -1)])
def test_bad_trainer_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^trainer\.{key}: "):
        TrainConfig(**{key: value})


# 9. Checksums: a checkpoint with zeroed bytes is refused.
def test_checkpoint_with_zeroed_bytes_is_refused(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "last" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    shard.write_bytes(bytes(data))
    model, stream, run, cfg = setup(tmp_path, steps=3)
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .*__0_0\.distcp does not match its recorded checksum; "
                                          r"trainer\.resume=false starts over$"):
        train(model, cfg, stream, run, tmp_path / "ckpt")


# 10. A crafted .metadata (its checksum recorded too) never runs.
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_crafted_checkpoint_metadata_is_refused_and_runs_nothing(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    last, marker = tmp_path / "ckpt" / "last", tmp_path / "marker"
    (last / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    manifest = last / "checksums.json"  # the attacker records the crafted file's checksum too
    if manifest.exists():
        sums = json.loads(manifest.read_text())
        sums[".metadata"] = hashlib.sha256((last / ".metadata").read_bytes()).hexdigest()
        manifest.write_text(json.dumps(sums))
    assert "builtins.exec" in _resume_refusal(tmp_path, marker)


def _resume_refusal(tmp_path, marker: Path) -> str:
    """Resume from the tampered checkpoint in tmp_path/ckpt: the one-line refusal, with nothing run."""
    model, stream, run, cfg = setup(tmp_path, steps=3)
    with pytest.raises(ConfigError) as err:
        train(model, cfg, stream, run, tmp_path / "ckpt")
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.resume: ")
    return message


def test_crafted_optimizer_state_in_the_shards_is_refused_and_runs_nothing(tmp_path):
    """The shards' non-tensor entries (the optimizer's lr, betas, group names) are pickles too: one that names
    a callable, re-saved with dcp.save and every checksum rewritten, is refused with one line on resume."""
    import torch.distributed.checkpoint as dcp

    from infini_bench.checkpoint import MANIFEST, _single_process_ok, _state
    from infini_bench.train import make_optimizer

    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    last, marker = tmp_path / "ckpt" / "last", tmp_path / "marker"
    optimizer = make_optimizer(model, cfg)
    optimizer.param_groups[0]["name"] = _Payload(marker)
    state = _state(model, optimizer)
    for path in last.glob("*.distcp"):
        path.unlink()
    (last / ".metadata").unlink()
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(last), no_dist=True)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in last.iterdir()
            if p.is_file() and p.name != MANIFEST}
    (last / MANIFEST).write_text(json.dumps(sums))  # the attacker records every new checksum
    assert "not plain data" in _resume_refusal(tmp_path, marker)


def test_output_files_follow_the_umask(tmp_path):
    """results.json, every PNG and the exported weights: 0644 under umask 022, 0600 under 077."""
    from types import SimpleNamespace

    from infini_bench.plots import line_plot
    from tasks.common import export_weights

    model = build_model("tiny", n_layers=1)
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / oct(mask)
        old = os.umask(mask)
        try:
            write_json(out / "results.json", {"a": 1})
            line_plot({"a": [1.0, 2.0]}, out / "plot.png", "x", "y", "t")
            export_weights(model, SimpleNamespace(out_dir=out, is_main=True))
        finally:
            os.umask(old)
        for name in ("results.json", "plot.png", "model.safetensors"):
            assert (out / name).stat().st_mode & 0o777 == mode, (name, oct(mask))


def test_a_corrupt_token_record_names_trainer_resume(tmp_path):
    from hydra import compose, initialize_config_dir

    from infini_bench.token_cache import TokenCache
    from tasks.lm import prepared_stream

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=lm"])
    record = tmp_path / "run" / "train_tokens.json"
    record.parent.mkdir()
    record.write_text('{"recipe": {"mix": ')  # torn
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .*train_tokens\.json is corrupt .*trainer\.resume=false"):
        prepared_stream(cfg.task, {"embedded_pg19": 1.0}, 0, ByteTokenizer(), 2, 0, TokenCache(tmp_path / "cache"),
                        record, fresh=False)


def test_lm_runs_keep_one_copy_of_their_tokens_in_the_shared_cache(tmp_path):
    """Two runs of the same data and tokenizer: one cache entry, written once; each run folder keeps only the
    record naming it."""
    env = {**ENV, "INFINI_BENCH_CACHE": str(tmp_path / "cache")}
    assert cli(*TINY_LM, out=tmp_path / "a", env=env).returncode == 0
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    written = entry.stat().st_mtime_ns
    proc = cli(*TINY_LM, "memory=none", out=tmp_path / "b", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "cache" / "tokens").iterdir()) == [entry] and entry.stat().st_mtime_ns == written
    for run in "ab":
        assert not (tmp_path / run / "train_tokens.pt").exists()
        record = json.loads((tmp_path / run / "train_tokens.json").read_text())
        assert record["streams"]["embedded_pg19"]["file"] == str(entry)
    assert "read from the token cache" in (tmp_path / "b" / "run.log").read_text()


def test_a_full_disk_while_caching_the_tokens_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    import tasks.lm as lm
    from infini_bench.errors import ResourceError
    from infini_bench.token_cache import TokenCache

    def full_disk(obj, path):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0: No space left")

    monkeypatch.setattr(torch, "save", full_disk)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=lm", "task.seq_len=64"])
    cache, record = TokenCache(tmp_path / "cache"), tmp_path / "run" / "train_tokens.json"
    with pytest.raises(ResourceError, match=r"cache/embedded_pg19-\w+\.pt could not be written .*No space left.*"
                                            r"free disk space there or point cache_dir at another folder"):
        lm.prepared_stream(cfg.task, {"embedded_pg19": 1.0}, 0, ByteTokenizer(), 2, 0, cache, record, fresh=True)
    assert list(cache.root.iterdir()) == []  # neither the entry nor its temporary file
    assert not record.exists()  # and no record naming an entry that is not there


def test_results_say_which_code_versions_and_device_made_them(tmp_path, monkeypatch):
    from infini_bench import tracking

    Run(tmp_path / "here", {}, device="cpu").finish({"val/ppl": 2.0})
    env = json.loads((tmp_path / "here" / "results.json").read_text())["environment"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True,
                          text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert env["torch"] == torch.__version__ and env["device"] and env["finished_utc"].endswith("Z")
    assert isinstance(env["git_dirty"], bool) or env["git_commit"] is None
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    Run(tmp_path / "nogit", {}, device="cpu").finish({})  # no git on the machine: recorded as unknown
    env = json.loads((tmp_path / "nogit" / "results.json").read_text())["environment"]
    assert env["git_commit"] is None and env["git_dirty"] is None

