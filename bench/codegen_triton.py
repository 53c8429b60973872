"""``python -m bench.codegen_triton``: what the Triton compiler makes of every kernel
specialization the host launches, compiled for sm_90 (H100) on any machine, GPU or not.

The sweep drives the real host ops (``fused_act/ops/``: their layouts and plans) on meta
tensors over the families, dtypes, aligned and tail shapes and constexpr variants they launch,
and records each launcher's arguments instead of running it.  Every distinct specialization (as
Triton specializes: dtypes, 16-byte pointer alignment, integers that are 1 or multiples of 16,
the constexprs) is compiled by the real compiler for ``TARGET`` in worker processes, each with a
fresh Triton cache so that nothing stale stands in for a changed kernel.  Per specialization it
reads registers and spill bytes (``ptxas -v`` on the PTX), the widest global load and store in
bytes (PTX ``ld.global.v4.b32`` is 16) and the rounding of every float narrowing.

``problems`` is the gate (``tests/test_codegen_triton.py``): a specialization that does not
compile, a spill (in any dtype), registers over the checked-in baseline
(``codegen_triton.json``) + 8, an access narrower than 16 bytes in a case whose tiles could all
be read 16 bytes at a time, or a narrowing not rounded to nearest even.  ``--write-baseline``
records this Triton's registers.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).with_name("codegen_triton.json")
TARGET = ("cuda", 90, 32)
REGISTER_SLACK = 8
VECTOR_BYTES = 16
# where a flat row is tiled: the first such argument of a kernel is the length a tail cuts
LENGTHS = ("L", "N")
# specializations that store one value a program and no tile (the FP8 kernel's amax pass):
# (kernel, constexpr, value); only their loads are held to 16 bytes
SCALAR_STORES = {("act_quant_kernel", "SCALING", 3)}
# the modules of triton_kernels whose kernels the sweep records and compiles
KERNEL_MODULES = ("acon", "elementwise", "frelu", "gated", "quant")

# ---- the sweep: host ops on meta tensors ------------------------------------------------------

FLOATS = ("float32", "float16", "bfloat16", "float64")
ACTS = ("mish", "swish", "gelu", "gelu_tanh")
# (N, C, H, W) by whether H W, and so a ROWS row, is a multiple of 16; C for COLS likewise
NCHW = {"aligned": (4, 32, 16, 16), "tail": (4, 32, 7, 7)}
NC = {"aligned": (256, 64), "tail": (256, 100)}
FLAT = {"aligned": (8, 1000), "tail": (7, 999)}
GLU_ROWS = 63  # odd: separate gate and up of the tail width make a flat tail
GLU_H = {"aligned": 256, "tail": 173}
INT64_NUMEL = 2**31 + 2048
QUANT_ROWS, QUANT_K = 63, 1024  # the FP8 kernel's rows: an odd count, a held width


def _sweep():
    """(family, case, thunk) for every host call of the sweep; a thunk runs the op on meta
    tensors (the launchers record, nothing runs)."""
    import torch

    from fused_act import ops, plan

    def t(shape, dtype, channels_last=False):
        x = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        return x.to(memory_format=torch.channels_last) if channels_last else x

    def param(shape, dtype):
        return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")

    def act(dt, name, x, beta=None, need_dbeta=False):
        def run():
            ops.forward_impl(x, name, beta, 1.0, "triton")
            ops.backward_impl(torch.empty_like(x), x, name, beta, 1.0, need_dbeta, "triton")
        return run

    cases = []
    for dt in FLOATS:
        for name in ACTS:
            for kind, shape in FLAT.items():
                cases.append(("act", f"{name} {dt} flat {kind}", act(dt, name, t(shape, dt))))
        for kind in ("aligned", "tail"):
            x = t(NCHW[kind], dt)
            cases += [
                ("act", f"swish {dt} one-value beta {kind}",
                 act(dt, "swish", t(FLAT[kind], dt), param((1,), dt), True)),
                ("act", f"swish {dt} per-channel beta nchw {kind}",
                 act(dt, "swish", x, param((NCHW[kind][1],), dt), True)),
                ("act", f"swish {dt} frozen per-channel beta nchw {kind}",
                 act(dt, "swish", x, param((NCHW[kind][1],), dt), False)),
                ("act", f"swish {dt} per-channel beta nc {kind}",
                 act(dt, "swish", t(NC[kind], dt), param((NC[kind][1],), dt), True)),
            ]
    for dt in ("float32", "bfloat16"):
        cases.append(("act", f"mish {dt} flat 64-bit offsets",
                      act(dt, "mish", t((INT64_NUMEL,), dt))))

    def glu(dt, name, gate, up, beta=None, need_dbeta=False):
        def run():
            out = ops.glu_forward_impl(gate, up, name, beta, 1.0, -1, "triton")
            ops.glu_backward_impl(torch.empty_like(out), gate, up, name, beta, 1.0, -1,
                                  need_dbeta, "triton")
        return run

    for dt in FLOATS:
        for name in ACTS:
            for kind, h in GLU_H.items():
                packed = t((GLU_ROWS, 2 * h), dt)
                cases += [
                    ("glu", f"{name} {dt} gate, up {kind}",
                     glu(dt, name, t((GLU_ROWS, h), dt), t((GLU_ROWS, h), dt))),
                    ("glu", f"{name} {dt} packed {kind}", glu(dt, name, packed, None)),
                ]
        cases.append(("glu", f"swish {dt} packed, beta tensor",
                      glu(dt, "swish", t((GLU_ROWS, 2 * GLU_H["aligned"]), dt), None,
                          param((1,), dt), True)))

    def acon(dt, x, beta_shape, need_params=True):
        c = x.shape[1]

        def run():
            p1, p2, beta = param((c,), dt), param((c,), dt), param(beta_shape, dt)
            ops.acon_forward_impl(x, p1, p2, beta, "triton")
            ops.acon_backward_impl(torch.empty_like(x), x, p1, p2, beta, need_params, "triton")
        return run

    for dt in FLOATS:
        for kind in ("aligned", "tail"):
            n, c = NCHW[kind][:2]
            for layout, x in (("nchw", t(NCHW[kind], dt)),
                              ("channels_last", t(NCHW[kind], dt, channels_last=True))):
                cases += [
                    ("acon", f"{dt} {layout} {kind}", acon(dt, x, (c,))),
                    ("acon", f"{dt} {layout} {kind}, meta-acon", acon(dt, x, (n, c, 1, 1))),
                ]
            cases.append(("acon", f"{dt} nchw {kind}, no parameter grads",
                          acon(dt, t(NCHW[kind], dt), (c,), need_params=False)))
            # one channel: a flat plan, whose tail is cut as in the parameterless ops
            one = (n, 1, *NCHW[kind][2:])
            cases.append(("acon", f"{dt} one channel {kind}", acon(dt, t(one, dt), (1,))))

    def frelu(x, need_code):
        def run():
            _, code = ops.frelu_forward_impl(x, torch.empty_like(x), need_code, "triton")
            if need_code:
                ops.frelu_backward_impl(torch.empty_like(x), code, "triton")
        return run

    def frelu_affine(x):
        c = x.shape[1]

        def run():
            a, b = param((c,), "float32"), param((c,), "float32")
            ops.frelu_max_affine_impl(x, torch.empty_like(x), a, b, "triton")
        return run

    for dt in FLOATS:
        for kind in ("aligned", "tail"):
            for need_code in (True, False):
                cases.append(("frelu", f"{dt} {kind}{'' if need_code else ', no grad'}",
                              frelu(t(FLAT[kind], dt), need_code)))
            cases += [
                ("frelu", f"{dt} eval nchw {kind}", frelu_affine(t(NCHW[kind], dt))),
                ("frelu", f"{dt} eval channels_last {kind}",
                 frelu_affine(t(NCHW[kind], dt, channels_last=True))),
            ]
    cases.append(("frelu", "bfloat16 64-bit offsets", frelu(t((INT64_NUMEL,), "bfloat16"), True)))

    def quant(gate, up, scaling, dim=None):
        def run():
            ops.quant.act_quant(gate, up, "swish", 1.0, dim, torch.float8_e4m3fn, scaling, None,
                                32, "triton")
        return run

    # representative specializations of the FP8 kernel, not its product of options: gated row
    # scaling with the row held in each dtype, then in bf16 the widest held row and a row past
    # plan.ROW_HOLD (two passes), block and tensor scaling (its amax pass too), the elementwise
    # and packed forms
    held, long = (QUANT_ROWS, QUANT_K), (QUANT_ROWS, 2 * plan.ROW_HOLD)
    widest = (QUANT_ROWS, plan.ROW_HOLD)  # the most registers a held row takes
    for dt in ("float32", "float16", "bfloat16"):
        cases.append(("quant", f"swiglu {dt} row held",
                      quant(t(held, dt), t(held, dt), "row")))
    bf = "bfloat16"
    cases += [
        ("quant", "swiglu bfloat16 row held at its widest",
         quant(t(widest, bf), t(widest, bf), "row")),
        ("quant", "swiglu bfloat16 row two-pass", quant(t(long, bf), t(long, bf), "row")),
        ("quant", "swiglu bfloat16 block", quant(t(held, bf), t(held, bf), "block")),
        ("quant", "swiglu bfloat16 tensor", quant(t(held, bf), t(held, bf), "tensor")),
        ("quant", "silu bfloat16 row held", quant(t(held, bf), None, "row")),
        ("quant", "silu bfloat16 block", quant(t(held, bf), None, "block")),
        ("quant", "swiglu bfloat16 packed block",
         quant(t((QUANT_ROWS, 2 * QUANT_K), bf), None, "block", -1)),
    ]
    return cases


# ---- recording and compiling (worker processes) -----------------------------------------------

def _install_kernels(source: Path, patches: list, scratch: str | None = None) -> Path:
    """Import ``fused_act.triton_kernels`` from a copy of ``source`` with each (file, old, new)
    of ``patches`` applied (``old`` must occur exactly once), so that a mutated kernel compiles
    without touching the tree; returns the copy's directory."""
    import importlib.util

    import fused_act

    # inside the run's scratch folder (the parent removes it), never left in the system's temp
    copy = Path(tempfile.mkdtemp(prefix="codegen_kernels_", dir=scratch)) / "triton_kernels"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in patches:
        text = (copy / name).read_text()
        if text.count(old) != 1:
            raise ValueError(f"patch for {name}: {old!r} occurs {text.count(old)} times")
        (copy / name).write_text(text.replace(old, new))
    spec = importlib.util.spec_from_file_location(
        "fused_act.triton_kernels", copy / "__init__.py", submodule_search_locations=[str(copy)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fused_act.triton_kernels"] = module
    spec.loader.exec_module(module)
    fused_act.triton_kernels = module
    return copy


def _describe(value):
    """An argument as Triton specializes on it (a tensor: its dtype and 16-byte alignment)."""
    if hasattr(value, "data_ptr"):
        # meta tensors: data_ptr is the view's byte offset, from an aligned allocation
        return ["ptr", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    return ["float", float(value)]


def _int_class(v: int) -> str:
    width = "i32" if -2**31 <= v < 2**31 else "i64"
    return f"{width}{'=1' if v == 1 else ':16' if v % 16 == 0 else ''}"


def _spec_id(kernel: str, params: list[str], args: list, constexprs: dict) -> str:
    parts = []
    for name, (kind, *rest) in zip(params, args, strict=True):
        if kind == "ptr":
            parts.append(f"{name}:*{rest[0]}{'' if rest[1] else '~'}")
        elif kind == "int":
            parts.append(f"{name}:{_int_class(rest[0])}")
    parts += [f"{k}={v}" for k, v in sorted(constexprs.items())]
    return f"{kernel}({', '.join(parts)})"


def _record(only: list[str] | None) -> list[dict]:
    """Every distinct launch of the sweep, in sweep order: kernel, its arguments as
    ``_describe`` gives them, constexprs and options, and the cases that launch it."""
    import triton

    from fused_act import kernels

    kernels.resolve = lambda device, name: "triton"  # meta tensors, launched by Triton's kernels
    kernels.kernels("triton")
    package = sys.modules["fused_act.triton_kernels"]
    launches: dict[str, dict] = {}
    current = {}

    def recorder(jit_fn):
        def run(*args, grid, warmup, **kwargs):
            params = [p.name for p in jit_fn.params]
            bound = dict(zip(params, args, strict=False))
            bound.update({k: v for k, v in kwargs.items() if k in params})
            options = {k: v for k, v in kwargs.items() if k not in params}
            constexprs = {p.name: bound[p.name] for p in jit_fn.params if p.is_constexpr}
            described = [_describe(bound[p.name]) for p in jit_fn.params if not p.is_constexpr]
            names = [p.name for p in jit_fn.params if not p.is_constexpr]
            name = jit_fn.fn.__name__
            key = _spec_id(name, names, described, constexprs) + repr(sorted(options.items()))
            entry = launches.setdefault(key, {
                "kernel": name, "params": names, "args": described, "constexprs": constexprs,
                "options": options, "family": current["family"], "cases": []})
            entry["cases"].append(current["case"])
        return run

    patched = list({id(value): value for name in KERNEL_MODULES
                    for value in vars(getattr(package, name)).values()
                    if isinstance(value, triton.runtime.JITFunction)}.values())
    for fn in patched:
        fn.run = recorder(fn)
    try:
        for family, case, thunk in _sweep():
            current.update(family=family, case=case)
            thunk()
    finally:
        for fn in patched:
            del fn.run
    rows = list(launches.values())
    return [r for r in rows if only is None or r["kernel"] in only]


class _Pointer:
    """A pointer argument for ``warmup``: a dtype and an address of the recorded alignment."""

    def __init__(self, dtype, aligned: bool):
        self.dtype, self._ptr = dtype, 0 if aligned else dtype.itemsize

    def data_ptr(self) -> int:
        return self._ptr


class _OfflineDriver:
    """The active driver while compiling: the target is ``TARGET``, whatever device is here."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget(*TARGET)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_CVT = re.compile(r"\bcvt((?:\.\w+)+)")
_FLOAT_BITS = {"f16": 16, "bf16": 16, "f16x2": 16, "bf16x2": 16, "f32": 32, "f64": 64}


def _widest(ptx: str, op: str) -> int:
    widest = 0
    for kind, mods in _ACCESS.findall(ptx):
        if kind != op:
            continue
        parts = mods.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 8)
        widest = max(widest, lanes * bits // 8)
    return widest


def _narrowing(ptx: str) -> str:
    """How every float narrowing of the PTX rounds: "rn", "" (none), else the odd modes."""
    modes = set()
    for mods in _CVT.findall(ptx):
        parts = mods.strip(".").split(".")
        types = [p for p in parts if p in _FLOAT_BITS]
        if len(types) == 2 and _FLOAT_BITS[types[0]] < _FLOAT_BITS[types[1]]:
            modes.add(next((p for p in parts if p in ("rn", "rz", "rm", "rp", "rna", "rs")),
                           "default"))
    return ",".join(sorted(modes))


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _spills(cubin: bytes, ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded a thread).  The cubin's resource usage says
    whether there is a stack frame at all (cheap); only then is ``ptxas -v`` run again on the
    PTX for the spill bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        if not int(re.search(r"STACK:(\d+)", usage).group(1)) + \
                int(re.search(r"LOCAL:(\d+)", usage).group(1)):
            return regs, 0
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", str(src), "-o",
                              str(path)], capture_output=True, text=True, check=True).stderr
    return regs, sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def _expects_vectors(entry: dict) -> bool:
    """Whether every tile of the case could be read and written 16 bytes at a time: float data
    (fp64 too: two values) at 16-byte aligned addresses, in a flat row or in rows whose lengths and
    strides are multiples of 16 elements (Triton knows no other divisibility)."""
    ptrs = [a for a in entry["args"] if a[0] == "ptr"]
    if ptrs[0][1] not in FLOATS or not all(a[2] for a in ptrs):
        return False
    flat = entry["constexprs"].get("FLAT", "N" in entry["params"])
    return flat or all(a[1] % 16 == 0 for n, a in zip(entry["params"], entry["args"],
                                                     strict=True)
                       if a[0] == "int" and (n == "L" or n.startswith("s_")))


def _tail(entry: dict) -> str:
    """"flat" or "rows" where the tiled length is not a multiple of 16 (masks Triton cannot
    prove uniform; in rows, also row starts it cannot prove aligned), else ""."""
    for n, a in zip(entry["params"], entry["args"], strict=True):
        if n in LENGTHS and a[1] % 16:
            return "flat" if entry["constexprs"].get("FLAT", n == "N") else "rows"
    return ""


def _compile(entry: dict) -> dict:
    import torch
    import triton
    fn = None
    for module in KERNEL_MODULES:
        fn = getattr(sys.modules[f"fused_act.triton_kernels.{module}"], entry["kernel"], fn)
    args = [_Pointer(getattr(torch, a[1]), a[2]) if a[0] == "ptr" else a[1]
            for a in entry["args"]]
    row = {k: entry[k] for k in ("kernel", "family", "constexprs")}
    row.update(id=_spec_id(entry["kernel"], entry["params"], entry["args"],
                           entry["constexprs"]),
               dtype=entry["args"][0][1], case=entry["cases"][0], launches=len(entry["cases"]),
               expects_vectors=_expects_vectors(entry), tail=_tail(entry),
               scalar_store=any(entry["kernel"] == k and entry["constexprs"].get(c) == v
                                for k, c, v in SCALAR_STORES),
               triton=triton.__version__)
    try:
        kernel = fn.warmup(*args, grid=(1,), **entry["constexprs"], **entry["options"])
        ptx = kernel.asm["ptx"]
        regs, spills = _spills(kernel.asm["cubin"], ptx)
        row.update(regs=regs, spills=spills, load=_widest(ptx, "ld"), store=_widest(ptx, "st"),
                   narrowing=_narrowing(ptx), error=None)
    except Exception as e:  # noqa: BLE001  (any failure to compile is the finding)
        row.update(regs=None, spills=None, load=None, store=None, narrowing=None,
                   error=f"{type(e).__name__}: {str(e).strip()[-2000:]}")
    return row


def _worker(index: int, count: int, config: dict) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    source = Path(config.get("source") or ROOT / "triton_kernels")
    _install_kernels(source, config.get("patches", []), os.environ.get("TRITON_CACHE_DIR"))
    from triton.runtime import driver
    driver.set_active(_OfflineDriver())
    entries = _record(config.get("kernels"))
    for entry in entries[index::count]:
        print(json.dumps(_compile(entry)), flush=True)


# ---- the parent: workers, gate, table ---------------------------------------------------------

def rows(kernels: list[str] | None = None, patches: list | None = None,
         source: str | Path | None = None, jobs: int | None = None) -> list[dict]:
    """Compile every recorded specialization (only those of ``kernels`` if given) in ``jobs``
    worker processes (default: one per CPU) with a fresh Triton cache, the Triton kernels taken
    from ``source`` (default: the tree's ``triton_kernels``) with ``patches`` (file, old, new)
    applied to a copy; one dict per specialization, in sweep order within each worker.  A
    worker that dies leaves a row naming it, with its error."""
    jobs = jobs or len(os.sched_getaffinity(0))
    config = json.dumps({"kernels": kernels, "patches": patches or [],
                         "source": str(source) if source else None})
    cache = tempfile.mkdtemp(prefix="codegen_triton_cache_")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "bench.codegen_triton", "--worker",
                                   str(i), str(jobs), config], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(jobs)]
        out = []
        for i, proc in enumerate(procs):
            stdout, stderr = proc.communicate()
            out += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode:
                out.append({"id": f"worker {i}", "kernel": "(worker)", "error":
                            f"exit {proc.returncode}: {stderr.strip()[-2000:]}"})
        return out
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def load_baseline(path: Path = BASELINE) -> dict:
    """The checked-in registers per specialization id, of the Triton version running here (or
    the nearest recorded one: registers move a little between compiler versions)."""
    if not path.exists():
        return {}
    import triton
    by_version = json.loads(path.read_text())
    if not by_version:
        return {}

    def key(v):
        return tuple(int(p) for p in v.split(".")[:2])
    here = key(triton.__version__)
    best = min(by_version, key=lambda v: (abs(key(v)[0] - here[0]) * 100 +
                                          abs(key(v)[1] - here[1]), -key(v)[1]))
    return by_version[best]


def problems(rows: list[dict], baseline: dict) -> list[str]:
    """What fails the gate, one line each: a specialization that does not compile, a spill (any
    dtype: fp64, the dtype of gradcheck, included), registers over ``baseline`` (id ->
    registers; an id it lacks is held to its kernel's largest) + 8, a case that could be read
    16 bytes at a time whose widest global load or store (a tile's: not ``SCALAR_STORES``'
    one value) is narrower, and a float narrowing that does not round to nearest even."""
    out = []
    by_kernel = defaultdict(int)
    for spec_id, regs in baseline.items():
        kernel = spec_id.split("(")[0]
        by_kernel[kernel] = max(by_kernel[kernel], regs)
    for r in rows:
        what = f"{r['id']} [{r.get('case', '')}]"
        if r.get("error"):
            out.append(f"{what}: does not compile: {r['error']}")
            continue
        if r["spills"]:
            out.append(f"{what}: spills {r['spills']} bytes at {r['regs']} registers")
        limit = baseline.get(r["id"], by_kernel.get(r["kernel"]))
        if limit is not None and r["regs"] > limit + REGISTER_SLACK:
            out.append(f"{what}: {r['regs']} registers, baseline {limit} + {REGISTER_SLACK}")
        store = VECTOR_BYTES if r.get("scalar_store") else r["store"]
        if r["expects_vectors"] and min(r["load"], store) < VECTOR_BYTES:
            out.append(f"{what}: widest global load {r['load']} B, store {r['store']} B "
                       f"(16-byte accesses expected)")
        if r["narrowing"] not in ("", "rn"):
            out.append(f"{what}: float narrowing rounds {r['narrowing']}, not rn")
    return out


def _span(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def table(rows: list[dict]) -> str:
    """Per kernel and dtype: specializations, registers, spill bytes, the narrowest widest
    load/store (bytes) over the cases that could be vectorized, the count and narrowest widths
    of the tail cases in flat rows and in rows of a matrix, and how float narrowings round."""
    groups = defaultdict(list)
    for r in rows:
        if not r.get("error"):
            groups[(r["kernel"], r["dtype"])].append(r)
    head = (f"{'kernel':<18} {'dtype':<9} {'specs':>5} {'regs':>7} {'spill':>5} "
            f"{'ld/st B':>8} {'flat tails':>10} {'row tails':>10} {'narrow':>6}")
    lines = [head, "-" * len(head)]
    for (kernel, dtype), rs in sorted(groups.items()):
        def widths(sel, count=False):
            if not sel:
                return "-"
            w = f"{min(r['load'] for r in sel)}/{min(r['store'] for r in sel)}"
            return f"{len(sel)}: {w}" if count else w
        vec = [r for r in rs if r["expects_vectors"]]
        flat = widths([r for r in rs if r["tail"] == "flat"], True)
        by_rows = widths([r for r in rs if r["tail"] == "rows"], True)
        modes = {r["narrowing"] for r in rs} - {""}
        lines.append(
            f"{kernel:<18} {dtype:<9} {len(rs):>5} {_span(r['regs'] for r in rs):>7} "
            f"{max(r['spills'] for r in rs):>5} {widths(vec):>8} {flat:>10} {by_rows:>10} "
            f"{','.join(sorted(modes)) or '-':>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the per-kernel table and the gate's problems (exit status 1 if any);
    ``--write-baseline`` records this Triton version's registers in ``codegen_triton.json``."""
    parser = argparse.ArgumentParser(prog="python -m bench.codegen_triton",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, help="worker processes (default: one per CPU)")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    parser.add_argument("--source", help="a triton_kernels directory to compile instead")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--write-baseline", action="store_true",
                        help="record this Triton's registers per specialization")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(int(args.worker[0]), int(args.worker[1]), json.loads(args.worker[2]))
        return 0
    import triton
    got = rows(kernels=args.kernel, source=args.source, jobs=args.jobs)
    print(f"triton {triton.__version__}, target {TARGET}: {len(got)} specializations")
    print(table(got))
    if args.json:
        Path(args.json).write_text(json.dumps(got, indent=1))
    if args.write_baseline:
        data = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
        version = ".".join(triton.__version__.split(".")[:2])
        data[version] = {r["id"]: r["regs"] for r in sorted(got, key=lambda r: r["id"])
                         if not r.get("error")}
        BASELINE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE.name} [{version}]: {len(data[version])} specializations")
    found = problems(got, load_baseline())
    for line in found:
        print("PROBLEM", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
