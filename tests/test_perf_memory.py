"""The default path never builds a (B, T, V) logits tensor: every float tensor a training step allocates,
forward and backward, the optimiser and the reference included, stays below B x T x V."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from preftune import data
from preftune.modeling import load_tokenizer
from preftune.train import train

from .conftest import TINY_ARCH

VOCAB = 4096  # well above the byte tokenizer's 259 ids: logits then dwarf every other activation


class LargestFloatTensor(TorchDispatchMode):
    """Watches every op's outputs; keeps the largest floating-point one (elements) and the op that made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), func, tuple(t.shape)
        return out


def _largest(tiny, **sections):
    cfg = tiny(model={"arch": dict(TINY_ARCH, vocab_size=VOCAB)}, train={"max_steps": 1, "batch_size": 8},
               **sections)
    pairs, _ = data.load_pairs(cfg.data.train, load_tokenizer(cfg.model), cfg.data)
    longest = max(p.length for p in pairs)  # T: the padded row length of the plain path's longest batch
    watch = LargestFloatTensor()
    with watch:
        train(cfg)
    return watch, cfg.train.batch_size * longest * VOCAB


def test_default_path_allocates_no_tensor_as_large_as_the_logits(tiny):
    watch, logits = _largest(tiny)
    assert watch.numel < logits, (watch.op, watch.shape, logits)


def test_the_plain_path_does_allocate_the_logits(tiny):
    """The watch sees them when they exist: the plain path's (2B, T, V) logits are over the bound."""
    watch, logits = _largest(tiny, perf={"plain": True})
    assert watch.numel >= logits, (watch.op, watch.shape, logits)
