"""A deterministic stand-in data stream for engine tests (not a test module itself).

Global batch i is drawn from a generator seeded by (seed, i); rank r of W takes rows [r*B, (r+1)*B), so a
run on W ranks with micro-batch B sees exactly the rows of a 1-rank run with micro-batch W*B. The task
(copy the first target_length input tokens) is learnable, so the loss falls.
"""
import torch


class SyntheticData:
    def __init__(self, vocab: int, batch_size: int, inputs_length: int = 16, targets_length: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.vocab, self.batch_size = vocab, batch_size
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.index = 0

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def load_resharded_state(self, states: list, step: int) -> None:
        """A checkpoint of another world size: `index` counts global batches, the same on every old rank,
        so the stream continues exactly (with the same global batch, micro-batch x ranks)."""
        self.index = states[0]["index"]

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
            rows = torch.randint(3, self.vocab, (self.batch_size * self.world_size, self.inputs_length), generator=g)
            mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            self.index += 1
            labels = mine[:, : self.targets_length].clone()
            yield {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": labels}
