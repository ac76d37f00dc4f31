"""Sequence log-probabilities of responses from ONE forward over chosen||rejected rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from preftune.data import CHOSEN, IGNORE, REJECTED, Batch, PackedBatch


@dataclass
class SequenceLogps:
    """Per-row results of one forward; rows 0..B-1 are chosen, B..2B-1 rejected."""

    logps: Tensor  # (2B,) sum of response-token log-probs; carries grad when the model does
    lengths: Tensor  # (2B,) response tokens per row (float)
    mean_logits: Tensor  # (2B,) mean logit over response tokens and vocabulary (detached; a health metric)
    # only when asked for (LD-DPO, WPO): per-token views, position t scores token t+1 of the row
    token_logps: Tensor | None = None  # (2B, T-1) log p(token), 0 off the response
    token_mask: Tensor | None = None  # (2B, T-1) True on response tokens
    token_log_sq_mass: Tensor | None = None  # (2B, T-1) log sum_v p(v)^2 (WPO's weight alignment), detached

    def rows(self, index: slice | Tensor) -> SequenceLogps:
        """The same results for a subset of rows (a slice or a boolean mask)."""
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))  # astuple would deep-copy
        return SequenceLogps(*(None if t is None else t[index] for t in fields))

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        b = self.logps.shape[0] // 2
        return self.rows(slice(None, b)), self.rows(slice(b, None))


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk_rows: int = 0, *, with_tokens: bool = False,
                   with_sq_mass: bool = False) -> SequenceLogps:
    """Sum of log p(response token | prefix) for every row of a concatenated batch.

    One forward over all 2B rows (chosen and rejected together) instead of two: half the weight reads and,
    under FSDP, half the all-gathers. The log-softmax runs in float32 whatever the model's dtype: in fp16 or
    bf16 it loses the small differences DPO's rewards are made of (NaN rewards are the usual symptom).
    `chunk_rows` > 0 converts that many rows of logits to float32 at a time, so the (2B, T, V) float32 copy
    never exists at once. `with_tokens` keeps the per-token log-probs and mask; `with_sq_mass` also the
    log of each position's squared-probability mass; both only for losses that declare they need them.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    # token t is predicted by position t-1
    logits = logits[:, :-1]  # (2B, T-1, V)
    targets = batch.labels[:, 1:]  # (2B, T-1)
    mask = targets != IGNORE  # (2B, T-1)
    safe_targets = targets.masked_fill(~mask, 0)
    step = chunk_rows if chunk_rows > 0 else logits.shape[0]
    token_logps, logit_sums, sq_mass = [], [], []
    for r in range(0, logits.shape[0], step):
        chunk = logits[r:r + step].float()  # (c, T-1, V)
        vocab_logps = chunk.log_softmax(-1)  # (c, T-1, V)
        lp = vocab_logps.gather(-1, safe_targets[r:r + step].unsqueeze(-1)).squeeze(-1)  # (c, T-1)
        token_logps.append(lp)
        with torch.no_grad():
            logit_sums.append((chunk.mean(-1) * mask[r:r + step]).sum(-1))  # (c,)
            if with_sq_mass:
                sq_mass.append(torch.logsumexp(2 * vocab_logps, dim=-1))  # (c, T-1) log sum_v p(v)^2
    token_logps_all = torch.cat(token_logps) * mask  # (2B, T-1)
    lengths = mask.sum(-1).float()  # (2B,)
    return SequenceLogps(
        logps=token_logps_all.sum(-1),
        lengths=lengths,
        mean_logits=torch.cat(logit_sums) / lengths.clamp(min=1),
        token_logps=token_logps_all if with_tokens or with_sq_mass else None,
        token_mask=mask if with_tokens or with_sq_mass else None,
        token_log_sq_mass=torch.cat(sq_mass) * mask if with_sq_mass else None,
    )



def batch_logps(model: torch.nn.Module, batch: Batch | PackedBatch, logps_chunk: int = 0, *,
                with_tokens: bool = False, with_sq_mass: bool = False) -> SequenceLogps:
    """The per-row results of `sequence_logps` by whichever path the batch layout and `perf.logps_chunk` pick.

    Every path computes the same numbers (tests/test_perf_paths.py); they differ in memory and compute.
    Per-token views (with_tokens, with_sq_mass) come from every path: on the plain path position t of a row
    scores token t+1 (T-1 columns), on the others column j is the row's j-th response token (as many columns
    as the longest response). Losses read them through the mask (sums, cumulative counts), which is the same
    in both; policy and reference rows of one batch always share a layout.
    """
    tokens = dict(with_tokens=with_tokens, with_sq_mass=with_sq_mass)
    if isinstance(batch, PackedBatch):
        return packed_sequence_logps(model, batch, logps_chunk, **tokens)
    if logps_chunk > 0:
        return chunked_sequence_logps(model, batch, logps_chunk, **tokens)
    return sequence_logps(model, batch, **tokens)


def chunked_sequence_logps(model: torch.nn.Module, batch: Batch, chunk_tokens: int, *, with_tokens: bool = False,
                           with_sq_mass: bool = False) -> SequenceLogps:
    """`sequence_logps` of a plain batch without the (2B, T, V) logits: the LM head runs on response tokens
    only (prompt and padding positions predict nothing we score), `chunk_tokens` of them at a time."""
    hidden = _final_hidden(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # (2B, T, H)
    targets = batch.labels[:, 1:]  # (2B, T-1); token t is predicted by position t-1
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # (N,) each, row-major: tokens in order
    return _response_logps(model, hidden[rows, cols], targets[rows, cols], rows, hidden.shape[0], chunk_tokens,
                           with_tokens=with_tokens, with_sq_mass=with_sq_mass)


def packed_sequence_logps(model: torch.nn.Module, batch: PackedBatch, chunk_tokens: int = 0, *,
                          with_tokens: bool = False, with_sq_mass: bool = False) -> SequenceLogps:
    """`sequence_logps` from a packed and/or prefix-shared layout (data.pack): one forward over its rows with
    per-unit position ids, then the LM head on the predicting positions only.

    Units are kept apart by UNIT_ATTENTION when the model uses it (see `use_unit_attention`), otherwise by a
    block mask over each row.
    """
    core = getattr(model, "module", model)
    if core.config._attn_implementation == UNIT_ATTENTION:
        attention = {"preftune_units": batch.units}  # passed through the layers to unit_attention
    else:
        attention = {"attention_mask": block_mask(model, batch.segment_ids, batch.kinds)}
    hidden = _final_hidden(model, input_ids=batch.input_ids, position_ids=batch.position_ids,
                           **attention)  # (R, L, H)
    pred_hidden = hidden.flatten(0, 1)[batch.pred_index]  # (N, H)
    return _response_logps(model, pred_hidden, batch.pred_target, batch.pred_owner, batch.num_rows, chunk_tokens,
                           with_tokens=with_tokens, with_sq_mass=with_sq_mass)


def block_mask(model: torch.nn.Module, segment_ids: Tensor, kinds: Tensor):
    """Who may attend to whom in a packed row: earlier positions of the same unit, except that a
    prefix-shared rejected response never sees the chosen response laid out before it.

    SDPA (CPU, and GPU without FlexAttention) takes it as a dense (R, 1, L, L) boolean mask, True = attend;
    padding positions form their own causal segment so no softmax row is empty. With
    attn_implementation=flex_attention it becomes a BlockMask, whose fully masked tiles are skipped.
    """
    core = getattr(model, "module", model)
    if core.config._attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def allowed(b, h, q, k):
            crossed = (kinds[b, q] == REJECTED) & (kinds[b, k] == CHOSEN)
            return (segment_ids[b, q] == segment_ids[b, k]) & (k <= q) & ~crossed

        rows, width = segment_ids.shape
        return create_block_mask(allowed, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)
    width = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L) query x key
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()  # (L, L)
    crossed = (kinds[:, :, None] == REJECTED) & (kinds[:, None, :] == CHOSEN)  # (R, L, L)
    return (same & causal & ~crossed)[:, None]  # (R, 1, L, L)


UNIT_ATTENTION = "preftune_units"


def unit_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """Attention unit by unit of a packed batch (data.PackedBatch.units), with no mask and no padding.

    query (R, heads, L, d), key and value (R, kv_heads, L, d). A unit [prompt | response] is one causal
    attention; a prefix-shared unit [prompt | chosen | rejected] is two: prompt+chosen causally, then the
    rejected queries over prompt+rejected keys with the causal diagonal shifted by the prompt length. So the
    cost is that of the separate sequences: nothing is spent on padding or on masked-out blocks (a dense
    mask over a packed row would pay for the whole row squared). Calls without units (plain padded batches,
    the reference model's plain path) go to transformers' SDPA unchanged.
    """
    units = kwargs.pop("preftune_units", None)
    if units is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0

    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=mask is None,
                                              scale=scaling, enable_gqa=gqa)

    # cut each row once with split (its backward is one cat) rather than slicing per unit: a slice's backward
    # writes into a zero-filled tensor the size of the whole row, once per slice
    width = query.shape[2]
    by_row: dict[int, list[tuple[int, int, int, int]]] = {}
    for row, start, prompt, first, second in units:
        by_row.setdefault(row, []).append((start, prompt, first, second))
    outputs = []
    for row, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0), strict=True)):
        sizes = [n for _, prompt, first, second in by_row.get(row, []) for n in (prompt, first, second)]
        sizes.append(width - sum(sizes))  # padding after the last unit (zero columns when one row holds all)
        qs, ks, vs = (t.unsqueeze(0).split(sizes, dim=2) for t in (q_row, k_row, v_row))
        pieces = []
        for u, (_, _, _, second) in enumerate(by_row.get(row, [])):
            i = 3 * u  # pieces i, i+1, i+2: prompt, first response, second response (possibly empty)
            head_k, head_v = torch.cat(ks[i:i + 2], dim=2), torch.cat(vs[i:i + 2], dim=2)
            pieces.append(attend(torch.cat(qs[i:i + 2], dim=2), head_k, head_v, None))
            if second:
                prompt = qs[i].shape[2]
                keys, values = torch.cat([ks[i], ks[i + 2]], dim=2), torch.cat([vs[i], vs[i + 2]], dim=2)
                # rejected token j sees the whole prompt and rejected tokens 0..j
                shifted_causal = torch.ones(second, prompt + second, dtype=torch.bool, device=query.device)
                pieces.append(attend(qs[i + 2], keys, values, shifted_causal.tril(prompt)))
        pieces.append(torch.zeros_like(qs[-1]))  # padding columns: their outputs are never read
        outputs.append(torch.cat(pieces, dim=2))
    out = torch.cat(outputs)  # (R, heads, L, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(UNIT_ATTENTION, unit_attention)
AttentionMaskInterface.register(UNIT_ATTENTION, sdpa_mask)  # plain batches still get SDPA's padding mask


def use_unit_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to unit_attention: packed batches then attend unit by unit, anything else as before."""
    if model.config._attn_implementation not in ("sdpa", UNIT_ATTENTION):
        raise ValueError(f"perf.packing needs model.attn_implementation=sdpa (unit attention runs SDPA per unit), "
                         f"got {model.config._attn_implementation!r}")
    model.set_attn_implementation(UNIT_ATTENTION)


def _final_hidden(model: torch.nn.Module, **inputs: Tensor) -> Tensor:
    """Last hidden state (after the final norm) from the model's own forward.

    The call goes through the (possibly DDP-wrapped) model so gradient hooks fire; logits_to_keep=1 keeps
    its LM head to one position, and the hidden states list's last entry is the normed final state.
    """
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def _lm_head(model: torch.nn.Module) -> torch.nn.Module:
    core = getattr(model, "module", model)  # DDP keeps the model in .module
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(core.config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"perf.logps_chunk / packing: {type(core).__name__} transforms its logits "
                             f"({name}={getattr(core.config, name)}), which the chunked LM head does not "
                             "reproduce; use the plain path (perf.logps_chunk=0, packing and prefix_sharing off)")
    return core.get_output_embeddings()


def _chunk_logps(lm_head: torch.nn.Module, hidden: Tensor, targets: Tensor,
                 with_sq_mass: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    logits = lm_head(hidden).float()  # (n, V) float32 whatever the model dtype
    log_z = logits.logsumexp(-1)  # (n,)
    target_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - log_z  # (n,)
    sq_mass = None
    if with_sq_mass:  # log sum_v p(v)^2 = logsumexp(2 log p) (WPO), never differentiated
        with torch.no_grad():
            sq_mass = torch.logsumexp(2 * (logits - log_z[:, None]), dim=-1)  # (n,)
    return target_logps, logits.mean(-1), sq_mass


def _token_columns(owner: Tensor, rows: int) -> tuple[Tensor, int]:
    """Column of each token in its row's per-token view: its rank among the tokens of its owner, which the
    layouts list in response order. (N,) and the width (the longest response)."""
    counts = torch.bincount(owner, minlength=rows)  # (rows,)
    order = torch.argsort(owner, stable=True)  # tokens grouped by owner, response order kept
    starts = counts.cumsum(0) - counts  # (rows,) first index of each owner in `order`
    columns = torch.empty_like(owner)
    columns[order] = torch.arange(owner.shape[0], device=owner.device) - starts[owner[order]]
    return columns, int(counts.max()) if owner.numel() else 0


def _response_logps(model: torch.nn.Module, pred_hidden: Tensor, targets: Tensor, owner: Tensor, rows: int,
                    chunk_tokens: int, *, with_tokens: bool = False, with_sq_mass: bool = False) -> SequenceLogps:
    """Sum of log p(target | its predicting position) per result row.

    pred_hidden (N, H), targets (N,), owner (N,) in [0, rows). With chunk_tokens > 0 each chunk's logits are
    freed after the forward and recomputed in backward (activation checkpointing of the LM head): memory
    O(chunk x V) instead of O(N x V) for one more LM-head forward on response tokens.
    """
    lm_head = _lm_head(model)
    step = chunk_tokens if chunk_tokens > 0 else max(1, targets.shape[0])
    recompute = chunk_tokens > 0 and torch.is_grad_enabled()
    token_logps, token_mean_logits, token_sq_mass = [], [], []
    for s in range(0, targets.shape[0], step):
        args = (lm_head, pred_hidden[s:s + step], targets[s:s + step], with_sq_mass)
        lp, ml, sq = checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute else _chunk_logps(*args)
        token_logps.append(lp)
        token_mean_logits.append(ml.detach())
        token_sq_mass.append(sq)
    zeros = torch.zeros(rows, device=targets.device)
    lengths = zeros.index_add(0, owner, torch.ones_like(owner, dtype=zeros.dtype))  # (rows,)
    all_logps = torch.cat(token_logps)  # (N,)
    views = {}
    if with_tokens or with_sq_mass:
        columns, width = _token_columns(owner, rows)
        grid = torch.zeros(rows, width, device=targets.device)  # (rows, longest response)
        views = dict(token_logps=grid.index_put((owner, columns), all_logps),
                     token_mask=torch.zeros(rows, width, dtype=torch.bool, device=targets.device).index_put(
                         (owner, columns), torch.ones_like(owner, dtype=torch.bool)))
        if with_sq_mass:
            views["token_log_sq_mass"] = grid.index_put((owner, columns), torch.cat(token_sq_mass))
    return SequenceLogps(
        logps=zeros.index_add(0, owner, all_logps),  # (rows,)
        lengths=lengths,
        mean_logits=zeros.index_add(0, owner, torch.cat(token_mean_logits)) / lengths.clamp(min=1),
        **views,
    )
