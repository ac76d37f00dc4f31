import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import config
from preftune.data import collate, load_pairs
from preftune.logps import sequence_logps
from preftune.modeling import load_model, load_tokenizer
from preftune.schedule import lr_factor
from preftune.train import train

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


def _first_step_moves(tiny, **optim) -> torch.Tensor:
    """|change| of every weight after one optimiser step with no warm-up."""
    cfg = tiny(optim={"lr": 1e-3, "warmup_steps": 0, **optim}, train={"max_steps": 1, "run_name": optim["name"]})
    start = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed)
    trained = AutoModelForCausalLM.from_pretrained(train(cfg) / "final")
    return torch.cat([(a - b).abs().flatten().detach() for a, b in zip(trained.parameters(), start.parameters(),
                                                                          strict=True)])


def test_rmsprop_is_the_papers_optimiser_with_torchs_defaults(tiny):
    # step 1 by hand: RMSprop's v = (1 - alpha) g^2 = 0.01 g^2, so the step is lr * g / (0.1 |g| + eps), i.e.
    # 10 lr for every weight with a gradient; AdamW's bias-corrected first step is lr * g / (|g| + eps) = lr
    rmsprop, adamw = _first_step_moves(tiny, name="rmsprop"), _first_step_moves(tiny, name="adamw")
    lr = 1e-3
    moved = rmsprop[rmsprop > 0]
    assert len(moved) > 0.5 * len(rmsprop)  # most weights get a gradient (untouched token embeddings don't)
    assert moved.max() <= 10 * lr * (1 + 1e-4) and moved.median() == pytest.approx(10 * lr, rel=1e-3)
    assert adamw.max() <= lr * (1 + 1e-4) and adamw[adamw > 0].median() == pytest.approx(lr, rel=1e-3)
    with pytest.raises(config.ConfigError, match="optim.weight_decay=0.1: decoupled weight decay is AdamW's"):
        tiny(optim={"name": "rmsprop", "weight_decay": 0.1})
    with pytest.raises(config.ConfigError, match=r"optim.name: 'sgd' is not one of \['adamw', 'rmsprop'\]"):
        tiny(optim={"name": "sgd"})
