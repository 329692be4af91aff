"""Hot swap of the served model (a fleet deploy): which generator new requests start on, and
the swapped-out ones that still finish what they started.

    LocalWorker.swap(new) ─▶ offer(new, its batch and capacity)   (event loop / fleet thread)
    engine loop, between two steps ─▶ adopt(batch)      new requests start on `new`, in a
                                                        batch sized for it (capacity.py);
                                                        the old batch keeps stepping
    ─▶ release(in_use)   the old generator is dropped once nothing queued or running
                         refers to it (each request runs on the generator whose tokenizer
                         made its prompt ids: `Request.generator`)

Not locked itself: LocalWorker (engine_loop.py) calls every method under its own lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_runtime.serving.capacity import Capacity
from edge_runtime.serving.request import DecodeBatch, ModelInfo, TextGenerator

# A swap is an engine-loop event: one logger for both.
log = logging.getLogger("edge_runtime.serving.engine_loop")


class ServedModels:
    def __init__(self, model: ModelInfo | None) -> None:
        self.served: tuple[TextGenerator | None, ModelInfo | None] = (None, model)
        """The serving generator (once loaded and warmed up) and its model, replaced together
        by one assignment so that a reader never sees the generator of one and the other's
        name."""
        self.capacity: Capacity | None = None
        """How many sequences the serving generator decodes together, and why; replaced
        with it."""
        self.pending: tuple[TextGenerator, ModelInfo | None, DecodeBatch, Capacity,
                            threading.Event] | None = None
        """A swap the engine loop has not adopted yet, with the new generator's (empty)
        batch and its capacity; the event is set once it has."""
        self.draining: list[tuple[TextGenerator, DecodeBatch]] = []
        """Generators swapped out, with the batch their running requests finish in."""

    def offer(self, gen: TextGenerator, model: ModelInfo | None, batch: DecodeBatch,
              capacity: Capacity) -> threading.Event:
        """Ask the engine loop to serve `gen` in `batch` (sized by `capacity`); the event is
        set once it does."""
        done = threading.Event()
        self.pending = (gen, model, batch, capacity, done)
        return done

    def adopt(self, batch: DecodeBatch) -> tuple[TextGenerator, DecodeBatch]:
        """On the engine thread: make the pending swap the serving model; `batch` (the old
        model's) keeps draining. The new generator and its own batch."""
        assert self.pending is not None
        gen, model, new_batch, capacity, done = self.pending
        self.pending = None
        old = self.served[0]
        if old is not None:
            self.draining.append((old, batch))
        self.served = (gen, model if model is not None else self.served[1])
        self.capacity = capacity
        done.set()
        log.info("now serving %s; %d sequences finish on the previous model",
                 model.version if model else "a new model", batch.active)
        return gen, new_batch

    def release(self, in_use: Callable[[TextGenerator], bool]) -> None:
        """Drop swapped-out generators that no running sequence and no `in_use` request
        refers to."""
        for gen, batch in list(self.draining):
            if not batch.active and not in_use(gen):
                self.draining.remove((gen, batch))
                log.info("released the previous model")

    def knows(self, gen: TextGenerator) -> bool:
        """Is `gen` the serving generator or one still draining?"""
        return gen is self.served[0] or any(g is gen for g, _ in self.draining)

    def batch_of(self, gen: TextGenerator) -> DecodeBatch:
        """The batch a swapped-out generator's requests run in."""
        return next(b for g, b in self.draining if g is gen)

    def busy_batches(self) -> list[DecodeBatch]:
        """The swapped-out batches that still have sequences running."""
        return [b for _, b in self.draining if b.active]
