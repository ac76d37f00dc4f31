"""`preftune iterate`, iterate(cfg): online / iterative DPO, rounds of sample -> judge -> pair -> train.

Offline pairs go stale as the policy moves; each round here samples the policy the previous round produced.
Round r (1-based) lives in `<run dir>/round-r/`; every phase writes its result when it finishes, and a rerun
of the same command skips each phase whose file is there, so a run killed at any point continues from the
last finished phase (and, inside training, from train's own last checkpoint):

  samples.json  k completions for each of the round's fresh prompts from the round's starting policy
  scores.json   the judge's score per sample (null: dropped after the judge's retries, with why)
  pairs.jsonl   the pairs iterate.pairing builds (pairs.json: how many were built and dropped, and why)
  unpaired.jsonl  unpaired losses (KTO): the desirable and undesirable completions iterate.unpaired_rule
                keeps, what the round trains on (their counts in pairs.json too)
  train/        one `train()` run on the pairs, train.resume=auto (train.json once it finished); with LoRA
                its final/ is the round's adapter on the initial model, which the next round trains further
  eval.json     held-out prompts: score with interval, KL to the initial model, win rate against it
  record.json   the round's record; <run dir>/rounds.jsonl holds every finished round's

Sampling is seeded by (train.seed, round), or (train.seed, round, prompt) with iterate.seed_each_prompt, so a
rerun samples the same completions. Only files cross phases (the policy is always reloaded from disk), so a
resumed run and an uninterrupted one compute the same thing. One process; docs/iterate.md has the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from preftune import config, evaluate, judges, lora
from preftune.config import Config, ConfigError
from preftune.data.prompts import load_prompts
from preftune.data.records import Text
from preftune.data.tokenize import chat_template_of, encode_prompt
from preftune.judges import ChatJudge, JudgeError
from preftune.losses import LOSSES
from preftune.losses import validate as validate_loss
from preftune.modeling import load_model, load_tokenizer
from preftune.pairing import PairCounts, UnpairedCounts, make_pairs, unpaired_by_threshold, unpaired_from_pairs


class IterateError(RuntimeError):
    """A round can not go on (too few pairs or unpaired completions, too few prompts); the message names the
    round and the counts."""


# --- prompts ---

def judge_prompt(prompt: Text) -> str:
    """The prompt as the judge reads it: the text, or a conversation as 'role: content' lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_prompts(prompts: Sequence[Text], tokenizer, template: str | None) -> list[list[int]]:
    """Prompt ids as training encodes them: text as is, conversations rendered with the generation prompt."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(encode_prompt(tokenizer, prompt))
            continue
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("iterate.prompts holds conversations but the tokenizer has no chat template; set "
                              "data.chat_template")
        text = tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False, add_generation_prompt=True)
        out.append(encode_prompt(tokenizer, text, add_special_tokens=False))
    return out


def split_prompts(cfg: Config) -> tuple[list[Text], list[Text]]:
    """(training prompts, held-out prompts). Without iterate.eval_prompts the held-out ones are the last
    num_eval_prompts of iterate.prompts, so no round trains on them."""
    it = cfg.iterate
    prompts = load_prompts(it.prompts, cfg.data)
    if it.eval_prompts:
        held_out = load_prompts(it.eval_prompts, cfg.data, split=cfg.data.eval_split)[:it.num_eval_prompts]
        held = {repr(p) for p in held_out}
        shared = sum(repr(p) in held for p in prompts[:it.rounds * it.prompts_per_round])
        if shared:
            print(f"iterate: {shared} training prompt(s) of {it.prompts!r} also appear in the held-out "
                  f"{it.eval_prompts!r}", flush=True)
    else:
        cut = len(prompts) - it.num_eval_prompts
        prompts, held_out = prompts[:max(cut, 0)], prompts[max(cut, 0):]
    needed = it.rounds * it.prompts_per_round
    if len(prompts) < needed:
        raise IterateError(f"iterate.prompts {it.prompts!r}: {len(prompts)} training prompts (after "
                           f"{len(held_out)} held out), but {it.rounds} rounds x {it.prompts_per_round} need {needed}")
    return prompts[:needed], held_out


# --- phases on disk ---

def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def _write_json(path: Path, obj: dict) -> None:
    """Atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def phase(path: Path, compute: Callable[[], dict]) -> dict:
    """The phase's saved result, or compute it, time it and save it."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, result)
    return result


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _none_to_nan(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _interval(values: np.ndarray, ev: config.EvalConfig) -> dict | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    mean, low, high = evaluate.bootstrap_ci(values, level=ev.level, n_boot=ev.n_boot, seed=ev.seed)
    return {"mean": mean, "low": low, "high": high}


def _per_prompt(values: np.ndarray, k: int) -> np.ndarray:
    """(P * k,) -> (P,) means over each prompt's finite values (NaN for a prompt with none)."""
    grouped = values.reshape(-1, k)
    finite = np.isfinite(grouped)
    sums = np.where(finite, grouped, 0.0).sum(axis=1)
    counts = finite.sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --- the run ---

class Models:
    """Frozen models by directory, loaded on first use; the policy is always read back from disk."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer, self.loaded = cfg, tokenizer, {}

    def get(self, path: Path) -> torch.nn.Module:
        """A full model directory, or a LoRA round's adapter (`<round>/train/final`) on the base its run
        trained, built by lora.load_adapter_model from that run's config.yaml as `preftune eval` builds it."""
        key = str(path)
        if key not in self.loaded:
            if lora.is_adapter_dir(path):
                model = lora.load_adapter_model(path.parent, path)[1]
            else:
                model_cfg = dataclasses.replace(self.cfg.model, path=key, arch={}, adapter_path="")
                model = load_model(model_cfg, self.tokenizer)
            self.loaded[key] = model.eval().requires_grad_(False)
        return self.loaded[key]

    def keep_only(self, *paths: Path) -> None:
        for key in set(self.loaded) - {str(p) for p in paths}:
            del self.loaded[key]


def check_setup(cfg: Config) -> None:
    """What iterate needs beyond a valid config; raises before anything is loaded."""
    it = cfg.iterate
    if not it.prompts:
        raise ConfigError("iterate.prompts: empty; name a prompt file (JSONL/Parquet/CSV) or a saved HF dataset")
    if not cfg.judge.name:
        raise ConfigError("judge.name: empty; iterate scores its samples with a judge: a reward name (length, "
                          "sentiment), reward_model, openai, or module:function")
    if cfg.model.adapter_path:
        raise ConfigError(f"model.adapter_path={cfg.model.adapter_path!r}: iterate starts from a full model (with "
                          "lora.enabled each round trains adapters on it); merge the adapter into its base with "
                          "`preftune export RUN_DIR OUT` and set model.path=OUT")
    if cfg.lora.enabled and cfg.reference.mode == "adapters_off" and it.reference == "round_start":
        raise ConfigError("reference.mode='adapters_off' with iterate.reference='round_start': the policy with its "
                          "adapters off is the initial model in every round, not the round's start; use auto")
    if cfg.train.stage != "preference":
        raise ConfigError("train.stage: iterate trains preference rounds; run `preftune sft` first and start from "
                          "its model")


def round_config(cfg: Config, r: int, start: Path, initial: Path, data_path: Path, out: Path) -> Config:
    """The `train()` config of round r: the user's model/loss/optim/train/perf settings on the round's data
    (pairs, or unpaired completions for an unpaired loss), starting from `start`, against the reference
    iterate.reference names.

    With lora.enabled the base is always the initial model and `start` (from round 2) the previous round's
    adapter, which this round trains further (model.adapter_path): the policy is initial + one adapter, and
    the initial model is that policy with its adapters off."""
    it = cfg.iterate
    spec = LOSSES[cfg.loss.name]
    adapter = lora.is_adapter_dir(start)
    raw = config.to_dict(cfg)
    raw["model"].update(path=str(initial if adapter else start), arch={}, adapter_path=str(start) if adapter else "",
                        tokenizer=cfg.model.tokenizer or str(initial))
    raw["data"].update(train=str(data_path), eval="", eval_fraction=0.0, format="jsonl",
                       shape="unpaired" if spec.unpaired else "pairs", fields={}, max_samples=0)
    mode, ref_path = cfg.reference.mode, ""
    # one no-grad pass, then no reference model in memory, where the numbers allow it: the table holds one
    # sum per response of a pair (LD-DPO needs per-token reference log-probs, KTO mismatched rows)
    table_fits = cfg.loss.ld_alpha == 1.0 and not spec.unpaired
    if it.reference == "initial":
        if cfg.lora.enabled and not adapter and mode in ("auto", "adapters_off"):
            mode = "adapters_off"  # fresh adapters on the initial model: adapters off is the initial model
        elif mode in ("auto", "adapters_off"):
            # adapters_off with a continued adapter is refused (config.validate: the bare base is not the start
            # of an adapter run), although here the base is exactly the initial model: read it from disk
            mode, ref_path = ("precomputed" if table_fits else "path"), str(initial)
        else:
            # copy: a copy of the round's start is the start-of-round policy, not the initial model
            mode, ref_path = ("path" if mode == "copy" else mode), str(initial)
    else:  # round_start: train()'s own default, the policy it starts from
        if mode == "auto":
            mode = "precomputed" if table_fits else "auto"
        elif mode == "path":
            if adapter:
                raise ConfigError("reference.mode='path' with iterate.reference='round_start' and lora.enabled: "
                                  "the round's start is an adapter, not a model directory; use auto or copy")
            ref_path = str(start)
    if spec.needs_reference:
        raw["reference"].update(mode=mode, path=ref_path)
    else:
        raw["reference"].update(mode="auto", path="")
    raw["train"].update(output_dir=str(out), run_name="train", resume="auto", overwrite=False, eval_every=0,
                        seed=cfg.train.seed + r - 1)
    if r > 1 and not it.warmup_every_round:
        raw["optim"]["warmup_steps"] = 0
    return config.from_dict(raw)


def materialise_initial(cfg: Config, tokenizer, out: Path) -> Path:
    """The directory of the model round 1 starts from: model.path, or a random model.arch saved once."""
    if cfg.model.path:
        return Path(cfg.model.path)
    target = out / "initial"
    if not (target / "config.json").is_file():
        model = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
        tmp = out / f".initial.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


class Rounds:
    """The phases of a run, each a method from files and arguments to a JSON-ready result (see `phase`)."""

    def __init__(self, cfg: Config, out: Path, progress: bool):
        it = cfg.iterate
        self.cfg, self.it, self.ev, self.out = cfg, it, cfg.eval, out
        self.judge = judges.build(cfg.judge, cache=out / "judge_cache.jsonl")  # before any model work: fail fast
        if isinstance(self.judge, ChatJudge):
            self.judge.check_reachable()
        self.tokenizer = load_tokenizer(cfg.model)
        self.template = chat_template_of(cfg.data)
        self.train_prompts, self.eval_prompts = split_prompts(cfg)
        self.initial = materialise_initial(cfg, self.tokenizer, out)
        self.models = Models(cfg, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.sampling = {"max_new_tokens": it.max_new_tokens, "temperature": it.temperature,
                         "batch_size": it.sample_batch_size, "progress": progress}
        self.eval_ids = encode_prompts(self.eval_prompts, self.tokenizer, self.template) if self.eval_prompts else []

    def round_prompts(self, r: int) -> list[Text]:
        n = self.it.prompts_per_round
        return self.train_prompts[(r - 1) * n:r * n]

    # --- sample: k completions per prompt from the round's starting policy ---
    def sample(self, r: int, start: Path) -> dict:
        it, k = self.it, self.it.samples_per_prompt
        policy = self.models.get(start)
        prompts = self.round_prompts(r)
        ids = encode_prompts(prompts, self.tokenizer, self.template)
        texts = [judge_prompt(p) for p in prompts]
        if it.seed_each_prompt:
            parts = [evaluate.sample(policy, self.tokenizer, [text], prompt_ids=[pid], n_per_prompt=k, top_p=it.top_p,
                                     seed=_prompt_seed(self.cfg.train.seed, r, p), desc=f"round {r} prompt {p}",
                                     **{**self.sampling, "progress": False, "batch_size": k})  # one call each
                     for p, (text, pid) in enumerate(zip(texts, ids, strict=True))]
            samples = evaluate.Samples(texts, k, ids, [c for s in parts for c in s.completion_ids],
                                       [c for s in parts for c in s.completions])
        else:
            samples = evaluate.sample(policy, self.tokenizer, texts, prompt_ids=ids, n_per_prompt=k, top_p=it.top_p,
                                      seed=self.cfg.train.seed + r - 1, desc=f"round {r} samples", **self.sampling)
        kl = 0.0 if start == self.initial else None
        if it.kl_samples and start != self.initial:
            first = min(it.kl_samples, k)
            keep = [i for i in range(len(samples)) if i % k < first]
            subset = evaluate.Samples(samples.prompts, first, samples.prompt_ids,
                                      [samples.completion_ids[i] for i in keep], [samples.completions[i] for i in keep])
            kl = float(np.mean(evaluate.sequence_kl(policy, self.models.get(self.initial), subset, pad_id=self.pad_id)))
        return {"start": str(start), "prompts": prompts, "k": k, "completion_ids": samples.completion_ids,
                "completions": samples.completions, "kl_to_initial": kl}

    # --- judge: one score per sample; items the judge could not score are dropped and counted ---
    def score(self, samples: dict) -> dict:
        texts = [judge_prompt(p) for p in samples["prompts"]]
        scores, failures = judges.score_groups(self.judge, texts, samples["completions"], samples["k"])
        return {"judge": self.judge.name, "scores": _nan_to_none(scores), "dropped": len(failures),
                "failures": failures}

    # --- pair: pairs.jsonl always; for an unpaired loss also unpaired.jsonl, what it trains on ---
    def pair(self, rd: Path, samples: dict, scores: np.ndarray) -> dict:
        it = self.it
        prompts, completions, k = samples["prompts"], samples["completions"], samples["k"]
        records, counts = make_pairs(prompts, completions, scores, k, rule=it.pairing, margin=it.margin,
                                     max_per_prompt=it.max_pairs_per_prompt)
        _write_jsonl(rd / "pairs.jsonl", records)
        gaps = [rec["score_chosen"] - rec["score_rejected"] for rec in records]
        result = {**dataclasses.asdict(counts), "mean_gap": float(np.mean(gaps)) if gaps else None}
        if LOSSES[self.cfg.loss.name].unpaired:
            if it.unpaired_rule == "pair_sides":
                examples, kept = unpaired_from_pairs(prompts, records)
            else:
                examples, kept = unpaired_by_threshold(prompts, completions, scores, k, threshold=it.threshold,
                                                       margin=it.margin)
            _write_jsonl(rd / "unpaired.jsonl", examples)
            result["unpaired"] = {"rule": it.unpaired_rule, **dataclasses.asdict(kept)}
        return result

    # --- train one round: train()'s own loop, which resumes from its checkpoints after a kill ---
    def train(self, r: int, start: Path, rd: Path) -> dict:
        from preftune.train import train  # the engine and loop; pairing and prompts need neither

        run_dir = train(round_config(self.cfg, r, start, self.initial, round_data(self.cfg, rd), rd))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = rows[-1] if rows else {}
        return {"run_dir": str(run_dir), "steps": last.get("step", 0), "loss": last.get("loss"),
                "accuracy": last.get("rewards/accuracies"), "margin": last.get("rewards/margins")}

    # --- evaluate: the held-out prompts ---
    def held_out(self, policy_dir: Path, name: str, baseline: dict | None) -> dict:
        """Samples of `policy_dir` on the held-out prompts: scores, KL to the initial model, win rate."""
        ev, judge = self.ev, self.judge
        policy = self.models.get(policy_dir)
        samples = evaluate.sample(policy, self.tokenizer, [judge_prompt(p) for p in self.eval_prompts],
                                  prompt_ids=self.eval_ids, n_per_prompt=ev.n_per_prompt, seed=ev.seed, desc=name,
                                  top_p=1.0, **self.sampling)
        per_sample_prompts = [samples.prompts[samples.prompt_of(i)] for i in range(len(samples))]
        result: dict = {"policy": str(policy_dir), "prompts": len(self.eval_prompts), "n_per_prompt": ev.n_per_prompt}
        scores = np.full(len(samples), np.nan)
        if isinstance(judge, judges.RewardJudge):
            scores, _ = judges.score_groups(judge, samples.prompts, samples.completions, ev.n_per_prompt)
            result["score"] = _interval(_per_prompt(scores, ev.n_per_prompt), ev)
        kl = np.zeros(len(samples))
        if policy_dir != self.initial:
            kl = evaluate.sequence_kl(policy, self.models.get(self.initial), samples, pad_id=self.pad_id)
        result["kl_to_initial"] = _interval(_per_prompt(kl, ev.n_per_prompt), ev)
        if baseline is not None and policy_dir != self.initial:
            verdict = judges.judge_texts(judge, per_sample_prompts, samples.completions,
                                         [s["completion"] for s in baseline["samples"]], ev.n_per_prompt,
                                         level=ev.level, n_boot=ev.n_boot, seed=ev.seed)
            result["vs_initial"] = verdict.summary
        result["samples"] = [{"prompt": p, "completion": c, "completion_ids": ids, "score": s, "kl": float(d)}
                             for p, c, ids, s, d in zip(per_sample_prompts, samples.completions,
                                                        samples.completion_ids, _nan_to_none(scores), kl, strict=True)]
        return result


def round_data(cfg: Config, rd: Path) -> Path:
    """The file round directory `rd` trains on: its pairs, or its unpaired completions for an unpaired loss."""
    return rd / ("unpaired.jsonl" if LOSSES[cfg.loss.name].unpaired else "pairs.jsonl")


def iterate(cfg: Config, *, progress: bool | None = None) -> Path:
    """Run (or continue) the rounds the config describes; returns the run directory. The final policy is
    `<run dir>/round-<last>/train/final`; `<run dir>/rounds.jsonl` holds one record per round."""
    from preftune.train import check

    config.validate(cfg)
    check_setup(cfg)
    it = cfg.iterate
    out = cfg.run_dir()
    # the registry's checks on a round's config before the run directory is claimed: a config that can not
    # train must not become the saved config a corrected rerun is compared with
    initial = Path(cfg.model.path) if cfg.model.path else out / "initial"
    validate_loss(cfg)  # the loss name first: round_config reads the loss's needs
    check(round_config(cfg, 1, initial, initial, round_data(cfg, out / "round-1"), out / "round-1"))
    _claim_run_dir(cfg, out)
    run = Rounds(cfg, out, cfg.train.progress if progress is None else progress)

    baseline = None
    if run.eval_prompts and it.eval_initial:
        print(f"iterate: the initial model on {len(run.eval_prompts)} held-out prompts", flush=True)
        baseline = phase(out / "baseline.json", partial(run.held_out, run.initial, "initial model", None))

    start = run.initial
    for r in range(1, it.rounds + 1):
        rd = out / f"round-{r}"
        print(f"\n=== iterate round {r}/{it.rounds}: {it.prompts_per_round} prompts x {it.samples_per_prompt} "
              f"samples from {start} ===", flush=True)
        samples = phase(rd / "samples.json", partial(run.sample, r, start))
        scored = phase(rd / "scores.json", partial(run.score, samples))
        scores = _none_to_nan(scored["scores"])
        if scored["dropped"]:
            print(f"round {r}: the judge could not score {scored['dropped']} item(s), dropped (first: "
                  f"{scored['failures'][0]})", flush=True)
        paired = phase(rd / "pairs.json", partial(run.pair, rd, samples, scores))
        dropped = {key: paired[key] for key in ("ties", "identical", "empty", "unscored", "over_cap")}
        print(f"round {r}: {paired['built']} pairs; dropped: {dropped}", flush=True)
        drawn = (f"{len(samples['prompts'])} prompts x {samples['k']} samples, {scored['dropped']} judge item(s) "
                 "failed")
        if "unpaired" in paired:
            kept = paired["unpaired"]
            examples = kept["desirable"] + kept["undesirable"]
            print(f"round {r}: {kept['desirable']} desirable and {kept['undesirable']} undesirable completions "
                  f"({kept['rule']})", flush=True)
            if examples < it.min_pairs:
                raise IterateError(f"round {r}: {examples} unpaired completions kept ({kept['desirable']} desirable, "
                                   f"{kept['undesirable']} undesirable), fewer than iterate.min_pairs={it.min_pairs} "
                                   f"({drawn}; iterate.unpaired_rule={kept['rule']!r} dropped "
                                   f"{kept['conflicting']} conflicting, {kept['ties']} ties, {kept['empty']} empty, "
                                   f"{kept['unscored']} unscored; pairs dropped: {dropped})")
        elif paired["built"] < it.min_pairs:
            raise IterateError(f"round {r}: {paired['built']} pairs built, fewer than iterate.min_pairs={it.min_pairs} "
                               f"({drawn}; dropped: {dropped}); sample more per prompt "
                               "(iterate.samples_per_prompt), lower iterate.margin, or use iterate.pairing=all_pairs")
        trained = phase(rd / "train.json", partial(run.train, r, start, rd))
        policy_dir = Path(trained["run_dir"]) / "final"
        evaluated = None
        if run.eval_prompts and (r % it.eval_every == 0 or r == it.rounds):
            evaluated = phase(rd / "eval.json", partial(run.held_out, policy_dir, f"round {r} eval", baseline))
        _write_json(rd / "record.json", round_record(r, it, samples, scores, scored, paired, trained, evaluated,
                                                     cfg.eval))
        _write_rounds(out, r)
        start = policy_dir
        run.models.keep_only(run.initial)
    print(f"\niterate: {it.rounds} round(s) done; final policy {start}; records {out / 'rounds.jsonl'}", flush=True)
    return out


def _prompt_seed(seed: int, r: int, p: int) -> int:
    return (seed * 1_000_003 + r * 10_007 + p) % 2**31


def round_record(r: int, it: config.IterateConfig, samples: dict, scores: np.ndarray, scored: dict, paired: dict,
                 trained: dict, evaluated: dict | None, ev: config.EvalConfig) -> dict:
    """One line of rounds.jsonl: everything about round r that a practitioner compares across rounds."""
    k = samples["k"]
    return {
        "round": r, "start": samples["start"], "policy": str(Path(trained["run_dir"]) / "final"),
        "reference": it.reference, "prompts": len(samples["prompts"]), "samples": len(samples["completions"]),
        "sample_score": _interval(_per_prompt(scores, k), ev),
        "sample_kl_to_initial": samples["kl_to_initial"],
        "judge": {"name": scored["judge"], "scored": int(np.isfinite(scores).sum()), "dropped": scored["dropped"],
                  "failures": scored["failures"][:10]},
        "pairs": {key: value for key, value in paired.items() if key != "seconds"},
        "train": {key: value for key, value in trained.items() if key != "seconds"},
        "eval": None if evaluated is None else {key: value for key, value in evaluated.items()
                                                if key not in ("samples", "seconds")},
        "seconds": {"sample": samples["seconds"], "judge": scored["seconds"], "pair": paired["seconds"],
                    "train": trained["seconds"], "eval": evaluated["seconds"] if evaluated else 0.0},
    }


def _write_rounds(out: Path, last: int) -> None:
    records = [(out / f"round-{r}" / "record.json").read_text(encoding="utf-8") for r in range(1, last + 1)]
    tmp = out / f".rounds.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(json.loads(rec), ensure_ascii=False) + "\n" for rec in records))
    os.replace(tmp, out / "rounds.jsonl")


# keys whose change leaves a run's finished phases valid: how it is shown, not what it computes
# (iterate.rounds too: round r's prompts and seeds do not depend on how many rounds follow, so a finished run
# can be continued for more rounds)
_COSMETIC = {("train", "progress"), ("train", "overwrite"), ("train", "log_every"), ("iterate", "rounds")}


def _claim_run_dir(cfg: Config, out: Path) -> None:
    """A fresh directory, or the same run to continue: a different config would mix two runs' rounds."""
    saved = out / "iterate.yaml"
    if saved.is_file():
        before = config.to_dict(config.load(saved))
        now = config.to_dict(cfg)
        changed = [f"{section}.{key}" for section, values in now.items() for key, value in values.items()
                   if (section, key) not in _COSMETIC and before.get(section, {}).get(key) != value
                   and not (section, key) == ("train", "run_name")]
        if changed and not cfg.train.overwrite:
            raise FileExistsError(f"{out} holds an iterate run with other settings ({', '.join(changed)}); rerun "
                                  "with the same config to continue it, choose another train.run_name, or set "
                                  "train.overwrite=true to start over")
        if changed:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not cfg.train.overwrite:
        raise FileExistsError(f"{out} already holds files that are not an iterate run; choose another "
                              "train.run_name or set train.overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, saved)


__all__ = ["IterateError", "JudgeError", "PairCounts", "UnpairedCounts", "iterate", "make_pairs", "round_config",
           "split_prompts"]
