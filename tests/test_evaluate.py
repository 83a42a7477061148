"""Streaming perplexity and the streamed NLL against a parallel forward over the same tokens, and the embedded
corpus split."""
import math

import pytest
import torch
import torch.nn.functional as F

from infini_bench.data import Document, embedded_documents
from infini_bench.evaluate import evaluate_lm, streamed_nll
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer


def test_streaming_perplexity_equals_parallel_forward():
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, memory="delta").eval()
    doc = Document("d", "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3)
    res = evaluate_lm(model, (doc,), ByteTokenizer(), torch.device("cpu"))
    ids = torch.tensor(ByteTokenizer().encode(doc.text))
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    nll = F.cross_entropy(logits, ids[1:], reduction="none")
    assert res["tokens"] == len(ids) - 1
    assert math.isclose(res["loss"], nll.mean().item(), rel_tol=1e-5)
    assert math.isclose(res["bpb"], nll.sum().item() / math.log(2) / (len(ids) - 1), rel_tol=1e-5)
    per_segment = [nll[i: i + 16].mean().item() for i in range(0, len(nll), 16)]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(res["loss_by_segment"], per_segment))



def test_streamed_nll_equals_one_full_sequence_forward_in_float64():
    """memory=full streamed segment by segment sees what one causal pass over the whole sequence sees."""
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, memory="full").eval()
    ids = torch.randint(0, 256, (2, 75))  # the last segment is partial
    labels = torch.randint(0, 256, (2, 75))
    labels[0, 5:30] = -100  # not scored: a prompt, say
    labels[:, 48:64] = -100  # a segment with nothing scored
    got = list(streamed_nll(model, ids, labels, "fp32"))
    with torch.no_grad():
        logp = model(ids).logits.double().log_softmax(-1)  # one forward: a single causal attention over 75 tokens
    scored = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored
    expected = [(nll[:, i: i + 16].sum().item(), int(scored[:, i: i + 16].sum())) for i in range(0, 75, 16)]
    assert [c for _, c in got] == [c for _, c in expected] and got[3][1] == 0
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], rel=1e-5, abs=1e-6)


def test_embedded_splits_are_disjoint_by_book():
    names = {s: {d.name for d in embedded_documents("embedded", s)} for s in ("train", "validation", "test")}
    assert names["validation"] == {"pg16", "whitehead-validation"}
    assert names["test"] == {"pg11", "whitehead-test"}
    assert not (names["train"] & names["validation"]) and not (names["train"] & names["test"])
    assert len(names["train"]) == 8
    val = embedded_documents("embedded_math", "validation")[0].text
    test = embedded_documents("embedded_math", "test")[0].text
    assert "\r" not in val and val[-200:] not in test
