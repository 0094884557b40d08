"""A tiny byte-level GPT in plain PyTorch and a real-text corpus every machine has offline.

Used by the standalone demo, the solver study and tests that need a *real* training
trajectory (gradients of a language model on real text, not random matrices) without
Megatron. The corpus is the Python standard library's own source files, read from the running
interpreter's installation, so nothing is downloaded.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

Tensor = torch.Tensor


def stdlib_corpus(max_bytes: int = 4_000_000, seed_files: Optional[list[str]] = None) -> bytes:
    """Concatenated ``*.py`` sources of the standard library (sorted paths; deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.glob("*.py"))
    if seed_files:
        paths = [root / f for f in seed_files]
    chunks, total = [], 0
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources found under {root}")
    return b"".join(chunks)[:max_bytes]


def batches(data: Tensor, batch: int, seq: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random windows ``(x, y)`` of ``seq`` bytes from ``data`` (uint8 -> int64)."""
    if data.numel() <= seq + 1:
        raise ValueError(f"corpus of {data.numel()} bytes is too short for sequences of {seq}")
    while True:
        idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        win = torch.stack([data[i:i + seq + 1] for i in idx.tolist()]).long()
        yield win[:, :-1], win[:, 1:]


class Block(nn.Module):
    """Pre-norm block: causal attention with separate q/k/v matrices and a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyGPT(nn.Module):
    """Byte-level GPT: 256-token vocabulary, learned positions, untied output layer."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.out = nn.Linear(dim, 256, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.size(1)) if p is not self.embed.weight else 1.0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.size(1), device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.out(self.norm(h))

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights that belong to a sphere optimizer (not embeddings or output)."""
        return [p for blk in self.blocks for n, p in blk.named_parameters() if p.dim() == 2]

    def other_parameters(self) -> list[nn.Parameter]:
        hidden = {id(p) for p in self.hidden_matrices()}
        return [p for p in self.parameters() if id(p) not in hidden]


def lm_loss(model: TinyGPT, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
