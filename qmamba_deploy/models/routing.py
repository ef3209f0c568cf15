"""Token routing and semantic ordering for MambaIRv2's attentive state space.

MambaIRv2 routes every token to one of T prompt classes and scans the tokens
grouped by class ("semantic neighbours"). The official inference samples the
route with gumbel noise and groups with an unstable sort, so two runs differ.
Every deployable path here uses argmax routing and a *stable* order, built
with a counting sort from ops that export to ONNX and run in TensorRT
(one-hot, cumulative sums, gather/scatter; no Sort, no TopK with k > 3840).

Modes (``ROUTING_MODES``):
- ``deterministic``: argmax + stable counting sort (default; eval and export).
- ``gumbel``: hard gumbel-softmax (straight-through gradient to the router)
  + stable counting sort; for training, as the official training does.
- ``official``: gumbel + ``torch.sort(stable=False)``, the official inference
  (non-deterministic); for comparisons only, not exportable.

The Gumbel noise is drawn by :func:`gumbel_softmax_hard` (the distribution of
``F.gumbel_softmax``, which the official code calls, not its random stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

ROUTING_MODES = ("deterministic", "gumbel", "official")
PROMPT_ORDERS = ("official", "sorted")


def route(logits: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: logits (B, L, T) -> (one-hot policy (B, L, T), class index (B, L)).

    In ``gumbel``/``official`` mode the policy carries the straight-through
    gradient of the hard gumbel-softmax.
    """
    if mode == "deterministic":
        cls = torch.argmax(logits, dim=-1)
        classes = torch.arange(logits.shape[-1], device=logits.device)
        policy = (cls.unsqueeze(-1) == classes).to(logits.dtype)
        return policy, cls
    if mode in ("gumbel", "official"):
        policy = gumbel_softmax_hard(logits)
        return policy, torch.argmax(policy.detach(), dim=-1)
    raise ValueError(f"routing mode {mode!r} is unknown; use one of {', '.join(ROUTING_MODES)}")


def gumbel_softmax_hard(logits: torch.Tensor) -> torch.Tensor:
    """F.gumbel_softmax(logits, tau=1, hard=True) along the last dim: a one-hot sample with the
    straight-through gradient of the soft sample. The Gumbel noise is -log(E) with E = -log(U), U
    uniform in (0, 1): the same distribution as torch's (which draws E with ``exponential_``, 6x slower
    on a CPU), not the same random stream."""
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    gumbels = uniform.log_().neg_().log_().neg_()
    soft = (logits + gumbels).softmax(dim=-1)
    hard = torch.zeros_like(logits).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def stable_positions(cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Where each token lands in the stable class order (a counting sort).

    cls: (B, L) integer classes in [0, num_classes). Returns pos (B, L) with
    sorted[pos[i]] = token i; tokens of one class keep their raster order.
    """
    classes = torch.arange(num_classes, device=cls.device)
    one_hot = (cls.unsqueeze(-1) == classes).to(torch.int64)  # (B, L, T)
    seen = torch.cumsum(one_hot, dim=1)  # (B, L, T): tokens of each class up to and including this one
    counts = seen[:, -1]  # (B, T)
    start = torch.cumsum(counts, dim=-1) - counts  # first slot of each class
    rank = torch.gather(seen, 2, cls.unsqueeze(-1)).squeeze(-1) - 1  # order inside the class
    return torch.gather(start, 1, cls) + rank


def semantic_order(cls: torch.Tensor, num_classes: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sort_idx, pos): sorted[j] = x[sort_idx[j]] and x[i] = sorted[pos[i]]."""
    if mode == "official":
        _, sort_idx = torch.sort(cls, dim=-1, stable=False)
        pos = torch.empty_like(sort_idx).scatter_(
            1, sort_idx, torch.arange(cls.shape[1], device=cls.device).expand_as(sort_idx).contiguous())
        return sort_idx, pos
    pos = stable_positions(cls, num_classes)
    steps = torch.arange(cls.shape[1], device=cls.device).expand_as(pos)
    sort_idx = torch.zeros_like(pos).scatter(1, pos, steps)
    return sort_idx, pos


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) gathered along L by index (B, L'): whole rows of the flattened (B*L, C) tensor
    (``index_select``, a Gather of rows in ONNX), not element by element with an expanded
    (B, L', C) index (``torch.gather``, GatherElements): 4x faster in PyTorch, and no index tensor
    the size of x in the graph."""
    b, length, c = x.shape
    rows = index + (torch.arange(b, device=index.device) * length).unsqueeze(-1)
    return x.reshape(b * length, c).index_select(0, rows.reshape(-1)).reshape(b, index.shape[1], c)


@contextlib.contextmanager
def routing_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run ``model`` with every ASSM in routing ``mode`` (gumbel to train, as the official training;
    deterministic to calibrate, evaluate and export), then restore the mode it had.

    Models without routing (MambaIR) pass through unchanged."""
    if not hasattr(model, "set_routing"):
        yield
        return
    modes = {m.routing for m in model.modules() if hasattr(m, "routing") and isinstance(m.routing, str)}
    model.set_routing(mode)
    try:
        yield
    finally:
        model.set_routing(modes.pop() if len(modes) == 1 else "deterministic")
