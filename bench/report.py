"""How the figures are shown: the markdown tables of results.md and the bandwidth plot.

Only reads result rows as the runner writes them to results.json, never runs anything, so a
table or plot can be redrawn or restyled from a saved results.json without a GPU, and a change
of presentation cannot change a measurement.
"""

import math
from pathlib import Path

from bench.table import CONTESTANTS, MODES

# the contestants shown together in the "more" column, where an op has them
_MORE = [c for c in CONTESTANTS if c not in ("fused", "fused_cuda", "eager", "compile")]


def _size(n: int) -> str:
    k = math.log2(n)
    return f"2^{int(k)}" if k == int(k) else str(n)


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _shown(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _ratio(other: dict, fused: dict) -> str:
    return f"{other['ms'] / fused['ms']:.2f}x" if other else ""


def _per(row: dict, other: dict, key: str) -> str:
    """``row[key] / other[key]``, blank where ``other`` is missing or its value 0."""
    return f"{row[key] / other[key]:.2f}" if other.get(key) else ""


def markdown(result: dict) -> str:
    """The tables: per op, dtype, shape and mode, the compile pipelines, and the cases and
    pipelines that failed (``errors``), which have no rows above."""
    info, rows = result["env"], [r for r in result["rows"] if "scaling" not in r]
    by = {(r["op"], r["dtype"], tuple(r["shape"]), r["mode"], r["contestant"]): r for r in rows}
    overhead = ", ".join(f"{k} {v:.1f} us" for k, v in result["host_overhead_us"].items())
    fused = "the Triton kernels" + (" under Triton's CPU interpreter (not GPU figures)"
                                    if info.get("interpreter") else "")
    lines = [
        f"# fused_act on {info['gpu']}", "",
        f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit "
        f"{info['commit']}, {info['date']}. Fractions are of a device-to-device copy of the same "
        "bytes timed in the same run; GPU times are medians of CUDA-graph replays (GPU time, no "
        f"host overhead: that is the next line). fused: {fused}; cuda: the CUDA C++ kernels.",
        "",
        f"Host time per eager forward+backward on 2^10 elements: {overhead}", "",
        "more: decompose is torch.compile of our op decomposed (compile mode \"decompose\"), "
        "liger is Liger-Kernel's kernel; peers: "
        + ", ".join(f"{k} {v}" for k, v in result.get("peers", {}).items()) + ".", "",
        "| op | dtype | shape | mode | fused ms | fused / copy | cuda / copy | eager / copy "
        "| compile / copy | more / copy | vs eager | vs compile | "
        "peak MB fused / eager / compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, dtype, shape, mode, c), r in by.items():
        if c != "fused":
            continue
        # a run may time some contestants only (a GPU lease's): those missing show blank
        e, k = (by.get((op, dtype, shape, mode, c), {}) for c in ("eager", "compile"))
        cu = by.get((op, dtype, shape, mode, "fused_cuda"), {}).get("frac_copy")
        more = ", ".join(f"{m} {_fmt(by[op, dtype, shape, mode, m]['frac_copy'], '.2f')}"
                         for m in _MORE if (op, dtype, shape, mode, m) in by)
        peaks = " / ".join(_fmt(x.get("peak_mb"), ".0f") for x in (r, e, k))
        shown = _size(r["n"]) if len(shape) == 1 else _shown(shape)
        lines.append(
            f"| {op} | {dtype} | {shown} | {mode} | {r['ms']:.4f} | {_fmt(r['frac_copy'], '.2f')} "
            f"| {_fmt(cu, '.2f')} | {_fmt(e.get('frac_copy'), '.2f')} | "
            f"{_fmt(k.get('frac_copy'), '.2f')} | {more} | "
            f"{_ratio(e, r)} | {_ratio(k, r)} | "
            f"{peaks if mode == 'fwd+bwd' else ''} |")
    lines += quant_markdown([r for r in result["rows"] if "scaling" in r])
    if result.get("pipelines"):
        lines += ["", "## torch.compile pipelines (forward+backward of a block, ms)", "",
                  "| op | block | " + " | ".join(result["pipelines"][0]["ms"]) + " | choice |",
                  "|---|---|" + "---|" * (len(result["pipelines"][0]["ms"]) + 1)]
        for p in result["pipelines"]:
            lines.append(f"| {p['op']} | {p['block']} | "
                         + " | ".join(f"{v:.4f}" for v in p["ms"].values())
                         + f" | {result['compile_mode_choice'][p['op']]} |")
    if result.get("mlp_recompute"):
        host = "" if result["env"]["device"] == "cuda" else " (CPU host time)"
        lines += ["", "## Gated MLP block: h kept or recomputed (eager forward+backward)", "",
                  f"| way | block | ms{host} | saved MiB | peak MiB |", "|---|---|---|---|---|"]
        for r in result["mlp_recompute"]:
            lines.append(f"| {r['variant']} | {r['block']} | {r['ms']:.4f} | "
                         f"{r['saved_mib']:.2f} | {_fmt(r['peak_mb'], '.0f')} |")
    if result.get("models"):
        host = "" if result["env"]["device"] == "cuda" else " (CPU host time)"
        lines += ["", "## Whole models: one SGD training step, original vs fused "
                  "(replace_activations, BatchNorm pairs fused)", "",
                  f"| model | batch | way | modules swapped | ms{host} | saved MiB | peak MiB "
                  "| ms fused / original | saved MiB fused / original |",
                  "|---|---|---|---|---|---|---|---|---|"]
        original = {r["model"]: r for r in result["models"] if r["way"] == "original"}
        for r in result["models"]:
            # the ratios on the fused row, against the original's row of the same model
            o = original.get(r["model"], {}) if r["way"] == "fused" else {}
            lines.append(f"| {r['model']} | {_shown(r['batch'])} | {r['way']} | {r['swapped']} "
                         f"| {r['ms']:.4f} | {r['saved_mib']:.2f} | {_fmt(r['peak_mb'], '.0f')} "
                         f"| {_per(r, o, 'ms')} | {_per(r, o, 'saved_mib')} |")
    if result.get("errors"):
        lines += ["", f"## Failed ({len(result['errors'])}: skipped, see results.json's errors)",
                  "", "| what | op | dtype | shape | error |", "|---|---|---|---|---|"]
        for e in result["errors"]:
            # a table cell holds one line, without the column separator
            error = e["error"].splitlines()[0].replace("|", "/")
            shape = _shown(e["shape"]) if e.get("shape") else ""
            lines.append(f"| {e['what']} | {e['op']} | {e.get('dtype', '')} | {shape} "
                         f"| {error[:300]} |")
    return "\n".join(lines) + "\n"


def quant_markdown(rows: list[dict]) -> list[str]:
    """The section of the activation fused with FP8 quantisation (``bench.quant``): a line per
    row, scaling, dtype and shape, with the target's verdict where it applies."""
    from bench.quant import TARGET, TARGET_SHAPE
    if not rows:
        return []
    by = {(r["op"], r["dtype"], tuple(r["shape"]), r["contestant"]): r for r in rows
          if r["mode"] != "copy"}
    peers = sorted({r["contestant"] for r in rows} - {"torch", "fused", "fused_cuda", "eager",
                                                      "compile"})
    target = "x".join(map(str, TARGET_SHAPE))
    lines = ["", "## Activation fused with FP8 quantisation (forward, out_dtype "
             f"{rows[0]['out_dtype']})", "",
             "act(x) or act(gate) * up returned as (q, scales) by one kernel, against the "
             "eager expression (the activation, then torch's amax, scale and clamped cast), "
             "torch.compile of it, and peers where importable. Bytes: the inputs read (n or 2n "
             "elements), n one-byte codes and the scales written. Target: at least "
             f"{TARGET['frac_copy']} of the copy and {TARGET['vs_eager']:g}x eager for "
             f"{' and '.join(TARGET['scalings'])} scaling at {target} (a packed gate_up twice "
             "as wide); the last column says whether the fused kernel meets it.", "",
             "| row | scaling | dtype | shape | fused ms | fused / copy | cuda / copy "
             "| eager / copy | compile / copy | peers / copy | vs eager | vs compile "
             "| peak MB fused / eager / compile | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, dtype, shape, c), r in by.items():
        if c != "fused":
            continue
        e, k, cu = (by.get((op, dtype, shape, c), {}) for c in ("eager", "compile",
                                                                "fused_cuda"))
        more = ", ".join(f"{p} {_fmt(by[op, dtype, shape, p]['frac_copy'], '.2f')}"
                         for p in peers if (op, dtype, shape, p) in by)
        peaks = " / ".join(_fmt(x.get("peak_mb"), ".0f") for x in (r, e, k))
        gate = shape[:-1] + (shape[-1] // (2 if "packed" in op else 1),)
        verdict = ""
        if gate == TARGET_SHAPE and r["scaling"] in TARGET["scalings"] and e:
            met = (r["frac_copy"] >= TARGET["frac_copy"]
                   and e["ms"] / r["ms"] >= TARGET["vs_eager"])
            verdict = "met" if met else "missed"
        shown = _size(r["n"]) if shape[0] == 1 else _shown(shape)
        lines.append(f"| {op} | {r['scaling']} | {dtype} | {shown} | {r['ms']:.4f} "
                     f"| {_fmt(r['frac_copy'], '.2f')} | {_fmt(cu.get('frac_copy'), '.2f')} "
                     f"| {_fmt(e.get('frac_copy'), '.2f')} | {_fmt(k.get('frac_copy'), '.2f')} "
                     f"| {more} | {_ratio(e, r)} | {_ratio(k, r)} | {peaks} | {verdict} |")
    return lines


def plot(rows: list[dict], folder: Path) -> None:
    """GB/s against size, one panel per op and mode, a line per contestant and dtype, the copy
    of the same dtype dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    # the FP8 rows (forward only, their own bytes) are in their own table, not on these axes
    sweep = [r for r in rows if r["gbps"] is not None and "scaling" not in r]
    ops = sorted({r["op"] for r in sweep if r["op"] != "copy"})
    dtypes = sorted({r["dtype"] for r in sweep})
    if not ops:
        return
    colors = {c: f"C{i}" for i, c in enumerate(CONTESTANTS)}
    styles = dict(zip(dtypes, ("-", "-.", ":"), strict=False))
    fig, axes = plt.subplots(len(ops), len(MODES), figsize=(15, 3.4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            for dtype in dtypes:
                copy = sorted({(r["n"], r["gbps"]) for r in sweep if r["op"] == op and
                               r["mode"] == "copy" and r["dtype"] == dtype})
                if copy:
                    ax.plot(*zip(*copy, strict=True), "k--", lw=0.8)
                for c in CONTESTANTS:
                    pts = sorted((r["n"], r["gbps"]) for r in sweep if r["op"] == op and
                                 r["mode"] == mode and r["contestant"] == c and
                                 r["dtype"] == dtype)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), styles.get(dtype, "-"), marker="o",
                                ms=3, color=colors[c], label=f"{c} {dtype}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode} (dashed: copy)")
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "bandwidth.png", dpi=90)
    plt.close(fig)


def cpu_markdown(result: dict) -> str:
    """The CPU table (``bench.cpu``): per op, dtype, size and thread count the ratio fused_act
    / torch of each mode, then the model rows and the failures."""
    info = result["env"]
    loop = (f" (a repetition: as many calls in a row as take {info['min_sample_ms']} ms or more)"
            if info.get("min_sample_ms") else "")
    lines = [
        f"# fused_act on {info['label']}: {info['cpu']}", "",
        f"torch {info['torch']}, commit {info['commit']}, {info['date']}, {info['cores']} "
        f"cores, threads {', '.join(map(str, info['threads']))} (torch.set_num_threads). "
        f"fused: fused_act with backend \"{info['backend']}\" on CPU tensors (what users get "
        f"there), which ran {info.get('implementation', 'the reference')}; torch: PyTorch's "
        "function where it has one, else the eager expression a user would write. Medians "
        f"of {info['reps']} repetitions interleaved between the two{loop}, each "
        "contestant checked against the reference first. Ratios are fused / torch time: below "
        "1 fused_act is faster.", "",
    ]
    if info.get("note"):
        lines += [f"**{info['note']}**", ""]
    lines += ["| op | torch | dtype | elements | threads | forward | backward | fwd+bwd "
              "| fwd+bwd ms fused / torch |", "|---|---|---|---|---|---|---|---|---|"]
    by: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        by.setdefault((r["op"], r["torch"], r["dtype"], r["n"], r["threads"]), {})[r["mode"]] = r
    for (op, label, dtype, n, threads), modes in by.items():
        ratios = " | ".join(_fmt(modes[m]["ratio"], ".2f") if m in modes else ""
                            for m in MODES)
        both = modes.get("fwd+bwd")
        ms = f"{both['fused_ms']:.3f} / {both['torch_ms']:.3f}" if both else ""
        lines.append(f"| {op} | {label} | {dtype} | {_size(n)} | {threads} | {ratios} | {ms} |")
    if result.get("models"):
        reps = info.get("model_reps", info["reps"])
        lines += ["", "## Models (fused_act swapped in vs the original, same weights)", "",
                  f"Medians of {reps} repetitions interleaved between the two.", "",
                  "| model | threads | what | modules swapped | fused ms | original ms "
                  "| fused / original |", "|---|---|---|---|---|---|---|"]
        for r in result["models"]:
            if r.get("fused_ms") is None:
                lines.append(f"| {r['model']} | {r.get('threads', '')} | {r.get('what', '')} "
                             f"| {r.get('swapped', '')} | | | skipped: {r['skipped']} |")
                continue
            lines.append(f"| {r['model']} | {r['threads']} | {r['what']} | {r['swapped']} "
                         f"| {r['fused_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} |")
    if result.get("errors"):
        lines += ["", f"## Failed ({len(result['errors'])}: skipped, see results.json)", "",
                  "| what | op | dtype | elements | threads | error |", "|---|---|---|---|---|---|"]
        for e in result["errors"]:
            error = e["error"].splitlines()[0].replace("|", "/")[:300]
            lines.append(f"| {e['what']} | {e['op']} | {e.get('dtype', '')} | "
                         f"{_size(e['n']) if e.get('n') else ''} | {e.get('threads', '')} "
                         f"| {error} |")
    return "\n".join(lines) + "\n"
