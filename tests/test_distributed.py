"""FSDP2 on 2 gloo CPU processes == one process on the same global batch; DCP checkpoints change world size.

Run as a script under torchrun, this file is the 2-rank worker; under pytest it launches that worker and
recomputes everything in one plain process (full logits, no FSDP, no chunked loss) to compare.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from infini_bench.data import TokenStream, embedded_documents
from infini_bench.checkpoint import load_checkpoint, save_checkpoint
from infini_bench.distributed import (
    DistInfo, all_reduce_mean, cleanup, full_tensor, init_distributed, main_first, shard_model,
)
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.train import lm_loss
from tasks.common import export_weights, load_weights

STEPS, GLOBAL_BATCH, T = 3, 4, 48


def tiny_model():
    torch.manual_seed(0)
    # Tied embeddings: the root FSDP unit must keep embed and lm_head one parameter.
    return build_model("tiny", segment_len=16, memory="delta", tie_embeddings=True)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def batch(step):
    """A few fixed sequences in turn, so that the loss falls within a few steps."""
    x = torch.randint(0, 259, (GLOBAL_BATCH, T + 1), generator=torch.Generator().manual_seed(step % 2))
    return x[:, :-1], x[:, 1:]


def plain_step(model, optimizer, step):
    """The reference: the whole global batch in one process, full logits, plain cross-entropy."""
    ids, labels = batch(step)
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), norm.item()


def my_rows(info: DistInfo) -> slice:
    per_rank = GLOBAL_BATCH // info.world_size
    return slice(info.rank * per_rank, (info.rank + 1) * per_rank)


def sharded_step(model, optimizer, step, info: DistInfo):
    """This rank's half of the global batch, chunked loss; FSDP averages the gradients over ranks."""
    ids, labels = batch(step)
    rows = my_rows(info)
    loss = lm_loss(model, ids[rows], labels[rows], chunk_tokens=40)  # 40 does not divide 96: ragged
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # over DTensor shards: the global norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_mean(loss.detach()).item(), full_tensor(norm).item()


def worker(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    info = init_distributed()
    torch.set_num_threads(1)
    model = shard_model(tiny_model(), param_dtype=None, activation_checkpointing=True)
    optimizer = make_optimizer(model)
    losses = [sharded_step(model, optimizer, step, info) for step in range(STEPS)]
    save_checkpoint(out / "ckpt", model, optimizer, extra={"step": STEPS})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    export_weights(model, SimpleNamespace(out_dir=out, is_main=info.is_main))  # for model.init_from
    after = sharded_step(model, optimizer, STEPS, info)  # the step a resumed run must reproduce
    bf16 = shard_model(tiny_model(), param_dtype=torch.bfloat16, activation_checkpointing=False)
    ids, labels = batch(0)
    with torch.no_grad():
        bf16_loss = all_reduce_mean(lm_loss(bf16, ids[my_rows(info)], labels[my_rows(info)])).item()
    # What the blocks receive when streaming: the memory must stay fp32 (docs/PAPER_NOTES.md, pitfall 4).
    state_dtypes = []
    bf16.layers[1].register_forward_pre_hook(
        lambda _, args: state_dtypes.append(args[1].M.dtype) if args[1] is not None else None)
    bf16.stream(ids[my_rows(info)])
    data_prep_checks(out, info)
    decoding_checks(out, info)
    if info.is_main:
        torch.save({"losses": losses, "after": after, "model": full, "bf16_loss": bf16_loss,
                    "state_dtypes": state_dtypes, "tied": model.lm_head.weight is model.embed.weight}, out / "dist.pt")
    cleanup()


def data_prep_checks(out: Path, info: DistInfo) -> None:
    """Rank 0 alone prepares data while rank 1 waits; an error there stops both; both train on one token file."""
    from omegaconf import OmegaConf

    from infini_bench.token_cache import TokenCache
    from tasks.lm import prepared_stream

    result = main_first(lambda: (out / f"built_by_rank{info.rank}").write_text("") or "done")
    try:
        main_first(lambda: 1 / 0)
        raised = False
    except ZeroDivisionError:
        raised = True
    t = OmegaConf.create({"dataset": "embedded_math", "seq_len": 32, "max_train_docs": 1, "fallback_offline": True})
    stream, _ = prepared_stream(t, {"embedded_math": 1.0}, 0, ByteTokenizer(), 4, 0, TokenCache(out / "cache"),
                                out / "train_tokens.json", fresh=False)
    torch.save({"result": result, "raised": raised, "batch": stream(3)["input_ids"]}, out / f"prep{info.rank}.pt")


def decoding_checks(out: Path, info: DistInfo) -> None:
    """Passkey scoring and generation under FSDP: they call the blocks' parts directly (cached decoding), so
    they run inside gathered(); afterwards the model is sharded again and trains on."""
    from infini_bench.distributed import gathered
    from infini_bench.generate import generate
    from tasks.passkey import evaluate_samples
    from tasks.passkey_data import make_sample

    model = shard_model(tiny_model(), param_dtype=None, activation_checkpointing=False)
    optimizer = make_optimizer(model)
    model.eval()
    samples = [make_sample(300, 0.0, i, ByteTokenizer(), key_range=(1, 9)) for i in range(2)]
    with gathered(model) as whole, torch.no_grad():
        outcomes = evaluate_samples(whole, samples, ByteTokenizer())
        text = generate(whole, torch.tensor([[1, 2, 3]]), max_new_tokens=20, greedy=True).tokens
    resharded = all(hasattr(p, "full_tensor") for p in model.parameters())
    model.train()
    after = sharded_step(model, optimizer, 0, info)  # training goes on after decoding
    torch.save({"acc": [o.token_acc for o in outcomes], "text": text, "resharded": resharded, "step": after},
               out / f"decode{info.rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank worker's outputs: 15-35 s on 2 shared cores, so the tests that use it are marked slow."""
    out = tmp_path_factory.mktemp("dist")
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, torch.load(out / "dist.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference():
    model = tiny_model()
    optimizer = make_optimizer(model)
    losses = [plain_step(model, optimizer, step) for step in range(STEPS)]
    return model, optimizer, losses


@pytest.mark.slow
def test_fsdp_losses_equal_single_process(two_ranks, reference):
    _, dist_out = two_ranks
    model, _, losses = reference
    assert dist_out["tied"]
    # (loss, gradient norm) per step; the norm catches gradients summed instead of averaged over ranks,
    # which Adam's scale invariance would hide from the losses and weights.
    torch.testing.assert_close(dist_out["losses"], losses, rtol=1e-5, atol=1e-5)
    assert losses[-1][0] < losses[0][0]  # the steps did train
    for name, p in model.state_dict().items():
        # Adam divides by sqrt(v): fp32 reduction-order noise in near-zero gradients moves a few weights
        # by ~1e-4, a hundredth of one step (lr 1e-2); a wrong gradient moves them by whole steps.
        diff = (dist_out["model"][name] - p).abs().max().item()
        assert diff <= 1e-3, f"{name}: max |difference| {diff:.2e}"


@pytest.mark.slow
def test_bf16_mixed_precision_close_to_fp32(two_ranks, reference):
    _, dist_out = two_ranks
    model = tiny_model()
    ids, labels = batch(0)
    with torch.no_grad():
        fp32 = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten()).item()
    assert dist_out["bf16_loss"] != fp32  # it did compute in bf16
    assert dist_out["state_dtypes"] == [torch.float32] * (T // 16 - 1)  # the memory stayed fp32 between segments
    assert abs(dist_out["bf16_loss"] - fp32) < 2e-2 * fp32


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_in_one_process(two_ranks, reference):
    out, dist_out = two_ranks
    ref_model, ref_opt = copy.deepcopy(reference[:2])  # stepped below; the fixture stays at step STEPS
    model = tiny_model()
    optimizer = make_optimizer(model)
    extra = load_checkpoint(out / "ckpt", model, optimizer)
    assert extra == {"step": STEPS}
    assert json.loads((out / "ckpt" / "extra.json").read_text()) == extra
    assert not (out / "ckpt.tmp").exists()
    assert model.lm_head.weight is model.embed.weight
    for name, p in model.state_dict().items():  # the same numbers the 2 ranks held, gathered
        assert torch.equal(p, dist_out["model"][name]), name
    ref_state = ref_opt.state_dict()["state"]
    for i, state in optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[i][key], rtol=1e-4, atol=1e-6)
        assert float(state["step"]) == STEPS
    resumed = plain_step(model, optimizer, STEPS)
    torch.testing.assert_close(resumed, plain_step(ref_model, ref_opt, STEPS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed, dist_out["after"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rank0_prepares_data_and_both_ranks_read_it(two_ranks):
    out, _ = two_ranks
    ranks = [torch.load(out / f"prep{r}.pt", weights_only=False) for r in range(2)]
    assert [r["result"] for r in ranks] == ["done", None]  # rank 1 waited and got no result of its own
    assert (out / "built_by_rank0").exists() and not (out / "built_by_rank1").exists()
    assert all(r["raised"] for r in ranks)  # rank 0's error reached rank 1 instead of leaving it waiting
    (entry,) = (out / "cache").iterdir()  # one copy of the tokens, named by the run's record
    assert json.loads((out / "train_tokens.json").read_text())["streams"]["embedded_math"]["file"] == str(entry)
    expected = TokenStream(embedded_documents("embedded_math", "train"), ByteTokenizer(), 32, 4, seed=0)(3)
    for r in ranks:
        assert torch.equal(r["batch"], expected["input_ids"])


@pytest.mark.slow
def test_weights_exported_from_two_ranks_load_into_one_process(two_ranks):
    out, dist_out = two_ranks
    model = build_model("tiny", segment_len=16, memory="delta", tie_embeddings=True)
    load_weights(model, str(out / "model.safetensors"))
    assert model.lm_head.weight is model.embed.weight
    for name, p in model.state_dict().items():
        assert torch.equal(p, dist_out["model"][name]), name


@pytest.mark.slow
def test_decoding_under_fsdp_equals_one_process(two_ranks):
    from infini_bench.generate import generate
    from tasks.passkey import evaluate_samples
    from tasks.passkey_data import make_sample

    out, _ = two_ranks
    model = tiny_model().eval()
    samples = [make_sample(300, 0.0, i, ByteTokenizer(), key_range=(1, 9)) for i in range(2)]
    with torch.no_grad():
        acc = [o.token_acc for o in evaluate_samples(model, samples, ByteTokenizer())]
        text = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=20, greedy=True).tokens
    step = plain_step(model.train(), make_optimizer(model), 0)
    for rank in range(2):
        got = torch.load(out / f"decode{rank}.pt", weights_only=False)
        assert got["acc"] == pytest.approx(acc) and got["text"] == text
        assert got["resharded"]  # back to DTensor shards afterwards
        torch.testing.assert_close(got["step"], step, rtol=1e-5, atol=1e-5)


def test_single_process_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model)
    plain_step(model, optimizer, 0)
    optimizer.param_groups[0]["lr"] = 3e-3  # as a schedule would: not a tensor, restored all the same
    save_checkpoint(tmp_path / "ckpt", model, optimizer, extra={"step": 1, "tokens": 192})
    fresh = build_model("tiny", segment_len=16, memory="delta", tie_embeddings=True)
    fresh_opt = make_optimizer(fresh)
    assert load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt) == {"step": 1, "tokens": 192}
    assert fresh_opt.param_groups[0]["lr"] == 3e-3
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # Bit-exact resume: the second step's loss already depends on the restored optimizer state.
    assert [plain_step(fresh, fresh_opt, s) for s in (1, 2)] == [plain_step(model, optimizer, s) for s in (1, 2)]


def test_chunked_loss_equals_full_logits():
    """Same loss and gradients as cross-entropy over the whole (B, T, V) logits, ignored labels included."""
    model = tiny_model()
    ids, labels = batch(0)
    labels = labels.clone()
    labels[0, :10] = -100
    full = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = lm_loss(model, ids, labels, chunk_tokens=50)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_a_loss_on_a_few_labelled_positions_equals_full_logits(chunk_tokens):
    """Only labelled positions reach the head (recall and passkey label a few tokens a sample): the loss and every
    gradient are those of cross-entropy over all logits, in one chunk or ragged ones."""
    model = tiny_model()
    ids, labels = batch(0)
    sparse = torch.full_like(labels, -100)
    sparse[0, 5::17], sparse[-1, 3] = labels[0, 5::17], labels[-1, 3]
    full = F.cross_entropy(model(ids).logits.flatten(0, 1), sparse.flatten(), ignore_index=-100)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = lm_loss(model, ids, sparse, chunk_tokens=chunk_tokens)
    loss.backward()
    torch.testing.assert_close(loss, full)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("tied", [True, False])
def test_a_micro_batch_without_labels_has_zero_loss_and_zero_gradients(tied):
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, memory="delta", tie_embeddings=tied)
    ids, labels = batch(0)
    loss = lm_loss(model, ids, torch.full_like(labels, -100))
    loss.backward()  # still a graph through the model: under FSDP every rank joins the same collectives
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_no_torchrun_means_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    x = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(x) is x and full_tensor(x) is x


def test_init_distributed_turns_off_cudnn_attention(monkeypatch):
    """cuDNN's SDPA backward failed on an H200 at recall's changing lengths; every run goes without it."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        assert torch.backends.cuda.cudnn_sdp_enabled()
        init_distributed()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

