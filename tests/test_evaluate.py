"""Streaming perplexity against a parallel forward over the same document, and the embedded corpus split."""
import math

import torch
import torch.nn.functional as F

from infini_bench.data import Document, embedded_documents
from infini_bench.evaluate import evaluate_lm
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


def test_embedded_splits_are_disjoint_by_book():
    names = {s: {d.name for d in embedded_documents("embedded", s)} for s in ("train", "validation", "test")}
    assert names["validation"] == {"pg16", "whitehead-validation"}
    assert names["test"] == {"pg11", "whitehead-test"}
    assert not (names["train"] & names["validation"]) and not (names["train"] & names["test"])
    assert len(names["train"]) == 8
    val = embedded_documents("embedded_math", "validation")[0].text
    test = embedded_documents("embedded_math", "test")[0].text
    assert "\r" not in val and val[-200:] not in test
