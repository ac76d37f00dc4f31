"""Peak memory of each reference mode on one workload, each mode in its own process.

    PYTHONPATH=src python benchmarks/reference_memory.py [--hidden 512 --layers 4 --vocab 16384 --steps 3]

The workload: a random Llama saved once as a HF directory (every mode loads the policy from it; path modes also
load the reference from it), the example pairs, batch 4, AdamW. Full fine-tuning modes are compared with `copy`,
LoRA modes with LoRA + `copy`. Peak RSS is the child's ru_maxrss: it includes the Python/torch runtime, which is
the same in every row, so the differences between rows are what a mode costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (config sections over the base workload, the row it is compared with)
MODES = {
    "copy": ({"reference": {"mode": "copy"}}, "copy"),
    "precomputed": ({"reference": {"mode": "precomputed"}}, "copy"),
    "path": ({"reference": {"mode": "path", "path": "{start}"}}, "copy"),
    "precomputed from path": ({"reference": {"mode": "precomputed", "path": "{start}"}}, "copy"),
    "none (reference-free loss)": ({"reference": {"mode": "none"}, "loss": {"name": "{reference_free}"}}, "copy"),
    "lora + copy": ({"lora": {"enabled": True}, "reference": {"mode": "copy"}}, "lora + copy"),
    "lora + adapters_off": ({"lora": {"enabled": True}, "reference": {"mode": "adapters_off"}}, "lora + copy"),
    "lora + precomputed": ({"lora": {"enabled": True}, "reference": {"mode": "precomputed"}}, "lora + copy"),
}


def reference_free_loss() -> str:
    """A reference-free loss from the registry, found by its property (the loop never runs a reference)."""
    from preftune.losses import LOSSES

    return next(name for name, spec in LOSSES.items() if not spec.needs_reference and not spec.unpaired)


def child(spec: dict) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from preftune import config
    from preftune.train import train

    sections = json.loads(json.dumps(spec["sections"]).replace("{reference_free}", reference_free_loss()))
    raw = spec["base"]
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    start = time.perf_counter()
    train(config.from_dict(raw))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_mib": peak_mib, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384, help="model vocab (the byte tokenizer uses 259 ids)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="*", default=list(MODES), help=f"subset of {list(MODES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    sys.path.insert(0, str(REPO / "src"))
    from preftune.config import ModelConfig
    from preftune.modeling import load_model, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="preftune-refmem-"))
    arch = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
            "num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 8,
            "vocab_size": args.vocab, "max_position_embeddings": 256, "tie_word_embeddings": False}
    model_cfg = ModelConfig(arch=arch, tokenizer="bytes")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    start_dir = work / "start"
    model.save_pretrained(start_dir, safe_serialization=True)
    tokenizer.save_pretrained(start_dir)
    del model
    print(f"workload: random Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{params / 1e6:.1f}M params ({params * 4 / 2**20:.0f} MiB fp32); 16 pairs, batch 4, {args.steps} steps")

    base = {
        "model": {"path": str(start_dir)},
        "data": {"train": str(REPO / "examples" / "pairs.jsonl"), "max_length": 128, "max_prompt_length": 64},
        "loss": {"name": "dpo"},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "train": {"output_dir": str(work / "runs"), "batch_size": 4, "max_steps": args.steps, "progress": False},
    }
    results = {}
    for name in args.modes:
        sections, _ = MODES[name]
        sections = json.loads(json.dumps(sections).replace("{start}", str(start_dir)))
        run_base = json.loads(json.dumps(base))
        run_base["train"]["run_name"] = name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        run_base["reference"] = {"cache_dir": str(work / f"cache-{run_base['train']['run_name']}")}  # cold cache
        spec = json.dumps({"base": run_base, "sections": sections})
        out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        if out.returncode != 0:
            sys.exit(f"{name}: failed\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"\n{'mode':<28} {'peak RSS MiB':>12} {'vs':>14} {'ratio':>6} {'delta MiB':>10} {'wall s':>7}")
    for name, r in results.items():
        against = MODES[name][1]
        ref = results.get(against)
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
        delta = f"{r['peak_mib'] - ref['peak_mib']:+.0f}" if ref else "-"
        print(f"{name:<28} {r['peak_mib']:>12.0f} {against:>14} {ratio:>6} {delta:>10} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
