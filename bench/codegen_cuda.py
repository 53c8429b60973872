"""``python -m bench.codegen_cuda``: what nvcc makes of every kernel instantiation of ``csrc/``,
compiled for sm_90 (H100) on any machine, GPU or not.

Each ``.cu`` is compiled to a cubin with the flags torch's extension builder uses for an install
(``fused_act/_build.py``), warnings as errors, the translation units in parallel.  Per kernel
instantiation it reads registers and stack (``cuobjdump -res-usage``), spill bytes (``ptxas
-v``, the only place that tells a spill from other local memory) and the widest global load
and store in bytes (``cuobjdump -sass``: ``LDG.E.128`` / ``STG.E.128`` are 16).

An instantiation is vectorized when the VEC template parameter of its kernel (read from the
kernel's declaration in ``csrc/``) is above 1; its storage type is the first template argument of
its op, so its vector is VEC x sizeof(storage) bytes.  ``problems`` is the gate
(``tests/test_codegen_cuda.py``): a spill, registers over the checked-in baseline
(``codegen_cuda_baseline.json``) + 8, or a vectorized instantiation whose widest global load or
store (but for an op that stores only its sums, ``sums_only_ops``) is narrower than its
vector.  ``--write-baseline`` records this nvcc's registers.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BASELINE = Path(__file__).with_name("codegen_cuda_baseline.json")
ARCH = "sm_90"
REGISTER_SLACK = 8
STORAGE_BYTES = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}
# SASS width suffixes of LDG/STG; an access with none of them is 4 bytes
WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _build_module():
    """fused_act/_build.py from the tree, so that the gate runs without the package installed."""
    spec = importlib.util.spec_from_file_location("fused_act_build", ROOT / "fused_act" /
                                                  "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tools() -> tuple[str, str] | None:
    """(nvcc, cuobjdump), or None where either is missing.  cuobjdump is looked for beside nvcc,
    on PATH, then in the Triton wheel (which ships one)."""
    nvcc = _build_module().nvcc_path()
    if nvcc is None:
        return None
    found = shutil.which("cuobjdump", path=str(Path(nvcc).parent)) or shutil.which("cuobjdump")
    if found is None:
        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.origin:
            bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(bundled) if os.access(bundled, os.X_OK) else None
    return (nvcc, found) if found else None


def nvcc_flags() -> list[str]:
    """What an install passes nvcc for device code: torch's standard and common flags,
    fused_act's own, one real architecture."""
    build = _build_module()
    return [build.torch_cxx_standard(), *build.torch_nvcc_flags(), *build.NVCC_FLAGS,
            "-gencode", f"arch=compute_{ARCH[3:]},code={ARCH}"]


# ---- reading the compiler's output ---------------------------------------------------------


def _ptxas_spills(log: str) -> dict[str, tuple[int, int]]:
    """mangled name -> (spill store bytes, spill load bytes), from ``ptxas -v``."""
    out = {}
    for m in re.finditer(r"Function properties for (\S+)\n\s*\d+ bytes stack frame, (\d+) "
                         r"bytes spill stores, (\d+) bytes spill loads", log):
        out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def _res_usage(text: str) -> dict[str, dict[str, int]]:
    out = {}
    for m in re.finditer(r"Function (\S+):\n\s*(.*)", text):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(2)))
        out[m.group(1)] = {"registers": int(fields["REG"]), "stack": int(fields["STACK"])}
    return out


def _access_width(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in WIDTHS:
            return WIDTHS[part]
    return 4


def _sass_widths(text: str) -> dict[str, tuple[int, int]]:
    """mangled name -> (widest global load, widest global store) in bytes (0: none)."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = (0, 0)
            continue
        m = re.search(r"\b(LDG|STG)(\.[\w.]+)?\s", line)
        if name and m:
            width = _access_width(m.group(0).strip())
            load, store = out[name]
            out[name] = (max(load, width), store) if m.group(1) == "LDG" else \
                (load, max(store, width))
    return out


def _demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _template_args(text: str) -> list[str]:
    """The top-level arguments of the first template argument list in ``text``."""
    start = text.index("<") + 1
    args, depth, cur = [], 0, ""
    for ch in text[start:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    args.append(cur.strip())
    return args


def kernel_templates(src: Path = CSRC) -> dict[str, list[str]]:
    """kernel name -> its template parameter names, from the ``__global__`` declarations (the
    launch bounds between ``void`` and the name may hold any balanced expression)."""
    found = {}
    for path in sorted(src.glob("*.cu*")):
        text = path.read_text()
        for m in re.finditer(r"template\s*<([^<>]*)>\s*__global__\s+void\s+", text):
            i = m.end()
            if text.startswith("__launch_bounds__", i):
                depth, i = 0, text.index("(", i)
                while True:
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                    if depth == 0:
                        break
            name = re.match(r"\s*(\w+)\s*\(", text[i:])
            if name:
                found[name.group(1)] = [p.split()[-1] for p in m.group(1).split(",")]
    return found


def _short(demangled: str) -> str:
    name = demangled.replace("fused_act::", "")
    name = re.sub(r"^void ", "", re.sub(r"\(.*\)$", "", name))
    return re.sub(r"\s*>", ">", name)


def _describe(demangled: str, templates: dict[str, list[str]], act_names: dict[str, str]):
    """(short name, VEC, storage type) of one instantiation."""
    short = _short(demangled)
    kernel = re.match(r"(\w+)", short).group(1)
    args = _template_args(short) if "<" in short else []
    params = templates.get(kernel)
    if args and (params is None or len(args) != len(params)):
        raise ValueError(f"{short}: no template declaration of {kernel} in csrc/ matches it")
    vec = int(args[params.index("VEC")]) if args and "VEC" in params else 1
    op_args = _template_args(args[0]) if args and "<" in args[0] else []
    storage = op_args[0] if op_args else ""
    for act_id, act in act_names.items():
        short = short.replace(f"ActMath<{act_id},", f"ActMath<{act},")
    return short, vec, storage


def sums_only_ops(src: Path = CSRC) -> set[str]:
    """The ops that store nothing but their sums (``static constexpr bool SUMS_ONLY = true``,
    csrc/tile.cuh): their only vector accesses are loads."""
    found = set()
    for path in sorted(src.glob("*.cu*")):
        for m in re.finditer(r"struct (\w+) \{[^{}]*?\bSUMS_ONLY = true;", path.read_text()):
            found.add(m.group(1))
    return found


def _act_names(src: Path) -> dict[str, str]:
    text = (src / "activations.cuh").read_text()
    return {v: f"ACT_{k}" for k, v in re.findall(r"\bACT_(\w+) = (\d+)", text)}


def _compile_one(nvcc: str, cuobjdump: str, src: Path, source: str, out: Path) -> list[dict]:
    cubin = out / (Path(source).stem + ".cubin")
    done = subprocess.run([nvcc, *nvcc_flags(), "-Werror", "all-warnings", "-Xptxas", "-v",
                           "-cubin", f"-I{src}", str(src / source), "-o", str(cubin)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return [{"source": source, "error": done.stderr[-4000:]}]
    spills = _ptxas_spills(done.stderr)
    usage = _res_usage(subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True,
                                      text=True, check=True).stdout)
    widths = _sass_widths(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                                         text=True, check=True).stdout)
    names = sorted(usage)
    templates, acts, sums_only = kernel_templates(src), _act_names(src), sums_only_ops(src)
    rows = []
    for mangled, demangled in zip(names, _demangle(names), strict=True):
        short, vec, storage = _describe(demangled, templates, acts)
        stores, loads = spills.get(mangled, (0, 0))
        load, store = widths.get(mangled, (0, 0))
        rows.append({
            "source": source, "kernel": short, "mangled": mangled, "vec": vec,
            "storage": storage, "vector_bytes": vec * STORAGE_BYTES.get(storage, 0),
            **usage[mangled], "spill_stores": stores, "spill_loads": loads,
            "load": load, "store": store, "ldg128": load >= 16, "stg128": store >= 16,
            "sums_only": "<" in short and short.split("<")[1] in sums_only,
        })
    return rows


def rows(sources: list[str] | None = None, patches: list[tuple[str, str, str]] = ()) -> list[dict]:
    """One row per kernel instantiation of ``sources`` (default: every csrc/*.cu).  ``patches``
    are (file, old, new) edits applied to a copy of csrc/ first (each ``old`` must occur)."""
    found = tools()
    if found is None:
        raise RuntimeError("nvcc or cuobjdump not found")
    nvcc, cuobjdump = found
    sources = sources or sorted(p.name for p in CSRC.glob("*.cu"))
    with tempfile.TemporaryDirectory(prefix="codegen_cuda_") as tmp:
        tmp = Path(tmp)
        src = CSRC
        if patches:
            src = tmp / "csrc"
            shutil.copytree(CSRC, src)
            for file, old, new in patches:
                text = (src / file).read_text()
                if old not in text:
                    raise ValueError(f"patch target not in {file}: {old!r}")
                (src / file).write_text(text.replace(old, new))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            done = pool.map(lambda s: _compile_one(nvcc, cuobjdump, src, s, tmp), sources)
            return [row for part in done for row in part]


# ---- the gate ------------------------------------------------------------------------------


def load_baseline(path: Path = BASELINE) -> dict[str, int]:
    return json.loads(path.read_text())["registers"] if path.exists() else {}


_ACT = re.compile(r"ActMathILi\d+E")


def activation_free(mangled: str) -> str:
    """An instantiation's name with its activation id left out: the instantiations of an
    activation added after the baseline was written are held to those of the same op."""
    return _ACT.sub("ActMathILi_E", mangled)


def limits(baseline: dict[str, int]) -> dict[str, int]:
    """The register limit of every activation-free name: the largest of its instantiations."""
    out: dict[str, int] = {}
    for mangled, regs in baseline.items():
        key = activation_free(mangled)
        out[key] = max(out.get(key, 0), regs)
    return out


def problems(rows: list[dict], baseline: dict[str, int]) -> list[str]:
    found = []
    by_op = limits(baseline)
    for r in rows:
        if r.get("error"):
            found.append(f"{r['source']}: does not compile:\n{r['error']}")
            continue
        name = r["kernel"]
        if r["spill_stores"] or r["spill_loads"]:
            found.append(f"{name}: spills ({r['spill_stores']} B stores, {r['spill_loads']} B "
                         f"loads, {r['stack']} B stack) at {r['registers']} registers")
        want = baseline.get(r["mangled"], by_op.get(activation_free(r["mangled"])))
        if want is not None and r["registers"] > want + REGISTER_SLACK:
            found.append(f"{name}: {r['registers']} registers, baseline {want} + "
                         f"{REGISTER_SLACK}")
        if r["vec"] > 1:
            need = min(r["vector_bytes"], 16) or 16
            if r["load"] < need or (r["store"] < need and not r.get("sums_only")):
                found.append(f"{name}: {need}-byte accesses expected (VEC = {r['vec']}), widest "
                             f"global load {r['load']} B, store {r['store']} B")
    return found


def table(rows: list[dict]) -> str:
    head = (f"{'kernel':<72} {'reg':>3} {'spill st/ld':>11} {'stack':>5} {'ld':>3} {'st':>3} "
            f"{'16B ld/st':>9}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.get("source", ""), r.get("kernel", ""))):
        if r.get("error"):
            lines.append(f"{r['source']}: does not compile")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        wide = "/".join("yes" if r[k] else "no" for k in ("ldg128", "stg128")) \
            if r["vec"] > 1 else "-"
        lines.append(f"{r['kernel'][:72]:<72} {r['registers']:>3} {spill:>11} {r['stack']:>5} "
                     f"{r['load']:>3} {r['store']:>3} {wide:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codegen_cuda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-baseline", action="store_true",
                        help=f"record every instantiation's registers in {BASELINE.name}")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if tools() is None:
        print("nvcc or cuobjdump not found: nothing compiled")
        return 1
    got = rows()
    print(table(got))
    if args.json:
        args.json.write_text(json.dumps(got, indent=1) + "\n")
    if args.write_baseline:
        regs = {r["mangled"]: r["registers"] for r in got if not r.get("error")}
        BASELINE.write_text(json.dumps({"arch": ARCH, "registers": dict(sorted(regs.items()))},
                                       indent=1) + "\n")
        print(f"wrote {BASELINE.relative_to(ROOT)}")
    found = problems(got, load_baseline())
    print("\n".join(found) if found else "no problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
