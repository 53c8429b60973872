"""64-bit offsets wherever they can pass 2^31, for every Triton kernel, on the CPU.

Each case runs the real op (its host code, plan and launch arguments) at a size past 2^31
elements, or with 2^30 and more partial sums per parameter gradient, through
``tests/sparse_launch.py``: only the programs at the edges of each launch run, under the
interpreter, and every access they make must lie inside its buffer.  The tensors are reserved,
not filled (``torch.empty``), so the values are whatever the memory holds and are not checked
here; ``tests/test_gpu.py::test_past_2_31_elements`` checks them on a GPU.
"""

import pytest
import torch

from fused_act import ops, plan

from .cases import need_device
from .sparse_launch import OutOfBounds, edge_programs, sparse_launches

BF16 = torch.bfloat16
N31 = 2**31 + 4099  # past 2^31, and not a multiple of any tile: a tail at the very end


@pytest.fixture(autouse=True)
def _interpreter():
    need_device("cpu")


def _empty(*shape, dtype=BF16, **kw) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, **kw)


def _sparse(fn, per_program=plan.BLOCK):
    with sparse_launches(lambda g: edge_programs(g, per_program)) as launches:
        out = fn()
    assert launches.records, "no Triton launch"
    for r in launches.records:
        assert r["accesses"] > 0 and r["programs"], r
    return out


def test_flat_activation_past_2_31():
    x, g = _empty(N31), _empty(N31)
    _sparse(lambda: ops.forward_impl(x, "mish", None, 1.0, "triton"))
    _sparse(lambda: ops.backward_impl(g, x, "mish", None, 1.0, False, "triton"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_beta_past_2_31(layout):
    """A per-channel learnable beta: ROWS (NCHW) and COLS (channels last) plans, dbeta
    partials included."""
    if layout == "nchw":
        x = _empty(8, 4, 2**26 + 3)
    else:
        x = _empty(2**21 + 5, 1024)
    g = torch.empty_like(x)
    beta = torch.ones(x.shape[1])
    _sparse(lambda: ops.forward_impl(x, "swish", beta, 1.0, "triton"))
    _sparse(lambda: ops.backward_impl(g, x, "swish", beta, 1.0, True, "triton"))


# (x's shape, beta's shape): Meta-ACON on (N, C) with 2^30 per-sample partials per gradient
# (COLS), on NCHW with H*W = 2 at 2^31 elements (ROWS, 2^30 rows), ACON-C per channel past 2^31
ACON = {
    "meta_nc": ((2**20, 1024), (2**20, 1024)),
    "meta_nchw_hw2": ((2**20, 1024, 1, 2), (2**20, 1024, 1, 1)),
    "channel_nchw": ((8, 4, 2**26 + 3), (1, 4, 1)),
}


@pytest.mark.parametrize("case", list(ACON))
def test_acon_partials_past_2_30(case):
    shape, beta_shape = ACON[case]
    x, g = _empty(*shape), _empty(*shape)
    c = shape[1]
    p1, p2 = torch.ones(c), torch.zeros(c)
    beta = torch.ones(beta_shape) if case.startswith("meta") else torch.ones(c)
    p = plan.channel_plan(x, c, case.startswith("meta"))
    assert p.partials >= 2**30 or x.numel() >= 2**31, p
    _sparse(lambda: ops.acon_forward_impl(x, p1, p2, beta, "triton"))
    _sparse(lambda: ops.acon_backward_impl(g, x, p1, p2, beta, True, "triton"))


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "beta"])
def test_gated_packed_past_2_31(learnable):
    """Packed (rows, 2H) gate/up with an odd H: the halves are read and written in place with a
    row stride of 2H, so offsets reach twice the output's size."""
    h = 2049
    rows = 2**31 // h + 3
    gate_up, g = _empty(rows, 2 * h), _empty(rows, h)
    beta = torch.ones(1) if learnable else None
    act = "swish"
    _sparse(lambda: ops.glu_forward_impl(gate_up, None, act, beta, 1.0, -1, "triton"))
    _sparse(lambda: ops.glu_backward_impl(g, gate_up, None, act, beta, 1.0, -1, learnable,
                                          "triton"))


def test_frelu_past_2_31():
    x, t, g = _empty(N31), _empty(N31), _empty(N31)
    _, code = _sparse(lambda: ops.frelu_forward_impl(x, t, True, "triton"))
    _sparse(lambda: ops.frelu_backward_impl(g, code, "triton"))
    x4, t4 = _empty(8, 4, 2**26 + 3), _empty(8, 4, 2**26 + 3)
    a, b = torch.ones(4), torch.zeros(4)
    _sparse(lambda: ops.frelu_max_affine_impl(x4, t4, a, b, "triton"))


def test_meta_acon_grid_within_launch_limit():
    """Meta-ACON on (N, C) with C = 2 and N = 2^31: a beta per element, walked in tiles of
    BLOCK elements (it once took a program per sample: 2^31 programs, over the launch limit)."""
    x = _empty(2**31, 2)
    beta = torch.empty(2**31, 2)  # fp32 already: no copy of the 16 GB it reserves
    p1, p2 = torch.ones(2), torch.zeros(2)
    p = plan.channel_plan(x, 2, True)
    assert p.grid[0] <= 2**31 - 1 and p.block_r * p.block_l == plan.BLOCK, p
    _sparse(lambda: ops.acon_forward_impl(x, p1, p2, beta, "triton"))
    _sparse(lambda: ops.acon_backward_impl(x, x, p1, p2, beta, False, "triton"))


def test_a_wrapping_offset_is_caught():
    """The check itself: the old ACON-C backward computed ``partial + 2 * P`` in 32 bits, and
    a launch with that arithmetic must fail here."""
    import triton
    import triton.language as tl

    @triton.jit
    def third(ptr, third_ptr, P, BLOCK: tl.constexpr, WRAP: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if WRAP:
            ptrs = ptr + 2 * P + offs
        else:
            ptrs = third_ptr + offs
        tl.store(ptrs, tl.zeros([BLOCK], tl.float32), mask=offs < P)

    p = 2**30
    grid = (p // 1024,)
    for wrap in (True, False):
        def launch(wrap=wrap):
            buf = torch.empty(3 * p)
            third[grid](buf, buf[2 * p:], p, BLOCK=1024, WRAP=wrap)
        if wrap:
            with pytest.raises(OutOfBounds, match="outside every writable argument"):
                _sparse(launch, 1024)
        else:
            _sparse(launch, 1024)


def test_plans_of_symbolic_sizes():
    """Plans are cached by size, and a symbolic size (a trace with dynamic shapes) has no hash:
    its plan is built uncached, not refused."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    n = ShapeEnv().create_unbacked_symint()
    p = plan.flat(n, plan.SCALAR)
    assert p.cols is n and p.rows == 1 and p.layout == plan.SCALAR
    assert plan.flat(64, plan.SCALAR) is plan.flat(64, plan.SCALAR)
