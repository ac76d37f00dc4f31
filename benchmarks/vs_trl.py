"""preftune vs TRL's DPOTrainer on one workload, side by side, on this machine.

    python benchmarks/vs_trl.py                # full: 6M, 110M and the 6M long-sequence workload
    python benchmarks/vs_trl.py --quick        # 6M only (a few minutes); --quick --long adds 6M-2048

Both trainers get the same random-init Llama (saved once as safetensors, loaded by each), the same tokenizer,
the same synthetic pairs (fixed seed: prompts 64-128 tokens, responses 64-192, EOS included), batch 8 pairs,
max_length 512, fp32, DPO beta 0.1, AdamW lr 1e-6. Each arm runs in its own process, the arms alternate,
and each child reports its step times and its own peak RSS (getrusage ru_maxrss). TRL is a
benchmark-only dependency (`pip install -e .[bench]`).

Arms:
  trl_default      DPOTrainer defaults: separate reference model, gradient checkpointing on
  trl_best         precompute_ref_log_probs=True, gradient checkpointing off (TRL's fastest CPU settings;
                   its padding_free is off since its DPO refactor)
  preftune         preftune's train() with reference.mode=copy (a separate reference model) and its perf
                   switches on (prefix sharing, packing, chunked log-probs; per size: PREFTUNE_PERF)
  preftune_precomp the same with reference.mode=precomputed: one no-grad pass over the pairs before the first
                   step (timed in "first step"), no reference model in memory afterwards
  preftune_defaults, preftune_defaults_precomp
                   the same two reference modes with NO perf switch set by this script: what
                   `preftune train config.yaml` does by itself (perf.resolve; its start-up line is printed).
                   The default arms are these, the TRL ones and trl_default_mmap; the hand-set preftune and
                   preftune_precomp run when named in --arms.

"pairs/s incl. ref pass" (precomputed arms and trl_best): the run's pairs, each scored once by the reference
pass and trained on once, over the wall time from launching the process to the end of its last step (start-up,
the reference pass and every step). Workload 6M-2048 is the long-sequence arm: the 6M model, prompts of 1024
tokens, responses of 512-1024, max_length 2048, batch 4, 1 warm-up + 3 timed steps.

Throughput counts the workload's non-pad tokens (2 x prompt + chosen + rejected per pair, what a plain
padded batch attends to) for every arm, whatever layout computes them. MFU = 6 N x tokens/s over the fp32
matmul rate measured in this run, N = non-embedding parameters including the LM head.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ARCHS = {
    "6M": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=8192),
    "110M": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}


@dataclass(frozen=True)
class Workload:
    arch: str  # a key of ARCHS
    prompt_len: tuple[int, int]  # token range of a prompt (inclusive)
    response_len: tuple[int, int]  # token range of each response, EOS included
    max_length: int
    max_prompt_length: int
    batch: int
    steps: tuple[int, int] | None = None  # (warm-up, timed) steps, when not the command line's
    arms: tuple[str, ...] = ()  # the arms this workload runs (of those asked for), when not all


SIZES = {
    "6M": Workload("6M", (64, 128), (64, 192), 512, 256, 8),
    "110M": Workload("110M", (64, 128), (64, 192), 512, 256, 8),
    # long sequences: preftune's default path never builds (2B, T, V) logits; TRL's does
    "6M-2048": Workload("6M", (1024, 1024), (512, 1024), 2048, 1024, 4, steps=(1, 3),
                        arms=("trl_default", "preftune_defaults", "trl_best", "preftune_defaults_precomp")),
}
BETA, LR, SEED = 0.1, 1e-6, 0

# preftune's switches for its arms, per model size; chosen by the measurements in docs/performance.md
# (6M: packing's per-unit attention calls cost more than the padding they save on a model this small, so
# prefix-shared rows go through one SDPA call with a block mask instead)
PREFTUNE_PERF = {
    "6M": {"prefix_sharing": True, "packing": False, "pack_tokens": 0, "logps_chunk": 1024,
           "gradient_checkpointing": 0, "compile": False, "fused_adamw": True, "mmap_threshold_kb": 1024},
    "110M": {"prefix_sharing": True, "packing": True, "pack_tokens": 0, "logps_chunk": 1024,
             "gradient_checkpointing": 1, "compile": False, "fused_adamw": True, "mmap_threshold_kb": 1024},
}
# TRL's default arm again under the allocator setting preftune's perf.mmap_threshold_kb makes (glibc reads
# it from the environment at start-up), so the memory ratio is not just an allocator tweak TRL could have too.
# Peak memory is reached in the first two steps, so this arm runs only those.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
MEMORY_ONLY = {"trl_default_mmap": (1, 1)}  # arm -> (warm-up, timed) steps
REF_PASS_ARMS = {"trl_best", "preftune_defaults_precomp", "preftune_precomp"}  # a reference pass before step 1


# --- workload (parent) ---

def build_workload(workdir: Path, size: str, num_pairs: int) -> dict:
    """Tokenizer, random-init model and pairs on disk; the same files feed both trainers."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = SIZES[size]
    arch = ARCHS[spec.arch]
    vocab_size = arch["vocab_size"]
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    # one word per id: any whitespace-joined word list tokenises back to exactly those ids in either trainer
    vocab = {s: i for i, s in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    model_dir = workdir / "model"
    tokenizer.save_pretrained(model_dir)
    model_config = AutoConfig.for_model("llama", **arch, max_position_embeddings=2048, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(model_dir, safe_serialization=True)

    rng = random.Random(SEED)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(len(specials), vocab_size)}" for _ in range(n))

    pairs_path, tokens = workdir / "pairs.jsonl", 0
    with pairs_path.open("w") as f:
        for _ in range(num_pairs):
            p = rng.randint(*spec.prompt_len)
            c, r = rng.randint(*spec.response_len), rng.randint(*spec.response_len)
            # EOS written in the text (counted in the response length), so neither trainer appends another
            record = {"prompt": words(p), "chosen": " " + words(c - 1) + " <eos>",
                      "rejected": " " + words(r - 1) + " <eos>"}
            f.write(json.dumps(record) + "\n")
            tokens += 2 * p + c + r
    embed = arch["vocab_size"] * arch["hidden_size"]
    params = sum(t.numel() for t in AutoModelForCausalLM.from_config(model_config).parameters())
    return {"size": size, "model_dir": str(model_dir), "pairs": str(pairs_path), "tokens_per_pair": tokens / num_pairs,
            "flop_params": params - embed}  # the input embedding is a lookup, not a matmul


def matmul_flops(n: int = 2048, reps: int = 8) -> float:
    """Sustained fp32 matmul rate of this machine now (best of `reps`), in FLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# --- children: one trainer each, reporting step times as one JSON line ---

def child_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    records = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    best = args.arm == "trl_best"  # trl_default_mmap is trl_default in another environment
    spec = SIZES[args.size]
    trl_args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=spec.batch, max_length=spec.max_length,
        beta=BETA,
        learning_rate=LR, max_steps=args.warmup + args.steps, bf16=False, fp16=False, use_cpu=True,
        logging_steps=10_000, save_strategy="no", report_to=[], seed=SEED, dataloader_num_workers=0,
        disable_tqdm=True, precompute_ref_log_probs=best, gradient_checkpointing=not best)
    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=trl_args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Clock()])
    # the tokenised dataset both trainers should agree on
    row = trainer.train_dataset[0]
    ids = {k: len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    trainer.train()
    return {"step_ends": step_ends, "first_pair_lengths": ids}


def child_preftune(args: argparse.Namespace) -> dict:
    """preftune's own trainer, `train()`, on the workload; a step ends when its metrics row is written."""
    import torch

    from preftune import config, data, sinks
    from preftune import perf as perf_paths
    from preftune import train as train_module
    from preftune.modeling import load_tokenizer

    spec = SIZES[args.size]
    defaults = args.arm.startswith("preftune_defaults")
    # the defaults arms set no switch (only --perf, for trying a lever by hand); the others the hand-set ones
    perf = json.loads(args.perf) if defaults else dict(PREFTUNE_PERF[spec.arch], **json.loads(args.perf))
    steps = args.warmup + args.steps
    cfg = config.from_dict({
        "model": {"path": args.model_dir},
        # precomputed: the log-prob cache lives in this run's own output dir, so every run pays for its pass
        "reference": {"mode": "precomputed" if args.arm.endswith("precomp") else "copy"},
        "data": {"train": args.pairs, "max_length": spec.max_length, "max_prompt_length": spec.max_prompt_length},
        "loss": {"name": "dpo", "beta": BETA},
        "optim": {"lr": LR, "warmup_steps": 0, "max_grad_norm": 1.0},  # TRL's clip norm, for like-for-like
        "train": {"batch_size": spec.batch, "seed": SEED, "max_steps": steps, "log_every": 1, "save_every": 0,
                  "progress": False, "output_dir": str(Path(args.pairs).parent / f"runs-{os.getpid()}")},
        "perf": perf,
    })
    # the padding share of the layouts train() builds (from the perf settings it resolves, kept here as it
    # resolves them): the same stream of batches, laid out the same way after the run
    resolved = {}
    resolve_perf = train_module.resolve_perf

    def resolve_and_keep(*a, **k):
        out = resolve_perf(*a, **k)
        resolved["perf"], resolved["line"] = out[0], perf_paths.summary(*out)
        return out

    train_module.resolve_perf = resolve_and_keep
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    pairs, _ = data.load_pairs(cfg.data.train, tokenizer, cfg.data)
    stream = data.batch_stream([p.length for p in pairs], spec.batch, SEED, cfg.data.group_by_length)
    batches = [[pairs[i] for i in next(stream)] for _ in range(steps)]
    lengths = {"prompt_ids": len(pairs[0].prompt_ids), "chosen_ids": len(pairs[0].chosen_ids),
               "rejected_ids": len(pairs[0].rejected_ids)}
    del pairs, tokenizer
    step_ends = []
    write = sinks.Sinks.write

    def timed_write(self, row):  # log_every=1: train() writes one row right after each optimiser step
        step_ends.append(time.perf_counter())
        write(self, row)

    sinks.Sinks.write = timed_write
    torch.manual_seed(SEED)
    train_module.train(cfg)
    padding = []
    for batch_pairs in batches:
        batch = data.lay_out(batch_pairs, pad_id, resolved["perf"])
        padding.append(batch.padding_share if isinstance(batch, data.PackedBatch) else data.padding_share(batch))
    return {"step_ends": step_ends, "padding_share": statistics.mean(padding),
            "first_pair_lengths": lengths, "perf_line": resolved["line"]}


def run_child(arm: str, workload: dict, args: argparse.Namespace, perf: str) -> dict:
    warmup, steps = MEMORY_ONLY.get(arm, SIZES[workload["size"]].steps or (args.warmup, args.steps))
    cmd = [sys.executable, __file__, "--child", arm, "--size", workload["size"], "--model-dir",
           workload["model_dir"], "--pairs", workload["pairs"],
           "--warmup", str(warmup), "--steps", str(steps), "--perf", perf]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if arm == "trl_default_mmap":
        env.update(ALLOCATOR_ENV)
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = result.pop("maxrss_kb") / 1024**2
    # time.perf_counter is system-wide monotonic on Linux, so the child's clock readings compare to `launched`
    ends = result.pop("step_ends")
    result["first_step_s"] = ends[0] - launched
    result["step_s"] = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:], strict=False)]
    result["run_s"] = ends[-1] - launched  # start-up, any reference pass, every step
    result["num_pairs"] = SIZES[workload["size"]].batch * len(ends)
    return result


def child_main(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    result = child_trl(args) if args.child.startswith("trl") else child_preftune(args)
    # peak resident memory of this trainer's process (Linux: kilobytes); any helper processes it ran count too
    result["maxrss_kb"] = max(resource.getrusage(who).ru_maxrss
                              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps(result))


# --- report (parent) ---

def summarise(runs: list[dict], workload: dict, flops: float) -> dict:
    batch = SIZES[workload["size"]].batch
    steps = [s for r in runs for s in r["step_s"]]
    pairs_per_s = [batch / s for s in steps]
    tokens_per_s = [p * workload["tokens_per_pair"] for p in pairs_per_s]
    return {
        "tokens_per_s": statistics.median(tokens_per_s),
        "tokens_lo": min(tokens_per_s), "tokens_hi": max(tokens_per_s),
        "pairs_per_s": batch * len(steps) / sum(steps),
        "pairs_per_s_with_ref_pass": statistics.median(r["num_pairs"] / r["run_s"] for r in runs),
        "perf_line": runs[0].get("perf_line"),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "first_step_s": statistics.median(r["first_step_s"] for r in runs),
        "mfu": statistics.median(tokens_per_s) * 6 * workload["flop_params"] / flops,
        "padding_share": runs[0].get("padding_share"),
        "steps": len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6M model only (and 6M-2048 with --long)")
    parser.add_argument("--long", action="store_true", help="with --quick: also the 6M-2048 long-sequence arm")
    parser.add_argument("--sizes", nargs="*", default=None, help=f"subset of {list(SIZES)}")
    parser.add_argument("--repeats", type=int, default=0,
                        help="rounds of all arms per size (0: 2 for 6M, 1 for 110M)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="*", default=["trl_default", "preftune_defaults", "trl_best",
                                                      "preftune_defaults_precomp", "trl_default_mmap"],
                        help="trl_default_mmap: TRL defaults under preftune's allocator setting, memory only")
    parser.add_argument("--perf", default="{}", help="JSON overrides of preftune's perf switches for its arms")
    parser.add_argument("--hand-perf", default="{}",
                        help="JSON overrides for the hand-set arms (preftune, preftune_precomp) only, e.g. "
                        "'{\"gradient_checkpointing\": 2}' to time another setting beside the defaults in one run")
    parser.add_argument("--json", default="", help="also write all results to this file")
    # child-process arguments
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--arm", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.arm = args.child
        child_main(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    sizes = args.sizes or ((["6M", "6M-2048"] if args.long else ["6M"]) if args.quick else ["6M", "110M", "6M-2048"])
    flops_before = matmul_flops()
    print(f"fp32 matmul (2048^2, {args.threads} threads): {flops_before / 1e9:.0f} GFLOP/s; "
          f"{args.warmup} warm-up + {args.steps} timed steps per run unless the workload says", flush=True)
    results: dict[str, dict] = {}
    hand_perf = dict(json.loads(args.perf), **json.loads(args.hand_perf))
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            spec = SIZES[size]
            warmup, timed = spec.steps or (args.warmup, args.steps)
            num_pairs = spec.batch * (warmup + timed)  # one epoch: every arm scores every pair exactly once
            workload = build_workload(Path(tmp) / size, size, num_pairs)
            arms = [a for a in args.arms if not spec.arms or a in spec.arms]
            print(f"{size}: {num_pairs} pairs, batch {spec.batch}, max_length {spec.max_length}; hand-set preftune "
                  f"perf {json.dumps(dict(PREFTUNE_PERF[spec.arch], **hand_perf))}", flush=True)
            repeats = args.repeats or (2 if size == "6M" else 1)
            runs: dict[str, list[dict]] = {arm: [] for arm in arms}
            for rep in range(repeats):
                for arm in arms:  # alternating trainers, so drifting machine load hits both
                    hand = arm in ("preftune", "preftune_precomp")
                    run = run_child(arm, workload, args, json.dumps(hand_perf) if hand else args.perf)
                    runs[arm].append(run)
                    print(f"  {size} round {rep + 1}/{repeats} {arm:17s} steps "
                          f"{' '.join(f'{s:.2f}' for s in run['step_s'])} s, peak {run['peak_rss_gb']:.2f} GB, "
                          f"first step {run['first_step_s']:.1f} s, lengths {run['first_pair_lengths']}", flush=True)
                    if run.get("perf_line") and rep == 0:
                        print(f"    {run['perf_line']}", flush=True)
            flops = (flops_before + matmul_flops()) / 2
            results[size] = {arm: summarise(r, workload, flops) for arm, r in runs.items()}
            results[size]["_workload"] = dict(workload, matmul_gflops=flops / 1e9)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    print()
    print(f"{'model':7s} {'arm':25s} {'tokens/s (min-max)':>22s} {'pairs/s':>8s} {'peak RSS':>9s} "
          f"{'1st step':>9s} {'MFU':>6s} {'pad':>5s} {'pairs/s incl. ref pass':>23s}")
    for size, arms in results.items():
        for arm, r in arms.items():
            if arm.startswith("_"):
                continue
            pad = "" if r["padding_share"] is None else f"{r['padding_share']:.0%}"
            with_ref = f"{r['pairs_per_s_with_ref_pass']:.2f}" if arm in REF_PASS_ARMS else ""
            print(f"{size:7s} {arm:25s} {r['tokens_per_s']:8.0f} ({r['tokens_lo']:5.0f}-{r['tokens_hi']:5.0f}) "
                  f"{r['pairs_per_s']:8.2f} {r['peak_rss_gb']:7.2f}GB {r['first_step_s']:8.1f}s "
                  f"{r['mfu']:6.1%} {pad:>5s} {with_ref:>23s}")
        w = arms["_workload"]
        print(f"{'':6s} ({w['tokens_per_pair']:.0f} non-pad tokens/pair, {w['flop_params'] / 1e6:.1f}M matmul "
              f"params, matmul {w['matmul_gflops']:.0f} GFLOP/s)")
    print()
    print("ratios preftune / TRL (throughput: tokens/s; memory: peak RSS)")
    for size, arms in results.items():
        for ours in ("preftune_defaults", "preftune_defaults_precomp", "preftune", "preftune_precomp"):
            for theirs in ("trl_default", "trl_best", "trl_default_mmap"):
                if ours in arms and theirs in arms:
                    a, b = arms[ours], arms[theirs]
                    speed = "" if theirs in MEMORY_ONLY else \
                        f"throughput x{a['tokens_per_s'] / b['tokens_per_s']:.2f}"
                    print(f"  {size:7s} {ours:25s} vs {theirs:16s} {speed:17s}"
                          f"  memory x{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}")
        for ours in ("preftune_defaults_precomp", "preftune_precomp"):
            if ours in arms and "trl_best" in arms:
                a, b = arms[ours], arms["trl_best"]
                print(f"  {size:7s} {ours:25s} vs {'trl_best':16s} pairs/s incl. the reference pass "
                      f"x{a['pairs_per_s_with_ref_pass'] / b['pairs_per_s_with_ref_pass']:.2f}")


if __name__ == "__main__":
    main()
