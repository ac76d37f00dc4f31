"""LoRA through peft: wrap the policy in fresh or existing adapters; merge a trained adapter into a full model.

A run trained with LoRA exports the adapter alone to `<run>/final` (megabytes, not the model). The run directory
is still all `preftune eval`, `generate` and `export` need: `load_adapter_model` rebuilds the base from the
run's config.yaml (the model.path directory, or the same random model from model.arch and train.seed) and loads
the adapter onto it. `merge` writes that model as one plain HF model whose outputs equal the adapter model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from preftune import config
from preftune.config import Config, LoraConfig
from preftune.modeling import load_model, load_tokenizer
from preftune.reference import weights_digest

ADAPTER_CONFIG = "adapter_config.json"  # peft's marker file of an adapter directory
EXPORT_RECORD = "preftune_export.json"  # written beside a merged model: which run it came from
BASE_RECORD = "base_weights.json"  # in a LoRA run on a random base: what rebuilding it from arch + seed must give


def wrap(model: torch.nn.Module, lora: LoraConfig, adapter_path: str = "") -> torch.nn.Module:
    """The model with trainable LoRA adapters and every base weight frozen.

    With `adapter_path` the adapters are that existing adapter (its own rank and targets, saved beside it),
    trained further; otherwise fresh adapters whose up-projection starts at zero, so the wrapped model
    computes exactly what the base did.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model
    except ImportError:
        raise ImportError("lora.enabled=true needs peft: pip install 'preftune[lora]'") from None

    if adapter_path:
        if not (Path(adapter_path) / ADAPTER_CONFIG).is_file():
            raise ValueError(f"model.adapter_path {adapter_path!r} holds no {ADAPTER_CONFIG}; expected a "
                             "directory written by peft's save_pretrained (e.g. a LoRA run's final/)")
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True).train()
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config).train()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def record_random_base(run_dir: Path, cfg: Config, base: torch.nn.Module) -> None:
    """Write BASE_RECORD for a LoRA run whose base is built from model.arch and train.seed, which no directory
    holds: the digest of its weights, against which `load_adapter_model` checks the base it rebuilds (another
    torch or transformers version may initialise the same arch differently)."""
    record = {"sha256": weights_digest(base), "built_from": f"model.arch with train.seed={cfg.train.seed}"}
    (Path(run_dir) / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def load_adapter_model(run_dir: Path, adapter_dir: Path | None = None) -> tuple[Config, torch.nn.Module, object]:
    """The base model a run trained (rebuilt from its config.yaml: a HF directory, or the same random model
    from `arch` and seed) with the run's trained adapter loaded, in eval mode; plus its config and tokenizer."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = config.load(run_dir / "config.yaml")
    adapter_dir = Path(adapter_dir or run_dir / "final")
    if not is_adapter_dir(adapter_dir):
        raise ValueError(f"{adapter_dir} holds no {ADAPTER_CONFIG}: run {str(run_dir)!r} did not train LoRA "
                         "adapters, and its final/ is already a full model")
    try:
        tokenizer = load_tokenizer(cfg.model)
        base = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    except OSError as err:  # transformers' answer to a missing directory (it took the path for a hub name)
        field = "model.path" if cfg.model.path else "model.tokenizer"
        value = cfg.model.path or cfg.model.tokenizer
        raise ValueError(f"{run_dir / 'config.yaml'}: {field} {value!r}, part of the base this run's LoRA "
                         f"adapter was trained on, could not be loaded ({str(err).splitlines()[0]}); final/ holds "
                         "the adapter alone, so the base must stay where the run found it") from None
    if not cfg.model.path and (run_dir / BASE_RECORD).is_file():
        if weights_digest(base) != json.loads((run_dir / BASE_RECORD).read_text())["sha256"]:
            raise ValueError(f"{run_dir / BASE_RECORD}: the base rebuilt from model.arch and train.seed="
                             f"{cfg.train.seed} (config.yaml) is not the one this run trained, whose digest is "
                             "recorded here (another torch or transformers version initialises differently?); "
                             "evaluate or `preftune export` the run where it was trained")
    return cfg, PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's base + trained adapter as one plain HF model directory (safetensors + tokenizer), and
    EXPORT_RECORD naming the run, so that `preftune eval` of the merged model can point back to it."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export directory {str(out_dir)!r} is not empty; choose another")
    cfg, model, tokenizer = load_adapter_model(run_dir)
    merged = model.merge_and_unload()  # W + (alpha / r) B A folded into each target weight
    merged.config.use_cache = True
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    base = cfg.model.path or f"random init of model.arch with train.seed={cfg.train.seed}"
    record = {"run_dir": str(run_dir.resolve()), "adapter": str((run_dir / "final").resolve()), "base": base}
    (out_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def merged_from_hint(model_dir: Path) -> str:
    """For an error about a model directory: where a merged LoRA export came from and how to evaluate that run
    ("" for any other directory)."""
    try:
        record = json.loads((Path(model_dir) / EXPORT_RECORD).read_text())
        run_dir, base = record["run_dir"], record["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (f". It is the LoRA adapter of run {run_dir} merged into its base ({base}) by `preftune export`: "
            f"evaluate the run itself (`preftune eval {run_dir}`), which rebuilds that base as the reference")
