"""The evidence run's report: Markdown and a PNG beside the JSON, and a summary against every target
(docs/ANCHORS.md, "Our targets") for the last lines of the command's output."""
from __future__ import annotations

import pathlib

# (what, threshold, how the value is read) -- the targets of docs/ANCHORS.md and the kernel issues.
ATTENTION_TARGETS = (("sdpa_bias", 2.0, "x SDPA with a materialised bias"),
                     ("flex_bucket", 1.2, "x FlexAttention, table in a score_mod"),
                     ("sdpa_nobias", 0.6, "x no-bias flash attention (SDPA)"))
MODEL_TARGETS = (("mfu", 0.40, "MFU of the t5forge step"), ("hf-sdpa", 2.0, "x Hugging Face eager (SDPA)"),
                 ("hf-sdpa-compile", 1.3, "x Hugging Face + torch.compile"))
RMS_NORM_TARGET = 85.0   # % of the copy bandwidth measured in the same run
OPTIMIZER_OPS_TARGET = 2000   # aten operations of one v1_1-base optimizer step (issue 13)


def _line(name: str, value: float | None, target: float, unit: str) -> str:
    if value is None:
        return f"{name}: not measured (target {target:g}{unit})"
    verdict = "met" if value >= target else "MISSED"
    return f"{name}: {value:.3g}{unit} (target >= {target:g}{unit}) {verdict}"


def _attention_ratio(records: list[dict], mode: str, length: int, baseline: str) -> float | None:
    def ms(provider):
        for r in records:
            if (r.get("mode") == mode and r["provider"] == provider and r["pass"] == "full"
                    and r["shape"][2] == length and r.get("ms")):
                return r["ms"]
        return None

    ours, base = ms("ours"), ms(baseline)
    return base / ours if ours and base else None


def summary(results: dict) -> list[str]:
    """One line per target: the value measured in this run, or 'not measured'."""
    parts = results.get("parts", {})
    lines = ["SMOKE RUN: tiny shapes on this device, the figures mean nothing"] if results.get("smoke") else []
    checks = parts.get("correctness", {})
    if checks.get("records"):
        bad = checks.get("failed", [])
        lines.append(f"correctness: {len(checks['records']) - len(bad)}/{len(checks['records'])} checks passed"
                     + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    else:
        lines.append(f"correctness: {checks.get('status', 'not run')} {checks.get('reason', '')}".rstrip())
    kernels = parts.get("kernels", {})
    attn = kernels.get("attention", {}).get("records", [])
    lengths = sorted({r["shape"][2] for r in attn})
    for mode in ("enc", "dec"):
        for length in sorted({lengths[0], lengths[-1]}) if lengths else [512]:
            for baseline, target, _ in ATTENTION_TARGETS:
                lines.append(_line(f"attention {mode} L={length} fwd+bwd vs {baseline}",
                                   _attention_ratio(attn, mode, length, baseline), target, "x"))
    rms = [r for r in kernels.get("rms_norm", {}).get("records", [])
           if r["kernel"] == "rms_norm" and r["provider"] == "ours" and r["pass"] == "forward"]
    lines.append(_line("rms_norm forward % of copy bandwidth", max((r["pct_copy_bw"] or 0 for r in rms), default=None),
                       RMS_NORM_TARGET, "%"))
    ops = parts.get("host_ops", {})
    if ops.get("status") == "ok":
        ada = ops["optimizer"].get("adafactor", {})
        fused = ada.get("fused")
        verdict = "met" if fused is not None and fused <= OPTIMIZER_OPS_TARGET else "MISSED"
        lines.append(f"{ops['preset']} Adafactor step: {fused} aten ops fused (target <= {OPTIMIZER_OPS_TARGET}) "
                     f"{verdict}; reference {ada.get('reference')}; ms {ops.get('optimizer_ms', {}).get('adafactor')}")
    lines += _model_lines(parts.get("model_steps", {}).get("records", []))
    lines += _decode_lines(parts.get("decode", {}))
    pre = parts.get("pretrain", {})
    if pre.get("status") == "ok":
        mfu = pre.get("mfu_median")
        lines.append(f"pretrain ({pre['steps']} steps): {pre['tokens_per_s_median']:.0f} tokens/s, MFU "
                     + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a"))
    else:
        lines.append(f"pretrain: {pre.get('status', 'not run')} {pre.get('reason', '')}".rstrip())
    big = parts.get("t5_11b", {})
    if big.get("status") == "ok":
        peak = f"{big['peak_mem_gb']:.1f} GiB" if big.get("peak_mem_gb") is not None else "n/a"
        lines.append(f"{big['preset']}: {big['tokens_per_s']:.0f} tokens/s, peak {peak}"
                     + (f", MFU {100 * big['mfu']:.1f}%" if big.get("mfu") else ""))
    else:
        lines.append(f"t5-11b: {big.get('status', 'not run')} {big.get('reason', '')}".rstrip())
    return lines


def _decode_lines(part: dict) -> list[str]:
    """tokens/s per decoding case: the static cache eager and compiled, the torch.cat cache, transformers."""
    rows = [r for r in part.get("records", []) if r.get("status") == "ok" and "tokens_per_s" in r]
    if not rows:
        return [f"decode: {part.get('status', 'not run')} {part.get('reason', '')}".rstrip()]
    lines = []
    for case in sorted({(r["search"], r["batch"]) for r in rows}):
        got = {r["provider"]: r["tokens_per_s"] for r in rows if (r["search"], r["batch"]) == case}
        lines.append(f"decode {case[0]} b{case[1]} tokens/s: " + ", ".join(f"{p} {v:.0f}" for p, v in got.items()))
    return lines


def _model_lines(records: list[dict]) -> list[str]:
    by = {(r.get("preset"), r.get("provider")): r for r in records if r.get("status") == "ok"}
    preset = next((p for p, _ in by if p in ("t5-v1_1-base", "tiny")), "t5-v1_1-base")
    ours = by.get((preset, "t5forge"))
    lines = [_line(f"{preset} step MFU (t5forge)", ours["mfu"] * 100 if ours else None, 40.0, "%")]
    for base, target, _ in MODEL_TARGETS[1:]:
        other = by.get((preset, base))
        ratio = other["step_s"] / ours["step_s"] if ours and other else None
        lines.append(_line(f"{preset} step vs {base}", ratio, target, "x"))
    return lines


def markdown(results: dict, summary_lines: list[str]) -> str:
    env = results.get("parts", {}).get("environment", {})
    out = ["# t5forge evidence run", "", f"- command: `{results['command']}`", f"- date: {results['date']}",
           f"- commit: {results['git_commit']}", f"- device: {env.get('device', {}).get('name', '?')}",
           f"- budget: {results['budget_s']} s; elapsed {results.get('elapsed_s', 0):.0f} s", "",
           "## Against the targets", ""] + [f"- {line}" for line in summary_lines] + ["", "## Parts", "",
                                                                                  "| part | status | seconds |",
                                                                                  "|---|---|---|"]
    for name, part in results.get("parts", {}).items():
        out.append(f"| {name} | {part.get('status')} {part.get('reason', '')} | {part.get('seconds', 0):.1f} |")
    steps = results.get("parts", {}).get("model_steps", {}).get("records", [])
    if steps:
        out += ["", "## Training steps", "", "| preset | provider | status | ms/step | tokens/s | MFU | peak MB |",
                "|---|---|---|---|---|---|---|"]
        for r in steps:
            ok = r.get("status") == "ok"
            out.append(f"| {r.get('preset')} | {r.get('provider', '')} | {r.get('status')} | "
                       f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                       f"{r.get('peak_mem_mb') or 0:.0f} |" if ok else
                       f"| {r.get('preset')} | {r.get('provider', '')} | {r.get('status')} {r.get('reason', '')} "
                       f"| | | | |")
    return "\n".join(out) + "\n"


def plot(results: dict, path: pathlib.Path) -> pathlib.Path | None:
    """Attention speed-ups over each baseline and training tokens/s per provider; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    parts = results.get("parts", {})
    attn = parts.get("kernels", {}).get("attention", {}).get("records", [])
    steps = [r for r in parts.get("model_steps", {}).get("records", []) if r.get("status") == "ok"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels, values = [], []
    for mode in ("enc", "dec"):
        for length in sorted({r["shape"][2] for r in attn}):
            for baseline, _, _ in ATTENTION_TARGETS:
                ratio = _attention_ratio(attn, mode, length, baseline)
                if ratio is not None:
                    labels.append(f"{mode} {length}\n{baseline}")
                    values.append(ratio)
    a.bar(range(len(values)), values)
    a.set_xticks(range(len(values)), labels, fontsize=6)
    a.axhline(1.0, color="gray", lw=0.8)
    a.set_title("attention fwd+bwd: ours faster by (x)")
    b.bar(range(len(steps)), [r["tokens_per_s"] for r in steps])
    b.set_xticks(range(len(steps)), [f"{r['preset']}\n{r['provider']}" for r in steps], fontsize=6)
    b.set_title("training step, tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
