"""One frozen, typed config tree; loaded from YAML, overridden by dotted `key=value`, saved back to YAML.

Every field is documented in place (the docstring under it); `preftune train --help` and the README's
config reference are generated from these docstrings, so this file is the single source of truth.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """HF model directory (or hub name where a network exists). Empty with `arch` set: a random-init model."""
    arch: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs incl. `model_type` (e.g. llama) to build a random-initialised model."""
    tokenizer: str = ""
    """Tokenizer directory; empty = same as `path`; `bytes` = preftune's built-in byte-level tokenizer."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16. Log-softmax always runs in float32."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off: only transformers' own classes load."""
    allow_pickle: bool = False
    """Load pickle (.bin/.pt) weights when `path` has no safetensors. Pickle can run code: only for files you trust."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager or flash_attention_2."""
    adapter_path: str = ""
    """An existing LoRA adapter directory (peft format) to continue training; needs lora.enabled. The
    reference is then the starting adapter model, never the bare base (adapters-off would be wrong)."""


@dataclass(frozen=True)
class ReferenceConfig:
    mode: str = "auto"
    """Where reference log-probs come from: auto, copy, precomputed, adapters_off, path or none. auto = none
    for reference-free losses and SFT, path when reference.path is set, adapters_off for LoRA from fresh
    adapters, copy otherwise. docs/reference.md says when to use which."""
    path: str = ""
    """HF model directory of a reference other than the starting policy (e.g. the SFT model). Used by
    mode=path, and by mode=precomputed as the model the log-probs are computed from."""
    cache_dir: str = ""
    """Directory of precomputed reference log-prob files, shared by runs; empty = <train.output_dir>/ref_cache.
    A file is reused only when the reference weights, token ids and numeric settings all match."""


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the base weights stay frozen."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Adapter scale numerator: updates are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] = field(default_factory=list)
    """Module names (or name suffixes) that get adapters, e.g. [q_proj, v_proj]; empty = every linear layer
    except the output head (peft's all-linear)."""


@dataclass(frozen=True)
class DataConfig:
    train: str = ""
    """Training preference data: a .jsonl/.json/.parquet/.csv file, a HF dataset saved with save_to_disk, or a
    hub dataset name where a network exists. Shapes and examples: docs/data.md."""
    eval: str = ""
    """Held-out preference data in any format train accepts (optional; see also eval_fraction)."""
    format: str = "auto"
    """Source format: auto (from the file suffix; a directory is a saved HF dataset), jsonl, json, parquet, csv
    or datasets."""
    shape: str = "auto"
    """Record shape: auto (from the first record's keys), pairs (prompt/chosen/rejected), implicit (chosen and
    rejected only; their shared start is the prompt), hh (Anthropic HH text), scored (response_a/response_b
    with score_a/score_b), unpaired (prompt/completion/label, for KTO), tldr_comparisons (OpenAI
    summarize-from-feedback comparisons: info/summaries/choice); for SFT also completion (prompt/completion)
    and tldr (a Reddit TL;DR post: subreddit/title/post/summary). Any text may instead be a list of {role,
    content} messages, rendered with the tokenizer's chat template."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column renames, canonical name -> column in the data, e.g. {prompt: question, chosen: response_j,
    rejected: response_k}, so other datasets' columns need no preprocessing."""
    split: str = "train"
    """Split of a HF dataset (directory or hub) to read for `train`."""
    eval_split: str = "test"
    """Split of a HF dataset to read for `eval`."""
    subset: str = ""
    """Configuration (subset) of a hub dataset with several, read for `train`, e.g. comparisons for
    openai/summarize_from_feedback; empty = the dataset's only one."""
    eval_subset: str = ""
    """Configuration (subset) of a hub dataset with several, read for `eval`."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training records for evaluation when `eval` is empty (0 = none). A
    record's side is fixed by a hash of its content, so duplicates never straddle train and eval."""
    max_samples: int = 0
    """Read at most this many records from each source (0 = all); the rest are reported as not read."""
    min_score_ratio: float = 2.0
    """Scored pairs: keep a pair only if the higher score is at least this multiple of the lower (the SHP
    filter; 1 keeps every untied pair). Left-out pairs are reported."""
    chat_template: str = ""
    """Jinja chat template (the text, or a path to a .jinja file) for conversational data; empty = the
    tokenizer's own."""
    max_length: int = 512
    """Longest prompt+response in tokens; longer pairs are truncated (counted and reported)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens once a pair must be truncated."""
    prompt_truncation: str = "keep_end"
    """Which end of an over-long prompt survives: keep_end (the words nearest the response) or keep_start."""
    drop_long: bool = False
    """Drop pairs longer than max_length instead of truncating them (each reported)."""
    skip_invalid: bool = False
    """Train on the valid records of a source that has malformed ones (each skipped one is reported). Off:
    loading stops with the list of invalid records (`preftune data check` shows them all)."""
    group_by_length: bool = True
    """Batch pairs of similar length together (shuffled within windows) so little compute goes to padding."""
    cache: bool = True
    """Keep tokenised data on disk, keyed by the source's content hash, the tokenizer and these settings; a
    second run with the same inputs skips tokenisation."""
    cache_dir: str = ""
    """Where the tokenised-data cache lives; empty = $PREFTUNE_CACHE if set, else <train.output_dir>/.cache."""


@dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"
    """Loss from the registry; `preftune losses` lists them."""
    beta: float | None = None
    """KL strength (DPO's beta; IPO's tau); unset = the loss's paper default (0.1 for DPO, 2.0 for SimPO).
    Lower lets the policy drift further from the reference."""
    params: dict[str, float] = field(default_factory=dict)
    """Loss-specific hyperparameters by name, e.g. {label_smoothing: 0.1} for cDPO."""
    weighting: str = "none"
    """Pair weights: none, or wpo (WPO, arXiv:2406.11827: weight pairs by the policy's probability of them)."""
    ld_alpha: float = 1.0
    """LD-DPO (arXiv:2409.06411): weight of tokens past the pair's shared length; 1 = off, paper uses ~0.3-0.7."""
    divergence: str = "reverse_kl"
    """f-DPO (arXiv:2309.16240) divergence: reverse_kl (= DPO), forward_kl, js or alpha."""
    divergence_alpha: float = 0.5
    """The alpha of divergence=alpha, in (0, 1)."""
    ref_sync: str = "none"
    """TR-DPO (arXiv:2404.09656) reference updates: none, soft (ref <- a policy + (1-a) ref) or hard (ref <- policy)."""
    ref_sync_alpha: float = 0.6
    """TR-DPO soft-update weight a of the policy, in (0, 1]."""
    ref_sync_every: int = 512
    """TR-DPO: update the reference every this many optimiser steps."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    """Optimiser: adamw, or rmsprop (the DPO paper's, with torch's defaults alpha 0.99 and eps 1e-8, as the DPO
    reference code builds it)."""
    lr: float = 1e-6
    """Peak learning rate (the DPO paper uses 1e-6 with batch 64)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (rmsprop takes none)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 150
    """Linear warm-up from 0 to `lr` over this many optimiser steps (paper: 150)."""
    schedule: str = "constant"
    """After warm-up: constant (paper), linear (decay to 0 at the last step) or cosine."""
    max_grad_norm: float = 10.0
    """Clip the global gradient norm to this (paper: 10); 0 disables clipping."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name under `output_dir`; empty = the config file's stem."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds a run (otherwise an error, never silent loss)."""
    batch_size: int = 8
    """Pairs per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; pairs per step = batch_size x grad_accum x processes."""
    max_steps: int = 0
    """Optimiser steps; 0 = derive from `epochs`."""
    epochs: float = 1.0
    """Passes over the training pairs when `max_steps` is 0."""
    seed: int = 0
    """Seeds data order, initialisation of random models and dropout."""
    log_every: int = 1
    """Write metrics every this many optimiser steps."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: no, bf16 or fp16."""
    progress: bool = True
    """Show a progress bar."""
    stage: str = "preference"
    """preference (DPO and family on pairs) or sft (supervised fine-tuning on the chosen responses or
    prompt/completion records; `preftune sft` sets it)."""
    eval_every: int = 0
    """Evaluate on the held-out pairs (data.eval or data.eval_fraction) every this many optimiser steps (and
    after the last); rows go to the metrics with an `eval/` prefix. 0 = never."""

    save_every: int = 100
    """Write a resumable checkpoint every this many optimiser steps (0 = never); see docs/robustness.md."""
    keep_checkpoints: int = 2
    """How many of the newest complete checkpoints to keep; older ones are deleted after each save."""
    resume: str = "never"
    """never: start afresh; auto (`--resume`): continue from the newest valid checkpoint of this run (afresh if
    there is none); or the path of a checkpoint (or of a run directory) to continue from. A resume may change
    the lr schedule (applied from the resumed step) and run controls, not what the run computes: see
    docs/robustness.md."""
    max_bad_steps: int = 5
    """Stop after this many optimiser steps in a row with a non-finite loss or gradient (each one is skipped)."""

@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16
    """Pairs per forward, and sequences per generate call, when evaluating or sampling."""
    prompts: int = 64
    """Distinct held-out prompts sampled for win rate and KL (`preftune eval`, in-training eval);
    0 = pair metrics only."""
    n_per_prompt: int = 1
    """Samples per prompt from each of policy and reference."""
    max_new_tokens: int = 64
    """Longest sampled completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy. KL is only an unbiased estimate at 1.0 with top_p 1.0."""
    temperatures: list[float] = field(default_factory=list)
    """Win rate at each of these sampling temperatures (the DPO paper's win-rate-vs-temperature curves), e.g.
    [0.25, 0.5, 0.75, 1.0]; empty = at `temperature` only. KL is always estimated at `temperature`."""
    baseline: str = "reference"
    """What the judge compares the policy's samples with: reference (the reference model's samples of the same
    prompts) or dataset (each held-out prompt's reference response from the data: the preferred response of a
    pair, a TL;DR post's human-written summary; as the DPO paper's TL;DR and Anthropic HH win rates)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 samples from the full distribution."""
    seed: int = 0
    """Seeds sampling (policy and reference use the same seed) and the bootstrap."""
    level: float = 0.95
    """Confidence level of the bootstrap intervals."""
    n_boot: int = 2000
    """Bootstrap resamples per interval."""


@dataclass(frozen=True)
class JudgeConfig:
    name: str = ""
    """Who decides policy-vs-reference wins: a reward name (length, sentiment), reward_model, openai, or
    module:function (a reward function of (prompts, completions); needs allow_code). Empty = no win rate."""
    allow_code: bool = False
    """Opt in to importing and running the module:function named in `judge.name`."""
    path: str = ""
    """reward_model: local HF sequence-classification directory (safetensors weights); sentiment: a classifier
    directory (empty = the one `preftune demo` cached last)."""
    label: int = 1
    """reward_model with several labels: the label whose log-probability is the score."""
    batch_size: int = 16
    """reward_model: texts per forward."""
    url: str = ""
    """openai: base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1."""
    model: str = ""
    """openai: model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (never logged); empty = send no key."""
    question: str = "Which response answers the prompt better?"
    """openai: the criterion put to the judge above the prompt and the two responses."""
    timeout_s: float = 60.0
    """openai: seconds to wait for one reply."""
    retries: int = 3
    """openai: further attempts after a timeout, connection error, HTTP 429 or 5xx."""
    backoff_s: float = 1.0
    """openai: wait before the first retry, doubled for each later one."""
    mode: str = "pairwise"
    """openai under `preftune iterate`: pairwise (the judge names the better of two samples, asked in both
    orders; a sample's score is its share of wins) or pointwise (the judge gives each sample a score from 1 to
    10). `preftune eval` always asks pairwise."""
    cache: str = ""
    """openai: JSONL file keeping every valid reply by its request, so a rerun or a resumed run never asks (or
    pays) twice; empty = <run dir>/judge_cache.jsonl under `preftune iterate`, no cache elsewhere."""


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files to <run>/tensorboard (pip install 'preftune[logging]')."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; an error if it is missing)."""
    wandb_project: str = "preftune"
    """W&B project; the run is named after train.run_name."""
    wandb_mode: str = "online"
    """W&B mode: online, offline (sync later with `wandb sync`) or disabled."""


@dataclass(frozen=True)
class ParallelConfig:
    sharding: str = "none"
    """none: every process holds the whole model (1 process, or DDP over N); fsdp2: weights, gradients and
    optimiser state sharded over the processes with torch's FSDP2 (fully_shard), a model-held reference
    sharded the same way, checkpoints saved shard by shard (DCP). docs/distributed.md."""
    reshard_after_forward: bool = True
    """fsdp2: free each decoder layer's gathered weights after its forward and gather them again in backward
    (least memory, ZeRO-3-like); false keeps them from forward to backward (one all-gather less per layer,
    ZeRO-2-like memory for weights)."""


@dataclass(frozen=True)
class PerfConfig:
    """Speed and memory switches. Each one changes how the numbers are computed, never which numbers: every
    combination gives the plain path's loss and gradients (tests/test_perf_paths.py). Unset (null) = automatic:
    train() picks the fastest setting proven equal for the loss, model and device (preftune/perf.py) and says
    which in one start-up line; true/false or a number forces it. Code handed an unresolved PerfConfig outside
    train() (lay_out, apply_speedups, Reference.prepare) reads unset as off."""

    plain: bool = False
    """true: the plain padded path with full logits, every switch off (for debugging and comparisons)."""
    prefix_sharing: bool | None = None
    """Encode each prompt once: a row holds prompt, chosen, rejected, and a block mask stops the rejected
    tokens from seeing the chosen ones (Wang et al. 2024, arXiv:2410.20305). Saves the prompt's second pass.
    Automatic: on for paired losses."""
    packing: bool | None = None
    """Padding-free packing: several sequences (or prefix-shared pairs) share one row, kept apart by a
    per-sequence attention mask and position ids that restart at 0 for each sequence. Automatic: on with
    attn_implementation=sdpa and hidden_size >= 512 (below that the per-unit attention calls cost more than
    the padding they save)."""
    pack_tokens: int = 0
    """Row length when packing; 0 = the longest sequence (or pair) of the batch, so attention never spans
    more than the unpacked rows would."""
    logps_chunk: int | None = None
    """> 0: run the LM head and float32 log-softmax on response tokens only, this many tokens at a time,
    recomputing each chunk in backward; the (2B, T, V) logits never exist. 0: the plain full-logits path.
    Automatic: 1024 unless the model transforms its logits (soft-capping, scaling)."""
    gradient_checkpointing: int | None = None
    """Recompute decoder layers' activations in backward instead of keeping them: 1 = every layer (about 1/3
    more compute, far less memory), n = every n-th layer (a middle ground), 0 = off. Automatic: off while the
    step's estimated activations fit in 1/8 of the memory available; else every layer with selective
    recomputation where full recomputation would need every 2nd or 3rd layer and the selective share fits;
    else the sparsest n that fits."""
    selective_checkpointing: bool | None = None
    """With gradient_checkpointing: keep each recomputed layer's matmul and attention outputs and recompute
    only its elementwise ops (norms, rotary embedding, SiLU, products) in backward: no matmul is run twice,
    and the layer keeps about half the activations it would without checkpointing (Korthikanti et al. 2022,
    arXiv:2205.05198, "selective activation recomputation"; torch's create_selective_checkpoint_contexts).
    false: full recomputation. Automatic (with automatic checkpointing): on, every layer, where full
    recomputation would need every 2nd or 3rd layer to fit (at 6M it cost 4-11% of tokens/s against none; at
    110M, in one run, faster than every-2-layers full recomputation at the same peak memory; not settled
    against full recomputation of every layer; docs/performance.md);
    else off. Forcing it on without gradient_checkpointing is refused."""
    compile: bool | None = None
    """torch.compile each decoder layer (dynamic shapes). Pays only on long runs: compiling takes minutes.
    Automatic: off."""
    fused_adamw: bool | None = None
    """AdamW as one fused kernel per step (torch's fused=True) instead of a for-each over lists of tensors:
    the same update up to float rounding, without the for-each path's temporary copies of the moments.
    Automatic: on for AdamW on CPU and CUDA."""
    mmap_threshold_kb: int | None = None
    """Linux/glibc only: blocks of at least this many KiB are mapped on their own and go back to the OS the
    moment they are freed (mallopt M_MMAP_THRESHOLD). Without it, glibc raises the threshold as tensors are
    freed and keeps freed activation memory in its heap, so peak RSS grows by a third or more. Costs some
    page-fault time per step. 0 = leave the allocator alone. Automatic: 1024 under glibc."""
    attention: str = ""
    """Attention kernel for the prefix-shared block mask: sdpa or flex_attention; empty = automatic
    (FlexAttention on CUDA for prefix-shared rows without packing, otherwise model.attn_implementation)."""


@dataclass(frozen=True)
class IterateConfig:
    """`preftune iterate`: online / iterative DPO. Each round samples the current policy on fresh prompts, scores
    the samples with the judge, pairs them, trains one round with the configured loss (model, loss, optim,
    train, perf sections), and evaluates on held-out prompts. docs/iterate.md has the recipe."""

    prompts: str = ""
    """Prompt source: .jsonl/.json/.parquet/.csv, a saved HF dataset or a hub name, read with data.format,
    data.split and data.fields. A record gives its `prompt` (text, or {role, content} messages rendered with the
    chat template), or any preference/SFT shape data.shape reads (HH, TL;DR, ...), whose prompt is taken."""
    eval_prompts: str = ""
    """Held-out prompt source, same formats, its data.eval_split (its first `num_eval_prompts`); empty = the last
    `num_eval_prompts` prompts of `prompts`, which no round trains on."""
    num_eval_prompts: int = 64
    """Held-out prompts evaluated after each round (0 = no held-out evaluation)."""
    rounds: int = 3
    """Sample -> judge -> pair -> train rounds; each samples the policy the previous round produced."""
    prompts_per_round: int = 32
    """Fresh prompts per round, taken in file order and never reused."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt from the current policy (k)."""
    max_new_tokens: int = 64
    """Longest sampled completion in tokens (round samples and held-out evaluation)."""
    temperature: float = 1.0
    """Sampling temperature for round samples and evaluation; 1.0 is the policy's own distribution."""
    top_p: float = 1.0
    """Nucleus mass for round samples; held-out KL is only unbiased at 1.0."""
    sample_batch_size: int = 32
    """Sequences per generate call."""
    seed_each_prompt: bool = False
    """Draw each prompt's k samples in one generate call of their own, from a seed of their own (seed, round,
    prompt), so they do not depend on sample_batch_size or on the other prompts of the round (costs batching);
    off: one seed per round, sample_batch_size sequences per call."""
    pairing: str = "best_worst"
    """How samples become pairs: best_worst (per prompt the highest- vs the lowest-scored sample), all_pairs
    (every two samples whose scores differ by more than `margin`, widest gap first) or disjoint (ranked by
    score: best vs worst, second best vs second worst, ...; no sample in two pairs)."""
    margin: float = 0.0
    """A pair needs its chosen score to exceed the rejected one by more than this; closer pairs are ties,
    dropped and counted."""
    max_pairs_per_prompt: int = 0
    """all_pairs, disjoint: keep at most this many pairs per prompt, widest gap first (0 = all)."""
    unpaired_rule: str = "pair_sides"
    """Unpaired losses (KTO): how scored samples become desirable/undesirable completions: pair_sides (the
    chosen sides of the pairs `pairing` builds desirable, the rejected sides undesirable; a completion on both
    sides is dropped) or threshold (every scored sample: above `threshold` desirable, below undesirable, within
    `margin` of it a tie)."""
    threshold: float = 0.0
    """unpaired_rule=threshold: the score that separates desirable from undesirable completions (on the judge's
    scale: a reward model's logit, a pointwise grade)."""
    min_pairs: int = 1
    """A round that builds fewer pairs (unpaired losses: fewer desirable + undesirable completions) stops the run
    with the round's counts."""
    reference: str = "initial"
    """Reference of each round's loss: initial (the model round 1 starts from) or round_start (the policy the
    round starts from). reference.mode picks how it is computed (auto: a frozen model; precomputed: one
    no-grad pass over the round's pairs, then freed)."""
    warmup_every_round: bool = False
    """Apply optim.warmup_steps in every round; off: only in round 1 (later rounds start warm)."""
    kl_samples: int = 0
    """Per prompt, this many of a round's samples also get log-probs under the initial model, for the record's
    KL of the current policy's samples (two extra forwards; 0 = skip)."""
    eval_every: int = 1
    """Evaluate on the held-out prompts after every this many rounds, and always after the last."""
    eval_initial: bool = True
    """Also evaluate the initial model on the held-out prompts before round 1 (the baseline of the records)."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / (self.train.run_name or "run")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it (read from the source, so docs never drift)."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            # one paragraph: a docstring wrapped over several source lines reads as one line
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; strings (from the command line) are parsed by the type."""
    origin = typing.get_origin(annotation)
    expected = getattr(annotation, "__name__", str(annotation))
    if origin is list:
        if isinstance(value, str):  # command line: `[q_proj, v_proj]` or `q_proj,v_proj`
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [v if item_type is Any else _coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = _parse_yaml(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_type = typing.get_args(annotation) or (str, Any)
        return {k: v if val_type is Any else _coerce(v, val_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        # nan passes every `< 0` check and inf every `> 0` one: refuse both here, where the key is known
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(others) == 1:  # X | None: None, or an X with X's own error message
            return None if value is None else _coerce(value, others[0], key)
        for arg in typing.get_args(annotation):
            try:
                return None if arg is type(None) and value is None else _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {annotation}, got {value!r}")
    if annotation is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {expected}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; {prefix or 'top level'} keys are {names}")
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            kwargs[key] = _build(ann, {} if value is None else value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, ann, dotted)
    return cls(**kwargs)


def build(raw: dict[str, Any]) -> Config:
    """A Config from a raw dict, types checked but values not validated (for tools that use one section)."""
    return _build(Config, raw, "")


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings to a raw config dict; the value is typed later by the field's annotation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.beta=0.2)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        cls: Any = Config
        node = raw
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            if not isinstance(node, dict):  # the YAML put a scalar or list where a mapping belongs
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])!r} is not a mapping in the config")
            if cls is None:  # inside a free-form mapping (e.g. model.arch.hidden_size)
                if i == len(parts) - 1:
                    node[part] = _parse_yaml(value, dotted)
                else:
                    node = node.setdefault(part, {})
                continue
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise ConfigError(f"unknown config key {dotted!r}; choices at this level: {names}")
            ann = _hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(ann):
                    raise ConfigError(f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.<key>=...")
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                cls = ann if dataclasses.is_dataclass(ann) else None
                if cls is None and typing.get_origin(ann) is not dict:
                    raise ConfigError(f"{dotted!r} is a {ann} value and has no sub-keys")
    return raw


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with every failure a ConfigError naming `where`. safe_load builds only plain data:
    tags such as !!python/object that would construct objects or run code are refused, never executed."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        raise ConfigError(f"{where}: not valid YAML (refused tag: {err.problem}); configs hold plain data and "
                          "can not construct Python objects or run code") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file plus dotted overrides; the run name defaults to the file's stem."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
        raw = _parse_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None
    if not cfg.train.run_name and path is not None:
        cfg = replace(cfg, "train.run_name", Path(path).stem)
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, key: str, value: Any) -> Config:
    """A copy of `cfg` with one dotted key changed (the tree is frozen)."""
    section, name = key.split(".", 1)
    sub = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})


_DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets")
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "optim.name": ("adamw", "rmsprop"),
    "perf.attention": ("", "sdpa", "flex_attention"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.stage": ("preference", "sft"),
    "reference.mode": ("auto", "copy", "precomputed", "adapters_off", "path", "none"),
    "loss.weighting": ("none", "wpo"),
    "loss.divergence": ("reverse_kl", "forward_kl", "js", "alpha"),
    "loss.ref_sync": ("none", "soft", "hard"),
    "log.wandb_mode": ("online", "offline", "disabled"),
    "eval.baseline": ("reference", "dataset"),
    "iterate.pairing": ("best_worst", "all_pairs", "disjoint"),
    "iterate.unpaired_rule": ("pair_sides", "threshold"),
    "iterate.reference": ("initial", "round_start"),
    "judge.mode": ("pairwise", "pointwise"),
    "parallel.sharding": ("none", "fsdp2"),
}


def validate_data(data: DataConfig) -> None:
    """The data section's value checks (also run alone by `preftune data check`)."""
    from preftune.data.records import CANONICAL_FIELDS, SHAPES  # late: keeps config importable on its own

    for name, choices in (("format", _DATA_FORMATS), ("shape", SHAPES),
                          ("prompt_truncation", ("keep_end", "keep_start"))):
        if getattr(data, name) not in choices:
            raise ConfigError(f"data.{name}: {getattr(data, name)!r} is not one of {list(choices)}")
    for name in data.fields:
        if name not in CANONICAL_FIELDS:
            raise ConfigError(f"data.fields.{name}: not a field preftune reads; map onto one of "
                              f"{list(CANONICAL_FIELDS)}")
    if data.max_length <= 0 or data.max_prompt_length <= 0:
        raise ConfigError(f"data.max_length ({data.max_length}) and data.max_prompt_length "
                          f"({data.max_prompt_length}) must be > 0")
    if data.max_prompt_length >= data.max_length:
        raise ConfigError(f"data.max_prompt_length ({data.max_prompt_length}) must be < data.max_length "
                          f"({data.max_length}) so each response keeps at least one token")
    if not 0 <= data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {data.eval_fraction}")
    if data.max_samples < 0:
        raise ConfigError(f"data.max_samples: must be >= 0 (0 = all), got {data.max_samples}")
    if data.min_score_ratio < 1:
        raise ConfigError(f"data.min_score_ratio: must be >= 1, got {data.min_score_ratio}")


def validate(cfg: Config) -> None:
    """Value checks that types alone can't express; each error names the key, the value and the choices."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    positive = ["train.batch_size", "train.grad_accum", "train.log_every", "train.keep_checkpoints",
                "train.max_bad_steps", "eval.batch_size", "eval.n_per_prompt", "eval.max_new_tokens", "eval.n_boot",
                "judge.batch_size", "judge.timeout_s"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(getattr(cfg, section), name)}")
    validate_data(cfg.data)
    for key in ("optim.lr", "optim.weight_decay", "optim.max_grad_norm", "train.epochs"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(getattr(cfg, section), name)}")
    for name in ("pack_tokens", "logps_chunk", "gradient_checkpointing", "mmap_threshold_kb"):
        if (getattr(cfg.perf, name) or 0) < 0:
            raise ConfigError(f"perf.{name}: must be >= 0 (0 = automatic / off), got {getattr(cfg.perf, name)}")
    if cfg.optim.name == "rmsprop" and cfg.optim.weight_decay:
        raise ConfigError(f"optim.weight_decay={cfg.optim.weight_decay}: decoupled weight decay is AdamW's; "
                          "optim.name=rmsprop (the DPO paper's) takes none")
    if cfg.optim.name == "rmsprop" and cfg.perf.fused_adamw:
        raise ConfigError("perf.fused_adamw=true: fuses AdamW's step; optim.name=rmsprop has no fused kernel")
    if cfg.train.max_steps < 0 or cfg.optim.warmup_steps < 0 or cfg.train.save_every < 0:
        raise ConfigError("train.max_steps, train.save_every and optim.warmup_steps must be >= 0")
    if not cfg.train.resume:
        raise ConfigError("train.resume: empty; use never, auto or the path of a checkpoint")
    for key in ("train.eval_every", "eval.prompts", "eval.temperature", "judge.retries", "judge.backoff_s"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(getattr(cfg, section), name)}")
    for t in cfg.eval.temperatures:
        if t < 0:
            raise ConfigError(f"eval.temperatures: each must be >= 0 (0 = greedy), got {t}")
    if not 0 < cfg.eval.top_p <= 1 or not 0 < cfg.eval.level < 1:
        raise ConfigError(f"eval.top_p must be in (0, 1] and eval.level in (0, 1); got {cfg.eval.top_p}, "
                          f"{cfg.eval.level}")
    if cfg.train.eval_every and not cfg.data.eval and cfg.data.eval_fraction == 0:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs held-out pairs: data.eval, or "
                          "data.eval_fraction > 0")
    if not cfg.model.path and not cfg.model.arch:
        raise ConfigError("model: set model.path (a HF model directory) or model.arch (a random-init config)")
    _validate_loss_values(cfg.loss)
    _validate_reference_values(cfg)
    validate_iterate(cfg.iterate)
    _validate_sharding(cfg)


# Checks of the loss against the registry (its name, hyperparameters, which modifiers it allows) and of the
# reference against the loss's needs live where a config meets the registry: `preftune.losses.validate` and
# `preftune.reference.validate`, both run by `preftune.train.check` (train() and iterate() call it first).
# This module stays plain data: it never imports the loss registry.


def validate_iterate(it: IterateConfig) -> None:
    """The iterate section's ranges (whether a judge and prompts are set is checked when iterate starts)."""
    for name in ("rounds", "prompts_per_round", "samples_per_prompt", "max_new_tokens", "sample_batch_size",
                 "min_pairs", "eval_every"):
        if getattr(it, name) <= 0:
            raise ConfigError(f"iterate.{name}: must be > 0, got {getattr(it, name)}")
    for name in ("num_eval_prompts", "max_pairs_per_prompt", "kl_samples", "margin", "temperature"):
        if getattr(it, name) < 0:
            raise ConfigError(f"iterate.{name}: must be >= 0, got {getattr(it, name)}")
    if it.samples_per_prompt < 2:
        raise ConfigError(f"iterate.samples_per_prompt: a pair needs two samples per prompt, got "
                          f"{it.samples_per_prompt}")
    if not 0 < it.top_p <= 1:
        raise ConfigError(f"iterate.top_p: must be in (0, 1], got {it.top_p}")


def _validate_loss_values(loss: LossConfig) -> None:
    """Ranges of the loss section that hold for every loss."""
    if loss.beta is not None and loss.beta <= 0:
        raise ConfigError(f"loss.beta: must be > 0, got {loss.beta}")
    if not 0 <= loss.ld_alpha <= 1:
        raise ConfigError(f"loss.ld_alpha: must be in [0, 1], got {loss.ld_alpha}")
    if loss.divergence == "alpha" and not 0 < loss.divergence_alpha < 1:
        raise ConfigError(f"loss.divergence_alpha: must be in (0, 1), got {loss.divergence_alpha}")
    if not 0 < loss.ref_sync_alpha <= 1:
        raise ConfigError(f"loss.ref_sync_alpha: must be in (0, 1], got {loss.ref_sync_alpha}")
    if loss.ref_sync_every <= 0:
        raise ConfigError(f"loss.ref_sync_every: must be > 0, got {loss.ref_sync_every}")


def _validate_reference_values(cfg: Config) -> None:
    """Reference and LoRA settings that contradict each other whatever the loss."""
    mode, lora = cfg.reference.mode, cfg.lora
    if cfg.model.adapter_path and not lora.enabled:
        raise ConfigError(f"model.adapter_path={cfg.model.adapter_path!r} continues a LoRA adapter: set "
                          "lora.enabled=true")
    if lora.enabled and (lora.r <= 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1):
        raise ConfigError(f"lora: need r > 0, alpha > 0 and 0 <= dropout < 1; got r={lora.r}, "
                          f"alpha={lora.alpha}, dropout={lora.dropout}")
    if mode == "path" and not cfg.reference.path:
        raise ConfigError("reference.mode='path' needs reference.path (a HF model directory)")
    if mode == "adapters_off" and not lora.enabled:
        raise ConfigError("reference.mode='adapters_off' needs lora.enabled=true (without adapters it is "
                          "the policy itself); use copy or precomputed")
    if mode == "adapters_off" and cfg.model.adapter_path:
        raise ConfigError(f"reference.mode='adapters_off' with model.adapter_path={cfg.model.adapter_path!r} "
                          "would make the bare base model the reference, not the adapter training starts "
                          "from; use copy or precomputed (or path, to choose the base deliberately)")
    if cfg.reference.path and mode not in ("auto", "path", "precomputed"):
        raise ConfigError(f"reference.path is set but reference.mode={mode!r} ignores it; use path, "
                          "precomputed or auto")


def _validate_sharding(cfg: Config) -> None:
    """Combinations the FSDP2 path does not run, refused before any work with the fields to change."""
    if cfg.parallel.sharding == "none":
        return
    refused = {
        "train.mixed_precision=fp16": (cfg.train.mixed_precision == "fp16",
                                       "fp16 needs a sharded gradient scaler preftune does not run; use bf16"),
        "perf.compile=true": (cfg.perf.compile, "compiling FSDP2's per-layer hooks is untested here; turn it off"),
        f"loss.ref_sync={cfg.loss.ref_sync!r}": (cfg.loss.ref_sync != "none",
                                                 "TR-DPO's reference update is not run sharded; use none"),
        f"train.eval_every={cfg.train.eval_every} and eval.prompts={cfg.eval.prompts}": (
            cfg.train.eval_every > 0 and cfg.eval.prompts > 0,
            "in-training sampling (win rate, KL) is not run sharded; set eval.prompts=0 for the held-out pair "
            "metrics alone, and sample from the export with `preftune eval`"),
    }
    for fields, (on, why) in refused.items():
        if on:
            raise ConfigError(f"parallel.sharding={cfg.parallel.sharding!r} with {fields}: {why}")
