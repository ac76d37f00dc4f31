"""The `preftune` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

from preftune import config


def config_keys() -> list[tuple[str, object, str]]:
    """(dotted key, default, the docstring written beside the field in config.py) for every config key."""
    keys = []
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory  # type: ignore[misc]
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            keys.append((f"{section.name}.{f.name}", default, docs.get(f.name, "")))
    return keys


def config_reference() -> str:
    """Every config key with its default and meaning, for `--help`."""
    return "\n".join(f"  {key} = {default!r}\n" + textwrap.indent(textwrap.fill(doc, 90), "      ")
                     for key, default, doc in config_keys())


def config_markdown() -> str:
    """The README's config reference: one table row per key."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default!r}` | {doc} |" for key, default, doc in config_keys()]
    return "\n".join(rows)


def _config_reference(args: argparse.Namespace) -> int:
    print(config_markdown() if args.markdown else config_reference())
    return 0


def _train(args: argparse.Namespace) -> int:
    from preftune.train import train

    cfg = config.load(args.config, args.overrides + (["train.resume=auto"] if args.resume else []))
    train(cfg)
    return 0


def _sft(args: argparse.Namespace) -> int:
    from preftune.train import train

    cfg = config.load(args.config, [*args.overrides, "train.stage=sft"])
    train(cfg)
    return 0


def _iterate(args: argparse.Namespace) -> int:
    from preftune.online import iterate

    cfg = config.load(args.config, args.overrides)
    out = iterate(cfg)
    print(f"rounds: {out / 'rounds.jsonl'}")
    return 0


def section_reference(*sections: str) -> str:
    """The keys of some config sections with defaults and meanings, for a command's --help."""
    return "\n".join(f"  {key} = {default!r}\n" + textwrap.indent(textwrap.fill(doc, 90), "      ")
                     for key, default, doc in config_keys() if key.split(".")[0] in sections)


def _export(args: argparse.Namespace) -> int:
    from preftune import lora

    out = lora.merge(args.run_dir, args.out)
    print(f"merged {args.run_dir}/final into the base model: {out}")
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


def _target_config(args: argparse.Namespace, extra: list[str]):
    """The run's (or a bare model's default) config with the command line's dotted overrides applied."""
    from preftune import heldout

    target = heldout.load_target(args.target, args.reference)
    raw = config.apply_overrides(config.to_dict(target.cfg), extra + args.overrides)
    target.cfg = config.from_dict(raw)
    return target


def _write_jsonl(path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _eval(args: argparse.Namespace) -> int:
    from preftune import heldout

    target = _target_config(args, [])
    data_path, part = (args.data, "all") if args.data else heldout.eval_source(target.cfg)
    if not data_path:
        raise config.ConfigError("no held-out pairs: pass --data SOURCE (the run has no data.eval or eval_fraction)")
    result, samples = heldout.evaluate_target(target, data_path, target.cfg.eval, target.cfg.judge, part=part,
                                              progress=not args.quiet)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else (target.run_dir / "eval.json" if target.run_dir else None)
    if out is not None:
        out.write_text(text + "\n")
        if samples:
            _write_jsonl(out.with_name("samples.jsonl"), samples)
        print(f"wrote {out}" + (f" and {out.with_name('samples.jsonl')}" if samples else ""), file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from preftune import heldout

    flags = {"eval.temperature": args.temperature, "eval.top_p": args.top_p, "eval.max_new_tokens": args.max_new_tokens,
             "eval.seed": args.seed, "eval.n_per_prompt": args.n, "eval.batch_size": args.batch_size}
    target = _target_config(args, [f"{k}={v}" for k, v in flags.items() if v is not None])
    prompts = heldout.unique_prompts(args.prompts, args.num_prompts)
    sbs = heldout.side_by_side(target.policy, target.reference, target.tokenizer, prompts, target.cfg.eval,
                               progress=not args.quiet)
    out = Path(args.out) if args.out else (target.run_dir or Path(".")) / "samples.jsonl"
    _write_jsonl(out, sbs.rows())
    print(f"wrote {len(sbs.policy)} side-by-side samples for {len(prompts)} prompts to {out}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from preftune.report import write_report

    print(write_report(args.run, args.out, max_samples=args.max_samples))
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

    p = sub.add_parser("sft", help="supervised fine-tuning (the stage before DPO) from a YAML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Supervised fine-tuning on the chosen responses of a preference file or on "
                       "{prompt, completion} records (data.train); the same loop, LoRA and export as `train` "
                       "(it is `train` with train.stage=sft).\n\nexample:\n  preftune sft configs/tiny.yaml "
                       "train.max_steps=20\n  preftune train configs/tiny.yaml reference.path=runs/tiny/final",
                       epilog="config keys: see `preftune train --help`")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 lora.enabled=true")
    p.set_defaults(func=_sft)

    p = sub.add_parser(
        "iterate", help="online / iterative DPO: rounds of sample -> judge -> pair -> train from the current policy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each round takes iterate.prompts_per_round fresh prompts from iterate.prompts, samples "
        "iterate.samples_per_prompt completions per prompt from the current policy, scores them with the judge "
        "(judge.*), pairs them (iterate.pairing, iterate.margin; unpaired losses: iterate.unpaired_rule), trains "
        "the round with loss.name (full weights, or LoRA adapters with lora.enabled), and evaluates "
        "on held-out prompts. One record per round goes to <run dir>/rounds.jsonl. Run the same command again "
        "after an interruption and it continues from the last finished phase (docs/iterate.md).\n\nexample:\n"
        "  preftune iterate configs/hh_iterate.yaml iterate.rounds=2 judge.name=reward_model judge.path=RM_DIR",
        epilog="iterate and judge keys (the other sections: `preftune train --help`):\n"
        + section_reference("iterate", "judge"))
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. iterate.rounds=5 loss.beta=0.2")
    p.set_defaults(func=_iterate)

    p = sub.add_parser("export", help="merge a LoRA run's trained adapter into a full HF model",
                       description="A LoRA run saves its adapter alone in RUN_DIR/final (load it with peft on the "
                       "base model). This writes base + adapter merged into one plain HF model directory, whose "
                       "outputs equal the adapter model's.")
    p.add_argument("run_dir", help="run directory of a LoRA run (holds config.yaml and final/)")
    p.add_argument("out", help="new directory for the merged model")
    p.set_defaults(func=_export)

    p = sub.add_parser("config", help="print every config key with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    p.set_defaults(func=_config_reference)

    p = sub.add_parser("losses", help="list the available losses and their hyperparameters")
    p.set_defaults(func=_losses)

    p = sub.add_parser("eval", help="held-out preference metrics, KL and win rate of a run against its reference",
                       description="Preference accuracy, reward margins, implicit rewards and log-probs of the "
                       "policy against its reference on held-out pairs, with bootstrap intervals, as JSON. With "
                       "eval.prompts > 0 (default 64) it also samples both models for KL(policy || reference), "
                       "and with judge.name set, the policy's win rate: over the reference model's samples, or "
                       "with eval.baseline=dataset over the data's own responses; eval.temperatures=[...] gives "
                       "one per temperature. Writes <run>/eval.json and <run>/samples.jsonl.\n\nexample:\n"
                       "  preftune eval runs/tiny --data heldout.jsonl judge.name=length eval.prompts=32",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run directory (reference rebuilt from its config.yaml) or HF model directory")
    p.add_argument("--data", help="held-out preference source, any format train reads (default: the run's "
                   "data.eval, or the records its data.eval_fraction held out)")
    p.add_argument("--reference", help="reference model directory (required for a bare model directory)")
    p.add_argument("--out", help="JSON output file (default <run>/eval.json; samples.jsonl beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides of eval.* / judge.* keys, e.g. judge.name=length")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="sample policy and reference side by side on the same prompts (JSONL)",
                       description="Sample the policy and its reference on the same prompts with the same seed, "
                       "batched, with progress; one JSON line per sample: prompt, reference, policy.")
    p.add_argument("target", help="run directory or HF model directory (then --reference is required)")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line (pairs files work)")
    p.add_argument("--reference", help="reference model directory (required for a bare model directory)")
    p.add_argument("--out", help="output JSONL (default <run>/samples.jsonl)")
    p.add_argument("--num-prompts", type=int, default=0, help="use the first N distinct prompts (0 = all)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus mass (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion (default 64)")
    p.add_argument("--seed", type=int, help="sampling seed, shared by both models (default 0)")
    p.add_argument("--n", type=int, help="samples per prompt from each model (default 1)")
    p.add_argument("--batch-size", type=int, help="sequences per generate call (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.temperature=0.7")
    p.set_defaults(func=_generate)

    p = sub.add_parser("report", help="one self-contained HTML report of a run (plots, eval tables, samples)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="HTML file (default <run>/report.html)")
    p.add_argument("--max-samples", type=int, default=50, help="sample rows shown")
    p.set_defaults(func=_report)

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
    # argparse stops filling a trailing positional list (the dotted overrides) at the first option, so
    # `eval RUN --data F judge.name=x` leaves them over; take them, and reject anything else as parse_args would
    if args.command == "demo":  # the demo parses its own options (--quick, --help, ...)
        args.demo_args = extra + args.demo_args
    elif extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # `preftune ... | head`: the reader left; end quietly as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
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
