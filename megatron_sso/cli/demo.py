"""``megatron-sso demo``: SSO on a tiny byte-level GPT, on real text, on a laptop CPU.

Trains :class:`megatron_sso.models.tiny_gpt.TinyGPT` on the Python standard library's own
sources (present on every machine, nothing downloaded) with SSO on the hidden matrices and
AdamW on embeddings, norms and the output layer (paper §6.1), and prints per-step loss,
learning rate, tokens/s and the spectral-norm / solver summary.
"""

from __future__ import annotations

import argparse
import math
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=["sso", "muon_sphere", "sso_muon", "adam"], default="sso",
                   help="sso_muon: our Muon baseline (the same name as under megatron-sso pretrain)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-2, help="sphere-optimizer peak lr (paper: ~1e-2 is SSO's optimum)")
    p.add_argument("--adam-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% (the paper's 5e-3 -> 5e-4 shape)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise SystemExit(f"--steps must be positive, got {args.steps}")
    import torch  # here, not at the top: every megatron-sso command imports this module

    from ..models.tiny_gpt import TinyGPT, batches, lm_loss, stdlib_corpus
    from ..ops.retraction import target_radius
    from ..optim.spectral_sphere import SpectralSphere

    torch.manual_seed(args.seed)
    data = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8)
    split = int(0.95 * data.numel())
    train, val = data[:split], data[split:]
    model = TinyGPT(dim=args.dim, layers=args.layers, heads=args.heads, ffn=2 * args.dim, seq=args.seq)
    hidden = model.hidden_matrices()
    adam_wd = 0.1
    if args.optimizer == "adam":
        opts = [torch.optim.AdamW(model.parameters(), lr=args.adam_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=adam_wd)]
        sphere = None
    else:
        sphere = SpectralSphere(hidden, lr=args.lr, mode="muon" if args.optimizer == "sso_muon" else args.optimizer)
        opts = [sphere, torch.optim.AdamW(model.other_parameters(), lr=args.adam_lr, betas=(0.9, 0.95),
                                          eps=1e-8, weight_decay=adam_wd)]
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    it = batches(train, args.batch, args.seq, torch.Generator().manual_seed(args.seed + 1))
    print(f"demo: TinyGPT dim={args.dim} layers={args.layers} on {train.numel():,} bytes of stdlib source; "
          f"optimizer={args.optimizer}", flush=True)
    t0, tokens = time.perf_counter(), 0
    first = None
    for step in range(args.steps):
        f = _lr_factor(step, args.warmup, args.steps)
        for o, lrs in zip(opts, base):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f
        x, y = next(it)
        loss = lm_loss(model, x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        tokens += x.numel()
        first = loss.item() if first is None else first
        if step % args.log_every == 0 or step == args.steps - 1:
            msg = f"step {step:5d}  loss {loss.item():.4f}  lr {f * base[0][0]:.2e}  tok/s {tokens / (time.perf_counter() - t0):,.0f}"
            if sphere is not None:
                ratios = [torch.linalg.matrix_norm(p.detach().double(), ord=2).item() / target_radius(*p.shape) for p in hidden]
                st = sphere.last_step_stats
                msg += (f"  |W|2/R [{min(ratios):.4f}, {max(ratios):.4f}]  msign/matrix {st['msign_calls_per_matrix']:.1f}"
                        f"  max|h| {st['max_abs_h']:.1e}")
            print(msg, flush=True)
    with torch.no_grad():
        vx, vy = next(batches(val, 64, args.seq, torch.Generator().manual_seed(123)))
        val_loss = lm_loss(model, vx, vy).item()
    print(f"done: train loss {first:.4f} -> {loss.item():.4f}; validation loss {val_loss:.4f}", flush=True)
    return 0
