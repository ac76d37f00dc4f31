"""`preftune iterate`: pairing rules by hand, rounds end to end on a tiny random model, kill -9 in each phase
then the same command == an uninterrupted run, and the judge's and the prompt file's faults."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import config, iterate, online
from preftune.cli import main
from preftune.data import DataError
from preftune.judges import JudgeError
from preftune.online import IterateError, make_pairs

from .conftest import REPO, TINY_ARCH
from .test_judges import Endpoint

NAN = math.nan


# --- pairing rules, hand-worked ---

def test_best_worst_pairs_the_extremes_and_counts_ties():
    prompts = ["p0", "p1", "p2"]
    completions = ["a", "b", "c",  # p0: scores 0.2, 0.9, 0.5 -> b over a, gap 0.7
                   "d", "e", "f",  # p1: all 0.4 -> one tie, no pair
                   "g", "h", "i"]  # p2: 0.3, NaN (judge failed), 0.35 -> gap 0.05 <= margin 0.1: tie
    scores = [0.2, 0.9, 0.5, 0.4, 0.4, 0.4, 0.3, NAN, 0.35]
    records, counts = make_pairs(prompts, completions, scores, 3, rule="best_worst", margin=0.1)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [("p0", "b", "a")]
    assert records[0]["score_chosen"] == 0.9 and records[0]["score_rejected"] == 0.2
    assert (counts.built, counts.ties, counts.unscored, counts.prompts_without_pair) == (1, 2, 1, 2)


def test_all_pairs_above_the_margin_widest_first_with_a_cap():
    # scores 1, 4, 2, 4: gaps (0,1)=3 (0,2)=1 (0,3)=3 (1,2)=2 (1,3)=0 (2,3)=2
    records, counts = make_pairs(["p"], ["w", "x", "y", "z"], [1.0, 4.0, 2.0, 4.0], 4, rule="all_pairs",
                                 margin=1.0, max_per_prompt=3)
    # margin 1 drops gap 1 (0,2) and gap 0 (1,3) as ties; of gaps 3, 3, 2, 2 the cap keeps the first three in
    # sample order among equal gaps: x>w, z>w, x>y; z>y is over the cap
    assert [(r["chosen"], r["rejected"]) for r in records] == [("x", "w"), ("z", "w"), ("x", "y")]
    assert (counts.built, counts.ties, counts.over_cap) == (3, 2, 1)


def test_disjoint_pairs_rank_against_rank_and_use_each_sample_once():
    # scores 0.1 .. 0.8 in shuffled sample order; ranked: t u v w x y z s -> t>s (0.7), u>z (0.5), v>y (0.3),
    # w>x (0.1, <= margin 0.15: a tie); the cap of 2 drops v>y
    texts = ["s", "t", "u", "v", "w", "x", "y", "z"]
    scores = [0.1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    records, counts = make_pairs(["p"], texts, scores, 8, rule="disjoint", margin=0.15, max_per_prompt=2)
    assert [(r["chosen"], r["rejected"]) for r in records] == [("t", "s"), ("u", "z")]
    assert (counts.built, counts.ties, counts.over_cap) == (2, 1, 1)
    every, _ = make_pairs(["p"], texts, scores, 8, rule="disjoint")
    sides = [r["chosen"] for r in every] + [r["rejected"] for r in every]
    assert sorted(sides) == sorted(texts)  # each sample in exactly one pair
    # an odd count leaves the median sample out
    odd, _ = make_pairs(["p"], ["a", "b", "c"], [0.0, 2.0, 1.0], 3, rule="disjoint")
    assert [(r["chosen"], r["rejected"]) for r in odd] == [("b", "a")]


def test_identical_and_empty_samples_make_no_pair():
    records, counts = make_pairs(["p"], ["same", " same ", "", "other"], [3.0, 1.0, 9.0, 2.0], 4,
                                 rule="all_pairs")
    # "" is left out whatever its score; "same" vs " same " differ only in whitespace
    assert [(r["chosen"], r["rejected"]) for r in records] == [("same", "other"), ("other", " same ")]
    assert (counts.empty, counts.identical, counts.built) == (1, 1, 2)


def test_conversational_prompts_get_assistant_turns():
    prompt = [{"role": "user", "content": "hi"}]
    records, _ = make_pairs([prompt], ["hello!", "go away"], [1.0, 0.0], 2)
    assert records[0]["prompt"] == prompt
    assert records[0]["chosen"] == [{"role": "assistant", "content": "hello!"}]


def test_all_pairs_with_margin_zero_is_the_dpo_papers_imdb_rule():
    """Every two samples with different scores (4 samples -> up to 6 pairs), widest gap first; the demo's rule."""
    texts, scores = ["a", "b", "c", "d", "e", "f"], [0.9, 0.1, 0.5, 0.2, 0.2, 0.7]
    got, counts = make_pairs(["p0", "p1"], texts, scores, 3, rule="all_pairs", max_per_prompt=6)
    first = [(r["chosen"], r["rejected"]) for r in got if r["prompt"] == "p0"]
    assert first == [("a", "b"), ("a", "c"), ("c", "b")]  # gaps 0.8, 0.4, 0.4: all 3 pairs of 3 samples
    second = [(r["chosen"], r["rejected"]) for r in got if r["prompt"] == "p1"]
    assert second == [("f", "d"), ("f", "e")] and counts.ties == 1  # d and e tie: no preference, no pair
    capped, counts = make_pairs(["p0", "p1"], texts, scores, 3, rule="all_pairs", max_per_prompt=1)
    assert [(r["chosen"], r["rejected"]) for r in capped] == [("a", "b"), ("f", "d")] and counts.over_cap == 3
    assert len(make_pairs(["p0", "p1"], texts, scores, 3, rule="all_pairs", margin=0.45)[0]) == 3  # 0.8, 0.5, 0.5
    assert len(make_pairs(["p0", "p1"], texts, scores, 3, rule="all_pairs", margin=0.6)[0]) == 1
    with pytest.raises(ValueError, match="2 scores for 2 prompts x 3"):
        make_pairs(["p0", "p1"], texts, scores[:2], 3)


# --- end to end on a tiny random model ---

def write_prompts(path: Path, n: int = 14) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(n)))
    return path


def iterate_raw(tmp_path: Path, **sections) -> dict:
    raw = {
        "model": {"arch": dict(TINY_ARCH), "tokenizer": "bytes"},
        "data": {"max_length": 96, "max_prompt_length": 48},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"output_dir": str(tmp_path / "runs"), "run_name": "it", "batch_size": 2, "progress": False,
                  "save_every": 1},
        "eval": {"n_boot": 200},
        "judge": {"name": "length"},
        "iterate": {"prompts": str(write_prompts(tmp_path / "prompts.jsonl")), "num_eval_prompts": 4, "rounds": 2,
                    "prompts_per_round": 4, "samples_per_prompt": 3, "max_new_tokens": 16, "sample_batch_size": 16,
                    "kl_samples": 1, "pairing": "all_pairs"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_two_rounds_write_records_and_train_from_the_previous_round(tmp_path):
    out = iterate(config.from_dict(iterate_raw(tmp_path)))
    first, second = records(out)
    assert first["start"] == str(out / "initial") and second["start"] == first["policy"]
    assert second["policy"] == str(out / "round-2" / "train" / "final")
    for rec in (first, second):
        pairs = [json.loads(line) for line in (out / f"round-{rec['round']}" / "pairs.jsonl").read_text().splitlines()]
        assert rec["pairs"]["built"] == len(pairs) > 0 and rec["samples"] == 12 and rec["judge"]["dropped"] == 0
        # every candidate pair is accounted for: 4 prompts x 3 choose 2
        assert rec["pairs"]["built"] + rec["pairs"]["ties"] + rec["pairs"]["identical"] == 12
        assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)  # the length judge prefers longer
        assert rec["train"]["steps"] == math.ceil(len(pairs) / 2)
        assert rec["eval"]["prompts"] == 4 and set(rec["eval"]["score"]) == {"mean", "low", "high"}
        assert set(rec["seconds"]) == {"sample", "judge", "pair", "train", "eval"}
    assert first["sample_kl_to_initial"] == 0.0  # round 1 samples the initial model itself
    assert second["sample_kl_to_initial"] != 0.0
    # the held-out prompts (the file's last 4) are never trained on
    trained = {json.loads(line)["prompt"] for r in (1, 2) for line in (out / f"round-{r}" / "pairs.jsonl").open()}
    assert not trained & {f"Question {i}: what is {i} plus {i}?" for i in range(10, 14)}


def test_reference_is_the_initial_model_or_the_start_of_round_policy(tmp_path):
    cfg = config.from_dict(iterate_raw(tmp_path))
    start, initial = tmp_path / "round-1-final", tmp_path / "initial"
    ref = online.round_config(cfg, 2, start, initial, tmp_path / "p.jsonl", tmp_path / "r2").reference
    assert (ref.mode, ref.path) == ("precomputed", str(initial))  # precomputed where it applies
    cfg = config.replace(cfg, "iterate.reference", "round_start")
    ref = online.round_config(cfg, 2, start, initial, tmp_path / "p.jsonl", tmp_path / "r2").reference
    assert (ref.mode, ref.path) == ("precomputed", "")  # train()'s default: computed from the model it starts from
    cfg = config.replace(config.replace(cfg, "reference.mode", "copy"), "iterate.reference", "initial")
    ref = online.round_config(cfg, 2, start, initial, tmp_path / "p.jsonl", tmp_path / "r2").reference
    assert (ref.mode, ref.path) == ("path", str(initial))  # a copy of round 2's start would not be the initial model


def test_round_start_reference_changes_what_round_two_trains_against(tmp_path):
    """The two reference choices give different round-2 losses (at step 1 the policy equals its round-start
    reference, so DPO's loss is exactly log 2; against the initial model it is not)."""
    losses = {}
    for choice in ("initial", "round_start"):
        (tmp_path / choice).mkdir()
        raw = iterate_raw(tmp_path / choice, iterate={"reference": choice})
        out = iterate(config.from_dict(raw))
        rows = [json.loads(line) for line in (out / "round-2" / "train" / "metrics.jsonl").open()]
        losses[choice] = rows[0]["loss"]
    assert losses["round_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses["initial"] - math.log(2)) > 1e-4


def test_too_few_pairs_stops_naming_the_round_and_counts(tmp_path):
    raw = iterate_raw(tmp_path, iterate={"min_pairs": 100})
    with pytest.raises(IterateError, match=r"round 1: \d+ pairs built, fewer than iterate.min_pairs=100 "
                                           r"\(4 prompts x 3 samples.*ties"):
        iterate(config.from_dict(raw))
    assert not (tmp_path / "runs" / "it" / "round-1" / "train").exists()  # stopped before training


def test_bad_prompt_lines_are_located_like_training_data(tmp_path):
    raw = iterate_raw(tmp_path)
    prompts = Path(raw["iterate"]["prompts"])
    lines = prompts.read_text().splitlines()
    lines[2] = '{"prompt": 3}'
    lines[5] = '{"prompt": "unclosed'
    prompts.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        iterate(config.from_dict(raw))
    assert f"{prompts}:3: prompt: must be a string or a list of messages, got int" in str(err.value)
    assert f"{prompts}:6: record: not valid JSON" in str(err.value)


def test_too_few_prompts_for_the_rounds_is_refused(tmp_path):
    raw = iterate_raw(tmp_path, iterate={"rounds": 3})
    with pytest.raises(IterateError, match=r"10 training prompts \(after 4 held out\), but 3 rounds x 4 need 12"):
        iterate(config.from_dict(raw))


def test_cli_iterate_runs_and_errors_are_one_line(tmp_path, capsys):
    config.save(config.from_dict(iterate_raw(tmp_path, iterate={"rounds": 1})), tmp_path / "it.yaml")
    assert main(["iterate", str(tmp_path / "it.yaml")]) == 0
    assert len(records(tmp_path / "runs" / "it")) == 1
    assert main(["iterate", str(tmp_path / "it.yaml"), "iterate.pairing=best"]) == 2
    assert "iterate.pairing: 'best' is not one of ['best_worst', 'all_pairs', 'disjoint']" in capsys.readouterr().err


def test_a_finished_run_continues_for_more_rounds_but_refuses_other_settings(tmp_path):
    out = iterate(config.from_dict(iterate_raw(tmp_path, iterate={"rounds": 1})))
    with pytest.raises(FileExistsError, match="other settings.*loss.beta"):
        iterate(config.from_dict(iterate_raw(tmp_path, iterate={"rounds": 1}, loss={"beta": 0.5})))
    iterate(config.from_dict(iterate_raw(tmp_path)))  # rounds 1 -> 2: round 1 is reused, round 2 runs
    assert [r["round"] for r in records(out)] == [1, 2]


# --- the chat judge: retries, drops, the cache, an endpoint that is down ---

def longer_is_better(question: str) -> str:
    if "Response A:" not in question:
        return "A"  # the reachability check
    a = question.split("Response A:\n")[1].split("\n\nResponse B:")[0]
    b = question.split("Response B:\n")[1].split("\n\nAnswer with")[0]
    return "A" if len(a) >= len(b) else "B"


def chat_judge(url: str, **extra) -> dict:
    return {"name": "openai", "url": url, "model": "judge", "api_key_env": "", "retries": 1, "backoff_s": 0.0,
            "timeout_s": 2.0, **extra}


def test_garbage_and_timeouts_are_retried_then_dropped_and_counted(tmp_path):
    calls = {"n": 0}

    def flaky(question: str) -> str:
        calls["n"] += 1
        if "Question 0:" in question:
            return "I cannot decide"  # always garbage for prompt 0: retried once, then dropped
        if "Question 1:" in question and calls["n"] % 2:
            return "maybe?"  # garbage on the first try only: the retry answers
        return longer_is_better(question)

    server = Endpoint(flaky)
    try:
        out = iterate(config.from_dict(iterate_raw(tmp_path, judge=chat_judge(server.url), iterate={"rounds": 1})))
    finally:
        server.close()
    (rec,) = records(out)
    # prompt 0: 3 comparisons (both orders each) all failed; its 3 samples have no score at all
    assert rec["judge"]["dropped"] == 3 and rec["pairs"]["unscored"] == 3
    assert all("malformed reply 'I cannot decide'" in f for f in rec["judge"]["failures"])
    assert rec["judge"]["scored"] == 9 and rec["pairs"]["built"] > 0


def test_pointwise_judge_scores_each_sample_and_the_cache_saves_every_request(tmp_path):
    def by_length(question: str) -> str:
        if "Response A:" in question:
            return longer_is_better(question)  # the held-out win rate is asked pairwise
        if "Response:" not in question:
            return "ok"  # the reachability check
        return str(min(10, 1 + len(question.split("Response:\n")[1].split("\n\nScore")[0]) // 3))

    server = Endpoint(by_length)
    try:
        raw = iterate_raw(tmp_path, judge=chat_judge(server.url, mode="pointwise",
                                                     cache=str(tmp_path / "cache.jsonl")),
                          iterate={"rounds": 1})
        out = iterate(config.from_dict(raw))
        asked = len(server.requests)
        # the reachability check, one request per sample, then the held-out win rate against the initial
        # model: 4 prompts in both orders (fewer where policy and initial sampled the same text: one request)
        assert 1 + 12 < asked <= 1 + 12 + 4 * 2
        raw["train"]["run_name"] = "again"
        iterate(config.from_dict(raw))  # a fresh run dir, the same samples: every reply from the cache
        assert len(server.requests) == asked + 1  # only the reachability check
    finally:
        server.close()
    (rec,) = records(out)
    assert rec["judge"]["dropped"] == 0 and rec["sample_score"]["mean"] >= 1


def test_endpoint_down_stops_before_any_training_naming_the_url(tmp_path):
    url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    # the URL and the error itself, before any model is built (no initial model saved, no round started)
    with pytest.raises(JudgeError, match=r"judge endpoint http://127.0.0.1:9/v1/chat/completions is not answering, "
                                         r"so the run stops before any training: .*Connection refused"):
        iterate(config.from_dict(iterate_raw(tmp_path, judge=chat_judge(url, retries=0))))
    assert not (tmp_path / "runs" / "it" / "round-1").exists()
    assert not (tmp_path / "runs" / "it" / "initial").exists()


# --- kill -9 in each phase, then the same command: the same weights and records as an uninterrupted run ---

DRIVER = '''
import os, sys, time
from pathlib import Path
from preftune import checkpoint, online
from preftune.cli import main

phase, marker = os.environ.get("PAUSE_PHASE"), os.environ.get("PAUSE_MARKER")
at_round = int(os.environ.get("PAUSE_ROUND", "0"))

def pause():
    Path(marker).write_text("paused")
    time.sleep(600)

if phase == "sample":  # the samples are drawn, not yet saved
    sample = online.Rounds.sample
    def paused_sample(self, r, start):
        result = sample(self, r, start)
        if r == at_round:
            pause()
        return result
    online.Rounds.sample = paused_sample
if phase == "judge":  # every sample scored, the scores not yet saved
    score, calls = online.Rounds.score, []
    def paused_score(self, samples):
        result = score(self, samples)
        calls.append(1)
        if len(calls) == at_round:
            pause()
        return result
    online.Rounds.score = paused_score
if phase == "train":  # inside the round's training, just after its step-2 checkpoint
    save = checkpoint.save
    def paused_save(accelerator, run_dir, step, *args, **kwargs):
        save(accelerator, run_dir, step, *args, **kwargs)
        if f"round-{at_round}" in str(run_dir) and step == 2:
            pause()
    checkpoint.save = paused_save
sys.exit(main(["iterate", *sys.argv[1:]]))
'''


def launch(tmp_path: Path, cfg_path: Path, **pause) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           **{f"PAUSE_{k.upper()}": str(v) for k, v in pause.items()}}
    return subprocess.Popen([sys.executable, str(driver), str(cfg_path)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(tmp_path: Path, cfg_path: Path) -> str:
    """Run the command to its end; returns what it printed."""
    proc = launch(tmp_path, cfg_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def killed_run_cfg(tmp_path: Path, name: str) -> Path:
    raw = iterate_raw(tmp_path, train={"run_name": name, "batch_size": 1})  # batch 1: several steps per round
    cfg_path = tmp_path / f"{name}.yaml"
    config.save(config.from_dict(raw), cfg_path)
    return cfg_path


def comparable(out: Path) -> list[dict]:
    """The records with the run directory's own name and the timings taken out."""
    rows = json.loads(json.dumps(records(out)).replace(str(out), "RUN"))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg_path = killed_run_cfg(tmp, "ref")
    run_to_end(tmp, cfg_path)
    return tmp / "runs" / "ref"


@pytest.mark.parametrize("phase", ["sample", "judge", "train"])
def test_killed_in_a_phase_then_rerun_equals_uninterrupted(tmp_path, uninterrupted, phase):
    cfg_path = killed_run_cfg(tmp_path, "run")
    marker = tmp_path / "paused"
    proc = launch(tmp_path, cfg_path, phase=phase, round=2, marker=marker)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    out = tmp_path / "runs" / "run"
    expected_missing = {"sample": "round-2/samples.json", "judge": "round-2/scores.json", "train": "round-2/train.json"}
    assert not (out / expected_missing[phase]).exists() and (out / "round-1" / "record.json").exists()
    if phase == "train":
        assert (out / "round-2" / "train" / "checkpoints" / "step-00000002").is_dir()
    round_one = (out / "round-1" / "train" / "final" / "model.safetensors").stat().st_mtime_ns
    printed = run_to_end(tmp_path, cfg_path)
    # it continued rather than redoing: round 1 is untouched, training picks up at its checkpoint
    assert (out / "round-1" / "train" / "final" / "model.safetensors").stat().st_mtime_ns == round_one
    assert ("resumed from" in printed and "at step 2" in printed) == (phase == "train")
    ours = load_file(out / "round-2" / "train" / "final" / "model.safetensors")
    theirs = load_file(uninterrupted / "round-2" / "train" / "final" / "model.safetensors")
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert comparable(out) == comparable(uninterrupted)


def test_iterate_section_round_trips_through_yaml_and_is_checked(tmp_path):
    raw = iterate_raw(tmp_path, iterate={"pairing": "best_worst", "margin": 0.25, "reference": "round_start",
                                         "seed_each_prompt": True}, judge={"name": "length", "mode": "pointwise"})
    cfg = config.from_dict(raw)
    config.save(cfg, tmp_path / "it.yaml")
    assert config.load(tmp_path / "it.yaml") == cfg
    for key, value, message in (("iterate.samples_per_prompt", 1, "a pair needs two samples"),
                                ("iterate.reference", "last", "'last' is not one of ['initial', 'round_start']"),
                                ("iterate.margin", -1.0, "iterate.margin: must be >= 0")):
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            config.from_dict(config.apply_overrides(iterate_raw(tmp_path), [f"{key}={value}"]))


def test_a_config_that_can_not_train_stops_before_claiming_the_run_dir(tmp_path):
    with pytest.raises(config.ConfigError, match="loss.name: unknown loss 'dpoo'"):
        iterate(config.from_dict(iterate_raw(tmp_path, loss={"name": "dpoo"}, iterate={"rounds": 1})))
    assert not (tmp_path / "runs" / "it" / "iterate.yaml").exists()
    iterate(config.from_dict(iterate_raw(tmp_path, iterate={"rounds": 1})))  # the corrected rerun just runs


def test_seed_each_prompt_makes_a_prompts_samples_independent_of_batching(tmp_path):
    """With iterate.seed_each_prompt, a prompt's k samples come from a seed of its own (seed, round, prompt):
    generated one sequence at a time or 16 at a time, they are the same tokens."""
    def round_one(name: str, batch: int) -> list[list[int]]:
        raw = iterate_raw(tmp_path, train={"run_name": name},
                          iterate={"seed_each_prompt": True, "sample_batch_size": batch})
        cfg = config.from_dict(raw)
        run = online.Rounds(cfg, cfg.run_dir(), progress=False)
        return run.sample(1, run.initial)["completion_ids"]

    one_at_a_time, batched = round_one("a", 1), round_one("b", 16)
    assert one_at_a_time == batched and len(batched) == 12
    assert len({tuple(ids) for ids in batched}) > 1  # not one sequence repeated: the seeds differ per prompt
    cli_help = subprocess.run([sys.executable, "-m", "preftune", "iterate", "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert "iterate.samples_per_prompt" in cli_help.stdout and "judge.mode" in cli_help.stdout
