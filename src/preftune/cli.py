"""The `preftune` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

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


def _data_check(args: argparse.Namespace) -> int:
    import yaml

    from preftune.data.check import check
    from preftune.modeling import load_tokenizer

    raw = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    raw = config.apply_overrides(raw or {}, args.overrides)
    # only the model and data sections matter here, so a config without loss/optim settings is fine
    cfg = config.build({k: v for k, v in raw.items() if k in ("model", "data")})
    config.validate_data(cfg.data)
    model = cfg.model if not args.model else config.ModelConfig(path=args.model)
    if not (model.tokenizer or model.path):
        raise config.ConfigError("data check needs a tokenizer: --model DIR (or 'bytes'), or a --config naming one")
    text, status = check(args.source, load_tokenizer(model), cfg.data, show=args.show)
    print(text)
    return status


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

    p = sub.add_parser("data", help="inspect preference data (see `preftune data check --help`)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check", help="counts, token lengths, truncation and every problem of a preference source",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read and tokenise a source as training would, and report: record counts, prompt/response "
        "token-length percentiles, how many pairs would be truncated or dropped, duplicates, chosen == rejected, "
        "empty responses, and each invalid record as file:line: field: problem. Exits 1 when any record is "
        "invalid.\n\nexample:\n  preftune data check examples/pairs.jsonl --model bytes data.max_length=64")
    p.add_argument("source", help="a .jsonl/.json/.parquet/.csv file, a saved HF dataset directory or a hub name")
    p.add_argument("--model", default="", help="tokenizer or model directory ('bytes': the built-in tokenizer)")
    p.add_argument("--config", default=None, help="YAML config to take the data settings (and tokenizer) from")
    p.add_argument("--show", type=int, default=10, help="how many invalid records to list (default 10)")
    p.add_argument("overrides", nargs="*", help="dotted data settings, e.g. data.shape=scored data.max_length=256")
    p.set_defaults(func=_data_check)

    p = sub.add_parser("demo", help="offline controlled-sentiment demo on SmolLM2-135M (see --help)",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a trailing positional list at the first option, so `data check SOURCE --model M
    # data.x=y` leaves the overrides over; take them, and reject anything else as parse_args would
    if extra and getattr(args, "data_command", None) == "check" and not any(a.startswith("-") for a in extra):
        args.overrides += extra
    elif args.command == "demo":  # the demo parses its own options (--quick, --help, ...)
        args.demo_args = extra + args.demo_args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
