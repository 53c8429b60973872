"""Triton launches at sizes the CPU cannot hold, checked where it matters: in their edge programs.

``sparse_launches(programs)`` makes every Triton launch in its block run, under the interpreter,
only the programs ``programs(grid)`` picks (by default the first, the last, those on either side
of an offset of 2^31), and checks every load and store those programs make that is not masked
off: all its addresses lie inside one tensor argument of the launch, and a store's inside one of
the tensors made in the block (by ``torch.empty``/``empty_like``: outputs, partial sums).  The
tensors can be larger than memory: a CPU tensor from ``torch.empty`` is only reserved, and the
few tiles the chosen programs touch are all that is ever mapped.  An offset computed in 32 bits
that wraps past 2^31 then shows as an address outside its buffer instead of a write gigabytes
away, and the launch arguments are the ones the host really computes for that size.
"""

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import triton.language as tl  # noqa: F401  (the wrapper's globals must show triton.language)
from triton.runtime import interpreter

from fused_act.plan import BLOCK

INT32_MAX = 2**31 - 1


class OutOfBounds(AssertionError):
    pass


class Launches:
    """What the block's launches did: per launch, the kernel, grid, programs run and accesses."""

    def __init__(self, writable: Iterable[torch.Tensor]) -> None:
        self.writable = writable  # read at each store: it may grow as the op makes its outputs
        self.buffers: list[tuple[int, int]] = []
        self.records: list[dict] = []

    def check(self, ptrs, mask, store: bool) -> None:
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[keep]
        if addr.size == 0:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        lo, hi = int(addr.min()), int(addr.max()) + size
        spans = [_span(t) for t in self.writable] if store else self.buffers
        if not any(start <= lo and hi <= end for start, end in spans):
            kind = "store" if store else "load"
            raise OutOfBounds(f"{self.records[-1]['kernel']}: a {kind} at [{lo:#x}, {hi:#x}) "
                              f"lies outside every {'writable ' if store else ''}argument "
                              f"{[(hex(s), hex(e)) for s, e in spans]}")
        self.records[-1]["accesses"] += 1


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def edge_programs(grid: int, per_program: int = BLOCK) -> list[int]:
    """The first and last two programs, and the two on either side of every multiple of 2^31
    elements (``per_program`` elements a program)."""
    picks = {0, 1, grid - 2, grid - 1}
    for k in range(1, 4):
        p = k * 2**31 // per_program
        picks |= {p - 1, p, p + 1}
    return sorted(p for p in picks if 0 <= p < grid)


@contextlib.contextmanager
def sparse_launches(programs: Callable[[int], list[int]] = edge_programs
                    ) -> Iterator[Launches]:
    """Run the block's Triton launches for ``programs(grid size)`` only, checking accesses (see
    the module's doc); yields the record of the launches.  A grid over the 2^31 - 1 programs
    the GPU allows along its first axis fails as the launch would."""
    made: list[torch.Tensor] = []
    launches = Launches(made)
    makers = {name: getattr(torch, name) for name in ("empty", "empty_like")}

    def recorder(make):
        def record(*args, **kwargs):
            made.append(t := make(*args, **kwargs))
            return t
        return record
    builder = interpreter.interpreter_builder
    init = interpreter.GridExecutor.__init__
    call = interpreter.GridExecutor.__call__
    restore = interpreter.GridExecutor._restore_args_dev
    load, store = builder.create_masked_load, builder.create_masked_store

    def selective_init(self, fn, *args, **kwargs):
        init(self, fn, *args, **kwargs)
        # the interpreter walks every program of the grid; only the chosen ones run the body
        def body(**kw):
            x, _, _ = builder.grid_idx
            if x in launches.records[-1]["programs"]:
                fn(**kw)
        body.__signature__ = inspect.signature(fn)
        body.__name__ = getattr(fn, "__name__", "kernel")
        self.fn = body

    def recording_call(self, *args, **kwargs):
        grid = self.grid if isinstance(self.grid, tuple) else None
        if grid is None:
            raise NotImplementedError("sparse_launches: a callable grid")
        n = grid[0]
        if n > INT32_MAX:
            raise OutOfBounds(f"{self.fn.__name__}: a grid of {n} programs, over the "
                              f"{INT32_MAX} a launch allows")
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        launches.buffers = [_span(t) for t in tensors]
        launches.records.append(dict(kernel=self.fn.__name__, grid=n, programs=set(programs(n)),
                                     accesses=0))
        try:
            call(self, *args, **kwargs)
        except interpreter.InterpreterError as e:
            cause = e  # the interpreter wraps what a body raises, once per call level
            while isinstance(cause, interpreter.InterpreterError) and cause.__cause__:
                cause = cause.__cause__
            if isinstance(cause, OutOfBounds):
                raise cause from None
            raise

    for name, make in makers.items():
        setattr(torch, name, recorder(make))
    interpreter.GridExecutor.__init__ = selective_init
    interpreter.GridExecutor.__call__ = recording_call
    # CPU tensors are the interpreter's own memory: nothing to copy back (and no pass over them)
    interpreter.GridExecutor._restore_args_dev = lambda *a, **k: None
    builder.create_masked_load = lambda ptrs, mask, *a: (launches.check(ptrs, mask, False),
                                                         load(ptrs, mask, *a))[1]
    builder.create_masked_store = lambda ptrs, v, mask, *a: (launches.check(ptrs, mask, True),
                                                             store(ptrs, v, mask, *a))[1]
    try:
        yield launches
    finally:
        for name, make in makers.items():
            setattr(torch, name, make)
        interpreter.GridExecutor.__init__ = init
        interpreter.GridExecutor.__call__ = call
        interpreter.GridExecutor._restore_args_dev = restore
        del builder.create_masked_load, builder.create_masked_store
