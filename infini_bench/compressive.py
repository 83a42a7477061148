"""Infini-attention's compressive memory as pure functions (Munkhdalai et al. 2024, arXiv 2404.07143, Eqs. 7-10).

The sequence is cut into segments of `segment_len` tokens. Inside a segment, queries attend causally to
keys of the same segment (Eq. 6, `infini_bench.attention`). Across segments, information flows only through a
compressive memory (M, z) per kv head, read before it is written (Eq. 7, then Eq. 8 or 9). A learned gate per
query head mixes the two (Eq. 10).

Two ways to compute the same function live here:
- the segment-parallel path (`infini_attention`): one SDPA call over all full segments, and for the linear
  rule an exclusive prefix sum over per-segment memory writes, with no Python loop over segments;
- the streaming path is simply the same call made on one segment at a time, passing `state` along.

Precision: M and z are fp32 everywhere, also under autocast (bf16 sums overflow or lose small writes over
long inputs): every write is accumulated into them in fp32. The products that touch every token (sigma(K)^T V,
sigma(Q) M, the delta rule's sigma(K) M) take their operands in the activations' dtype and accumulate in fp32,
as every other matrix product of the model does; with fp32 inputs everything is fp32.

Three choices the paper leaves open are options here, for the ablation study (docs/ABLATIONS.md); the defaults are
the reading above:
- `products`: "activation" (above) or "fp32", every memory product in fp32 even under autocast (PRODUCTS);
- `backprop`: "full", gradients flow from a segment's read into the earlier segments' writes, or "detached",
  the memory a segment reads is a constant, as Transformer-XL's cache is (BACKPROPS);
- `read_scale`: None, A_mem as Eq. 7 gives it, or a learned (H * D_v,) scale: A_mem RMS-normalised over D_v
  per head and position, then scaled, before the gate mixes it in (`normalize_read`).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infini_bench.attention import EMPTY_READS, Rotary, parallel_local_attention, split_segments

RULES = ("linear", "delta", "none")
PRODUCTS = ("activation", "fp32")
BACKPROPS = ("full", "detached")


class MemoryState(NamedTuple):
    """Compressive memory of one layer: M (B, H_kv, D, D_v) and z (B, H_kv, D), always fp32."""

    M: Tensor
    z: Tensor


def sigma(x: Tensor) -> Tensor:
    """ELU + 1, the memory's non-negative feature map (Eq. 7), in x's dtype: x + 1 above zero, exp(x) at or below.

    Written so rather than as elu(x) + 1, which cancels in bf16: there exp(x) - 1 + 1 is exactly 0 for x <= -7
    (and a query with every component that low reads 0 / 0), and coarse above. The same function and gradient
    (1 at x = 0); the clamp keeps the branch not taken finite, so its zero gradient stays zero."""
    return torch.where(x > 0, x + 1, x.clamp(max=0).exp())


def normalize_read(a_mem: Tensor, scale: Tensor) -> Tensor:
    """A_mem (..., H, L, D_v) RMS-normalised over D_v, times scale (H * D_v,), in fp32."""
    h, dv = a_mem.shape[-3], a_mem.shape[-1]
    return F.rms_norm(a_mem.float(), (dv,), eps=1e-6) * scale.float().view(h, 1, dv)


def _products(products: str, device: torch.device):
    """The context the memory's products run in: as they come, or fp32 with autocast off."""
    return contextlib.nullcontext() if products == "activation" else torch.autocast(device.type, enabled=False)


def _retrieve(sq: Tensor, M: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 7's numerator sigma(q) M and denominator sigma(q) z, query heads grouped onto their kv head.

    sq (B, H_kv, G, ..., N, D), M (B, H_kv, G or 1, ..., D, D_v), z (B, H_kv, ..., D), both fp32 ->
    num (B, H_kv, G, ..., N, D_v) and den (B, H_kv, G, ..., N, 1) in sq's dtype (fp32 accumulation).
    """
    num = torch.matmul(sq, M.to(sq.dtype))
    den = torch.matmul(sq, z.unsqueeze(2).unsqueeze(-1).to(sq.dtype))
    return num, den


def _memory_writes(
    sk: Tensor, vf: Tensor, rule: str, state: MemoryState | None
) -> tuple[Tensor, Tensor, MemoryState]:
    """Memory each of S full segments reads, and the memory after the last one.

    sk (B, H_kv, S, N, D), vf (B, H_kv, S, N, D_v), in the activations' dtype.
    Returns M_prev (B, H_kv, S, D, D_v), z_prev (B, H_kv, S, D), both fp32, and the new state. Where
    `state` is None, entry 0 is a placeholder: the first segment has no memory to read.
    """
    b, hk, s, n, d = sk.shape
    dz = sk.sum(dim=3, dtype=torch.float32)  # (B, H_kv, S, D): z update of every segment
    if rule == "linear":
        dM = (sk.transpose(-1, -2) @ vf).float()  # Eq. 8, per segment: (B, H_kv, S, D, D_v)
        # Exclusive prefix sum: segment s reads the memory written by segments < s.
        M_all = torch.cumsum(dM, dim=2)
        z_all = torch.cumsum(dz, dim=2)
        M_prev = torch.cat([torch.zeros_like(dM[:, :, :1]), M_all[:, :, :-1]], dim=2)
        z_prev = torch.cat([torch.zeros_like(dz[:, :, :1]), z_all[:, :, :-1]], dim=2)
        if state is not None:
            M_prev = M_prev + state.M.unsqueeze(2)
            z_prev = z_prev + state.z.unsqueeze(2)
        new_state = MemoryState(M_prev[:, :, -1] + dM[:, :, -1], z_prev[:, :, -1] + dz[:, :, -1])
    else:  # delta: each write depends on the memory it updates, so scan over segments (M in fp32)
        # z does not depend on M: its exclusive prefix sum, and every segment's denominator sigma(K) z, come
        # first in one product, leaving three products per segment in the scan (read, correct, write).
        z_prev = torch.cat([torch.zeros_like(dz[:, :, :1]), torch.cumsum(dz, dim=2)[:, :, :-1]], dim=2)
        if state is not None:
            z_prev = z_prev + state.z.unsqueeze(2)
        den = sk @ z_prev.unsqueeze(-1).to(sk.dtype)  # (B, H_kv, S, N, 1); entry 0 unused without a state
        M = None if state is None else state.M
        Ms = []
        # unbind, not sk[:, :, i]: the backward of S selects would add S full-size gradients
        for k_i, v_i, den_i in zip(sk.unbind(2), vf.unbind(2), den.unbind(2)):  # (B, H_kv, N, D or D_v or 1)
            if M is None:  # no memory yet: the retrieval term of Eq. 9 is 0
                Ms.append(sk.new_zeros(b, hk, d, vf.shape[-1], dtype=torch.float32))  # placeholder, never read
                M = (k_i.transpose(-1, -2) @ v_i).float()
            else:
                Ms.append(M)
                new = torch.addcdiv(v_i, k_i @ M.to(k_i.dtype), den_i, value=-1.0)  # V - what the memory holds
                M = M + (k_i.transpose(-1, -2) @ new).float()  # Eq. 9
        M_prev = torch.stack(Ms, dim=2)
        new_state = MemoryState(M, z_prev[:, :, -1] + dz[:, :, -1])
    return M_prev, z_prev, new_state


def memory_read(q: Tensor, state: MemoryState, *, products: str = "activation", backprop: str = "full",
                read_scale: Tensor | None = None) -> Tensor:
    """Eq. 7 for any number of query positions: q (B, H, L, D), un-rotated -> A_mem (B, H, L, D_v), fp32."""
    b, h, length, d = q.shape
    hk = state.M.shape[1]
    M, z = (state.M.detach(), state.z.detach()) if backprop == "detached" else state
    with _products(products, q.device):
        sq = sigma(q if products == "activation" else q.float()).reshape(b, hk, h // hk, length, d)
        num, den = _retrieve(sq, M.unsqueeze(2), z)
    a_mem = (num.float() / den.float()).reshape(b, h, length, -1)
    return a_mem if read_scale is None else normalize_read(a_mem, read_scale)


def memory_write(k: Tensor, v: Tensor, rule: str, state: MemoryState | None, *,
                 products: str = "activation") -> MemoryState:
    """Eq. 8 or 9 for one segment: k (B, H_kv, L, D), v (B, H_kv, L, D_v), L <= segment_len."""
    if products == "fp32":
        k, v = k.float(), v.float()
    with _products(products, k.device):
        _, _, new_state = _memory_writes(sigma(k).unsqueeze(2), v.unsqueeze(2), rule, state)
    return new_state


def infini_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    segment_len: int,
    rule: str = "linear",
    state: MemoryState | None = None,
    rotary: Rotary | None = None,
    empty_read: str = "zero",
    products: str = "activation",
    backprop: str = "full",
    read_scale: Tensor | None = None,
) -> tuple[Tensor, MemoryState | None]:
    """Infini-attention over a whole sequence, starting from `state` (None: no memory yet).

    q (B, H, T, D), k (B, H_kv, T, D), v (B, H_kv, T, D_v), beta (H,) raw gate logits; `empty_read` is what
    the first segment reads when there is no state (EMPTY_READS); `products`, `backprop` and `read_scale` are
    the ablation's options (module docstring).
    Returns out (B, H, T, D_v) in q's dtype and the memory after the last token (None for rule 'none').
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    if empty_read not in EMPTY_READS:
        raise ValueError(f"empty_read={empty_read!r} is not one of {', '.join(EMPTY_READS)}")
    if products not in PRODUCTS:
        raise ValueError(f"products={products!r} is not one of {', '.join(PRODUCTS)}")
    if backprop not in BACKPROPS:
        raise ValueError(f"backprop={backprop!r} is not one of {', '.join(BACKPROPS)}")
    if segment_len <= 0:
        raise ValueError(f"segment_len={segment_len} must be > 0")
    b, h, t, d = q.shape
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} kv heads")
    n = min(segment_len, t)
    t_full = (t // n) * n
    if t_full < t:  # a shorter last segment: full segments in parallel, then the tail carries their state
        options = dict(segment_len=n, rule=rule, rotary=rotary, empty_read=empty_read, products=products,
                       backprop=backprop, read_scale=read_scale)
        head, state = infini_attention(q[:, :, :t_full], k[:, :, :t_full], v[:, :, :t_full], beta, state=state,
                                       **options)
        tail, state = infini_attention(q[:, :, t_full:], k[:, :, t_full:], v[:, :, t_full:], beta, state=state,
                                       **options)
        return torch.cat([head, tail], dim=2), state

    a_dot = parallel_local_attention(q, k, v, n, rotary)  # (B, H, T, D_v)
    if rule == "none":
        return a_dot, None

    s, g, dv = t // n, h // hk, v.shape[-1]
    mq, mk, mv = (q, k, v) if products == "activation" else (q.float(), k.float(), v.float())
    with _products(products, q.device):
        M_prev, z_prev, new_state = _memory_writes(split_segments(sigma(mk), n), split_segments(mv, n), rule, state)
    if backprop == "detached":  # each segment reads a constant: no gradient from a read into earlier writes
        M_prev, z_prev = M_prev.detach(), z_prev.detach()
    # Segments with memory to read: all of them, or all but the first at the start of a document.
    first = 0 if state is not None else 1
    head = a_dot[:, :, : first * n]  # the first segment of a document: A_mem = 0 (or, ablation, A_dot alone)
    if first and empty_read == "zero":
        head = (head * (1.0 - torch.sigmoid(beta.float())).view(1, h, 1, 1)).to(a_dot.dtype)
    if s == first:
        return head.to(q.dtype), new_state
    gate = torch.sigmoid(beta.float()).view(1, hk, g, 1, 1, 1)
    local = a_dot[:, :, first * n:].reshape(b, hk, g, s - first, n, dv)
    with _products(products, q.device):
        sq = split_segments(sigma(mq[:, :, first * n:]), n).reshape(b, hk, g, s - first, n, d)  # un-rotated q
        if read_scale is None:
            # Eq. 10 with Eq. 7 inside: sigmoid(beta) A_mem = sigma(q) (sigmoid(beta) M) / (sigma(q) z), so the
            # gate scales the small memories, not the T x D_v retrievals; the mix is then one fused addcdiv.
            num, den = _retrieve(sq, M_prev[:, :, first:].unsqueeze(2) * gate, z_prev[:, :, first:])
            local = local if products == "activation" else local.float()
            mixed = torch.addcdiv(local * (1.0 - gate).to(local.dtype), num, den)  # (B, H_kv, G, S', N, D_v)
        else:  # the ablation: A_mem normalised per head before the mix
            num, den = _retrieve(sq, M_prev[:, :, first:].unsqueeze(2), z_prev[:, :, first:])
            a_mem = (num.float() / den.float()).reshape(b, h, s - first, n, dv).transpose(1, 2)  # (B, S', H, N, D_v)
            a_mem = normalize_read(a_mem, read_scale).transpose(1, 2).reshape(b, hk, g, s - first, n, dv)
            mixed = local.float() * (1.0 - gate) + gate * a_mem
    # Assembled as (B, T, H, D_v) in memory, so the output projection's reshape needs no copy.
    out = torch.cat([head.transpose(1, 2),
                     mixed.reshape(b, h, t - first * n, dv).transpose(1, 2)], dim=1).transpose(1, 2)
    return out.to(q.dtype), new_state
