"""The bad input lines the pretraining data readers skipped (engine/data/c4.py reports each one once):
their counts by kind for the run's final summary line (the Trainer's metrics.jsonl records carry the running
total as `bad_input_lines`, from the data's `bad_input_counts()`)."""
from __future__ import annotations

import collections



def read_stats(data) -> dict[str, int]:
    """Bad input lines the data reader(s) skipped so far, by kind, summed over loader workers: every
    reader's counts live in the data state (`stats.bad`), which is what a resume restores too."""
    totals: dict[str, int] = collections.Counter()

    def walk(node):
        if isinstance(node, dict):
            bad = node.get("stats", {}).get("bad") if isinstance(node.get("stats"), dict) else None
            if isinstance(bad, dict):
                totals.update({k: int(v) for k, v in bad.items() if v})
            for key, value in node.items():
                if key != "stats":
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data.state_dict() if hasattr(data, "state_dict") else {})
    return dict(totals)


def bad_input_counts(data) -> dict[str, int]:
    """Bad input lines skipped so far by kind: the data's own cheap count when it has one, else its state's."""
    counts = getattr(data, "bad_input_counts", None)
    return counts() if callable(counts) else read_stats(data)


def bad_input_summary(data) -> str:
    """", 3 bad input lines skipped (invalid_json 2, corrupt_gzip 1)" or "" when none were."""
    bad = bad_input_counts(data)
    if not bad:
        return ""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
    return f", {sum(bad.values())} bad input lines skipped ({kinds})"
