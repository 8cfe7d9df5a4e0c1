"""A deterministic, resumable order over the training prompts.

Each epoch is a permutation seeded by (seed, epoch), so the order depends only on the seed and the
position: a run resumed from a checkpoint that stored `state()` takes the same prompts in the same order
as an uninterrupted run.
"""

from __future__ import annotations

import numpy as np


class PromptCursor:
    """Hands out task indices in chunks; `rewind_to` un-takes prompts of chunks that were discarded."""

    def __init__(self, n_tasks: int, seed: int, shuffle: bool = True):
        if n_tasks <= 0:
            raise ValueError("the training set is empty: check data.train_path (or data.synthetic.n_train)")
        self.n, self.seed, self.shuffle = n_tasks, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n)
                if self.shuffle
                else np.arange(self.n)
            )
            self._perm_epoch = epoch
        return self._perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            step = min(k - len(out), self.n - self.pos)
            out.extend(int(i) for i in order[self.pos : self.pos + step])
            self.pos += step
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict[str, int]) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])

    rewind_to = load_state
