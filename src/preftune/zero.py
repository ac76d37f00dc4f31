"""DeepSpeed ZeRO-2 / ZeRO-3 under an Accelerate DeepSpeed launch: the DeepSpeed config filled from
preftune's, the refusals, and the frozen reference as a ZeRO-3 inference engine.

The launcher chooses the engine (`accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`
sets ACCELERATE_USE_DEEPSPEED=true and the ZeRO stage); the training config stays the one source of every
number: train.batch_size is DeepSpeed's train_micro_batch_size_per_gpu, optim.max_grad_norm its
gradient_clipping, train.mixed_precision its bf16 block. DeepSpeed's own gradient_accumulation_steps is
always 1: the loop marks the last micro-batch of each step as the accumulation boundary itself
(`set_gradient_accumulation_boundary`) and scales each micro-batch's loss as on every other path, so
DeepSpeed never divides the loss again. The optimiser is preftune's (AdamW or RMSprop, built by train.py),
handed to DeepSpeed as a client optimiser; the loop writes each step's lr into its param groups.

What the loop does with the engine (train.py): `engine.backward(loss)` per micro-batch, then one
`engine.step()` (DeepSpeed clips to gradient_clipping, steps, zeroes the gradients; it skips the step on its
own when the global gradient norm is not finite), `engine.get_global_grad_norm()` for the logged norm.
Checkpoints (checkpoint.py) are `engine.save_checkpoint` inside preftune's atomic protocol.
"""

from __future__ import annotations

import os

import torch

from preftune.config import Config, ConfigError

STAGES = {2: "zero2", 3: "zero3"}


def launched() -> bool:
    """True when the launcher asked Accelerate for DeepSpeed (accelerate launch with a DEEPSPEED config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def refuse_unsupported(cfg: Config, stage: int) -> None:
    """Combinations the DeepSpeed path does not run, refused before any work with the fields to change."""
    name = STAGES.get(stage)
    if name is None:
        raise ConfigError(f"the Accelerate DeepSpeed config asks for zero_stage {stage}; preftune runs ZeRO "
                          "stage 2 or 3 (configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)")
    refused = {
        f"parallel.sharding={cfg.parallel.sharding!r}": (
            cfg.parallel.sharding != "none",
            "DeepSpeed shards the model itself; set parallel.sharding=none, or launch FSDP2 with "
            "configs/accelerate/fsdp.yaml"),
        "train.mixed_precision=fp16": (
            cfg.train.mixed_precision == "fp16",
            "DeepSpeed's fp16 loss scaler skips steps on its own, which preftune's non-finite-step guard would "
            "count as bad steps; use bf16"),
        "perf.compile=true": (bool(cfg.perf.compile), "compiling under DeepSpeed's hooks is untested here"),
        f"loss.ref_sync={cfg.loss.ref_sync!r}": (cfg.loss.ref_sync != "none",
                                                 "TR-DPO's reference update is not run under DeepSpeed"),
        f"train.eval_every={cfg.train.eval_every} and eval.prompts={cfg.eval.prompts}": (
            cfg.train.eval_every > 0 and cfg.eval.prompts > 0,
            "in-training sampling is not run under DeepSpeed; set eval.prompts=0, and sample from the export "
            "with `preftune eval`"),
        f"perf.logps_chunk={cfg.perf.logps_chunk}": (  # None: automatic, which perf.resolve turns off here
            stage == 3 and (cfg.perf.logps_chunk or 0) > 0,
            "the chunked LM head runs outside the model's forward, where ZeRO-3 holds only this process's "
            "partition of the head's weight; set perf.logps_chunk=0"),
        "lora.enabled=true": (cfg.lora.enabled, "LoRA under DeepSpeed is not tested here; use FSDP2 "
                                                "(parallel.sharding=fsdp2) for LoRA"),
    }
    for fields, (on, why) in refused.items():
        if on:
            raise ConfigError(f"DeepSpeed ZeRO-{stage} with {fields}: {why}")


def fill_config(ds_config: dict, cfg: Config, world: int) -> dict:
    """DeepSpeed's config (Accelerate's plugin dict) with its batch, clipping and precision fields taken
    from preftune's `cfg`; a field the user set to another explicit value is refused, naming both. Returns
    the same dict, changed in place."""
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        # the loop sets the accumulation boundary itself (its own train.grad_accum) and scales the loss itself
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.batch_size * world,
        # 0 disables DeepSpeed's clipping, as optim.max_grad_norm=0 disables the plain loop's
        "gradient_clipping": float(cfg.optim.max_grad_norm),
    }
    for key, value in wanted.items():
        given = ds_config.get(key, "auto")
        if given not in ("auto", None) and given != value:
            source = {"gradient_accumulation_steps": "train.grad_accum (DeepSpeed's stays 1)",
                      "gradient_clipping": "optim.max_grad_norm"}.get(key, "train.batch_size")
            raise ConfigError(f"the DeepSpeed config sets {key}={given!r}, but preftune's config gives {value!r}; "
                              f"leave it out (or 'auto') and set {source} in the training config")
        ds_config[key] = value
    bf16 = cfg.train.mixed_precision == "bf16"
    # check_grad_overflow: without it a bf16 ZeRO step applies a NaN gradient instead of skipping it
    ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": bf16, "check_grad_overflow": True}
    ds_config["fp16"] = {**ds_config.get("fp16", {}), "enabled": False}
    ds_config["zero_allow_untested_optimizer"] = True  # preftune's torch AdamW / RMSprop as a client optimiser
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("compute_grad_norm") is False:
        raise ConfigError("the DeepSpeed config sets zero_optimization.compute_grad_norm=false; preftune logs the "
                          "gradient norm and skips non-finite steps by it: leave it out")
    # ZeRO-3's export gathers the full weights through the 16-bit consolidated state dict (in the model's
    # dtype: fp32 here unless bf16)
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds_config["steps_per_print"] = float("inf")
    return ds_config


def accelerator_kwargs(cfg: Config) -> dict:
    """Accelerator(...) arguments for a DeepSpeed launch: the plugin Accelerate would build from the launch
    environment, filled from preftune's config, with ZeRO-3's init-time partitioning off (every process
    builds the full starting model, as on the FSDP2 path, so the random init and the reference copy are the
    unsharded run's); on CPU the gloo backend named explicitly (without it Accelerate finds no backend and
    reports one process on every rank). Never cpu=True: that turns the launch into MULTI_CPU, plugin dropped."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(zero3_init_flag=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    refuse_unsupported(cfg, int(plugin.zero_stage))
    fill_config(plugin.deepspeed_config, cfg, world)
    plugin.gradient_accumulation_steps = 1
    plugin.gradient_clipping = float(cfg.optim.max_grad_norm)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return {"deepspeed_plugin": plugin, "kwargs_handlers": handlers}


def build_models_whole() -> None:
    """Call right after the Accelerator is built: it registers its DeepSpeed config with transformers,
    which then builds every model under ZeRO-3's init-time partitioning (each process holding empty
    parameters from the start) whatever zero3_init_flag says. preftune builds the full starting model on
    every process, as the FSDP2 path does, so the random init and the reference's copy are those of an
    unsharded run; the engine partitions them in prepare()."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def stage(model: torch.nn.Module) -> int:
    """ZeRO stage of a prepared DeepSpeed engine; 0 for any other module."""
    get = getattr(model, "zero_optimization_stage", None)
    return int(get()) if callable(get) else 0


def layout(model: torch.nn.Module) -> str | None:
    """"zero2" / "zero3" for a DeepSpeed engine, None otherwise (the checkpoint's "sharding" field)."""
    return STAGES.get(stage(model))


def place_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen reference beside a DeepSpeed policy. ZeRO-3: an inference engine partitioned the same way
    (forward only, no optimiser, each process holds 1/N of the weights); ZeRO-2, which keeps full weights
    on every process anyway: a full replica on the device."""
    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    if int(plugin.zero_stage) != 3:
        return model.to(accelerator.device)
    ds_config = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("optimizer", "scheduler")}
    # the policy's partitioning settings, less its optimiser offload (a frozen model has no optimiser)
    ds_config["zero_optimization"] = {k: v for k, v in plugin.deepspeed_config["zero_optimization"].items()
                                      if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, not the module
    return engine
