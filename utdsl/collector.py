"""Python's cyclic garbage collector paused for a bounded piece of work, and told that what the
work built is long-lived."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["collector_paused", "keep_as_old"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cycle collector off inside the block, restored after. A parse allocates acyclic AST
    nodes by the hundred thousand and a compile fx nodes by the thousand; collections triggered by
    their number walk every live object (the model, its graphs) and cost more than the work
    itself. What the block leaves behind is collected afterwards as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def keep_as_old() -> None:
    """Hand every object the cycle collector tracks to its oldest generation at once.

    A parse (or a check) builds up to millions of nodes with the collector paused: acyclic, freed
    by reference counting, and kept as long as the spec is. Left young, the first collection
    after the pause would walk every one of them (about a second for 100,000 rules) and the
    next older collection again, to find what collections find of long-lived objects: nothing
    to free. ``gc.freeze()`` then ``gc.unfreeze()`` moves them (and any other young object) to
    the oldest generation in two list splices; full collections still walk them as usual.
    Skipped when the program has frozen objects itself: ``unfreeze`` would thaw them."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
