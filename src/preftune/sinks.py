"""Where metric rows go: metrics.jsonl always, TensorBoard and Weights & Biases when the config asks.

Only the main process writes (the loop builds the sinks there alone); `check_available` runs on every
process first, so a missing package fails all ranks alike instead of leaving the others waiting.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from preftune.config import Config, ConfigError, to_dict


def check_available(cfg: Config) -> None:
    """Fail before training if a sink the config asks for cannot be created here."""
    for wanted, package, how in (
            (cfg.log.tensorboard, "tensorboard", "pip install 'preftune[logging]' (or pip install tensorboard)"),
            (cfg.log.wandb, "wandb", "pip install wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ConfigError(f"log.{package}=true but the {package!r} package is not installed: {how}, "
                           f"or set log.{package}=false")


class Sinks:
    """Fan-out of metric rows ({"step": k, name: value, ...}) to every configured sink."""

    def __init__(self, cfg: Config, run_dir: Path):
        check_available(cfg)
        # append: a resumed run continues the file it started
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = self.wandb = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.log.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.train.run_name or None,
                                    dir=str(run_dir), mode=cfg.log.wandb_mode, config=to_dict(cfg))

    def write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()  # a crashed run keeps every row it logged
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

