"""train(cfg): the whole preference-training loop, top to bottom.

The same code runs on 1 process or N (DDP / FSDP / DeepSpeed through Accelerate): every process sees the
same stream of global batches and takes its own contiguous slice, so 1 process x batch 8 and 2 processes x
batch 4 consume the same pairs in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune import checkpoint, data, guard
from preftune.config import Config, OptimConfig
from preftune.logps import sequence_logps
from preftune.losses import RunningMean, UnpairedLogps, bind, pair_logps
from preftune.modeling import load_model, load_tokenizer

# metrics that are means over the step's examples, each summed with its own count (KTO's chosen and rejected
# counts differ); rewards/margins = rewards/chosen - rewards/rejected
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
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


@torch.no_grad()
def sync_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656): ref <- alpha * policy + (1 - alpha) * ref;
    alpha = 1 is the hard update (ref <- policy)."""
    for ref_param, policy_param in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_param.lerp_(policy_param.to(ref_param.dtype), alpha)


def train(cfg: Config) -> Path:
    """Train the policy the config describes; returns the run directory (export in `final/`)."""
    # Accelerate only runs several CPU processes (gloo) when told the run is on CPU
    cpu_only = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu_only)
    set_seed(cfg.train.seed)
    run_dir, resume_from = checkpoint.prepare_run_dir(cfg, accelerator)
    say = accelerator.print

    # --- data ---
    tokenizer = load_tokenizer(cfg.model)
    loss_fn = bind(cfg.loss)
    if loss_fn.unpaired:  # `pairs` then holds single completions, each desirable or not (KTO)
        pairs, report = data.load_unpaired(cfg.data.train, tokenizer, cfg.data)
    else:
        pairs, report = data.load_pairs(cfg.data.train, tokenizer, cfg.data, cache_dir=data.cache_dir_for(cfg))
    say(report.summary())
    if accelerator.is_main_process:
        checkpoint.write_json(run_dir / "data_report.json", vars(report))

    # --- models ---
    policy = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    reference = None
    if loss_fn.needs_reference:
        # frozen copy of the starting policy; reference-free losses never build one
        reference = copy.deepcopy(policy).eval().requires_grad_(False)

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
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    say(f"{len(pairs)} pairs, {total_steps} steps of {pairs_per_step} pairs, loss {cfg.loss.name}, "
        f"{world} process(es), run dir {run_dir}")

    # --- resume ---
    # what a checkpoint holds besides the weights: name -> object with state_dict()/load_state_dict().
    # Components with state of their own (a loss's running mean, a synced reference) register here.
    nonfinite = guard.NonFiniteGuard(cfg.train.max_bad_steps)
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "nonfinite": nonfinite}
    if accelerator.scaler is not None:  # fp16 loss scale
        stateful["scaler"] = accelerator.scaler
    if reference is not None and cfg.loss.ref_sync != "none":  # TR-DPO moves the reference
        stateful["reference"] = accelerator.unwrap_model(reference)
    running = RunningMean() if loss_fn.running_state else None  # BCO's reward shift, identical on all ranks
    start_step = 0
    if resume_from is not None:
        start_step, extra = checkpoint.load(accelerator, resume_from, policy, stateful, cfg)
        running = RunningMean(**extra["running"]) if running is not None else None
        say(f"resumed from {resume_from} at step {start_step}")
    if accelerator.is_main_process:
        checkpoint.truncate_metrics(run_dir / "metrics.jsonl", start_step)

    # --- loop ---
    global_batch = cfg.train.batch_size * world
    lengths = [p.length for p in pairs]
    # one stream item per optimiser step, cut into micro-batches: the step's pairs do not depend on how it is
    # split into batch x accumulation x processes, and the data position is the step counter
    stream = data.batch_stream(lengths, pairs_per_step, cfg.train.seed, cfg.data.group_by_length,
                               start=start_step)
    pad_id = tokenizer.pad_token_id
    n_metrics = len(PAIR_METRICS)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=start_step, desc="train",
               disable=not (accelerator.is_main_process and cfg.train.progress))
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_indices = next(stream)
        micro_batches = [step_indices[i:i + global_batch] for i in range(0, pairs_per_step, global_batch)]
        step_pairs = sum(len(m) for m in micro_batches)  # global count: the loss is a mean over all of them
        sums = torch.zeros(2 * n_metrics + 1, device=accelerator.device)  # sums, counts, tokens
        records = []  # (sources, per-example losses) of each micro-batch: names the culprits of a non-finite step
        for i, global_indices in enumerate(micro_batches):
            local = global_indices[rank * cfg.train.batch_size:(rank + 1) * cfg.train.batch_size]
            last = i == len(micro_batches) - 1
            # skip the gradient all-reduce on all but the last micro-batch of the step
            sync = contextlib.nullcontext() if last else accelerator.no_sync(policy)
            with sync:
                if loss_fn.unpaired:
                    unpaired = data.collate_unpaired([pairs[j] for j in local], pad_id, cfg.data.max_length)
                    unpaired = unpaired.to(accelerator.device)
                    batch = unpaired.matched
                    policy_rows = sequence_logps(policy, batch)
                    with torch.no_grad():
                        ref_rows = sequence_logps(reference, batch)
                        # KTO's z0: mean log-ratio of mismatched (x_i, y_{i-1}) rows, never differentiated
                        kl = (sequence_logps(policy, unpaired.mismatched).logps
                              - sequence_logps(reference, unpaired.mismatched).logps).mean()  # ()
                    kl = accelerator.reduce(kl, reduction="mean")  # one estimate for the whole global batch
                    lp = UnpairedLogps(policy_rows.logps, ref_rows.logps, policy_rows.lengths,
                                       unpaired.desirable, kl)
                    policy_chosen, policy_rejected = (policy_rows.rows(unpaired.desirable),
                                                      policy_rows.rows(~unpaired.desirable))
                else:
                    batch = data.collate([pairs[j] for j in local], pad_id).to(accelerator.device)
                    tokens = dict(with_tokens=loss_fn.needs_token_logps)
                    policy_chosen, policy_rejected = sequence_logps(
                        policy, batch, with_sq_mass=loss_fn.needs_sq_mass, **tokens).halves()
                    ref_chosen = ref_rejected = None
                    if reference is not None:
                        with torch.no_grad():
                            ref_chosen, ref_rejected = sequence_logps(reference, batch, **tokens).halves()
                    lp = pair_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
                out = loss_fn(lp, running)  # per-example losses (B,)
                # DDP averages gradients over processes, hence x world: the step's gradient is that of
                # the mean loss over every pair of the step, whatever the batch/accumulation/process split
                accelerator.backward(out.losses.sum() * world / step_pairs)
            records.append((batch.sources, out.losses.detach()))
            with torch.no_grad():
                values = (out.losses, out.chosen_rewards, out.rejected_rewards, out.accuracies(),
                          policy_chosen.logps, policy_rejected.logps,
                          policy_chosen.mean_logits, policy_rejected.mean_logits)  # in PAIR_METRICS order
                sums += torch.stack([v.detach().float().sum() for v in values]
                                    + [torch.tensor(float(v.numel()), device=accelerator.device) for v in values]
                                    + [batch.attention_mask.sum().float()])

        # --- optimiser step: never with a non-finite loss or gradient (a skipped step still moves the
        # schedule and the data on, so the run stays a function of the step counter) ---
        sums = accelerator.reduce(sums, reduction="sum")  # before the check: every process sees the same loss
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        if nonfinite.check(accelerator, step + 1, sums[0].item(), float(grad_norm), records):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.loss.ref_sync != "none" and (step + 1) % cfg.loss.ref_sync_every == 0:
            alpha = 1.0 if cfg.loss.ref_sync == "hard" else cfg.loss.ref_sync_alpha
            sync_reference(accelerator.unwrap_model(reference), accelerator.unwrap_model(policy), alpha)

        # --- metrics: summed over processes once, then divided by the pair count once ---
        elapsed = time.perf_counter() - t0
        n_tokens = sums[-1].item()
        means = {name: sums[k].item() / sums[n_metrics + k].item() if sums[n_metrics + k] > 0 else None
                 for k, name in enumerate(PAIR_METRICS)}  # None: no such example this step (KTO)
        if running is not None:
            chosen, rejected = PAIR_METRICS.index("rewards/chosen"), PAIR_METRICS.index("rewards/rejected")
            running = running.update(sums[chosen].item() + sums[rejected].item(),
                                     sums[n_metrics + chosen].item() + sums[n_metrics + rejected].item())
        row = {"step": step + 1, **means}
        if means["rewards/chosen"] is not None and means["rewards/rejected"] is not None:
            row["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        row.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=n_tokens / elapsed,
                   skipped_steps=nonfinite.skipped)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if metrics_file is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps):
            metrics_file.write(json.dumps(guard.json_safe(row)) + "\n")
            metrics_file.flush()
        nonfinite.stop_if_stuck(lr, cfg.train.mixed_precision)

        # --- checkpoint ---
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            # plain values the loop replaces each step ride along as `extra`
            extra = {"running": dataclasses.asdict(running)} if running is not None else {}
            checkpoint.save(accelerator, run_dir, step + 1, policy, stateful, cfg, extra)
    bar.close()
    if metrics_file is not None:
        metrics_file.close()

    # --- export ---
    checkpoint.export(accelerator, policy, tokenizer, run_dir / "final")
    say(f"exported {run_dir / 'final'}")
    accelerator.end_training()
    return run_dir
