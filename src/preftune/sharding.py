"""FSDP2 (torch's `fully_shard`) for the policy and a model-held reference: one code path for CPU and GPU.

`parallel.sharding=fsdp2` shards every parameter over the processes: each decoder layer is one unit whose
weights are all-gathered just before its forward (and again in backward) and freed after, the embeddings,
final norm and LM head form the root unit. The same function runs under gloo on CPU (the tests) and under
NCCL on GPUs: Accelerate still starts the processes, picks the device and seeds the RNGs, but the model is
never handed to Accelerate's own FSDP or DDP wrapper (whose FSDP plugin is ignored on CPU, so a CPU test
through it would exercise nothing).

Precision: with train.mixed_precision=bf16 the sharded fp32 master weights are cast to bf16 for each
all-gather and compute (FSDP2's MixedPrecisionPolicy), gradients are reduced in fp32 and the optimiser
steps fp32 weights; the log-softmax still runs in fp32 (logps.py). That is "bf16 weights in compute,
fp32 master copy", not autocast (which the unsharded path uses through Accelerate); docs/distributed.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from preftune.config import Config

SHARDED = "fsdp2"


def enabled(cfg: Config) -> bool:
    return cfg.parallel.sharding == SHARDED


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process (a one-GPU check, the 1-process side of a test);
    Accelerate starts one only for several. A store in memory suffices when nobody else has to join."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP.append(backend)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers names in `_no_split_modules` (LlamaDecoderLayer, ...), in order."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps the model inside
    layer_types = set(getattr(core, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"parallel.sharding=fsdp2: found no decoder layers ({sorted(layer_types)}) in "
                         f"{type(core).__name__} to shard; this architecture is not supported sharded")
    return layers


def shard(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over all processes, decoder layer by decoder layer, then the rest as the root
    unit; returns it (the same object, now an FSDPModule). Frozen models (a reference) are sharded the same
    way and simply never get an optimiser. Call after the perf switches that live on the model
    (modeling.apply_speedups), before the optimiser is built: the optimiser must hold the sharded params."""
    ensure_process_group(device)
    # no model.to(device): fully_shard moves each unit to the device as it shards it, so a GPU never holds
    # more than one full layer at a time (each process still loads the whole model into CPU memory first)
    param_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
    # reduce in fp32: bf16 gradient sums over 8+ ranks lose the small differences DPO's gradients carry
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    reshard = cfg.parallel.reshard_after_forward
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=mp_policy)
    # the root keeps its (embedding, norm, head) weights gathered from forward to backward
    fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy)
    return model


def as_float(value: torch.Tensor | float) -> float:
    """A gradient norm as a float: under FSDP2 clip_grad_norm_ returns a replicated DTensor."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def check_engine(cfg: Config, accelerator) -> None:
    """Stop before any work when the launcher asked Accelerate for its own FSDP engine. preftune shards
    with parallel.sharding=fsdp2 and needs Accelerate to start plain processes (configs/accelerate/fsdp.yaml
    does); Accelerate's FSDP engine would run without sharded checkpoints. (A DeepSpeed launch takes the
    ZeRO path instead: zero.py, docs/distributed.md.)"""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("the Accelerate config asks for distributed_type FSDP; preftune shards with its own "
                         "FSDP2 path: launch with configs/accelerate/fsdp.yaml (distributed_type MULTI_GPU) and "
                         f"set parallel.sharding=fsdp2 in the training config (now {cfg.parallel.sharding!r}; "
                         "docs/distributed.md)")


_OWN_GROUP = []  # the one-process group ensure_process_group started, released at the end of the run


def release_process_group() -> None:
    """End the one-process group this module started (a later run in the same process starts afresh)."""
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()
