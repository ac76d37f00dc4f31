"""Held-out evaluation of a trained policy against its reference: pair metrics with bootstrap intervals,
side-by-side samples, win rate under a judge and sequence-level KL.

`preftune eval`, `preftune generate` and the loop's in-training eval all go through here. Nothing here
touches Accelerate: the loop shards pairs with `shard_for_rank` and reduces the sums itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch

from preftune import config, lora
from preftune.data import DataError, TokenizedPair, collate
from preftune.data.records import Text
from preftune.evaluate import Samples, bootstrap_ci, per_prompt_mean, sample, sequence_kl
from preftune.logps import sequence_logps
from preftune.losses import PAIR_METRICS, BoundLoss, bind
from preftune.losses import score_pairs as score_batch
from preftune.modeling import load_model, load_tokenizer
from preftune.reference import Reference

# per-pair quantities `score_pairs` returns, in the order the loop logs them
# the training rows' metrics (losses.PAIR_METRICS) and, per pair, the margin between the two rewards
PAIR_KEYS = (*PAIR_METRICS[:4], "rewards/margins", *PAIR_METRICS[4:])
REF_KEYS = ("ref_logps/chosen", "ref_logps/rejected")
T = TypeVar("T")


@dataclasses.dataclass
class Target:
    """What `preftune eval/generate` compares: a policy, its reference and how the run trained it."""

    cfg: config.Config  # the run's config (loss, beta, data limits); defaults for a bare model directory
    tokenizer: object
    policy: torch.nn.Module
    reference: torch.nn.Module
    run_dir: Path | None  # None when a bare model directory was given


def load_target(path: str | Path, reference: str | Path | None = None) -> Target:
    """A run directory (policy = run/final, reference rebuilt from run/config.yaml) or a bare HF model
    directory (then `reference`, another model directory, is required: a bare model has no known start).

    A LoRA run's final/ holds the adapter alone: the policy is then the run's base (model.path, or the same
    random model from model.arch and train.seed) with that adapter loaded, unmerged, as it trained; the
    reference is rebuilt as for any run (for fresh adapters, the base itself: what adapters_off computed).
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        cfg = config.load(path / "config.yaml")
        policy_dir = path / "final"
        if not policy_dir.is_dir():
            raise ValueError(f"{path}: run has no exported policy at {policy_dir} (did training finish?)")
        run_dir: Path | None = path
    elif lora.is_adapter_dir(path):
        raise ValueError(f"{path} holds a LoRA adapter, not a model: pass the run directory that holds its "
                         "config.yaml (e.g. the adapter's parent), from which the base and the reference are rebuilt")
    elif path.is_dir():
        if reference is None:
            raise ValueError(f"{path} is a model directory, not a run (no config.yaml): pass --reference "
                             f"MODEL_DIR to name the model it is compared against{lora.merged_from_hint(path)}")
        cfg = config.from_dict({"model": {"path": str(path)}})
        policy_dir, run_dir = path, None
    else:
        raise ValueError(f"{path}: no such run or model directory")
    if run_dir is not None and lora.is_adapter_dir(policy_dir):
        _, policy, tokenizer = lora.load_adapter_model(run_dir, policy_dir)
    else:
        model_cfg = dataclasses.replace(cfg.model, path=str(policy_dir), arch={}, tokenizer="")
        tokenizer = load_tokenizer(model_cfg)
        policy = load_model(model_cfg, tokenizer).eval()
    # never the trained policy (ANCHORS: reference log-probs from the trained policy make every reward 0)
    ref_cfg = cfg if reference is None else dataclasses.replace(
        cfg, reference=dataclasses.replace(cfg.reference, mode="path", path=str(reference)))
    ref_model = Reference.for_eval(ref_cfg, tokenizer).model
    # one process: both models on the GPU when there is one (sampling a multi-billion model on CPU takes days)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Target(cfg, tokenizer, policy.to(device), ref_model.to(device), run_dir)


def pair_loss(cfg: config.Config) -> BoundLoss:
    """The loss whose rewards and value held-out pairs are scored with: the run's own, with its modifiers;
    for an unpaired loss (KTO) DPO with the run's beta, whose implicit reward beta * log-ratio is KTO's too."""
    loss_fn = bind(cfg.loss)
    return bind("dpo", cfg.loss.beta) if loss_fn.unpaired else loss_fn


def eval_source(cfg: config.Config) -> tuple[str, str]:
    """(source, part) of a run's held-out pairs for `data.load_pairs`: `data.eval`, else the records of
    `data.train` that `data.eval_fraction` holds out; ("", "all") when the run has neither."""
    if cfg.data.eval:
        return cfg.data.eval, "eval"
    if cfg.data.eval_fraction > 0:
        return cfg.data.train, "eval"
    return "", "all"


def prompts_of(pairs: Sequence[TokenizedPair], tokenizer, limit: int) -> list[str]:
    """Distinct prompts of tokenised pairs, in order, at most `limit` (0 = all), as text `sample` encodes
    again: decoded with special tokens kept, so a chat template's markers survive (encode_prompt drops a
    doubled BOS)."""
    prompts: list[str] = []
    seen: set[tuple[int, ...]] = set()
    for pair in pairs:
        key = tuple(pair.prompt_ids)
        if key not in seen:
            seen.add(key)
            prompts.append(tokenizer.decode(pair.prompt_ids, skip_special_tokens=False))
            if len(prompts) == limit:
                break
    return prompts


def shard_for_rank(items: Sequence[T], rank: int, world: int, batch_size: int) -> tuple[list[T], torch.Tensor]:
    """This rank's items (pairs or prompts), padded so every rank runs the same number of batches, and their
    weights (n,): 1 for its own items, 0 for padding.

    Every rank must take part in every forward (under FSDP a forward is a collective: a rank that skips one
    hangs the others), so the short shards are topped up with copies of item 0 weighted 0.
    """
    items = list(items)
    per_rank = math.ceil(len(items) / world)
    padded = math.ceil(per_rank / batch_size) * batch_size
    mine = items[rank::world]
    weights = torch.tensor([1.0] * len(mine) + [0.0] * (padded - len(mine)))
    return mine + [items[0]] * (padded - len(mine)), weights


def eval_sums(policy, reference, pairs: list[TokenizedPair], weights: torch.Tensor, *, loss_fn, pad_id: int,
              batch_size: int, device) -> torch.Tensor:
    """Weighted sums of every PAIR_KEYS metric over this rank's pairs, then the weight total: (K + 1,).
    Summed over ranks and divided once by the total, they give the same means as one process."""
    per_pair = score_pairs(policy, reference, pairs, loss_fn=loss_fn, pad_id=pad_id, batch_size=batch_size,
                           device=device)
    weights = weights.to(device)
    return torch.stack([(per_pair[k] * weights).sum() for k in PAIR_KEYS] + [weights.sum()])


def kl_sums(generator, policy, reference, tokenizer, prompts: list[str], weights: torch.Tensor,
            ev: config.EvalConfig, *, synced_gpus: bool, device) -> torch.Tensor:
    """(sum over this rank's prompts of the per-prompt sequence KL, weight total): (2,).

    `generator` is the model `generate` runs on (the unwrapped policy); `policy` scores the samples.
    """
    samples = sample(generator, tokenizer, prompts, n_per_prompt=ev.n_per_prompt, max_new_tokens=ev.max_new_tokens,
                     temperature=ev.temperature, top_p=ev.top_p, batch_size=ev.batch_size, seed=ev.seed,
                     progress=False, synced_gpus=synced_gpus)
    terms = sequence_kl(policy, reference, samples, batch_size=ev.batch_size, pad_id=tokenizer.pad_token_id)
    per_prompt = torch.tensor(per_prompt_mean(terms, ev.n_per_prompt), dtype=torch.float32)
    return torch.stack([(per_prompt * weights).sum(), weights.sum()]).to(device)


def eval_row(pair_sums: torch.Tensor, kl: torch.Tensor | None) -> dict[str, float]:
    """The `eval/...` metrics from sums already reduced over ranks."""
    row = {f"eval/{k}": pair_sums[i].item() / pair_sums[-1].item() for i, k in enumerate(PAIR_KEYS)}
    if kl is not None:
        row["eval/kl"] = kl[0].item() / kl[1].item()
    return row


@torch.no_grad()
def score_pairs(policy: torch.nn.Module, reference: torch.nn.Module | None, pairs: list[TokenizedPair], *,
                loss_fn, pad_id: int, batch_size: int, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """Per-pair loss, implicit rewards, accuracy, margins and log-probs: each (N,) float32 on `device`.

    Rewards are what the run's loss calls its rewards (beta * log-ratio for DPO), so held-out numbers read
    like the training rows. With a reference, its log-probs come too (`ref_logps/...`). A loss with running
    state (BCO's reward shift) is scored with the state at its start (shift 0).
    """
    was_training = policy.training
    policy.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in PAIR_KEYS + (REF_KEYS if reference is not None else ())}
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start:start + batch_size], pad_id).to(device)
        tokens = dict(with_tokens=loss_fn.needs_token_logps)  # LD-DPO and WPO read per-token log-probs
        chosen, rejected = sequence_logps(policy, batch, with_sq_mass=loss_fn.needs_sq_mass, **tokens).halves()
        ref_chosen = ref_rejected = None
        if reference is not None:
            ref_chosen, ref_rejected = sequence_logps(reference, batch, **tokens).halves()
            out["ref_logps/chosen"].append(ref_chosen.logps)
            out["ref_logps/rejected"].append(ref_rejected.logps)
        lo, values = score_batch(loss_fn, chosen, rejected, ref_chosen, ref_rejected)  # as training scores
        values["rewards/margins"] = lo.chosen_rewards - lo.rejected_rewards
        for key in PAIR_KEYS:
            out[key].append(values[key].float())
    policy.train(was_training)
    return {k: torch.cat(v).float() for k, v in out.items()}


def summarise(per_pair: dict[str, torch.Tensor], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
              ) -> dict[str, dict[str, float]]:
    """{metric: {mean, low, high}}: the mean over pairs and its percentile bootstrap interval."""
    out = {}
    for key, values in per_pair.items():
        mean, low, high = bootstrap_ci(values.cpu().numpy(), level=level, n_boot=n_boot, seed=seed)
        out[key] = {"mean": mean, "low": low, "high": high}
    return out


def unique_prompts(pairs_path: str | Path, limit: int) -> list[str]:
    """Distinct prompts of a preference (or {"prompt"}-only) JSONL file in file order; at most `limit`."""
    prompts: list[str] = []
    seen: set[str] = set()
    with open(pairs_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{pairs_path}:{lineno}: expected an object with a string field 'prompt'")
            if obj["prompt"] not in seen:
                seen.add(obj["prompt"])
                prompts.append(obj["prompt"])
    return prompts[:limit] if limit > 0 else prompts


@dataclasses.dataclass
class SideBySide:
    """Policy and reference samples for the same prompts: policy sample i and reference sample i share
    prompt i // n_per_prompt and the sampling seed."""

    policy: Samples
    reference: Samples

    def rows(self) -> list[dict]:
        return [{"prompt": self.policy.prompts[self.policy.prompt_of(i)], "sample": i % self.policy.n_per_prompt,
                 "policy": self.policy.completions[i], "reference": self.reference.completions[i]}
                for i in range(len(self.policy))]


def side_by_side(policy, reference, tokenizer, prompts: list[str], ev: config.EvalConfig,
                 progress: bool = True) -> SideBySide:
    kwargs = dict(n_per_prompt=ev.n_per_prompt, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                  top_p=ev.top_p, batch_size=ev.batch_size, seed=ev.seed, progress=progress)
    return SideBySide(sample(policy, tokenizer, prompts, desc="policy", **kwargs),
                      sample(reference, tokenizer, prompts, desc="reference", **kwargs))


def kl_summary(policy, reference, samples: Samples, *, pad_id: int, batch_size: int, level: float,
               n_boot: int, seed: int) -> dict[str, float]:
    """Sequence-level KL(policy || reference) in nats per completion from the policy's own samples, with a
    bootstrap interval over prompts (samples of one prompt are not independent)."""
    terms = sequence_kl(policy, reference, samples, batch_size=batch_size, pad_id=pad_id)  # (N,)
    mean, low, high = bootstrap_ci(per_prompt_mean(terms, samples.n_per_prompt), level=level, n_boot=n_boot,
                                   seed=seed)
    return {"mean": mean, "low": low, "high": high, "samples": len(terms)}


def response_text(response: Text) -> str:
    """A response as plain text for a judge: the text itself, or its messages' contents."""
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


def dataset_references(source: str | Path, tokenizer, data_cfg: config.DataConfig, *, part: str = "all",
                       limit: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, references): the first `limit` (0 = all) distinct prompts of a held-out source, each with the
    response the data holds for it: the preferred response of a pair (an Anthropic HH chosen response), a TL;DR
    post's human-written summary, a demonstration's completion. Prompts are decoded from the ids training would
    see (truncation included), as `prompts_of` does; references are the data's own text. A prompt that comes
    more than once keeps its first response."""
    from preftune.data.load import LoadReport, fit, iter_encoded, iter_records, refuse_invalid, source_split

    source = str(source)
    report = LoadReport(source)
    split, subset = source_split(source, data_cfg, part)
    records = iter_records(source, data_cfg, report, part, split, examples=True, subset=subset)
    prompts: list[str] = []
    references: list[str] = []
    seen: set[tuple[int, ...]] = set()
    for rec, prompt_ids, responses in iter_encoded(records, tokenizer, data_cfg, report):
        fitted = fit(prompt_ids, responses, data_cfg, rec.source, report)
        if fitted is None or tuple(fitted[0]) in seen:
            continue
        seen.add(tuple(fitted[0]))
        prompts.append(tokenizer.decode(fitted[0], skip_special_tokens=False))
        references.append(response_text(rec.completion))
        if len(prompts) == limit:
            break
    refuse_invalid(report, data_cfg)
    if not prompts:
        raise DataError(f"{source}: no held-out prompts ({report.summary()})")
    return prompts, references


def evaluate_target(target: Target, data_path: str | Path, ev: config.EvalConfig, judge_cfg: config.JudgeConfig,
                    *, part: str = "all", progress: bool = True) -> tuple[dict, list[dict]]:
    """Everything `preftune eval` reports, as a JSON-ready dict, plus the side-by-side sample rows.

    Pair metrics when the data holds pairs; when `ev.prompts` > 0, the policy's samples, its KL from the
    reference (from samples at `ev.temperature`) and, when a judge is named, its win rate over the baseline
    (`ev.baseline`: the reference model's samples, or the data's own responses) at each temperature of
    `ev.temperatures` (default: `ev.temperature` alone). In the sample rows, `reference` is the baseline's text.
    """
    from preftune import judges
    from preftune.data import load_pairs
    from preftune.data.load import source_shape
    from preftune.data.records import SFT_SHAPES

    if judge_cfg.name and ev.prompts == 0:
        raise ValueError(f"judge.name={judge_cfg.name!r} judges samples, but eval.prompts=0 samples none")
    judge = judges.build(judge_cfg) if judge_cfg.name else None  # before any model work: fail fast
    cfg, tok = target.cfg, target.tokenizer
    ci = {"level": ev.level, "n_boot": ev.n_boot, "seed": ev.seed}
    result: dict = {"data": str(data_path), "loss": cfg.loss.name, "beta": cfg.loss.beta, "level": ev.level}
    paired = source_shape(str(data_path), cfg.data, part) not in SFT_SHAPES
    if paired:
        pairs, report = load_pairs(data_path, tok, cfg.data, part=part)
        per_pair = score_pairs(target.policy, target.reference, pairs, loss_fn=pair_loss(cfg),
                               pad_id=tok.pad_token_id, batch_size=ev.batch_size,
                               device=next(target.policy.parameters()).device)
        result.update(pairs=len(pairs), skipped=len(report.skipped), metrics=summarise(per_pair, **ci))
    rows: list[dict] = []
    if ev.prompts == 0:
        if not paired:
            raise ValueError(f"{data_path} holds one response per prompt (no pairs to score), and eval.prompts=0 "
                             "samples nothing to judge against them")
        return result, rows
    # --- prompts, and what the policy is judged against ---
    references: list[str] = []
    if ev.baseline == "dataset" or not paired:
        prompts, references = dataset_references(data_path, tok, cfg.data, part=part, limit=ev.prompts)
    else:
        prompts = prompts_of(pairs, tok, ev.prompts)
    n = ev.n_per_prompt
    kwargs = dict(n_per_prompt=n, max_new_tokens=ev.max_new_tokens, top_p=ev.top_p, batch_size=ev.batch_size,
                  seed=ev.seed, progress=progress)
    temperatures = list(ev.temperatures) or [ev.temperature]
    sweep = bool(ev.temperatures)
    # --- KL from the policy's own samples at eval.temperature (unbiased at 1.0, top_p 1.0) ---
    at_kl_temperature = sample(target.policy, tok, prompts, desc="policy", temperature=ev.temperature, **kwargs)
    result["kl"] = kl_summary(target.policy, target.reference, at_kl_temperature, pad_id=tok.pad_token_id,
                              batch_size=ev.batch_size, **ci)
    # --- samples and win rate at each temperature ---
    win_rates = []
    for t in temperatures:
        policy_samples = at_kl_temperature if t == ev.temperature else sample(
            target.policy, tok, prompts, desc=f"policy T={t:g}", temperature=t, **kwargs)
        if ev.baseline == "dataset":
            baseline = [references[policy_samples.prompt_of(i)] for i in range(len(policy_samples))]
        else:
            baseline = sample(target.reference, tok, prompts, desc=f"reference T={t:g}", temperature=t,
                              **kwargs).completions
        these = [{"prompt": prompts[policy_samples.prompt_of(i)], "sample": i % n,
                  "policy": policy_samples.completions[i], "reference": baseline[i]}
                 for i in range(len(policy_samples))]
        if judge is not None:
            verdict = judges.judge_texts(judge, [r["prompt"] for r in these], policy_samples.completions,
                                         baseline, n, **ci)
            win_rates.append({**verdict.summary, "temperature": t, "baseline": ev.baseline})
            for row, p_score, r_score in zip(these, verdict.policy_scores, verdict.reference_scores, strict=True):
                row.update(policy_score=p_score, reference_score=r_score)
        if sweep:
            for row in these:
                row["temperature"] = t
        rows += these
    if win_rates:
        if sweep:
            result["win_rates"] = win_rates
        else:
            result["win_rate"] = win_rates[0]
    result["sampling"] = {k: getattr(ev, k) for k in ("prompts", "n_per_prompt", "max_new_tokens", "temperature",
                                                     "temperatures", "top_p", "seed", "baseline")}
    return result, rows
