"""Which fast paths a run takes: `resolve(perf, ...)` turns the perf section (each switch on, off or None =
automatic) into concrete settings for this loss, model and device, with a reason for each choice.

Every path it can pick is proven to compute the plain path's numbers (tests/test_perf_paths.py), so an
automatic choice changes speed and memory, never a loss or a gradient. A switch the user forces on that cannot
serve the run stops it here, before training, naming the switch, the loss and what to do instead.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from preftune.config import ConfigError, PerfConfig

CHUNK_TOKENS = 1024  # LM-head rows per chunk: (1024, V) float32 logits at a time; measured in docs/performance.md
PACKING_MIN_HIDDEN = 512  # below this, per-unit attention calls cost more than the padding they save (measured)
MMAP_THRESHOLD_KB = 1024  # glibc's mmap threshold when automatic (docs/performance.md, "Allocator")
# activations kept for backward per token, per layer, in units of hidden_size values (q, k, v, attention out,
# two norms, the MLP's gate/up/act/down inputs at intermediate ~ 4 x hidden, residuals): an estimate for the
# checkpointing policy only, never for correctness
ACTIVATION_VALUES_PER_TOKEN_LAYER = 24
# of those, the matmul and attention outputs selective recomputation keeps: q, k, v, attention out, o_proj out,
# down_proj out (6 x hidden) and gate, up (2 x 4 x hidden); the norms, rotary, SiLU and products are recomputed
SELECTIVE_VALUES_PER_TOKEN_LAYER = 14
# full recomputation of every n-th layer repeats ~1/(3n) of a step's compute; selective recomputation of every
# layer cost 4-11% of a step at 6M and ran 11% faster than every-2-layers full recomputation at 110M in one
# same-run comparison, so it is preferred where full recomputation would need n <= this (a second 110M run read
# full recomputation of every layer faster still: not settled, docs/performance.md)
SELECTIVE_MAX_INTERVAL = 3
# share of the memory available that one step's kept activations may take before checkpointing turns on
ACTIVATION_BUDGET = 0.125


@dataclass(frozen=True)
class Needs:
    """What the run asks of the log-prob path: the loss's needs and the stage."""

    loss: str  # the loss's name, for messages
    paired: bool = True  # chosen/rejected pairs (False: KTO's unpaired rows)
    sft: bool = False  # SFT examples: single sequences
    partitioned_head: bool = False  # ZeRO-3: outside the model's forward a process holds 1/N of the LM head
    # per-token needs (LD-DPO, WPO) are not here: every path serves them (logps.batch_logps)


@dataclass(frozen=True)
class Machine:
    """Where the run happens: device kind, memory available to it (bytes), and whether the C library is glibc."""

    device: str  # "cpu" or "cuda"
    memory_bytes: int
    glibc: bool


def machine(device) -> Machine:
    """This process's Machine: free GPU memory on CUDA, MemAvailable of /proc/meminfo on CPU."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        memory = int(free)
    else:
        memory = _mem_available()
    return Machine(kind, memory, sys.platform.startswith("linux") and _has_glibc())


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: the checkpointing policy then checkpoints every layer


def _has_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


def activation_bytes(model_config, tokens: int, dtype_bytes: int) -> int:
    """Estimated activations one training step keeps for backward without checkpointing."""
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    return layers * tokens * hidden * ACTIVATION_VALUES_PER_TOKEN_LAYER * dtype_bytes


def resolve(perf: PerfConfig, needs: Needs, model_config, place: Machine, *, step_tokens: int, dtype_bytes: int = 4,
            optimizer: str = "adamw", attn_implementation: str = "sdpa") -> tuple[PerfConfig, list[str]]:
    """The concrete perf settings of a run (no None left) and one reason per choice.

    step_tokens: an upper bound of the tokens one micro-batch holds (2 x batch x max_length for pairs), for
    the checkpointing policy. `model_config` is the policy's HF config (hidden_size, num_hidden_layers,
    logit transforms).
    """
    if perf.plain:
        forced = [f"perf.{f.name}" for f in dataclasses.fields(PerfConfig)
                  if f.name not in ("plain", "pack_tokens") and getattr(perf, f.name) not in (None, False, 0, "")]
        if forced:
            raise ConfigError(f"perf.plain=true takes the plain path, but {', '.join(forced)} also set: "
                              "drop perf.plain or those switches")
        plain = dataclasses.replace(perf, prefix_sharing=False, packing=False, logps_chunk=0,
                                    gradient_checkpointing=0, selective_checkpointing=False, compile=False,
                                    fused_adamw=False, mmap_threshold_kb=0,
                                    attention=attn_implementation)
        return plain, ["plain path (perf.plain=true)"]

    reasons: list[str] = []
    what = "SFT" if needs.sft else f"loss {needs.loss!r}"

    def refuse(switch: str, why: str, instead: str) -> None:
        raise ConfigError(f"{switch}: {why} for {what}; {instead}")

    # --- layout: which rows one forward holds ---
    logit_transform = next((n for n in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                            if getattr(model_config, n, None) not in (None, 1, 1.0)), None)
    paired = needs.paired and not needs.sft
    # every loss, stage and reference mode runs on the packed / chunked path; a model that transforms its
    # logits does not (the chunked LM head applies none of those transforms)
    gap = (f"the model transforms its logits ({logit_transform}), which the packed and chunked LM head do not "
           "reproduce") if logit_transform else ""
    if perf.prefix_sharing is None:
        prefix_sharing = paired
        reasons.append("prefix sharing" + ("" if paired else " off: no pairs to share a prompt"))
    else:
        prefix_sharing = perf.prefix_sharing
        if prefix_sharing and not paired:
            refuse("perf.prefix_sharing=true", "shares a prompt between chosen and rejected, there are no pairs",
                   "leave perf.prefix_sharing unset (automatic) or false")
        reasons.append(f"prefix sharing {'on' if prefix_sharing else 'off'} (forced)")

    units_ok = attn_implementation in ("sdpa", "preftune_units")
    if gap and perf.prefix_sharing is None:
        prefix_sharing = False
        reasons[-1] = f"prefix sharing off: {gap}"

    if perf.packing is None and gap:
        packing = False
        reasons.append(f"packing off: {gap}")
    elif perf.packing is None:
        big = model_config.hidden_size >= PACKING_MIN_HIDDEN
        packing = units_ok and big
        reasons.append("packing" if packing else
                       f"packing off: model.attn_implementation={attn_implementation}, unit attention needs sdpa"
                       if not units_ok else
                       f"packing off: hidden {model_config.hidden_size} < {PACKING_MIN_HIDDEN}, per-unit attention "
                       "costs more than the padding it saves")
    else:
        packing = perf.packing
        if packing and not units_ok:
            refuse("perf.packing=true", f"unit attention runs SDPA per unit, model.attn_implementation is "
                   f"{attn_implementation!r},", "set model.attn_implementation=sdpa or leave perf.packing unset")
        reasons.append(f"packing {'on' if packing else 'off'} (forced)")

    if perf.logps_chunk is None and needs.partitioned_head:
        # the chunked head multiplies by the head's weight outside forward, where ZeRO-3 has not gathered it
        logps_chunk = 0
        reasons.append("chunked LM head off: ZeRO-3 partitions the head's weight outside the model's forward")
    elif perf.logps_chunk is None:
        logps_chunk = 0 if gap else CHUNK_TOKENS
        reasons.append(f"chunked LM head off: {gap}" if gap else f"chunked LM head ({CHUNK_TOKENS} tokens)")
    else:
        logps_chunk = perf.logps_chunk
        reasons.append(f"chunked LM head {logps_chunk or 'off'} (forced)")
    for switch, on in (("perf.prefix_sharing", prefix_sharing), ("perf.packing", packing),
                       ("perf.logps_chunk", logps_chunk)):
        if on and gap:
            refuse(f"{switch}={'true' if on is True else on}", gap, f"leave {switch} unset (automatic) or "
                   f"set it to {'false' if on is True else 0}: the run then takes the plain path")

    # --- memory: gradient checkpointing from the estimated activations vs the memory available ---
    selective = bool(perf.selective_checkpointing)
    if perf.gradient_checkpointing is None:
        kept = activation_bytes(model_config, step_tokens, dtype_bytes)
        budget = int(place.memory_bytes * ACTIVATION_BUDGET)
        layers = model_config.num_hidden_layers
        how = ""
        if kept <= budget:
            checkpointing = 0
        else:
            # every n-th layer recomputed keeps about (n-1)/n of the activations; the largest n that fits
            checkpointing = 1
            for n in range(layers, 1, -1):
                if kept * (n - 1) / n <= budget:
                    checkpointing = n
                    break
            kept_selective = kept * SELECTIVE_VALUES_PER_TOKEN_LAYER // ACTIVATION_VALUES_PER_TOKEN_LAYER
            if perf.selective_checkpointing is None and checkpointing <= SELECTIVE_MAX_INTERVAL \
                    and kept_selective <= budget:
                # every layer, keeping its matmul outputs: no matmul runs twice, ~14/24 of the activations kept
                checkpointing, selective = 1, True
                how = f", selective (matmul outputs kept, ~{kept_selective / 2 ** 30:.1f} GiB)"
        gib = 2 ** 30
        reasons.append(f"checkpointing {'off' if not checkpointing else f'every {checkpointing} layer(s)'}"
                       f"{how}: ~{kept / gib:.1f} GiB activations vs budget {budget / gib:.1f} GiB "
                       f"({ACTIVATION_BUDGET:g} of {place.memory_bytes / gib:.1f} GiB available)")
    else:
        checkpointing = perf.gradient_checkpointing
        reasons.append(f"checkpointing {checkpointing or 'off'} (forced)")

    # selective recomputation: chosen above when checkpointing is automatic; forced, it needs checkpointing
    if perf.selective_checkpointing and not checkpointing:
        refuse("perf.selective_checkpointing=true", "chooses what a checkpointed layer keeps, and "
               "perf.gradient_checkpointing is off", "set perf.gradient_checkpointing=1 (or n) beside it")
    if perf.selective_checkpointing:
        reasons[-1] += ", selective (matmul outputs kept, elementwise ops recomputed; forced)"
    elif perf.selective_checkpointing is False and checkpointing:
        reasons[-1] += ", full recomputation (selective forced off)"
    compile_ = bool(perf.compile)
    if perf.compile is not None:
        reasons.append(f"compile {'on' if compile_ else 'off'} (forced)")

    if perf.fused_adamw is None:
        fused = optimizer == "adamw" and place.device in ("cpu", "cuda")
        reasons.append("fused AdamW" if fused else f"fused AdamW off: optim {optimizer} on {place.device}")
    else:
        fused = perf.fused_adamw
        if fused and place.device not in ("cpu", "cuda"):
            refuse("perf.fused_adamw=true", f"torch has no fused AdamW on {place.device}",
                   "set perf.fused_adamw=false")

    if perf.mmap_threshold_kb is None:
        mmap_kb = MMAP_THRESHOLD_KB if place.glibc else 0
        reasons.append(f"mmap threshold {mmap_kb} KiB" if mmap_kb else "allocator left alone: no glibc")
    else:
        mmap_kb = perf.mmap_threshold_kb
        if mmap_kb and not place.glibc:
            refuse(f"perf.mmap_threshold_kb={mmap_kb}", "sets glibc's mallopt and this C library is not glibc",
                   "set perf.mmap_threshold_kb=0")

    if not perf.attention:
        # FlexAttention skips the fully masked tiles of a prefix-shared row on GPU; packed rows attend unit by
        # unit through SDPA, which is what CPU runs too
        flex = place.device == "cuda" and prefix_sharing and not packing and attn_implementation == "sdpa"
        attention = "flex_attention" if flex else attn_implementation
        reasons.append(f"attention {'units (SDPA per unit)' if packing else attention}")
    else:
        attention = perf.attention
        if attention == "flex_attention" and packing:
            refuse("perf.attention=flex_attention", "packed rows attend unit by unit through SDPA",
                   "set perf.packing=false or leave perf.attention unset")
        reasons.append(f"attention {attention} (forced)")

    resolved = dataclasses.replace(perf, prefix_sharing=prefix_sharing, packing=packing, logps_chunk=logps_chunk,
                                   gradient_checkpointing=checkpointing, selective_checkpointing=selective,
                                   compile=compile_, fused_adamw=fused,
                                   mmap_threshold_kb=mmap_kb, attention=attention)
    return resolved, reasons


def summary(resolved: PerfConfig, reasons: list[str]) -> str:
    """The one start-up line: the paths this run takes and why."""
    return "perf: " + "; ".join(reasons)
