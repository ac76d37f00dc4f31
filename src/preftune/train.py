"""train(cfg): the whole preference-training loop, top to bottom.

The same code runs on 1 process or N (DDP / FSDP / DeepSpeed through Accelerate): every process sees the
same stream of global batches and takes its own contiguous slice, so 1 process x batch 8 and 2 processes x
batch 4 consume the same pairs in the same order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune import checkpoint, data, lora, sft
from preftune.config import Config, OptimConfig
from preftune.logps import sequence_logps
from preftune.losses import Logps, bind
from preftune.modeling import load_model, load_tokenizer
from preftune.reference import Reference

# metric name -> how a step's value is formed from per-pair sums (all are means over the step's pairs)
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warm-up to 1 (the DPO paper), then constant, linear decay or cosine decay to 0."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    if optim.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: Config) -> Path:
    """Train the policy the config describes; returns the run directory (export in `final/`)."""
    # Accelerate only runs several CPU processes (gloo) when told the run is on CPU
    cpu_only = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu_only)
    set_seed(cfg.train.seed)
    run_dir = checkpoint.prepare_run_dir(cfg, accelerator)
    say = accelerator.print

    # --- data ---
    tokenizer = load_tokenizer(cfg.model)
    sft_stage = cfg.train.stage == "sft"  # SFT examples are pairs without a rejected response
    pairs, report = (sft.load_examples if sft_stage else data.load_pairs)(cfg.data.train, tokenizer, cfg.data)
    say(report.summary())
    if accelerator.is_main_process:
        checkpoint.write_json(run_dir / "data_report.json", vars(report))

    # --- models ---
    loss_fn = bind(cfg.loss.name, cfg.loss.beta, cfg.loss.params)
    policy = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    if cfg.lora.enabled:
        policy = lora.wrap(policy, cfg.lora, cfg.model.adapter_path)
    # before Accelerate wraps the policy, so a copy is of the bare module; mode none builds nothing
    reference = Reference.build(cfg, policy, tokenizer)

    # --- optimiser and schedule ---
    world, rank = accelerator.num_processes, accelerator.process_index
    pairs_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    total_steps = data.steps_for(len(pairs), pairs_per_step, cfg.train.epochs, cfg.train.max_steps)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps,
        weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # precomputed: one no-grad pass (or the cache) now, and no reference model from here on. Before any
    # resume loads trained weights: the reference is always the starting model, never a checkpoint
    reference.prepare(cfg, accelerator, policy, tokenizer, pairs)
    say(f"{len(pairs)} {'examples' if sft_stage else 'pairs'}, {total_steps} steps of {pairs_per_step}, "
        f"{'sft' if sft_stage else 'loss ' + cfg.loss.name}, reference {reference.mode}"
        f"{' (cached)' if reference.cache_hit else ''}, {world} process(es), run dir {run_dir}")

    # --- loop ---
    global_batch = cfg.train.batch_size * world
    lengths = [p.length for p in pairs]
    stream = data.batch_stream(lengths, global_batch, cfg.train.seed, cfg.data.group_by_length)
    pad_id = tokenizer.pad_token_id
    metric_names = sft.METRICS if sft_stage else PAIR_METRICS
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, desc="train", disable=not (accelerator.is_main_process and cfg.train.progress))
    for step in range(total_steps):
        t0 = time.perf_counter()
        micro_batches = [next(stream) for _ in range(cfg.train.grad_accum)]
        step_pairs = sum(len(m) for m in micro_batches)  # global count: the loss is a mean over all of them
        sums = torch.zeros(len(metric_names) + 2, device=accelerator.device)  # + pairs, tokens
        for i, global_indices in enumerate(micro_batches):
            local = global_indices[rank * cfg.train.batch_size:(rank + 1) * cfg.train.batch_size]
            batch_pairs = [pairs[j] for j in local]
            batch = (sft.collate if sft_stage else data.collate)(batch_pairs, pad_id).to(accelerator.device)
            last = i == len(micro_batches) - 1
            # skip the gradient all-reduce on all but the last micro-batch of the step
            sync = contextlib.nullcontext() if last else accelerator.no_sync(policy)
            with sync:
                if sft_stage:
                    losses, metric_sums = sft.step(policy, batch)  # (B,), one sum per sft.METRICS
                else:
                    policy_chosen, policy_rejected = sequence_logps(policy, batch).halves()
                    ref_chosen_logps, ref_rejected_logps = reference.logps(batch, batch_pairs)  # (B,) each
                    lp = Logps(policy_chosen.logps, policy_rejected.logps, policy_chosen.lengths,
                               policy_rejected.lengths, ref_chosen_logps, ref_rejected_logps)
                    out = loss_fn(lp)
                    losses = out.losses  # (B,)
                    metric_sums = [
                        out.losses.sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                        (out.chosen_rewards > out.rejected_rewards).float().sum(),
                        (out.chosen_rewards - out.rejected_rewards).sum(),
                        policy_chosen.logps.sum(), policy_rejected.logps.sum(),
                        policy_chosen.mean_logits.sum(), policy_rejected.mean_logits.sum()]
                # DDP averages gradients over processes, hence x world: the step's gradient is that of
                # the mean loss over every pair of the step, whatever the batch/accumulation/process split
                accelerator.backward(losses.sum() * world / step_pairs)
            with torch.no_grad():
                sums += torch.stack([
                    *metric_sums,
                    torch.tensor(float(len(local)), device=accelerator.device),
                    batch.attention_mask.sum().float(),
                ]).detach().float()

        # --- optimiser step ---
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # --- metrics: summed over processes once, then divided by the pair count once ---
        sums = accelerator.reduce(sums, reduction="sum")
        elapsed = time.perf_counter() - t0
        n_pairs, n_tokens = sums[-2].item(), sums[-1].item()
        row = {"step": step + 1}
        row.update({name: sums[k].item() / n_pairs for k, name in enumerate(metric_names)})
        row.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=n_tokens / elapsed)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
        if metrics_file is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps):
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
    bar.close()
    if metrics_file is not None:
        metrics_file.close()

    # --- export ---
    checkpoint.export(accelerator, policy, tokenizer, run_dir / "final")
    say(f"exported {run_dir / 'final'}")
    accelerator.end_training()
    return run_dir
