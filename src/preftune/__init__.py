"""preftune: Direct Preference Optimization and its family for HuggingFace causal language models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from preftune.config import Config

__version__ = "0.1.0"


def iterate(cfg: Config, *, progress: bool | None = None) -> Path:
    """Online / iterative DPO (`preftune iterate`): see `preftune.online.iterate`. Imported on call, so
    `import preftune` stays free of torch."""
    from preftune.online import iterate as run

    return run(cfg, progress=progress)


__all__ = ["iterate"]
