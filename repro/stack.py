"""The transformer stack run piece by piece: what GPTQ and the block-wise methods share.

``capture(model, sequences, batch_size)`` runs the model once per mini-batch and returns one
``StackBatch`` per mini-batch: the hidden states entering block 0 and, for *every* block, the
other arguments the model passes it (attention mask, rotary position embeddings, position ids
...). Each block gets its own arguments because families differ per block: Gemma 3 alternates
sliding-window and global-attention blocks with different rotary bases and masks, so block 0's
arguments are wrong for block 5. transformers gives every block of one ``config.layer_types``
kind the same arguments (every block, when the config has no kinds), so the forward pass stops
at the first block of the last kind to appear — block 0 for GPT-2, OPT, Llama and Mistral,
block 5 for Gemma 3 — and the other blocks share the arguments of their kind's first block.

``run_blocks(blocks, start, stop, batch, hidden)`` then runs any slice of the stack on a
mini-batch, and ``advance`` moves every batch's hidden states one block deeper, in place.

Offloading: ``capture(..., store="cpu")`` keeps the hidden states on CPU while the block
arguments stay on the model's device (they are small: masks, rotary tables); ``run_block``
moves a mini-batch's hidden states to that device as it enters a block, and ``advance`` puts
each output back where its input was kept. So the device holds the model, one mini-batch and
whatever the caller computes, not the calibration set's activations (n x seq x hidden x 4 B:
8.6 GB for 128 x 4096 tokens at Llama-2-7B's width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from repro.evaluate import batches, block_hidden, check_sequences, model_device
from repro.models import blocks as stack_blocks


@dataclass
class StackBatch:
    """One calibration mini-batch inside the stack.

    ``hidden`` [batch, seq, hidden_size]: the residual stream at the depth this batch has reached
    (block 0's input right after ``capture``), kept on the device ``capture`` was told to store it
    on; ``calls[i]`` = ``(args, kwargs)`` that block ``i`` takes besides its hidden states;
    ``device``: where those arguments live and the blocks run (the model's device).
    """

    hidden: torch.Tensor
    calls: list
    device: torch.device


class _Caught(Exception):
    """Raised by the pre-hook on the last block: everything the stack needs has been seen."""


def argument_sources(model) -> list[int]:
    """Per block, the first block of its ``config.layer_types`` kind (whose arguments it gets)."""
    n = len(stack_blocks(model))
    kinds = list(getattr(model.config, "layer_types", None) or ["all"] * n)[:n]
    first = {}
    return [first.setdefault(kind, i) for i, kind in enumerate(kinds)]


def capture(model, sequences: torch.Tensor, batch_size: int, store=None) -> list[StackBatch]:
    """Block 0's inputs and every block's arguments, per mini-batch of ``sequences``
    [n, seq_len] (token ids): one forward pass per mini-batch, stopped before the first block
    of the last argument kind runs (``argument_sources``). Hidden states are kept on ``store``
    (default: the model's device), in the model's dtype."""
    check_sequences(model, sequences, allow_empty=True)  # e.g. GPTQ's held-out part, when none is held out
    device = model_device(model)
    stack = stack_blocks(model)
    sources = argument_sources(model)
    last = max(sources)
    caught: list[StackBatch] = []

    def hook(index):
        def catch(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                caught.append(StackBatch(hidden.to(store or device), [None] * len(stack), device))
            caught[-1].calls[index] = (tuple(args[1:]), kwargs)
            if index == last:
                raise _Caught
        return catch

    handles = [stack[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in sorted(set(sources))]
    try:
        for batch in batches(sequences, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        for h in handles:
            h.remove()
    for item in caught:
        item.calls = [item.calls[source] for source in sources]
    return caught


def run_block(block, index: int, batch: StackBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Output hidden states of stack block ``index`` (the module ``block``) on ``hidden``
    (default ``batch.hidden``; moved to ``batch.device`` if kept elsewhere) with the arguments
    the model gives that block. The output is on the block's device (``batch.device`` unless
    accelerate spread the model over several)."""
    args, kwargs = batch.calls[index]
    hidden = batch.hidden if hidden is None else hidden
    return block_hidden(block(hidden.to(batch.device), *args, **kwargs))


def run_blocks(blocks, start: int, stop: int, batch: StackBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run stack blocks ``start .. stop-1`` (``blocks`` is the whole stack) in order."""
    hidden = batch.hidden if hidden is None else hidden
    for i in range(start, stop):
        hidden = run_block(blocks[i], i, batch, hidden)
    return hidden


def advance(block, index: int, stack_batches: list[StackBatch]) -> None:
    """Replace every batch's hidden states by block ``index``'s output on them, in place, kept
    where the input was (see offloading above)."""
    for batch in stack_batches:
        batch.hidden = run_block(block, index, batch).to(batch.hidden.device)
