"""Step 3: train the reference Qwen3-MoE (needs torch and numpy only).

Wants a GPU (CUDA, bf16 autocast; the recorded run, 1100 steps, took 2.5
minutes on one H200) but falls back to the CPU (float32; then pass a small
``--steps``, or expect many hours: a step of 32k tokens takes ~0.13 s on an
H200 and tens of seconds on a laptop CPU).  Reads the uint16 token streams made by
``train_tokenizer.py`` and writes into ``--out``:

* ``model-0000N.safetensors`` - the trained weights in BF16, transformers'
  ``Qwen3MoeForCausalLM`` names, split into shards below 15 MiB each;
* ``config.json``             - the model configuration;
* ``train_log.json``          - settings, the step count actually run, and the
  validation losses seen.

Training: random 512-token windows of the training stream (batch 64), AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine
decay to 10 %, gradient clipping at 1.0, next-token cross-entropy plus a
Switch-style load-balancing loss (coefficient ``router_aux_loss_coef``).  The
weights with the best validation loss are kept.  With ``--time-budget`` the
step count is cut, after the first steps have been timed, to what fits in that
many seconds (the cosine schedule is then laid over the new count); the count
used is logged so that a rerun can pass it as ``--steps`` with
``--time-budget 0``.

Usage: python scripts/reference_model/train.py --out .work/reference_model/checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_CONFIG, TRAIN_TOKENS  # noqa: E402
from model import Qwen3Moe  # noqa: E402

SHARD_BYTES = 15 * 1024 * 1024


def save_shards(state: dict[str, torch.Tensor], out: Path) -> list[str]:
    """Save BF16 tensors as safetensors shards smaller than SHARD_BYTES."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        nbytes = t.numel() * 2
        if nbytes > SHARD_BYTES:
            raise ValueError(f"{name} alone exceeds a shard")
        if size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}.safetensors"
        save_file(shard, str(out / fname))
        names.append(fname)
    return names


def batches(tokens: torch.Tensor, n: int, seq: int, gen: torch.Generator, device) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq - 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    return tokens[idx].to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq: int, batch: int, device, amp) -> float:
    """Mean next-token loss over non-overlapping windows of the validation stream."""
    model.eval()
    n_win = (tokens.numel() - 1) // seq
    total, count = 0.0, 0
    for s in range(0, n_win, batch):
        w = torch.arange(s, min(s + batch, n_win))
        idx = w[:, None] * seq + torch.arange(seq + 1)[None, :]
        x = tokens[idx].to(device)
        with amp():
            logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=Path, default=TRAIN_TOKENS.parent, help="folder with train.npy, valid.npy")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds for the loop; 0 = no limit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    args = ap.parse_args()

    t_start = time.time()
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    use_bf16 = device.type == "cuda"
    torch.manual_seed(args.seed)
    if use_bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def amp():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    train_tokens = torch.from_numpy(np.load(args.tokens / "train.npy").astype(np.int64))
    valid_tokens = torch.from_numpy(np.load(args.tokens / "valid.npy").astype(np.int64))
    cfg = dict(MODEL_CONFIG)
    model = Qwen3Moe(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device} ({torch.cuda.get_device_name() if use_bf16 else 'cpu'}), "
        f"torch {torch.__version__}, "
        f"{n_params} parameters, {train_tokens.numel()} training tokens",
        flush=True,
    )

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("norm.weight"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    total_steps = args.steps

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(args.seed + 1)
    aux_coef = cfg["router_aux_loss_coef"]
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params, "evals": []}
    best = (float("inf"), -1, None)
    t_loop = time.time()
    step = 0
    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batches(train_tokens, args.batch, args.seq, gen, device)
        with amp():
            logits, aux = model(x[:, :-1])
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 5:
            t5 = time.time()
        if step == 25 and args.time_budget > 0:
            per_step = (time.time() - t5) / 20
            n_evals = total_steps // args.eval_every + 1
            eval_cost = per_step * (valid_tokens.numel() / (args.batch * args.seq))
            fit = int((args.time_budget - (time.time() - t_loop) - n_evals * eval_cost) / per_step) + step
            if fit < total_steps:
                print(
                    f"time budget: {per_step * 1e3:.1f} ms/step -> {fit} steps instead of {total_steps}",
                    flush=True,
                )
                total_steps = max(fit, args.warmup + 1, step + 1)
        if step % 50 == 0 or step == 1:
            el = time.time() - t_loop
            print(
                f"step {step}/{total_steps} loss {ce.item():.4f} aux {aux.item():.3f} "
                f"gnorm {gnorm.item():.2f} "
                f"lr {lr_at(step - 1):.2e} {el:.0f}s {step * args.batch * args.seq / el:.0f} tok/s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == total_steps:
            vl = evaluate(model, valid_tokens, args.seq, args.batch, device, amp)
            print(f"step {step} valid loss {vl:.4f} ppl {math.exp(vl):.2f}", flush=True)
            log["evals"].append({"step": step, "valid_loss": vl, "train_loss": ce.item(), "time": time.time() - t_loop})
            if vl < best[0]:
                best = (vl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
    log["steps"] = total_steps
    log["tokens_seen"] = total_steps * args.batch * args.seq
    log["epochs"] = log["tokens_seen"] / train_tokens.numel()
    log["best_step"], log["best_valid_loss"] = best[1], best[0]
    log["loop_seconds"] = time.time() - t_loop
    args.out.mkdir(parents=True, exist_ok=True)
    log["shards"] = save_shards(best[2], args.out)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    log["total_seconds"] = time.time() - t_start
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(
        f"done: best valid loss {best[0]:.4f} (ppl {math.exp(best[0]):.2f}) at step {best[1]}, "
        f"{log['epochs']:.2f} epochs, {log['total_seconds']:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
