"""The prepared GPU check: device tests, then preftune against TRL's DPOTrainer on one GPU.

    bash benchmarks/gpu_check.sh OUT                 # on the GPU machine: installs, then runs this (<= 8 min)
    python benchmarks/gpu_check.py --cpu --out OUT   # dry run on CPU: every step, a tiny model, 1 timed step

Steps:
  1. `pytest -m gpu tests/test_gpu.py` on the device: bf16 log-probs (fp32 log-softmax), the fused SDPA
     kernels against the math kernel, FlexAttention's block mask for prefix sharing, FSDP2 on one device
     (train, sharded checkpoint, resume, export, bf16); and `pytest -m gpu tests/test_deepspeed.py`: DeepSpeed
     ZeRO-2 and ZeRO-3 on one device through `accelerate launch` (train = the plain run, engine checkpoint,
     bit-exact resume, export, bf16).
  2. A DPO benchmark on a random-init Llama of ~0.94B parameters (hidden 2048, 16 layers, vocab 32000; --cpu:
     a 2-layer toy), workload from benchmarks/vs_trl.py (the same model files, tokenizer and synthetic
     pairs feed every arm: prompts 64-128 tokens, responses 64-192, batch 8, max_length 512, beta 0.1, AdamW),
     bf16 (autocast over fp32 weights) for every arm, each arm in its own process:
       trl               TRL's DPOTrainer, its defaults (separate reference model) with bf16=True
       preftune          preftune's train(), separate (copy) reference, perf switches below
       preftune_precomp  the same with reference.mode=precomputed (its one no-grad pass is in "1st step")
     Throughput counts the workload's non-pad tokens (2 x prompt + chosen + rejected per pair) for every
     arm. MFU = 6 N x tokens/s over the bf16 matmul rate measured here (and over the H200's 989 TFLOP/s
     dense bf16 spec on a GPU), N = non-embedding parameters incl. the LM head. Memory: peak CUDA memory
     allocated (reserved beside it); on CPU peak RSS.
Writes OUT/gpu_check.json and OUT/gpu_check.txt (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import vs_trl  # noqa: E402  the workload generator shared with the CPU benchmark

vs_trl.ARCHS.setdefault("0.9B", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000))
vs_trl.ARCHS.setdefault("toy", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=1024))
BATCH, MAX_LENGTH = 8, 512  # the CPU benchmark's standard workload (vs_trl.SIZES["6M"]), on these models
for _arch in ("0.9B", "toy"):
    vs_trl.SIZES.setdefault(_arch, vs_trl.Workload(_arch, (64, 128), (64, 192), MAX_LENGTH, 256, BATCH))
H200_BF16_DENSE = 989e12  # NVIDIA's H200 SXM spec, dense bf16 tensor-core FLOP/s
PERF = {"prefix_sharing": True, "logps_chunk": 1024, "gradient_checkpointing": 1, "fused_adamw": True}
ARMS = ("trl", "preftune", "preftune_precomp")


# --- children: one trainer each, reporting step-end times and peak memory as one JSON line ---

def child_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(vs_trl.SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    records = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    trl_args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
        beta=vs_trl.BETA, learning_rate=vs_trl.LR, max_steps=args.warmup + args.steps, bf16=True,
        use_cpu=args.cpu, logging_steps=10_000, save_strategy="no", report_to=[], seed=vs_trl.SEED,
        dataloader_num_workers=0, disable_tqdm=True)
    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=trl_args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return {"step_ends": step_ends}


def child_preftune(args: argparse.Namespace) -> dict:
    """preftune's train() on the workload; a step ends when its metrics row is written (log_every=1)."""
    import torch

    from preftune import config, sinks
    from preftune.train import train

    cfg = config.from_dict({
        "model": {"path": args.model_dir},
        "reference": {"mode": "precomputed" if args.child == "preftune_precomp" else "copy"},
        "data": {"train": args.pairs, "max_length": MAX_LENGTH, "max_prompt_length": 256},
        "loss": {"name": "dpo", "beta": vs_trl.BETA},
        "optim": {"lr": vs_trl.LR, "warmup_steps": 0, "max_grad_norm": 1.0},  # TRL's clip norm
        "train": {"batch_size": BATCH, "seed": vs_trl.SEED, "max_steps": args.warmup + args.steps,
                  "log_every": 1, "save_every": 0, "progress": False, "mixed_precision": "bf16",
                  "output_dir": str(Path(args.pairs).parent / f"runs-{os.getpid()}")},
        "perf": dict(PERF, **json.loads(args.perf)),
    })
    step_ends = []
    write = sinks.Sinks.write

    def timed_write(self, row):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        write(self, row)

    sinks.Sinks.write = timed_write
    train(cfg)
    return {"step_ends": step_ends}


def child_main(args: argparse.Namespace) -> None:
    import resource

    import torch

    result = child_trl(args) if args.child == "trl" else child_preftune(args)
    if torch.cuda.is_available():
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        result["reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
        result["reserved_gb"] = None
    print(json.dumps(result))


# --- parent ---

def run_child(arm: str, workload: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--model-dir", workload["model_dir"], "--pairs",
           workload["pairs"], "--warmup", str(args.warmup), "--steps", str(args.steps), "--perf", args.perf]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if args.cpu:
        cmd.append("--cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""
    launched = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.arm_timeout)
    except subprocess.TimeoutExpired as err:  # the check goes on: one arm must not cost the whole report
        return {"error": f"timed out after {args.arm_timeout} s", "stderr_tail": str(err.stderr)[-2000:]}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ends = result.pop("step_ends")
    result["first_step_s"] = ends[0] - launched  # start-up, model load, (precompute), first step
    result["step_s"] = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:], strict=False)]
    steps = result["step_s"]
    result["tokens_per_s"] = BATCH * workload["tokens_per_pair"] / statistics.median(steps)
    result["mfu_measured"] = result["tokens_per_s"] * 6 * workload["flop_params"] / workload["matmul_flops"]
    if not args.cpu:
        result["mfu_spec"] = result["tokens_per_s"] * 6 * workload["flop_params"] / H200_BF16_DENSE
    return result


def matmul_flops(cpu: bool) -> float:
    """Sustained bf16 matmul rate on this device now (best of 10), FLOP/s."""
    import torch

    device = "cpu" if cpu else "cuda"
    n = 1024 if cpu else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(11):
        if not cpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if not cpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "flash_attn", "deepspeed",
                 "preftune"):
        try:
            versions[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"python": platform.python_version(), "device": device, "versions": versions}


def device_tests(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(REPO / "tests" / "test_gpu.py"),
           str(REPO / "tests" / "test_deepspeed.py"), "-q", "-p",
           "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}", *args.pytest_args.split()]
    env = dict(os.environ, PREFTUNE_TEST_DEVICE="cpu" if args.cpu else "cuda")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.tests_timeout)
    except subprocess.TimeoutExpired as err:
        return {"returncode": None, "summary": f"timed out after {args.tests_timeout} s", "counts": {},
                "seconds": args.tests_timeout, "failures_tail": str(err.stdout)[-3000:]}
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|deselected)", summary)}
    return {"returncode": proc.returncode, "summary": summary, "counts": counts,
            "seconds": time.perf_counter() - started, "failures_tail": proc.stdout[-3000:] if proc.returncode else ""}


def table(report: dict) -> str:
    w = report["workload"]
    lines = [f"device: {report['environment']['device']}; bf16 matmul {w['matmul_flops'] / 1e12:.1f} TFLOP/s "
             f"measured; model {w['size']} ({w['flop_params'] / 1e6:.1f}M matmul params), batch {BATCH}, "
             f"{w['tokens_per_pair']:.0f} non-pad tokens/pair, {report['args']['warmup']} warm-up + "
             f"{report['args']['steps']} timed steps",
             f"device tests: {report['device_tests'].get('summary', 'skipped (--skip-tests)')}", "",
             f"{'arm':17s} {'tokens/s':>10s} {'step s':>8s} {'peak GB':>8s} {'1st step':>9s} {'MFU':>6s} "
             f"{'MFU spec':>9s}"]
    for arm, r in report["arms"].items():
        if "error" in r:
            lines.append(f"{arm:17s} failed: {r['error']}")
            continue
        spec = f"{r['mfu_spec']:9.1%}" if r.get("mfu_spec") is not None else f"{'-':>9s}"
        lines.append(f"{arm:17s} {r['tokens_per_s']:10.0f} {statistics.median(r['step_s']):8.3f} "
                     f"{r['peak_gb']:8.2f} {r['first_step_s']:8.1f}s {r['mfu_measured']:6.1%} {spec}")
    arms = report["arms"]
    if "error" not in arms.get("trl", {"error": 1}):
        for ours in ("preftune", "preftune_precomp"):
            if "error" not in arms.get(ours, {"error": 1}):
                a, b = arms[ours], arms["trl"]
                lines.append(f"{ours} / trl: throughput x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                             f"peak memory x{a['peak_gb'] / b['peak_gb']:.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU: tiny model, same steps")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"))
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps (0: 2 on GPU, 1 with --cpu)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 6 on GPU, 1 with --cpu)")
    parser.add_argument("--perf", default="{}", help="JSON overrides of preftune's perf switches")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for the device tests")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-timeout", type=int, default=0, help="seconds (0: 150 on GPU, 900 with --cpu)")
    parser.add_argument("--arm-timeout", type=int, default=0, help="seconds per arm (0: 90 on GPU, 600 with --cpu)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup or (1 if args.cpu else 2)
    args.steps = args.steps or (1 if args.cpu else 6)
    # GPU: the whole check stays within ~8 minutes even when a step hangs (150 + 3 x 90 s + set-up)
    args.tests_timeout = args.tests_timeout or (900 if args.cpu else 150)
    args.arm_timeout = args.arm_timeout or (600 if args.cpu else 90)
    if args.child:
        child_main(args)
        return
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device; run with --cpu for the dry run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"environment": environment(), "args": vars(args)}
    print(f"environment: {json.dumps(report['environment'])}", flush=True)
    report["device_tests"] = {"skipped_by_flag": True} if args.skip_tests else device_tests(args, out)
    print(f"device tests: {report['device_tests'].get('summary', 'skipped (--skip-tests)')}", flush=True)
    size = "toy" if args.cpu else "0.9B"
    with tempfile.TemporaryDirectory() as tmp:
        workload = vs_trl.build_workload(Path(tmp) / size, size, BATCH * (args.warmup + args.steps))
        workload["matmul_flops"] = matmul_flops(args.cpu)
        report["workload"] = {k: v for k, v in workload.items() if k not in ("model_dir", "pairs")}
        report["arms"] = {}
        for arm in args.arms:
            report["arms"][arm] = run_child(arm, workload, args)
            r = report["arms"][arm]
            print(f"  {arm}: " + (f"failed: {r['error']}" if "error" in r else
                                  f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gb']:.2f} GB"), flush=True)
    report["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (out / "gpu_check.txt").write_text(text)
    print("\n" + text + f"total {report['seconds']:.0f} s; wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
