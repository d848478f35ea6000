"""Python's cyclic garbage collector paused for a bounded piece of work."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["collector_paused"]


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
