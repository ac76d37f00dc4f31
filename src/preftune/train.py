"""train(cfg): the whole preference-training loop, top to bottom.

The same code runs on 1 process or N (DDP through Accelerate; FSDP2 with parallel.sharding): every
process sees the same stream of global batches and takes its own contiguous slice, so 1 process x batch 8
and 2 processes x batch 4 consume the same pairs in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from preftune import allocator, checkpoint, data, guard, heldout, lora, sft, sharding, sinks, zero
from preftune import perf as perf_paths
from preftune.config import Config, OptimConfig, PerfConfig
from preftune.data import Batch
from preftune.logps import batch_logps
from preftune.losses import (
    PAIR_METRICS,  # noqa: F401 (re-exported: train.PAIR_METRICS names the logged rows)
    BoundLoss,
    RunningMean,
    UnpairedLogps,
    bind,
    pair_metrics,
    score_pairs,
)
from preftune.losses import validate as validate_loss
from preftune.modeling import apply_speedups, load_model, load_tokenizer
from preftune.reference import Reference
from preftune.reference import validate as validate_reference
from preftune.schedule import Schedule


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, or RMSprop: the DPO paper's optimiser (Rafailov et al. 2023, appendix B), built as its reference
    code builds it, `torch.optim.RMSprop(params, lr=lr)`, so with torch's alpha 0.99 and eps 1e-8.
    `fused` (perf.fused_adamw): AdamW's step as one kernel instead of for-each lists."""
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim.lr)
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay, fused=fused or None)


@torch.no_grad()
def sync_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656): ref <- alpha * policy + (1 - alpha) * ref;
    alpha = 1 is the hard update (ref <- policy)."""
    for ref_param, policy_param in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_param.lerp_(policy_param.to(ref_param.dtype), alpha)


# --- one micro-batch of each stage ---

Forward = tuple[Tensor, dict[str, Tensor], Batch]
"""(per-example losses (B,), per-example metric values by name, the batch)"""


def sft_forward(policy: torch.nn.Module, examples: list[data.TokenizedExample], perf: PerfConfig, pad_id: int,
                device) -> Forward:
    """SFT: the mean-token NLL of each example's response, in the resolved perf layout (one row each)."""
    batch = data.lay_out_sequences([(e.prompt_ids, e.response_ids) for e in examples],
                                   [e.source for e in examples], pad_id, perf).to(device)
    losses, values = sft.step(policy, batch, perf.logps_chunk)
    return losses, values, batch


def paired_forward(policy: torch.nn.Module, reference: Reference, pairs: list, loss_fn: BoundLoss,
                   running: RunningMean | None, perf: PerfConfig, pad_id: int, device) -> Forward:
    """DPO and family: one policy forward over chosen||rejected in the resolved perf layout, the reference's
    rows, then the scoring step held-out evaluation shares (losses.score_pairs)."""
    batch = data.lay_out(pairs, pad_id, perf).to(device)
    tokens = dict(with_tokens=loss_fn.needs_token_logps)  # LD-DPO and WPO read per-token log-probs
    policy_chosen, policy_rejected = batch_logps(
        policy, batch, perf.logps_chunk, with_sq_mass=loss_fn.needs_sq_mass, **tokens).halves()
    ref_rows = reference.scores(batch, pairs, **tokens)  # (2B,) rows; None: no reference
    ref_chosen, ref_rejected = ref_rows.halves() if ref_rows is not None else (None, None)
    out, values = score_pairs(loss_fn, policy_chosen, policy_rejected, ref_chosen, ref_rejected, running)
    return out.losses, values, batch


def unpaired_forward(policy: torch.nn.Module, reference: Reference, examples: list, loss_fn: BoundLoss,
                     kl: Tensor | None, perf: PerfConfig, pad_id: int, device) -> Forward:
    """KTO and kin: single completions, each desirable or not, in the resolved perf layout (row i = example
    i); `kl` is the step's KL estimate (step_kl_estimate, when loss_fn.kl_estimate), the same for every
    micro-batch of the step."""
    batch = data.lay_out_sequences([(e.prompt_ids, e.completion_ids) for e in examples],
                                   [e.source for e in examples], pad_id, perf).to(device)
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool, device=device)  # (B,)
    policy_rows = batch_logps(policy, batch, perf.logps_chunk)
    ref_rows = reference.scores(batch)
    out = loss_fn(UnpairedLogps(policy_rows.logps, ref_rows.logps, policy_rows.lengths, desirable, kl))
    values = pair_metrics(out, policy_rows.rows(desirable), policy_rows.rows(~desirable))
    return out.losses, values, batch


class StepMetrics:
    """The per-example metric values of one optimiser step, summed with their own counts (KTO's chosen and
    rejected counts differ) and the step's token count; all-reduced as one tensor (one collective), read back
    by name."""

    def __init__(self, device: torch.device):
        self.device, self.names, self.total = device, [], None  # total: (2 * metrics + 1,) sums, counts, tokens

    def add(self, values: dict[str, Tensor], num_tokens: int) -> None:
        if self.total is None:
            self.names = list(values)
            self.total = torch.zeros(2 * len(self.names) + 1, device=self.device)
        if list(values) != self.names:
            raise RuntimeError(f"micro-batches of one step report different metrics: {list(values)} vs {self.names}")
        with torch.no_grad():
            self.total += torch.stack([v.detach().float().sum() for v in values.values()]
                                      + [torch.tensor(float(v.numel()), device=self.device) for v in values.values()]
                                      + [torch.tensor(float(num_tokens), device=self.device)])

    def reduce(self, accelerator: Accelerator) -> None:
        self.total = accelerator.reduce(self.total, reduction="sum")

    def sum(self, name: str) -> float:
        return self.total[self.names.index(name)].item()

    def count(self, name: str) -> float:
        return self.total[len(self.names) + self.names.index(name)].item()

    def means(self) -> dict[str, float | None]:
        n = len(self.names)
        return {name: self.total[k].item() / self.total[n + k].item() if self.total[n + k] > 0 else None
                for k, name in enumerate(self.names)}

    def tokens(self) -> float:
        return self.total[-1].item()


def check(cfg: Config) -> None:
    """Where a config meets the registries: the loss against `LOSSES`, the reference against the loss's needs
    (config.validate, run on every load, has checked everything that needs no registry). train() runs it
    first; `preftune iterate` runs it on each round's config before any model loads."""
    validate_loss(cfg)
    validate_reference(cfg)


def resolve_perf(cfg: Config, loss_fn: BoundLoss, sft_stage: bool, policy: torch.nn.Module, items: list,
                 device, zero_stage: int = 0) -> tuple[PerfConfig, list[str]]:
    """perf.resolve for this run: the loss's needs, the policy's config, the device and its free memory, and
    the longest micro-batch the data can make (for the checkpointing policy)."""
    needs = perf_paths.Needs(cfg.loss.name, paired=not loss_fn.unpaired, sft=sft_stage,
                             partitioned_head=zero_stage == 3)
    rows_per_item = 1 if sft_stage or loss_fn.unpaired else 2  # chosen and rejected rows of a pair
    longest = max((p.length for p in items), default=cfg.data.max_length)
    step_tokens = rows_per_item * cfg.train.batch_size * longest  # padded rows: an upper bound for any layout
    core = getattr(policy, "base_model", policy)  # a LoRA wrapper keeps the HF model's config underneath
    model_config = getattr(core, "config", policy.config)
    dtype_bytes = torch.finfo(next(policy.parameters()).dtype).bits // 8
    return perf_paths.resolve(cfg.perf, needs, model_config, perf_paths.machine(device), step_tokens=step_tokens,
                              dtype_bytes=dtype_bytes, optimizer=cfg.optim.name,
                              attn_implementation=model_config._attn_implementation)


@dataclasses.dataclass
class _Progress:
    """What train() needs to know from inside the loop when a run fails."""

    main_process: bool = False  # the main process alone writes the run directory, so it alone removes one
    steps: int = 0  # optimiser steps this call has taken


@torch.no_grad()
def step_kl_estimate(policy: torch.nn.Module, reference: Reference, examples: list[data.TokenizedUnpaired],
                     micro_batches: list[list[int]], rank: int, batch_size: int, pad_id: int, max_length: int,
                     accelerator: Accelerator, perf: PerfConfig) -> torch.Tensor:
    """KTO's KL estimate for one optimiser step (Ethayarajh et al. 2024, arXiv:2402.01306, Sec. 4.1): the mean,
    over the m unrelated pairs (x_k, y_{k-1}) of the whole step, of log pi(y|x) - log pi_ref(y|x); the loss
    clamps it at 0 and never differentiates it.

    Example k of the step (in stream order, across micro-batches and processes) is paired with the completion
    of example k-1 (cyclically), and each process scores the rows of its own micro-batch slices; the sums and
    counts are reduced over processes, so the estimate is the same for any batch x accumulation x processes
    split (a mean of per-micro-batch means would not be). One no-grad forward of policy and reference per
    micro-batch: the cost of scoring the mismatched rows inside each micro-batch."""
    step = [j for m in micro_batches for j in m]  # (m,) the step's examples in stream order
    total = torch.zeros(2, device=accelerator.device)  # sum of log-ratios, number of rows
    offset = 0
    for global_indices in micro_batches:
        positions = range(offset + rank * batch_size, offset + (rank + 1) * batch_size)
        prompts_of = [examples[step[k]] for k in positions]
        completions_of = [examples[step[k - 1]] for k in positions]  # k = 0 takes the last
        rows = data.lay_out_sequences(data.mismatched_rows(prompts_of, completions_of, max_length),
                                      [e.source for e in prompts_of], pad_id, perf).to(accelerator.device)
        logratios = batch_logps(policy, rows, perf.logps_chunk).logps - reference.scores(rows).logps  # (B,)
        total += torch.stack([logratios.sum(), torch.tensor(float(logratios.numel()), device=total.device)])
        offset += len(global_indices)
    total = accelerator.reduce(total, reduction="sum")
    return total[0] / total[1]  # ()


def train(cfg: Config) -> Path:
    """Train the policy the config describes; returns the run directory (export in `final/`).

    A run that stops before its first optimiser step (a refused setting, a data error, a model that does not
    load, out of memory in step 1, Ctrl-C) leaves its run directory as it found it, absent or empty, so a retry
    under the same name starts clean. A directory that already held something (a run resumed or overwritten)
    is never removed, and neither is a run that took a step: its metrics say how far it got.
    """
    check(cfg)  # a refused setting stops before the run directory is touched
    run_dir = cfg.run_dir()
    existed = run_dir.is_dir()
    found_empty = not existed or not any(run_dir.iterdir())  # judged before this call writes anything
    progress = _Progress()
    try:
        return _train(cfg, progress)
    except BaseException:
        sharding.release_process_group()  # the one-process FSDP2 group this run started, if any
        if found_empty and progress.main_process and not progress.steps:
            shutil.rmtree(run_dir, ignore_errors=True)  # best effort: never hides the error being raised
            if existed:
                run_dir.mkdir()
        raise


def _train(cfg: Config, progress: _Progress) -> Path:
    """The loop itself; `progress` tells train() whether a failure leaves anything worth keeping."""
    # Accelerate only runs several CPU processes (gloo) when told the run is on CPU
    cpu_only = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    sharded = sharding.enabled(cfg)
    # a DeepSpeed launch (accelerate launch with a DEEPSPEED config): ZeRO-2/3 engine, its config filled from
    # cfg (zero.accelerator_kwargs; refuses what it can not run, before any work)
    deepspeed = zero.launched()
    engine_kwargs = zero.accelerator_kwargs(cfg) if deepspeed else {"cpu": cpu_only}
    # sharded, bf16 is FSDP2's mixed-precision policy (sharding.shard), not Accelerate's autocast
    accelerator = Accelerator(mixed_precision="no" if sharded else cfg.train.mixed_precision, **engine_kwargs)
    progress.main_process = accelerator.is_main_process
    if deepspeed:
        zero.build_models_whole()
    else:
        sharding.check_engine(cfg, accelerator)  # before any work: Accelerate's own FSDP/DeepSpeed plugins
    set_seed(cfg.train.seed)
    sinks.check_available(cfg)  # on every rank, before anything is written: a missing package stops all of them
    run_dir, resume_from = checkpoint.prepare_run_dir(cfg, accelerator)
    say = accelerator.print

    # --- data ---
    tokenizer = load_tokenizer(cfg.model)
    loss_fn = bind(cfg.loss)
    sft_stage = cfg.train.stage == "sft"
    # `pairs`: the items the stream indexes, one type per stage (TokenizedExample, TokenizedUnpaired, TokenizedPair)
    if sft_stage:
        pairs, report = sft.load_examples(cfg.data.train, tokenizer, cfg.data)
    elif loss_fn.unpaired:  # `pairs` then holds single completions, each desirable or not (KTO)
        pairs, report = data.load_unpaired(cfg.data.train, tokenizer, cfg.data)
    else:
        pairs, report = data.load_pairs(cfg.data.train, tokenizer, cfg.data, cache_dir=data.cache_dir_for(cfg))
    say(report.summary())
    if accelerator.is_main_process:
        checkpoint.write_json(run_dir / "data_report.json", vars(report))
    eval_from, eval_part = heldout.eval_source(cfg)
    eval_pairs = data.load_pairs(eval_from, tokenizer, cfg.data, part=eval_part)[0] if cfg.train.eval_every else []

    # --- models ---
    policy = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    if cfg.lora.enabled:
        if not cfg.model.path and accelerator.is_main_process:  # final/ will hold the adapter alone
            lora.record_random_base(run_dir, cfg, policy)  # what eval and export must rebuild from arch + seed
        policy = lora.wrap(policy, cfg.lora, cfg.model.adapter_path)
    # before Accelerate wraps the policy, so a copy is of the bare module; mode none builds nothing
    reference = Reference.build(cfg, policy, tokenizer)
    # the perf paths this run takes: the user's forced switches, the rest chosen for this loss, model and
    # device; `run_cfg` carries them to everything that reads perf (reference pass, layouts, optimiser), while
    # `cfg` stays as written (checkpoints and resume compare the user's settings)
    zero_stage = int(accelerator.state.deepspeed_plugin.zero_stage) if deepspeed else 0
    perf, reasons = resolve_perf(cfg, loss_fn, sft_stage, policy, pairs, accelerator.device, zero_stage)
    run_cfg = dataclasses.replace(cfg, perf=perf)
    say(perf_paths.summary(perf, reasons))
    if perf.mmap_threshold_kb and not allocator.set_mmap_threshold(perf.mmap_threshold_kb):
        say("perf.mmap_threshold_kb: glibc's mallopt refused; the allocator is left as it is")
    if reference.model is not None and reference.model is not policy:
        apply_speedups(reference.model, perf, trainable=False)
    apply_speedups(policy, perf)
    if sharded:  # before the optimiser is built: it must hold the shards, not the full parameters
        policy = sharding.shard(policy, cfg, accelerator.device)

    # --- optimiser and schedule ---
    world, rank = accelerator.num_processes, accelerator.process_index
    pairs_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    total_steps = data.steps_for(len(pairs), pairs_per_step, cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.optim,
                                fused=perf.fused_adamw)
    schedule = Schedule(cfg.optim, total_steps)  # sets each step's lr; a resume may re-plan it
    if not sharded:  # FSDP2 reduces gradients itself: no DDP wrapper around it; DeepSpeed: its engine
        policy, optimizer = accelerator.prepare(policy, optimizer)
    # precomputed: one no-grad pass (or the cache) now, and no reference model from here on. Before any
    # resume loads trained weights: the reference is always the starting model, never a checkpoint
    reference.prepare(run_cfg, accelerator, policy, tokenizer, pairs)
    say(f"{len(pairs)} {'examples' if sft_stage else 'pairs'}, {total_steps} steps of {pairs_per_step}, "
        f"{'sft' if sft_stage else 'loss ' + cfg.loss.name}, reference {reference.mode}"
        f"{' (cached)' if reference.cache_hit else ''}, {world} process(es), run dir {run_dir}")
    # held-out eval scores arbitrary rows and samples: it gets the reference as a module (never the policy)
    eval_reference = reference.as_module() if eval_pairs else None

    # --- resume ---
    # what a checkpoint holds besides the weights: name -> object with state_dict()/load_state_dict().
    # Components with state of their own (a loss's running mean, a synced reference) register here.
    nonfinite = guard.NonFiniteGuard(cfg.train.max_bad_steps)
    stateful = {"optimizer": optimizer, "schedule": schedule, "nonfinite": nonfinite}
    if accelerator.scaler is not None:  # fp16 loss scale
        stateful["scaler"] = accelerator.scaler
    if cfg.loss.ref_sync != "none":  # TR-DPO moves the reference
        stateful["reference"] = accelerator.unwrap_model(reference.model)
    # BCO's reward shift, identical on all ranks
    running = RunningMean() if loss_fn.running_state and not sft_stage else None
    start_step, changes = 0, {}
    if resume_from is not None:
        # fields that fix the numbers must match the checkpoint's config (refused otherwise); schedule
        # fields take effect from here on, the curve continuing from the last trained step's lr
        start_step, extra, changes = checkpoint.load(accelerator, resume_from, policy, stateful, cfg)
        running = RunningMean(**extra["running"]) if running is not None else None
        replanned = schedule.resume(start_step, cfg.optim, total_steps)
        say(f"resumed from {resume_from} at step {start_step}"
            + (f"; lr schedule re-planned from step {start_step + 1}" if replanned else "")
            + "".join(f"; {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    if accelerator.is_main_process:
        checkpoint.truncate_metrics(run_dir / "metrics.jsonl", start_step)
        checkpoint.record_resume(run_dir, start_step, resume_from, changes)

    # --- loop ---
    global_batch = cfg.train.batch_size * world
    lengths = [p.length for p in pairs]
    # one stream item per optimiser step, cut into micro-batches: the step's pairs do not depend on how it is
    # split into batch x accumulation x processes, and the data position is the step counter
    stream = data.batch_stream(lengths, pairs_per_step, cfg.train.seed, cfg.data.group_by_length,
                               start=start_step)
    pad_id = tokenizer.pad_token_id
    metric_sinks = sinks.Sinks(cfg, run_dir) if accelerator.is_main_process else None
    if eval_pairs:
        eval_loss = heldout.pair_loss(cfg)
        eval_shard, eval_weights = heldout.shard_for_rank(eval_pairs, rank, world, cfg.eval.batch_size)
        kl_prompts = heldout.prompts_of(eval_pairs, tokenizer, cfg.eval.prompts) \
            if eval_reference is not None and cfg.eval.prompts > 0 else []
        if kl_prompts:
            kl_shard, kl_weights = heldout.shard_for_rank(kl_prompts, rank, world, cfg.eval.batch_size)
    bar = tqdm(total=total_steps, initial=start_step, desc="train",
               disable=not (accelerator.is_main_process and cfg.train.progress))
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_indices = next(stream)
        micro_batches = [step_indices[i:i + global_batch] for i in range(0, pairs_per_step, global_batch)]
        step_pairs = sum(len(m) for m in micro_batches)  # global count: the loss is a mean over all of them
        metrics = StepMetrics(accelerator.device)
        records = []  # (sources, per-example losses) of each micro-batch: names the culprits of a non-finite step
        # KTO: one KL estimate for the whole step, before its gradient passes use it
        kl = step_kl_estimate(policy, reference, pairs, micro_batches, rank, cfg.train.batch_size, pad_id,
                              cfg.data.max_length, accelerator, perf) if loss_fn.kl_estimate else None
        for i, global_indices in enumerate(micro_batches):
            local = global_indices[rank * cfg.train.batch_size:(rank + 1) * cfg.train.batch_size]
            last = i == len(micro_batches) - 1
            # skip the gradient all-reduce on all but the last micro-batch of the step; FSDP2 reduce-scatters
            # every micro-batch, since skipping it would keep each layer's full unsharded gradient
            sync = contextlib.nullcontext() if last or sharded or deepspeed else accelerator.no_sync(policy)
            with sync:
                batch_items = [pairs[j] for j in local]
                if sft_stage:
                    losses, values, batch = sft_forward(policy, batch_items, perf, pad_id, accelerator.device)
                elif loss_fn.unpaired:
                    losses, values, batch = unpaired_forward(policy, reference, batch_items, loss_fn, kl, perf,
                                                             pad_id, accelerator.device)
                else:
                    losses, values, batch = paired_forward(policy, reference, batch_items, loss_fn, running, perf,
                                                           pad_id, accelerator.device)
                # DDP averages gradients over processes, hence x world: the step's gradient is that of
                # the mean loss over every pair of the step, whatever the batch/accumulation/process split
                step_loss = losses.sum() * world / step_pairs
                if deepspeed:  # the engine reduces (ZeRO: into partitions) and accumulates; no step here
                    policy.set_gradient_accumulation_boundary(last)
                    # the whole step's loss, summed over processes, is known once the last forward ran:
                    # if it is not finite, poison the gradient so the engine's own non-finite-norm check
                    # skips the step and clears what earlier micro-batches accumulated (the plain skip)
                    if last and not torch.isfinite(accelerator.reduce(
                            (sum(step_losses.sum() for _, step_losses in records) + losses.detach().sum()).reshape(1),
                            reduction="sum")).all():
                        step_loss = step_loss * float("nan")
                    policy.backward(step_loss)
                else:
                    accelerator.backward(step_loss)
            records.append((batch.sources, losses.detach()))
            metrics.add(values, batch.num_tokens)

        # --- optimiser step: never with a non-finite loss or gradient (a skipped step still moves the
        # schedule and the data on, so the run stays a function of the step counter) ---
        metrics.reduce(accelerator)  # before the check: every process sees the same loss
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        lr = schedule.lr(step)  # the rate this step uses
        for group in optimizer.param_groups:
            group["lr"] = lr
        if deepspeed:
            # clip (gradient_clipping = optim.max_grad_norm), step and zero grads in one call; DeepSpeed skips
            # the step itself when the global norm is not finite (inf is then what it reports)
            policy.step()
            grad_norm = float(policy.get_global_grad_norm())
            nonfinite.check(accelerator, step + 1, metrics.sum("loss"), grad_norm, records)
        else:
            grad_norm = sharding.as_float(accelerator.clip_grad_norm_(policy.parameters(), max_norm))
            if nonfinite.check(accelerator, step + 1, metrics.sum("loss"), float(grad_norm), records):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.steps = step + 1  # from here on a failure keeps the run directory
        if cfg.loss.ref_sync != "none" and (step + 1) % cfg.loss.ref_sync_every == 0:
            alpha = 1.0 if cfg.loss.ref_sync == "hard" else cfg.loss.ref_sync_alpha
            sync_reference(accelerator.unwrap_model(reference.model), accelerator.unwrap_model(policy), alpha)

        # --- metrics: summed over processes once, then divided by the pair count once ---
        elapsed = time.perf_counter() - t0
        means = metrics.means()  # None: no such example this step (KTO)
        if running is not None:
            running = running.update(metrics.sum("rewards/chosen") + metrics.sum("rewards/rejected"),
                                     metrics.count("rewards/chosen") + metrics.count("rewards/rejected"))
        row = {"step": step + 1, **means}
        if means.get("rewards/chosen") is not None and means.get("rewards/rejected") is not None:
            row["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        row.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=metrics.tokens() / elapsed,
                   skipped_steps=nonfinite.skipped)
        bar.update(1)
        accuracy = row.get("rewards/accuracies")  # absent for SFT, None on a KTO step without pairs
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc="-" if accuracy is None else f"{accuracy:.2f}")

        # --- held-out eval: every rank scores its equal-length shard (a rank-0-only forward hangs FSDP) ---
        evaluating = bool(eval_pairs) and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == total_steps)
        if evaluating:
            eval_sums = heldout.eval_sums(policy, eval_reference, eval_shard, eval_weights, loss_fn=eval_loss,
                                          pad_id=pad_id, batch_size=cfg.eval.batch_size, device=accelerator.device)
            kl_sums = heldout.kl_sums(accelerator.unwrap_model(policy), policy, eval_reference, tokenizer, kl_shard,
                                      kl_weights, cfg.eval, synced_gpus=world > 1,
                                      device=accelerator.device) if kl_prompts else None
            row.update(heldout.eval_row(accelerator.reduce(eval_sums, reduction="sum"),
                                        None if kl_sums is None else accelerator.reduce(kl_sums, reduction="sum")))
        if metric_sinks is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps
                                         or evaluating):
            metric_sinks.write(guard.json_safe(row))  # a skipped step's NaN loss is written as null
        nonfinite.stop_if_stuck(lr, cfg.train.mixed_precision)

        # --- checkpoint ---
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            # plain values the loop replaces each step ride along as `extra`
            extra = {"running": dataclasses.asdict(running)} if running is not None else {}
            checkpoint.save(accelerator, run_dir, step + 1, policy, stateful, cfg, extra)
    bar.close()
    if metric_sinks is not None:
        metric_sinks.close()

    # --- export ---
    checkpoint.export(accelerator, policy, tokenizer, run_dir / "final")
    say(f"exported {run_dir / 'final'}")
    accelerator.end_training()
    sharding.release_process_group()
    return run_dir
