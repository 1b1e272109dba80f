"""Log-likelihood of several options after one shared prompt, the prompt computed once.

Multiple choice costs (prompt + option) tokens per option when each option is scored as its
own sequence; the prompt (a chat template, often a system prompt, and the question) is most of
that. Here a batch of prompts runs once with a KV cache, the cache is repeated for each option,
and only the option tokens run again: about options-times less work on the prompt. Models whose
cache cannot be repeated fall back to one sequence per option (`score_continuations`, which
also scores perplexity windows and preference pairs), which gives the same numbers.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def score_options(model, prompts: list[list[int]], options: list[list[list[int]]], batch_size: int, pad_id: int,
                  max_len: int, share_prefix: bool = True) -> list[list[tuple[float, int]]]:
    """(sum of log p(option | prompt), option tokens) for every option of every prompt.

    `batch_size` counts prompts when they are shared (each batch then runs batch_size x options
    short option rows), sequences otherwise.
    """
    if share_prefix:
        try:
            return _shared(model, prompts, options, batch_size, pad_id, max_len)
        except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError) as exc:
            log.info("prompt sharing unavailable for %s (%s); scoring each option separately",
                     type(model).__name__, exc)
    pairs, owners = [], []
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        for o, option in enumerate(opts):
            pairs.append((prompt, option))
            owners.append((q, o))
    flat = score_continuations(model, pairs, batch_size, pad_id, max_len)
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(opts) for opts in options]
    for (q, o), score in zip(owners, flat):
        out[q][o] = score
    return out


def _shared(model, prompts, options, batch_size, pad_id, max_len):
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(opts) for opts in options]
    # group by option count (the cache is repeated the same number of times for every prompt in a batch)
    by_count: dict[int, list[int]] = {}
    for q, opts in enumerate(options):
        by_count.setdefault(len(opts), []).append(q)
    with torch.inference_mode():
        for k, members in by_count.items():
            members.sort(key=lambda q: len(prompts[q]))
            per_batch = max(1, batch_size)
            for start in range(0, len(members), per_batch):
                chunk = members[start:start + per_batch]
                longest = max((len(o) for q in chunk for o in options[q]), default=0)
                opt_len = max(1, min(longest, max_len // 2))
                limit = max(1, max_len - opt_len)
                seqs = [prompts[q][-limit:] for q in chunk]
                ids, mask = left_pad(seqs, pad_id)
                ids, mask = ids.to(device), mask.to(device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache(config=model.config)
                first = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, logits_to_keep=1)
                first_logp = first.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, dim=0)
                cache = first.past_key_values
                cache.batch_repeat_interleave(k)
                conts = [o[:opt_len] for q in chunk for o in options[q]]
                cont_ids = torch.full((len(conts), opt_len), pad_id, dtype=torch.long, device=device)
                cont_mask = torch.zeros_like(cont_ids)
                for row, cont in enumerate(conts):
                    cont_ids[row, :len(cont)] = torch.tensor(cont, dtype=torch.long)
                    cont_mask[row, :len(cont)] = 1
                full_mask = torch.cat([mask.repeat_interleave(k, dim=0), cont_mask], dim=1)
                start_pos = mask.sum(-1, keepdim=True).repeat_interleave(k, dim=0)
                cont_pos = start_pos + torch.arange(opt_len, device=device).unsqueeze(0)
                logits = model(input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_pos,
                               past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)
                for row, cont in enumerate(conts):
                    q, o = chunk[row // k], row % k
                    if not cont:
                        continue
                    total = float(first_logp[row, cont[0]])
                    if len(cont) > 1:
                        steps = logits[row, :len(cont) - 1]
                        target = torch.tensor(cont[1:], device=device).unsqueeze(-1)
                        total += float(steps.gather(-1, target).sum())
                    out[q][o] = (total, len(cont))
    return out


def left_pad(seqs: list[list[int]], pad_id: int):
    """(ids, attention mask) with padding on the left, so every row ends where its text ends."""
    import torch

    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _position_ids(mask):
    """Positions that ignore left padding, so absolute-position models score the same as unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _last_logits(model, ids, mask, keep: int):
    """Logits of the last `keep` positions; `logits_to_keep` avoids materialising the rest."""
    import inspect

    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": _position_ids(mask)}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**kwargs, logits_to_keep=keep).logits
    return model(**kwargs).logits[:, -keep:]


def score_continuations(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                        pad_id: int, max_len: int) -> list[tuple[float, int]]:
    """(sum of log p(continuation | context), continuation length) for each pair of token ids.

    Left-padded batches sorted by length; only the continuation positions' logits are kept
    (`logits_to_keep`), which keeps memory small even with a 150k-token vocabulary.
    """
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs, conts = [], []
            for i in chunk:
                context, continuation = pairs[i]
                continuation = continuation[:max_len - 1]
                seqs.append((context + continuation)[-max_len:])
                conts.append(continuation)
            ids, mask = left_pad(seqs, pad_id)
            keep = max(len(c) for c in conts) + 1
            logits = _last_logits(model, ids.to(device), mask.to(device), keep)
            for row, (i, cont) in enumerate(zip(chunk, conts)):
                n = len(cont)
                if n == 0:
                    continue
                step = logits[row, keep - 1 - n:keep - 1].float().log_softmax(-1)
                target = torch.tensor(cont, device=device).unsqueeze(-1)
                results[i] = (float(step.gather(-1, target).sum()), n)
    return results
