"""The reference model of a preference loss, held in one of several ways that all give the same numbers.

Modes (`reference.mode`; docs/reference.md says when to use which):
  copy          a frozen deep copy of the starting policy (for LoRA from an adapter: of that adapter model)
  precomputed   one no-grad pass over every pair before training, cached on disk; no reference in memory
                while training
  adapters_off  LoRA: the policy itself with its adapters switched off, i.e. the frozen base
  path          a frozen model loaded from reference.path (e.g. the SFT model while the policy starts elsewhere)
  none          reference-free losses and SFT: nothing is built or run

One way to get a reference: `Reference.build` for training (before the policy is prepared, then `prepare`),
`Reference.for_eval` for evaluating a finished run or a config; both read weights from disk through one
loader, `load_frozen`, and resolve `auto` through `Reference.resolve_mode`.

The reference never sees a trained weight: copy and path are separate frozen modules, adapters_off runs only
the frozen base weights, and a precomputed table is fixed before the first step; a pair missing from the table
is an error, never a quiet fall-back to the policy.

Like checkpoint.py this is engine-aware setup code: it hands reference models to Accelerate (so they are
sharded like the policy under FSDP) and gathers the shares of a multi-process precompute.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import Tensor

from preftune import data, sharding, zero
from preftune.config import Config, ConfigError, PerfConfig
from preftune.data import Batch, TokenizedPair
from preftune.logps import SequenceLogps, batch_logps
from preftune.losses import LOSSES
from preftune.modeling import apply_speedups, load_model, weights_digest

CACHE_FORMAT = 1  # bump when the meaning of a cached number changes


def validate(cfg: Config) -> None:
    """The reference settings against what the loss needs (config.validate has checked the rest)."""
    spec = LOSSES[cfg.loss.name]
    mode = cfg.reference.mode
    if cfg.train.stage == "sft" or not spec.needs_reference:
        if mode not in ("auto", "none"):
            raise ConfigError(f"reference.mode={mode!r} but {cfg.train.stage!r} with loss {cfg.loss.name!r} "
                              "uses no reference; leave it auto or set none")
        return
    if mode == "none":
        raise ConfigError(f"reference.mode='none' but loss {cfg.loss.name!r} needs a reference; choose from "
                          "['auto', 'copy', 'precomputed', 'adapters_off', 'path'], or a reference-free loss")
    resolved = Reference.resolve_mode(cfg)
    if resolved == "precomputed":
        # the table holds one summed log-prob per response of each pair, fixed before training
        if spec.unpaired:
            raise ConfigError(f"reference.mode='precomputed': {cfg.loss.name!r} also scores mismatched "
                              "completions that depend on each batch; use copy, path or adapters_off")
        if cfg.train.eval_every > 0:
            raise ConfigError("reference.mode='precomputed' with train.eval_every > 0: held-out eval and its KL "
                              "run the reference on rows the table does not hold; use copy, or evaluate "
                              "afterwards with `preftune eval` (it rebuilds the reference)")
        if cfg.loss.ld_alpha != 1.0:
            raise ConfigError("reference.mode='precomputed': loss.ld_alpha needs per-token reference "
                              "log-probs, which the table does not keep; use copy, path or adapters_off")
    if cfg.loss.ref_sync != "none" and (resolved not in ("copy", "path") or (resolved == "path" and cfg.lora.enabled)):
        raise ConfigError(f"loss.ref_sync={cfg.loss.ref_sync!r} updates the reference from the policy, so the "
                          f"reference must be a separate model of the same shape: set reference.mode='copy' "
                          f"(resolved mode is {resolved!r})")


def pair_key(pair: TokenizedPair) -> tuple[tuple[int, ...], ...]:
    """A pair's identity in the precomputed table: its token ids, whatever file or position it came from."""
    return tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids)


class Reference:
    """Reference log-probs of a batch. `build` before the policy is prepared, `prepare` after, then `logps`."""

    def __init__(self, mode: str, model: torch.nn.Module | None = None):
        self.mode = mode
        self.model = model
        """copy/path: the frozen reference; adapters_off: the prepared policy; otherwise None"""
        self.table: dict[tuple, Tensor] | None = None
        """precomputed: pair_key -> (2,) reference logps of (chosen, rejected)"""
        self.cache_file: Path | None = None
        self.cache_hit = False
        self._peft: torch.nn.Module | None = None  # adapters_off: the unwrapped peft model that owns the switch
        self.logps_chunk = 0  # perf.logps_chunk, set by prepare
        self._identity = ""  # precomputed: the reference weights' digest, part of the cache key

    @staticmethod
    def resolve_mode(cfg: Config) -> str:
        """The concrete reference mode: `auto` resolved, `none` whenever nothing uses a reference."""
        if cfg.train.stage == "sft" or not LOSSES[cfg.loss.name].needs_reference:
            return "none"
        if cfg.reference.mode != "auto":
            return cfg.reference.mode
        if cfg.reference.path:
            return "path"
        if cfg.lora.enabled and not cfg.model.adapter_path:
            return "adapters_off"  # fresh adapters start at zero: the base is exactly the starting policy
        return "copy"

    @classmethod
    def build(cls, cfg: Config, policy: torch.nn.Module, tokenizer) -> Reference:
        """The reference of `cfg` for training from the starting `policy`, before Accelerate wraps it (a deep
        copy of a wrapped or sharded module would copy the wrapper)."""
        mode = cls.resolve_mode(cfg)
        model = None
        if mode == "copy":
            model = copy.deepcopy(policy)
        elif mode == "path":
            model = load_frozen(cfg, tokenizer)
        if model is not None:
            model = model.eval().requires_grad_(False)  # the copy; load_frozen's model already is
        reference = cls(mode, model)
        if mode == "precomputed":
            # here, not after prepare: every process still holds the full starting weights (under FSDP a
            # digest of each process's shard would differ, and processes would disagree about a cache hit)
            reference._identity = files_digest(cfg.reference.path) if cfg.reference.path else weights_digest(policy)
        return reference

    @classmethod
    def for_eval(cls, run: str | Path | Config, tokenizer=None) -> Reference:
        """The reference a run trained against, rebuilt from disk as a frozen model (`.model`) for held-out
        evaluation; never the trained policy. `run` is a run directory (its config.yaml) or a config;
        `tokenizer` defaults to the config's.

        Every mode gives the model its numbers came from: reference.path when set, otherwise the starting
        policy (with model.adapter_path that starting adapter model; for adapters_off the bare base). A run
        without a reference (SFT, reference-free losses; `.mode` is 'none') gets its starting model, what
        `preftune eval` compares it with."""
        from preftune.modeling import load_tokenizer

        cfg = run if isinstance(run, Config) else _run_config(Path(run))
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        return cls(cls.resolve_mode(cfg), load_frozen(cfg, tokenizer))

    def prepare(self, cfg: Config, accelerator: Accelerator, policy: torch.nn.Module, tokenizer,
                pairs: list[TokenizedPair]) -> Reference:
        """Place the reference beside the prepared policy; for precomputed, fill the table from the cache or
        one no-grad pass over `pairs` (the policy's starting weights, or reference.path) and free that model."""
        self.logps_chunk = cfg.perf.logps_chunk or 0  # unset outside train() (which resolves it): off
        if self.model is not None:
            self.model = place_frozen(self.model, cfg, accelerator)
        elif self.mode == "adapters_off":
            self.model, self._peft = policy, accelerator.unwrap_model(policy)
        elif self.mode == "precomputed":
            self._precompute(cfg, accelerator, policy, tokenizer, pairs)
        return self

    def scores(self, batch: Batch, batch_pairs: list[TokenizedPair] | None = None, *,
               with_tokens: bool = False) -> SequenceLogps | None:
        """Reference results for every row of `batch` (chosen rows then rejected rows for pairs; any rows
        for a model-held reference, e.g. KTO's mismatched ones); None without a reference.

        A precomputed table answers by pair, so it needs `batch_pairs` (the pairs the rows come from, in
        order), and it holds sums only: its token fields are None (WPO reads only the policy's tokens;
        reference.validate keeps the table away from LD-DPO, which would need the reference's)."""
        if self.mode == "none":
            return None
        if self.table is not None:
            if batch_pairs is None:
                raise ValueError("precomputed reference log-probs are per pair; this loss scores rows that are "
                                 "not training pairs (use copy, path or adapters_off)")
            try:
                rows = torch.stack([self.table[pair_key(p)] for p in batch_pairs])  # (B, 2)
            except KeyError:
                missing = [p.source for p in batch_pairs if pair_key(p) not in self.table]
                raise KeyError(f"pairs {missing[:3]} have no precomputed reference log-probs; precompute "
                               "over every split you score (the policy is never a stand-in)") from None
            logps = rows.T.reshape(-1).to(batch.input_ids.device)  # (2B,): chosen rows, then rejected rows
            # response lengths from the pairs themselves: the same count as a plain batch's labels, and
            # independent of the layout (a packed batch (perf.packing) has no per-row labels)
            lengths = torch.tensor([float(len(p.chosen_ids)) for p in batch_pairs]
                                   + [float(len(p.rejected_ids)) for p in batch_pairs],
                                   device=batch.input_ids.device)  # (2B,)
            return SequenceLogps(logps, lengths, torch.zeros_like(logps))  # logits: not kept, not needed
        # adapters_off runs the training policy: eval mode so dropout can't touch the reference
        was_training = self.model.training
        switch = self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext()
        self.model.eval()
        try:
            with torch.no_grad(), switch:
                # the policy's path and perf layout (packed, prefix-shared, chunked LM head), so per-token
                # views come in the policy's columns
                return batch_logps(self.model, batch, self.logps_chunk, with_tokens=with_tokens)
        finally:
            self.model.train(was_training)

    def as_module(self) -> torch.nn.Module | None:
        """The reference as a module for code that runs it on arbitrary rows or samples (held-out eval, KL):
        the frozen model, or the policy wrapped so that every call runs with its adapters off; None without
        a reference. A precomputed table has no module (validate refuses in-training eval with it)."""
        if self.mode == "none":
            return None
        if self.table is not None:
            raise ValueError("a precomputed reference has no model to run on held-out rows; use copy or "
                             "evaluate afterwards with `preftune eval`, which rebuilds the reference")
        return _AdaptersOff(self.model, self._peft) if self._peft is not None else self.model

    # --- precomputed ---

    def _precompute(self, cfg: Config, accelerator: Accelerator, policy: torch.nn.Module, tokenizer,
                    pairs: list[TokenizedPair]) -> None:
        key = cache_key(self._identity, pairs, cfg)
        cache_dir = Path(cfg.reference.cache_dir or Path(cfg.train.output_dir) / "ref_cache")
        self.cache_file = cache_dir / f"{key}.safetensors"
        table = load_cached(self.cache_file, len(pairs))
        self.cache_hit = table is not None
        if table is None:
            model = policy
            if cfg.reference.path:
                # the training layout needs the same attention as the policy (packed units never mix)
                loaded = apply_speedups(load_frozen(cfg, tokenizer), cfg.perf, trainable=False)
                model = place_frozen(loaded.eval().requires_grad_(False), cfg, accelerator)
            table = precompute_logps(model, pairs, tokenizer.pad_token_id, cfg.train.batch_size, accelerator,
                                     cfg.perf)
            if model is not policy:
                # the loaded reference goes now: Accelerate's registry would otherwise keep it alive all run
                accelerator._models = [m for m in accelerator._models if m is not model]
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if accelerator.is_main_process:
                save_cached(self.cache_file, table, key)
            accelerator.wait_for_everyone()
        self.table = {pair_key(p): row for p, row in zip(pairs, table, strict=True)}


def place_frozen(model: torch.nn.Module, cfg: Config, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model beside the policy: sharded like it under parallel.sharding=fsdp2 (forward only, no
    optimiser state), otherwise on the device in Accelerate's evaluation mode (no DDP wrapper)."""
    if sharding.enabled(cfg):
        return sharding.shard(model, cfg, accelerator.device)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # ZeRO-3: partitioned like the policy
        return zero.place_frozen(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


class _AdaptersOff(torch.nn.Module):
    """The (LoRA) policy seen as its frozen base: each forward runs in eval mode with the adapters off."""

    def __init__(self, policy: torch.nn.Module, peft: torch.nn.Module):
        super().__init__()
        self._held = (policy, peft)  # a tuple, not submodules: this wrapper owns no parameters

    def parameters(self, recurse: bool = True):
        """The policy's, never trained through this wrapper: code that finds a model's device from its first
        parameter (evaluate.completion_logps, scoring KL samples in the loop's eval) needs one."""
        return self._held[0].parameters(recurse)

    def forward(self, *args, **kwargs):
        policy, peft = self._held
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), peft.disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)


def load_frozen(cfg: Config, tokenizer) -> torch.nn.Module:
    """The one reader of reference weights from disk, frozen and in eval mode, in the policy's dtype and
    attention kernel: reference.path when set; otherwise the starting policy (model.path, or the random
    model.arch with train.seed), with model.adapter_path that starting adapter model, except for
    adapters_off, whose reference is the bare base."""
    from preftune import lora

    if cfg.reference.path:
        try:
            model = load_model(dataclasses.replace(cfg.model, path=cfg.reference.path, arch={}, adapter_path=""),
                               tokenizer)
        except ValueError as err:  # e.g. a vocabulary smaller than the tokenizer's
            raise ValueError(f"reference.path {cfg.reference.path!r}: {err}") from None
    else:
        model = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
        if cfg.model.adapter_path and Reference.resolve_mode(cfg) != "adapters_off":
            model = lora.wrap(model, cfg.lora, cfg.model.adapter_path)
    return model.eval().requires_grad_(False)


def _run_config(run_dir: Path) -> Config:
    from preftune import config

    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml); pass the run, or a config")
    return config.load(run_dir / "config.yaml")


@torch.no_grad()
def precompute_logps(model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int, batch_size: int,
                     accelerator: Accelerator, perf: PerfConfig | None = None) -> Tensor:
    """(N, 2) reference logps of (chosen, rejected) for every pair, from one no-grad pass.

    Process r scores pairs r, r + W, r + 2W, ...; every process runs the same number of forwards (shares are
    padded by repeating a pair) because under FSDP each forward is a collective. One gather at the end.
    `perf` picks the layout and LM-head path as in training: with logps_chunk the (2B, T, V) logits of this
    pass never exist either (at 110M and batch 8 they would be 1 GB, twice: logits and log-softmax).
    """
    perf = perf or PerfConfig()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(len(pairs) / world)
    share = list(range(rank, len(pairs), world))
    share += [share[-1] if share else 0] * (per_rank - len(share))
    was_training = model.training
    model.eval()
    local = torch.zeros(per_rank, 2, device=accelerator.device)  # (per_rank, 2)
    for start in range(0, per_rank, batch_size):
        rows = share[start:start + batch_size]
        batch = data.lay_out([pairs[i] for i in rows], pad_id, perf).to(accelerator.device)
        chosen, rejected = batch_logps(model, batch, perf.logps_chunk or 0).halves()
        local[start:start + len(rows)] = torch.stack([chosen.logps, rejected.logps], dim=1).float()
    model.train(was_training)
    gathered = accelerator.gather(local).cpu()  # (world * per_rank, 2), rank-major
    table = torch.empty(len(pairs), 2)
    for r in range(world):
        idx = list(range(r, len(pairs), world))
        table[idx] = gathered[r * per_rank:r * per_rank + len(idx)]
    return table


def files_digest(path: str) -> str:
    """sha256 of a model directory's weight and config files (content, not dates): the weights' identity
    without loading them, so a cache hit never loads the reference."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"reference.path {path!r} holds no .safetensors weights")
    for p in files:
        h.update(p.name.encode() + b"|")
        with p.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def cache_key(model_identity: str, pairs: list[TokenizedPair], cfg: Config) -> str:
    """sha256 of (reference weights, every pair's token ids in order, settings that change the numbers).

    Token ids stand for the tokenizer and the truncation settings: any change there changes an id."""
    h = hashlib.sha256()
    settings = {"format": CACHE_FORMAT, "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation,
                "mixed_precision": cfg.train.mixed_precision}
    h.update(json.dumps({"model": model_identity, "settings": settings}, sort_keys=True).encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:32]


def load_cached(path: Path, num_pairs: int) -> Tensor | None:
    if not path.is_file():
        return None
    table = load_file(path)["logps"]  # (N, 2)
    if table.shape != (num_pairs, 2):  # the key covers the pair count; this only guards a damaged file
        return None
    return table


def save_cached(path: Path, table: Tensor, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": table.contiguous()}, tmp, metadata={"key": key, "pairs": str(len(table))})
    os.replace(tmp, path)  # readers never see half a file
