"""The `preftune` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from preftune import config


def config_reference() -> str:
    """Every config key with its default and the docstring written beside it in config.py."""
    lines = []
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory  # type: ignore[misc]
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {section.name}.{f.name} = {default!r}")
            lines.append(textwrap.indent(textwrap.fill(docs.get(f.name, ""), 90), "      "))
    return "\n".join(lines)


def config_markdown() -> str:
    """The README's config reference: one table row per key, from the docstrings in config.py."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory  # type: ignore[misc]
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append(f"| `{section.name}.{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)


def _config_reference(args: argparse.Namespace) -> int:
    print(config_markdown() if args.markdown else config_reference())
    return 0


def _train(args: argparse.Namespace) -> int:
    from preftune.train import train

    cfg = config.load(args.config, args.overrides + (["train.resume=auto"] if args.resume else []))
    train(cfg)
    return 0


def _losses(args: argparse.Namespace) -> int:
    from preftune.losses import LOSSES, MODIFIERS

    width = max(map(len, LOSSES))
    for name, spec in LOSSES.items():
        params = ", ".join(f"{k}={v}" for k, v in spec.hyperparameters().items())
        print(f"{name:<{width}}  {spec.summary}\n{'':<{width}}  hyperparameters: {params}; "
              f"needs: {', '.join(spec.needs())}")
    print("\nmodifiers (paired losses; see docs/losses.md):")
    for key, summary in MODIFIERS.items():
        print(f"  {key:<24}  {summary}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from preftune.demo import main as demo_main

    return demo_main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference fine-tuning (DPO and family) "
                                     "of HuggingFace causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy from a YAML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train with DPO (or another loss) from a YAML config; dotted key=value "
                       "arguments override it, typed by the field.\n\nexample:\n  preftune train "
                       "configs/tiny.yaml train.max_steps=20 loss.beta=0.2",
                       epilog="config keys:\n" + config_reference())
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2 optim.lr=5e-7")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its newest valid checkpoint (train.resume=auto); a specific "
                   "checkpoint: train.resume=PATH")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="print every config key with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    p.set_defaults(func=_config_reference)

    p = sub.add_parser("losses", help="list the available losses and their hyperparameters")
    p.set_defaults(func=_losses)

    p = sub.add_parser("demo", help="offline controlled-sentiment demo on SmolLM2-135M (see --help)",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (config.ConfigError, FileExistsError) as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError and model/tokenizer problems are ValueErrors with a located message
        if type(err).__module__.startswith("preftune") or type(err) is ValueError:
            print(f"preftune: error: {err}", file=sys.stderr)
            return 2
        raise
    except RuntimeError as err:  # CheckpointError (e.g. a full disk), NonFiniteError: the run stopped, diagnosed
        if type(err).__module__.startswith("preftune"):
            print(f"preftune: error: {err}", file=sys.stderr)
            return 1
        raise
