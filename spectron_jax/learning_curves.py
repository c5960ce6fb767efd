"""Learning curves of a training run as one PNG: what the run's metric log says, drawn.

    python -m spectron_jax.learning_curves --model_dir=runs/learn_cpu --output=curves.png \
        [--eval test:1000=evals/test_1000 --eval train:1000=evals/train_1000 ...]

Panels, from `MODEL_DIR/metrics.jsonl` (`metric_logs.read_records`):

1. text CE of the prompt's transcript (`ce_asr`) and of the continuation (`ce_lm`) on the validation
   split, beside the same terms on the training batches (a moving mean), so memorisation shows as a
   widening gap; dashed, the validation terms with every row reading another row's prompt
   (`ce_*_swapped_prefix`, with `TrainConfig.eval_swapped_prefix`): a model that reads its prefix
   lies below its dashed line.
2. the spectrogram L1+L2 of the frames (`spec_frames`) and the whole spectrogram loss (`spec_total`),
   validation and training.
3. with `--eval SPLIT:STEP=DIR` (a continuation-suite folder with `metrics.json`, the free-running
   figures of the export of checkpoint STEP on SPLIT): the prompt-transcript CER, the continuation's
   CER and the share of rows ended by the stop head, per split against the step.

The numbers drawn are printed as a table too (`--print`), so a reader can check the picture.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Mapping, Sequence

import numpy as np

from spectron_jax import filesystem, metric_logs
from spectron_jax.validation import SWAPPED_SUFFIX

TEXT_TERMS = (("ce_asr", "prompt transcript"), ("ce_lm", "continuation"))
SPEC_TERMS = (("spec_frames", "frames L1+L2"), ("spec_total", "spectrogram loss"))
FREE_RUNNING = (("prompt_transcript_cer", "prompt-transcript CER"), ("continuation_cer", "continuation CER"),
                ("stop_head_fraction", "stopped by the stop head"))


def series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps int64 [n], values float64 [n]) of `key` in `records`, the last record of a step kept (a
    resumed run logs a step again), sorted by step; records without a finite value are skipped."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value) and "step" in record:
            by_step[int(record["step"])] = float(value)
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the `window - 1` before it (fewer at the start): float64 [n]."""
    if values.size == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    index = np.arange(1, values.size + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def parse_eval(spec: str) -> tuple[str, int, str]:
    """'SPLIT:STEP=DIR' -> (split, step, dir); a one-line ValueError naming the flag otherwise."""
    head, sep, folder = spec.partition("=")
    split, colon, step = head.partition(":")
    if not (sep and colon and split and folder and step.isdigit()):
        raise ValueError(f"--eval {spec!r}: expected SPLIT:STEP=DIR (e.g. test:1000=evals/test_1000)")
    return split, int(step), folder


def read_free_running(specs: Sequence[str]) -> dict[str, list[tuple[int, dict]]]:
    """{split: [(step, the pooled figures of that folder's metrics.json)] sorted by step}."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for spec in specs:
        split, step, folder = parse_eval(spec)
        path = filesystem.join(folder, "metrics.json")
        if not filesystem.exists(path):
            raise ValueError(f"--eval {spec!r}: {path} does not exist (run spectron_jax.eval there first)")
        payload = json.loads(filesystem.read_text(path))
        out.setdefault(split, []).append((step, payload.get("metrics", payload)))
    return {split: sorted(rows, key=lambda r: r[0]) for split, rows in out.items()}


def table(records: Sequence[Mapping], free_running: Mapping[str, list[tuple[int, dict]]]) -> str:
    """The validation figures per evaluation step (and the free-running ones), as fixed-width text."""
    validation = [r for r in records if r.get("split") == "validation"]
    keys = [k for k, _ in TEXT_TERMS] + [k + SWAPPED_SUFFIX for k, _ in TEXT_TERMS] + [k for k, _ in SPEC_TERMS]
    keys = [k for k in keys if series(validation, k)[0].size]
    lines = ["validation  " + " ".join(f"{k:>24}" for k in ["step"] + keys)]
    steps = sorted({int(r["step"]) for r in validation if "step" in r})
    columns = {k: dict(zip(*series(validation, k))) for k in keys}
    for step in steps:
        cells = [f"{step:>24}"] + [f"{columns[k].get(step, float('nan')):>24.3f}" for k in keys]
        lines.append("            " + " ".join(cells))
    for split, rows in free_running.items():
        lines.append(f"free-running on {split}: " + ", ".join(
            f"step {step}: " + " ".join(f"{k}={m.get(k)}" for k, _ in FREE_RUNNING) for step, m in rows))
    return "\n".join(lines)


def plot(records: Sequence[Mapping], free_running: Mapping[str, list[tuple[int, dict]]], output: str,
         train_window: int = 25) -> None:
    """Draws the panels of the module docstring into the PNG `output` (local or an object store)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation = [r for r in records if r.get("split") == "validation"]
    training = [r for r in records if r.get("split") == "train"]
    panels = 3 if free_running else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    colours = ("tab:blue", "tab:orange", "tab:green")
    for ax, terms, title in ((axes[0], TEXT_TERMS, "text cross-entropy (nats/token)"),
                             (axes[1], SPEC_TERMS, "spectrogram loss")):
        for (key, label), colour in zip(terms, colours):
            steps, values = series(training, key)
            if steps.size:
                ax.plot(steps, moving_mean(values, train_window), color=colour, alpha=0.35, lw=1,
                        label=f"{label}, train (mean of {train_window})")
            steps, values = series(validation, key)
            if steps.size:
                ax.plot(steps, values, "o-", color=colour, lw=2, label=f"{label}, validation")
            steps, values = series(validation, key + SWAPPED_SUFFIX)
            if steps.size:
                ax.plot(steps, values, "s--", color=colour, lw=1.5, label=f"{label}, validation, another's prompt")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if free_running:
        ax = axes[2]
        markers = {"test": "o-", "train": "s--"}
        for (key, label), colour in zip(FREE_RUNNING, colours):
            for split, rows in free_running.items():
                points = [(s, m[key]) for s, m in rows if isinstance(m.get(key), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, markers.get(split, "^:"), color=colour, label=f"{label} ({split})")
        ax.set_xlabel("checkpoint step")
        ax.set_title("free-running (greedy) decoding")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    filesystem.write_bytes(output, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="the training run's MODEL_DIR")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--eval", action="append", default=[], metavar="SPLIT:STEP=DIR",
                        help="a continuation-suite folder of the export of checkpoint STEP on SPLIT (repeatable)")
    parser.add_argument("--train_window", type=int, default=25, help="moving mean of the training terms (records)")
    parser.add_argument("--print", dest="print_table", action="store_true", help="also print the figures")
    args = parser.parse_args(argv)
    try:
        records = metric_logs.read_records(args.model_dir)
        if not records:
            raise ValueError(f"--model_dir {args.model_dir!r}: no metric records (metrics.jsonl) there")
        if args.train_window < 1:
            raise ValueError(f"--train_window must be >= 1, got {args.train_window}")
        free_running = read_free_running(args.eval)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(records, free_running, args.output, args.train_window)
    if args.print_table:
        print(table(records, free_running))
    return 0


if __name__ == "__main__":
    sys.exit(main())
