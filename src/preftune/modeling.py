"""Load the policy model and tokenizer a config names: a HF directory, or a random model from `arch`."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from preftune.config import ModelConfig, PerfConfig
from preftune.logps import use_unit_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte symbols + <bos>, <eos>, <pad>; no merges, no download.

    For tiny random models in smoke runs and tests. It saves and reloads like any HF fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<bos>", "<eos>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def load_tokenizer(cfg: ModelConfig):
    source = cfg.tokenizer or cfg.path
    if source == "bytes":
        tokenizer = byte_tokenizer()
    elif not source:
        raise ValueError("model.tokenizer: a random-init model (model.arch) needs a tokenizer: "
                         "a tokenizer directory or 'bytes'")
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # padding positions are masked out of attention and loss, so any id will do; EOS is always present
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer, seed: int = 0) -> torch.nn.Module:
    """The policy in training mode. Weights load from safetensors only unless model.allow_pickle is set:
    unpickling a .bin/.pt file can execute code."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        pickle_only = Path(cfg.path).is_dir() and not any(Path(cfg.path).glob("*.safetensors"))
        if pickle_only and not cfg.allow_pickle:
            raise ValueError(f"model.path {cfg.path!r} holds no .safetensors weights; preftune does not load "
                             "pickle (.bin/.pt) weights since they can execute code; convert them first, or "
                             "set model.allow_pickle=true if you trust the files")
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation, use_safetensors=not pickle_only)
    else:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.arch needs a 'model_type' (e.g. llama)")
        arch.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch.setdefault(name, getattr(tokenizer, name))
        model_config = AutoConfig.for_model(model_type, **arch)
        torch.manual_seed(seed)  # a random model is a function of the seed
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype,
                                                 attn_implementation=cfg.attn_implementation)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    model.config.use_cache = False  # training never reuses the KV cache; keeping it costs memory
    return model.train()



def apply_speedups(model: torch.nn.Module, perf: PerfConfig, trainable: bool = True) -> torch.nn.Module:
    """The perf switches that live on the model, in place. None changes the numbers: recomputation repeats
    the same ops, unit attention is tested against the plain path, compiled layers against eager ones."""
    if perf.packing:
        use_unit_attention(model)  # a packed row attends unit by unit instead of through a (L, L) mask
    elif perf.attention == "flex_attention" and model.config._attn_implementation != "flex_attention":
        # prefix-shared rows' block mask becomes a BlockMask whose fully masked tiles are skipped (GPU)
        model.set_attn_implementation("flex_attention")
    if perf.gradient_checkpointing and trainable:
        # non-reentrant: works with frozen inputs and keyword arguments such as the packed units
        kwargs = {"use_reentrant": False}
        if perf.selective_checkpointing:
            kwargs["context_fn"] = keep_matmul_outputs
        model.activation_checkpointing_enable(kwargs, every_n_layers=perf.gradient_checkpointing)
    if perf.compile:
        # per decoder layer, not the whole model: one small graph reused by every layer, dynamic lengths
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ValueError(f"perf.compile: found no decoder layers ({sorted(layer_types)}) in "
                             f"{type(model).__name__}")
        for layer in layers:
            layer.compile(dynamic=True, backend=COMPILE_BACKEND)
    return model


@functools.cache
def _kept_ops() -> frozenset:
    """The matmul and attention kernels whose outputs selective recomputation keeps (those this torch has)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _kept_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def keep_matmul_outputs():
    """Selective recomputation for one checkpointed layer (perf.selective_checkpointing): the outputs of its
    matmuls and attention kernels are kept from forward, everything else (norms, rotary, SiLU, products,
    views) is recomputed in backward, so the recomputation costs elementwise work only (arXiv:2205.05198)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmuls)


COMPILE_BACKEND = "inductor"  # tests swap in aot_eager: same graph capture, seconds instead of minutes on CPU


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes: the identity of a model's weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
