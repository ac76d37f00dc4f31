"""Run directories and the final export in HF format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator

from preftune import config


def prepare_run_dir(cfg: config.Config, accelerator: Accelerator) -> Path:
    """Create the run directory; refuse to write over a finished or started run unless asked to."""
    run_dir = cfg.run_dir()
    if accelerator.is_main_process:
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.train.overwrite:
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already holds a run; choose another train.run_name=..., "
                "or set train.overwrite=true to replace it")
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def export(accelerator: Accelerator, model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Weights as safetensors, config and tokenizer: a directory `from_pretrained` loads.

    `get_state_dict` gathers full weights on every engine (a no-op for one process, a gather under FSDP or
    ZeRO-3); only the main process writes.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # inference users want the cache back
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        unwrapped.config.use_cache = False
        tokenizer.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
