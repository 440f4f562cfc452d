"""Results files, the Markdown report with its plots, and `t5forge compare A.json B.json`.

A results file is one JSON document (schema `t5forge-bench/1`): device, versions, date, the command, the
run's configuration, the measured ceilings and every record of every suite. The report is derived from
it alone, so a report can be rebuilt from a committed results file:

    python -c "from benchmarks.report import write_report, load_results; \
               write_report(load_results('benchmarks/results/cpu/bench-all-...json'), 'out/')"
    t5forge compare benchmarks/results/<dev>/bench-all-A.json benchmarks/results/<dev>/bench-all-B.json
"""
from __future__ import annotations

import argparse
import json
import pathlib

from engine.errors import USER_ERRORS, report

SCHEMA = "t5forge-bench/1"
# Kernel records whose provider is one of ours; every other provider is a baseline for the speed-ups.
OUR_KERNEL_PROVIDERS = ("t5forge", "triton", "ours")
OUR_MODEL_PROVIDER = "t5forge"


def stem(results: dict) -> str:
    """File name stem: what, and when (the directory already says which hardware)."""
    when = results["date"].replace(":", "").replace("-", "")[:13]  # 20261122T2359
    return f"bench-{results['suite']}{'-smoke' if results.get('smoke') else ''}-{when}"


def load_results(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a t5forge results file (schema {SCHEMA!r} expected)")
    return data


def shape_key(shape) -> str:
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    if isinstance(shape, (list, tuple)):
        return "x".join(str(s) for s in shape)
    return str(shape)


# ----------------------------------------------------------------------------------------------------
# Derived tables
# ----------------------------------------------------------------------------------------------------

def model_rows(results: dict) -> list[dict]:
    return [r for r in results.get("model", {}).get("records", [])]


def kernel_speedups(results: dict) -> list[dict]:
    """(kernel, pass, shape, baseline) -> baseline ms / our ms, for every shape both measured."""
    records = [r for r in results.get("kernels", {}).get("records", []) if r.get("ms")]
    ours = {(r["kernel"], r.get("pass", ""), shape_key(r.get("shape"))): r for r in records
            if r.get("provider") in OUR_KERNEL_PROVIDERS}
    out = []
    for r in records:
        key = (r["kernel"], r.get("pass", ""), shape_key(r.get("shape")))
        if r.get("provider") in OUR_KERNEL_PROVIDERS or key not in ours:
            continue
        out.append({"kernel": key[0], "pass": key[1], "shape": key[2], "baseline": r["provider"],
                    "ours_ms": ours[key]["ms"], "baseline_ms": r["ms"], "speedup": r["ms"] / ours[key]["ms"]})
    return out


def _fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _offloaded(rec: dict) -> bool:
    return rec.get("offload") not in (None, "none")


def _label(rec: dict) -> str:
    if rec.get("status") != "ok":
        return f"{rec.get('status')}: {rec.get('reason', '')}"
    if rec.get("method") == "extrapolated":
        return "extrapolated"
    return "measured, CPU offload" if _offloaded(rec) else "measured"


def _phases(rec: dict) -> str:
    ph = rec.get("phase_s") or {}
    if rec.get("method") == "extrapolated" or not all(k in ph for k in ("forward", "backward", "optimizer")):
        return "-"
    return " / ".join(f"{ph[k] * 1e3:.0f}" for k in ("forward", "backward", "optimizer"))


def engine_label(rec: dict) -> str:
    """How a record trained: DeepSpeed with its ZeRO stage and offload, or plain torch; old files as written."""
    if rec.get("engine") == "deepspeed":
        text = f"DeepSpeed ZeRO-{rec.get('zero_stage')}"
        if _offloaded(rec):
            text += f" + offload {rec['offload']}"
        return f"{text}, {rec.get('optimizer')}, {rec.get('precision')}"
    if rec.get("engine") == "torch":
        return f"torch, {rec.get('optimizer', 'adamw').split(' ')[0]}"
    return str(rec.get("engine", "-"))


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------

def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    """Lay the figure out, write it as a PNG at 110 dpi and close it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_model(results: dict, out_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
    plt = _pyplot()
    recs = [r for r in model_rows(results) if r.get("status") == "ok"]
    if not recs:
        return []
    presets = list(dict.fromkeys(r["preset"] for r in recs))
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    paths = []
    for metric, ylabel, fname in (("seqs_per_s", "sequences / s", "throughput"), ("mfu", "MFU (%)", "mfu")):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(presets) + 2), 4))
        width = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            xs, ys, hatches = [], [], []
            for i, preset in enumerate(presets):
                r = next((r for r in recs if r["preset"] == preset and r["provider"] == prov), None)
                if r is None or r.get(metric) is None:
                    continue
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(r[metric] * (100 if metric == "mfu" else 1))
                hatches.append("//" if r.get("method") == "extrapolated" else (".." if _offloaded(r) else ""))
            bars = ax.bar(xs, ys, width, label=prov)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        if metric == "seqs_per_s":
            ax.set_yscale("log")
        ax.set_title(f"{ylabel} per preset, {results['device']['name']} (//: extrapolated, ..: CPU offload)", fontsize=9)
        ax.legend(fontsize=8)
        paths.append(_save_figure(fig, out_dir / f"{name}-model-{fname}.png"))
    return paths


def _plot_kernels(results: dict, out_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
    plt = _pyplot()
    rows = kernel_speedups(results)
    if not rows:
        return []
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(len(kernels), 1, figsize=(8, 3 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        krows = [r for r in rows if r["kernel"] == kernel]
        labels = list(dict.fromkeys(f"{r['shape']} {r['pass']}".strip() for r in krows))
        baselines = list(dict.fromkeys(r["baseline"] for r in krows))
        width = 0.8 / len(baselines)
        for j, base in enumerate(baselines):
            pts = [(labels.index(f"{r['shape']} {r['pass']}".strip()), r["speedup"]) for r in krows
                   if r["baseline"] == base]
            ax.bar([i + (j - (len(baselines) - 1) / 2) * width for i, _ in pts], [s for _, s in pts], width,
                   label=f"vs {base}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{kernel}: baseline time / ours", fontsize=9)
        ax.legend(fontsize=7)
    return [_save_figure(fig, out_dir / f"{name}-kernel-speedups.png")]


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------

def _header_lines(results: dict) -> list[str]:
    dev = results["device"]
    ceil, peak = results.get("ceilings", {}), results.get("peak", {})
    cpu = dev["kind"] == "cpu"
    lines = [f"# t5forge benchmark: {results['suite']}{' (smoke)' if results.get('smoke') else ''}", ""]
    if cpu:
        lines += ["> **CPU run.** These figures come from a CPU, not a GPU: they check that every suite runs "
                  "and give ratios between providers on this CPU. They say nothing about GPU throughput or "
                  "GPU MFU; the GPU figures remain to be measured.", ""]
    lines += [f"- device: {dev['name']} ({dev['kind']}, {dev['memory_bytes'] / 2**30:.0f} GiB, "
              f"{dev['cpu_count']} CPUs, {dev['threads']} torch threads)",
              f"- date: {results['date']}; git {results.get('git_commit', '?')}",
              f"- command: `{results.get('command', '')}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
              f"- peak for MFU: {_fmt(peak.get('tflops'), '.1f')} TFLOP/s ({peak.get('source', '?')}); "
              f"measured {ceil.get('matmul_dtype', '')} matmul {ceil.get('matmul_n', '')}^3: "
              f"{_fmt(ceil.get('matmul_tflops'), '.2f')} TFLOP/s; copy {_fmt(ceil.get('copy_tbps'), '.3f')} TB/s",
              ""]
    return lines


def _model_lines(results: dict) -> list[str]:
    cfg = results.get("config", {})
    lines: list[str] = []
    recs = model_rows(results)
    if recs:
        lines += ["## Model suite: one training step (forward, backward, optimizer)", "",
                  f"Batch {cfg.get('batch_size')} x inputs {cfg.get('inputs_length')} / targets "
                  f"{cfg.get('targets_length')}, {cfg.get('dtype')}; the same random batch for every provider; "
                  f"median of {cfg.get('steps')} steps after {cfg.get('warmup')} warm-up. Tokens count inputs + "
                  "targets. MFU = model FLOPs (models/config.py `flops_per_sequence`) / time / peak; "
                  "'of ceiling' uses the measured matmul instead.", "",
                  "- `t5forge`: the engine as a user trains with it: the preset's ready config "
                  "(`engine/configs/<preset>.toml`: ZeRO stage, precision regime, optimizer, activation "
                  "checkpointing) with the micro-batch set to the batch above and grad_accum 1, the DeepSpeed "
                  "JSON from `engine/distributed/deepspeed_config.py`, `deepspeed.initialize` on one rank. A preset whose own "
                  "config does not fit the device runs ZeRO-3 with optimizer and parameters offloaded to the CPU "
                  "when `t5forge plan`'s estimates say the host memory allows (*measured, CPU offload*).",
                  "- `t5forge-torch`, `hf-sdpa`, `hf-sdpa-compile`: plain torch, one set-up for all three (bf16 "
                  "parameters, fused AdamW over fp32 master weights): `t5forge-torch` : `hf-sdpa` compares the "
                  "model code alone; `t5forge` : `hf-sdpa` adds the engine and the preset's optimizer.",
                  "- *extrapolated*: measured at reduced depth (same width, 1 and 2 layers per stack) and "
                  "extrapolated per layer: not a measurement of the full model.", "",
                  "- fwd / bwd / opt: median milliseconds of the forward, the backward and the optimizer step "
                  "(with what the engine does around it) within the timed steps.", "",
                  "| preset | provider | engine | how | ms/step | fwd / bwd / opt ms | seq/s | tokens/s | TFLOP/s | "
                  "MFU | of ceiling | peak mem MB | vs hf-sdpa | vs hf-compile |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["preset"], r["provider"]): r for r in recs}
        for r in recs:
            ok = r.get("status") == "ok"
            ratios = []
            for base in ("hf-sdpa", "hf-sdpa-compile"):
                b = by.get((r["preset"], base))
                good = ok and r["provider"] != base and b and b.get("status") == "ok"
                ratios.append(f"{b['step_s'] / r['step_s']:.2f}x" if good else "-")
            lines.append(
                f"| {r['preset']} | {r['provider']} | {engine_label(r)} | {_label(r)} | "
                f"{_fmt(r.get('step_s') and r['step_s'] * 1e3, '.1f')} | {_phases(r)} | "
                f"{_fmt(r.get('seqs_per_s'), '.3g')} | "
                f"{_fmt(r.get('tokens_per_s'), '.4g')} | {_fmt(r.get('tflops'), '.3g')} | "
                f"{_pct(r.get('mfu'))} | {_pct(r.get('mfu_of_ceiling'))} | "
                f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {ratios[0]} | {ratios[1]} |")
        lines += _model_notes(recs)
    return lines


def _model_notes(recs: list[dict]) -> list[str]:
    """The engine set-up, memory kinds and activation-memory table under the model table."""
    lines: list[str] = []
    planned = [r for r in recs if r.get("engine") == "deepspeed" and r.get("plan")]
    if planned:
        lines += ["", "Engine set-up and memory plan of each `t5forge` record (model states: DeepSpeed's "
                  "estimators for one GPU; activations: the plan's formula):", ""]
        for r in planned:
            skipped = f"; {r['steps_skipped']} timed step(s) skipped (non-finite)" if r.get("steps_skipped") else ""
            ckpt = ", activation checkpointing" if r.get("gradient_checkpointing") else ""
            host = f"; host peak {r['host_peak_mem_mb']:.0f} MB" if r.get("host_peak_mem_mb") else ""
            lines.append(f"- {r['preset']}: {r.get('run_config')}{ckpt}. Plan: {r['plan']}{host}{skipped}")
    kinds = {r.get("mem_kind") for r in recs if r.get("mem_kind")}
    lines += ["", "Peak memory: " + "; ".join(sorted(kinds)) if kinds else "", ""]
    acts = [r for r in recs if r.get("saved_activation_mb") is not None]
    if acts:
        lines += ["Activation memory (bytes saved for backward in one step by `t5forge-torch`, whose bf16 "
                  "parameters are not counted), measured vs `t5forge plan`'s formula:", "", "| preset | profile | measured MB | predicted MB | ratio |",
                  "|---|---|---:|---:|---:|"]
        for r in acts:
            lines.append(f"| {r['preset']} | {r.get('activation_profile')} | {r['saved_activation_mb']:.1f} | "
                         f"{r['predicted_activation_mb']:.1f} | "
                         f"{r['predicted_activation_mb'] / r['saved_activation_mb']:.3f} |")
        lines.append("")
    return lines


def _kernel_lines(results: dict) -> list[str]:
    lines: list[str] = []
    kern = results.get("kernels")
    if kern:
        lines += ["## Kernel suite", ""]
        for module, status in kern.get("modules", {}).items():
            lines.append(f"- `{module}`: {status}")
        lines.append("")
        krecs = kern.get("records", [])
        if krecs:
            lines += ["| kernel | pass | shape | provider | ms | GB/s | TFLOP/s | peak mem MB |",
                      "|---|---|---|---|---:|---:|---:|---:|"]
            for r in krecs:
                lines.append(f"| {r.get('kernel')} | {r.get('pass', '')} | {shape_key(r.get('shape'))} | "
                             f"{r.get('provider')} | {_fmt(r.get('ms'), '.4g')} | {_fmt(r.get('gbps'), '.4g')} | "
                             f"{_fmt(r.get('tflops'), '.4g')} | {_fmt(r.get('peak_mem_mb'), '.4g')} |")
            speed = kernel_speedups(results)
            if speed:
                lines += ["", "| kernel | pass | shape | vs | speed-up |", "|---|---|---|---|---:|"]
                lines += [f"| {s['kernel']} | {s['pass']} | {s['shape']} | {s['baseline']} | {s['speedup']:.2f}x |"
                          for s in speed]
            lines.append("")
    return lines


def render_markdown(results: dict, plots: list[pathlib.Path]) -> str:
    lines = _header_lines(results) + _model_lines(results) + _kernel_lines(results)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write `<stem>.json`, `<stem>.md` and the PNG plots under out_dir; returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = stem(results)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    plots = _plot_model(results, out, name) + _plot_kernels(results, out, name)
    md_path = out / f"{name}.md"
    md_path.write_text(render_markdown(results, plots), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}


# ----------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------

def comparison_rows(a: dict, b: dict) -> list[tuple[str, str, float | None, float | None]]:
    """(what, metric, A, B) for every record present in either file, matched by identity."""
    rows = []

    def index(res, suite, key):
        return {key(r): r for r in res.get(suite, {}).get("records", [])}

    suites = (("model", lambda r: f"{r['preset']} / {r['provider']}", ("seqs_per_s", "mfu", "peak_mem_mb")),
              ("kernels", lambda r: f"{r['kernel']} {r.get('pass', '')} {shape_key(r.get('shape'))} / "
                                    f"{r.get('provider')}", ("ms", "gbps", "tflops")))
    for suite, key, metrics in suites:
        ia, ib = index(a, suite, key), index(b, suite, key)
        for k in list(dict.fromkeys([*ia, *ib])):
            ra, rb = ia.get(k, {}), ib.get(k, {})
            for m in metrics:
                va, vb = ra.get(m), rb.get(m)
                if va is not None or vb is not None:
                    tag = " (extrapolated)" if "extrapolated" in (ra.get("method"), rb.get("method")) else ""
                    tag += " (CPU offload)" if _offloaded(ra) or _offloaded(rb) else ""
                    rows.append((k + tag, m, va, vb))
    return rows


def format_comparison(a: dict, b: dict, path_a: str, path_b: str) -> str:
    lines = [f"A: {path_a}  [{a['device']['name']}, {a['date']}, git {a.get('git_commit', '?')}]",
             f"B: {path_b}  [{b['device']['name']}, {b['date']}, git {b.get('git_commit', '?')}]"]
    if a["device"]["name"] != b["device"]["name"]:
        lines.append("note: different devices; ratios compare hardware as well as code")
    lines += ["", f"{'record':<58}{'metric':<13}{'A':>12}{'B':>12}{'B/A':>8}", "-" * 103]
    for what, metric, va, vb in comparison_rows(a, b):
        ratio = f"{vb / va:.3f}" if va and vb is not None else "-"
        lines.append(f"{what[:57]:<58}{metric:<13}{_fmt(va, '.4g'):>12}{_fmt(vb, '.4g'):>12}{ratio:>8}")
    return "\n".join(lines)


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="t5forge compare", description="show two benchmark results side by side")
    ap.add_argument("a", help="results JSON (the reference)")
    ap.add_argument("b", help="results JSON (the candidate)")
    args = ap.parse_args(argv)
    try:
        a, b = load_results(args.a), load_results(args.b)
    except USER_ERRORS as e:
        return report("compare", e)
    print(format_comparison(a, b, args.a, args.b))
    return 0
