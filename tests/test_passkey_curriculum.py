"""The passkey curricula (keys and prompt lengths growing over training) and accuracy by key-question distance."""
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from infini_bench.errors import ConfigError
from infini_bench.tokenizer import ByteTokenizer
from tasks.passkey import check_config
from tasks.passkey_data import Outcome, PasskeyBatches, by_distance

ROOT = Path(__file__).resolve().parents[1]

TOK = ByteTokenizer()


def keys_of(batch: dict) -> list[int]:
    return [int(TOK.decode(row.tolist()).split("The pass key is ")[1].split(".")[0]) for row in batch["input_ids"]]


def test_keys_grow_from_one_digit_to_the_full_range():
    batches = PasskeyBatches(TOK, (300, 300), batch_size=8, seed=3, key_range=(1, 50000), key_ramp=10)
    assert batches.keys(0) == (1, 9) and batches.keys(10) == batches.keys(99) == (1, 50000)
    assert batches.keys(5) == (1, round(9 * (50000 / 9) ** 0.5))  # log-uniform: halfway in digits
    uppers = [batches.keys(i)[1] for i in range(11)]
    assert uppers == sorted(uppers)
    assert all(1 <= k <= 9 for k in keys_of(batches(0)))
    assert all(1 <= k <= batches.keys(5)[1] for k in keys_of(batches(5)))


def test_lengths_move_to_the_end_range_and_then_match_a_batch_without_curriculum():
    ramped = PasskeyBatches(TOK, (300, 320), 2, seed=5, lengths_end=(600, 640), length_ramp=4, key_ramp=4,
                            key_range=(1, 50000))
    assert ramped.length_range(0) == (300, 320) and ramped.length_range(2) == (450, 480)
    assert 300 <= ramped(0)["input_ids"].shape[1] - 6 <= 330
    plain = PasskeyBatches(TOK, (600, 640), 2, seed=5, key_range=(1, 50000))
    for i in (4, 7):  # past both ramps, the batch is the one the plain stream draws
        assert torch.equal(ramped(i)["input_ids"], plain(i)["input_ids"])
        assert torch.equal(ramped(i)["labels"], plain(i)["labels"])


def test_the_length_ramp_can_wait_for_the_short_prompts_to_be_learned():
    late = PasskeyBatches(TOK, (300, 320), 2, seed=5, lengths_end=(600, 640), length_ramp=4, length_start=6)
    assert [late.length_range(i) for i in (0, 5, 6, 8, 10, 30)] == [
        (300, 320), (300, 320), (300, 320), (450, 480), (600, 640), (600, 640)]
    early = PasskeyBatches(TOK, (300, 320), 2, seed=5, lengths_end=(600, 640), length_ramp=4)
    assert all(late.length_range(i + 6) == early.length_range(i) for i in range(8))  # shifted by six
    assert torch.equal(late(10)["input_ids"], early(10)["input_ids"])  # both past their ramps


def test_accuracy_by_distance_bins_by_powers_of_two():
    rng = random.Random(0)
    outcomes = [Outcome(rng.random(), rng.random() < 0.5, "", rng.choice([0, 0, 1, 2, 3, 5, 7, 8, 100]))
                for _ in range(200)]
    rows = by_distance(outcomes)
    edges = [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (64, 127)]  # 16-63 holds none of the distances drawn
    assert [(r["segments_back_min"], r["segments_back_max"]) for r in rows] == edges
    for r, (low, high) in zip(rows, edges):
        group = [o for o in outcomes if low <= o.segments_back <= high]
        assert r["n"] == len(group)
        assert abs(r["acc"] - sum(o.token_acc for o in group) / len(group)) < 1e-12
        assert abs(r["exact"] - sum(o.exact for o in group) / len(group)) < 1e-12


@pytest.mark.parametrize("override, key", [
    ("task.key_ramp_steps=-1", "task.key_ramp_steps"), ("task.length_ramp_steps=1.5", "task.length_ramp_steps"),
    ("task.length_ramp_start=-2", "task.length_ramp_start"),
    ("task.train_lengths_end=[100,300]", "task.train_lengths_end"),
    ("task.train_lengths_end=[400,300]", "task.train_lengths_end"),
])
def test_bad_curriculum_names_the_key(override, key):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=passkey", override])
    with pytest.raises(ConfigError) as err:
        check_config(cfg.task, TOK)
    assert err.value.key == key
