import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import config
from preftune.data import collate, load_pairs
from preftune.logps import sequence_logps
from preftune.modeling import load_model, load_tokenizer
from preftune.train import lr_factor, train

from .conftest import EXAMPLE_PAIRS, read_metrics


def test_thirty_steps_learn_the_preferences_and_export_loads(tiny):
    cfg = tiny()
    run_dir = train(cfg)
    rows = read_metrics(run_dir)
    assert len(rows) == 30 and [r["step"] for r in rows] == list(range(1, 31))
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3  # policy == reference at step 1: -log sigma(0)
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert key in rows[-1]
    assert all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in rows)
    assert (run_dir / "config.yaml").is_file() and config.load(run_dir / "config.yaml") == cfg

    # the export is a plain HF directory; on all 16 training pairs the trained policy prefers chosen
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file()
    policy = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    reference = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).eval()
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tok, cfg.data)
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = sequence_logps(policy, batch).halves()
        rc, rr = sequence_logps(reference, batch).halves()
    accuracy = ((pc.logps - rc.logps) > (pr.logps - rr.logps)).float().mean().item()
    assert accuracy == 1.0

    prompt = tok("Tell me about the film: ", return_tensors="pt")
    out = policy.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_run_dir_is_never_silently_overwritten(tiny):
    cfg = tiny(train={"max_steps": 1})
    train(cfg)
    try:
        train(cfg)
    except FileExistsError as err:
        assert "already holds a run" in str(err) and "train.overwrite=true" in str(err)
    else:
        raise AssertionError("second run into the same directory should be refused")
    train(config.replace(cfg, "train.overwrite", True))


def test_warmup_then_schedules():
    optim = config.OptimConfig(warmup_steps=3, schedule="constant")
    assert [lr_factor(s, 10, optim) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = config.OptimConfig(warmup_steps=0, schedule="linear")
    assert [lr_factor(s, 4, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = config.OptimConfig(warmup_steps=0, schedule="cosine")
    assert lr_factor(0, 10, cosine) == 1.0 and abs(lr_factor(5, 10, cosine) - 0.5) < 1e-9


def test_loss_and_lr_rows_follow_the_schedule(tiny):
    run_dir = train(tiny(train={"max_steps": 4}, optim={"lr": 1e-3, "warmup_steps": 3}))
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    assert lrs == [1e-3 * f for f in (0.25, 0.5, 0.75, 1.0)]
