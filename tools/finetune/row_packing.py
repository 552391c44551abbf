"""Packed batches as rows: each row one example as trl prepared it (with ``packing``: several rows packed
best-fit-decreasing, their lengths in ``seq_lengths``), padded to the batch's longest row — or, for CUDA-graphed
decoder layers, always to ``max_seq_len``, one fixed ``batch_size × max_seq_len`` shape.

trl's own collator for packed data flattens the whole batch into one row of varying length (padding-free), which
a graph cannot replay, and which SDPA attends as one ``B·L``-long sequence under a mask (B² times the attention
work of B rows of L). Here each packed example stays a row of its own:

    input_ids     (B, L)    padded with the pad token
    position_ids  (B, L)    0, 1, … restarting at every packed sequence; 0 on padding
    labels        (B, L)    trl's labels; -100 on padding and on each sequence's first token

and no ``attention_mask``: transformers then reads the restarts in ``position_ids`` as packed sequences and builds
the block-diagonal causal mask itself (each padding token is a sequence of one, attending only to itself). With
``fixed_length`` every full batch has the same ``(B, 1, max_seq_len, max_seq_len)`` mask, what a graph replays;
a smaller last batch runs the layers eagerly. Without it a batch is only as long as its longest packed row (a
small data set's one short row is not padded to a long ``max_seq_len``).
"""

from __future__ import annotations


def row_collator(pad_token_id: int, max_seq_len: int, *, fixed_length: bool = False):
    """The collate function (a list of trl-prepared examples → model inputs) described above."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=False,
                                             return_position_ids=True,
                                             pad_to_multiple_of=max_seq_len if fixed_length else None)

    def collate(examples: list[dict]) -> dict:
        out = padded(examples)
        del out["attention_mask"]
        out["labels"][out["position_ids"] == 0] = -100   # a first token predicts nothing from the row before
        return out

    return collate
