"""Does the CUDA-graph decoder compute what the eager decoder computes? (1B shape, random init, one GPU.)

    python scripts/decode_graph_check.py

Decodes 80 teacher-forced tokens across a memory write with `generate.decode_step` and with
`generate.StaticDecoder` (captured as a CUDA graph), in fp32 and in bf16, and prints the largest logit
difference relative to the largest fp32 logit. In fp32 the two agree to rounding; in bf16 their gap should be
no larger than bf16's own error against fp32. Then the same for a tiny model with `token_shift` (whose
previous embedding the graph reads and writes in the first layer's cache), against the parallel forward too.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from infini_bench.generate import StaticDecoder, decode_step, prefill  # noqa: E402
from infini_bench.model import build_model  # noqa: E402


def decode_both(model, ids: torch.Tensor, prompt: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, eager_state = prefill(model, ids[:, :prompt])
    _, graph_state = prefill(model, ids[:, :prompt])
    graphed = StaticDecoder(model, graph_state, graph=True)
    eager, graph = [], []
    for t in range(prompt, prompt + steps):
        eager.append(decode_step(model, ids[:, t], eager_state).float())
        graph.append(graphed.step(ids[:, t]).float())
    return torch.stack(eager), torch.stack(graph)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    for rule in ("linear", "delta"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            reference = build_model("1b", memory=rule).eval()
            for layer in reference.layers:  # gates away from 0.5, so that the memory matters
                layer.attn.gate.data.normal_(0, 2)
        n = reference.cfg.segment_len
        ids = torch.randint(0, reference.cfg.vocab_size, (1, 3 * n), device="cuda")
        prompt = 2 * n - 40  # the 40th step finishes a segment and writes the memory
        e32, g32 = decode_both(reference, ids, prompt, 80)
        e16, g16 = decode_both(reference.to(torch.bfloat16), ids, prompt, 80)
        scale = e32.abs().max().item()

        def gap(a: torch.Tensor, b: torch.Tensor) -> float:
            return ((a - b).abs().max() / scale).item()

        print(f"{rule}: graph vs eager, fp32 {gap(g32, e32):.1e}, bf16 {gap(g16, e16):.3f}; "
              f"bf16 eager vs fp32 eager {gap(e16, e32):.3f}")
        del reference
    torch.manual_seed(0)
    with torch.device("cuda"):
        shifted = build_model("tiny", memory="linear", segment_len=64, token_shift=True).eval()
        shifted.token_shift.data.normal_(0, 1)
        for layer in shifted.layers:
            layer.attn.gate.data.normal_(0, 2)
    ids = torch.randint(0, shifted.cfg.vocab_size, (2, 200), device="cuda")
    eager, graph = decode_both(shifted, ids, 100, 99)
    with torch.no_grad():
        parallel = shifted(ids).logits[:, 100:199].transpose(0, 1).float()
    scale = parallel.abs().max().item()
    print(f"tiny linear with token_shift, fp32: graph vs eager {((graph - eager).abs().max() / scale).item():.1e}, "
          f"graph vs parallel forward {((graph - parallel).abs().max() / scale).item():.1e}")


if __name__ == "__main__":
    main()
