"""The staleness sweep's report: its tables (stability, admission, gain over the one-batch
baseline) and its plot, from the rows of steps.csv and cells.csv (bench.staleness_sweep).
Pure functions of those rows, so merged sweeps report with `--report` alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sync_ratio(mode: str) -> int:
    """N of a "sync-N" mode; 0 for any other mode (async ones, or a malformed name)."""
    return int(mode[5:]) if mode.startswith("sync-") and mode[5:].isdigit() else 0


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _by_cell(cells: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """cells.csv rows by (variant, mode): one list of seeds' rows a table line."""
    by: dict[tuple[str, str], list[dict]] = {}
    for row in cells:
        by.setdefault((row["variant"], row["mode"]), []).append(row)
    return by


def one_batch(mode: str, steps: int) -> bool:
    """A sync-N cell with N >= its steps trains on one batch sampled from the initial policy:
    its training reward is that policy's, so the rose-then-fell rules say nothing about it."""
    return sync_ratio(mode) >= steps


def table(cells: list[dict], variants: list[str], modes: list[str], drop: float = 0.10) -> str:
    """Markdown: per variant and mode, final reward (mean over seeds, with min-max), collapses
    (rose, then fell below the start), runs that ended below their start whether or not they
    rose first (both n/a for a one-batch cell, see `one_batch`), the largest sequence weight W
    seen and the mean W."""
    by = _by_cell(cells)
    head = ["objective", "mode", "final reward (seeds: mean, min-max)", "final eval acc", "collapsed",
            "ended below start", "max W", "mean W"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        for m in modes:
            rows = by.get((v, m), [])
            if not rows:
                continue
            final = np.array([_float(r["final_reward"]) for r in rows])
            acc = np.array([_float(r["final_eval_accuracy"]) for r in rows])
            if all(r.get("steps") not in (None, "") and one_batch(m, int(_float(r["steps"]))) for r in rows):
                collapsed = below = "n/a"
            else:
                collapsed = f"{sum(int(_float(r['collapsed'])) for r in rows)}/{len(rows)}"
                below = f"{sum(_float(r['final_reward']) < _float(r['start_reward']) - drop for r in rows)}/{len(rows)}"
            w_max = np.nanmax([_float(r["seq_w_max"]) for r in rows])
            w_mean = np.nanmean([_float(r["seq_w_mean"]) for r in rows])
            lines.append(
                f"| {v} | {m} | {final.mean():.3f} ({final.min():.2f}-{final.max():.2f}) | {np.nanmean(acc):.3f} "
                f"| {collapsed} | {below} | {w_max:.3g} | {w_mean:.3g} |"
            )
    return "\n".join(lines) + "\n"


def admission_table(cells: list[dict], variants: list[str], modes: list[str]) -> str:
    """Markdown: per variant and async mode, what the staleness rule cost and bought. The
    samples dropped for staleness, the learner's idle share (waiting for data, of wait +
    train), the cap in force on average, the largest true sequence weight W and final reward."""
    by = _by_cell(cells)
    head = ["objective", "mode", "seeds", "final reward", "max W", "dropped samples", "learner idle", "mean cap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        for m in modes:
            rows = by.get((v, m), [])
            if not rows or not m.startswith("async"):
                continue
            col = {k: np.array([_float(r.get(k)) for r in rows]) for k in
                   ("final_reward", "seq_w_max", "dropped", "learner_idle", "mean_cap")}  # fmt: skip
            lines.append(
                f"| {v} | {m} | {len(rows)} | {np.nanmean(col['final_reward']):.3f} "
                f"| {np.nanmax(col['seq_w_max']):.3g} | {np.nanmean(col['dropped']):.0f} "
                f"| {np.nanmean(col['learner_idle']):.0%} | {np.nanmean(col['mean_cap']):.2f} |"
            )
    return "\n".join(lines) + "\n"


def gain_table(steps: list[dict], variants: list[str], modes: list[str], block: int) -> str:
    """Markdown: per variant and mode, the training reward's gain over a one-batch cell of the same
    seed, by blocks of `block` steps (mean over seeds), and the last block's gain per seed.

    A seed fixes the prompts of every step, and a one-batch cell (sync-N, N >= steps) trains on
    a batch the initial policy sampled, so its reward at step t is the initial policy's on the
    prompts every other cell of that seed trained on at step t. The difference is what training
    bought on the same prompts, without the prompt-to-prompt noise a reward curve carries. The
    baseline is the variant's own one-batch cell, else the first variant's that has one. Empty
    when no cell is one-batch."""
    reward: dict[tuple, dict[int, float]] = {}
    for r in steps:
        if r.get("reward") not in (None, ""):
            reward.setdefault((r["variant"], r["mode"], str(r["seed"])), {})[int(r["step"])] = _float(r["reward"])
    length = {key: max(series) for key, series in reward.items()}
    base_modes = [m for m in modes if any(k[1] == m and one_batch(m, n) for k, n in length.items())]
    if not base_modes:
        return ""
    base_mode = base_modes[0]

    def baseline(variant: str, seed: str) -> dict[int, float] | None:
        for v in [variant, *variants]:
            if (v, base_mode, seed) in reward:
                return reward[(v, base_mode, seed)]
        return None

    block = max(1, min(block, max(length.values())))  # cells shorter than a block: one block
    nblocks = max(length.values()) // block
    head = ["objective", "mode", "seeds", *(f"steps {b * block + 1}-{(b + 1) * block}" for b in range(nblocks)),
            "last block, per seed"]  # fmt: skip
    lines = [f"Training-reward gain over {base_mode} on the same prompts (same seed):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for v in variants:
        for m in modes:
            if m == base_mode:
                continue
            gains = []  # per seed: gain per block
            for (cv, cm, seed), series in sorted(reward.items()):
                base = baseline(v, seed) if (cv, cm) == (v, m) else None
                if base is None:  # another cell, or a seed without a one-batch cell
                    continue
                per_block = []
                for b in range(nblocks):
                    at = [t for t in range(b * block + 1, (b + 1) * block + 1) if t in series and t in base]
                    per_block.append(float(np.mean([series[t] - base[t] for t in at])) if at else float("nan"))
                gains.append(per_block)
            if not gains:
                continue
            g = np.array(gains)
            cells = [f"{x:+.2f}" for x in np.nanmean(g, axis=0)]
            lines.append(f"| {v} | {m} | {len(g)} | " + " | ".join(cells) + " | "
                         + " ".join(f"{x:+.2f}" for x in g[:, -1]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _curves(steps: list[dict], variant: str, mode: str, column: str) -> tuple[list[int], np.ndarray] | None:
    """(steps, seeds x steps) of one column for one cell, over the steps every seed logged it."""
    runs = {}
    for r in steps:
        if r["variant"] == variant and r["mode"] == mode and r.get(column) not in (None, ""):
            runs.setdefault(r["seed"], {})[int(r["step"])] = _float(r[column])
    if not runs:
        return None
    common = sorted(set.intersection(*(set(x) for x in runs.values())))
    return common, np.array([[x[k] for k in common] for x in runs.values()])


def plot(steps: list[dict], variants: list[str], modes: list[str], smooth: int, path: Path) -> None:
    """Reward vs learner step: one panel per mode, one line per objective (mean over seeds,
    moving average), the seeds' range shaded. When the cells evaluated along the way, a second
    row shows held-out accuracy: the one to read at large N, where the training reward is the
    old policy's (a sync-N batch is sampled before its N updates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = any(r.get("eval_accuracy") not in (None, "") for r in steps)
    rows = 2 if evals else 1
    fig, axes = plt.subplots(rows, len(modes), figsize=(4.2 * len(modes), 3.6 * rows), sharey="row", squeeze=False)
    colours = plt.get_cmap("tab10")
    for col, mode in enumerate(modes):
        for i, v in enumerate(variants):
            style = "-" if v.startswith("vespo") else "--"
            found = _curves(steps, v, mode, "reward")
            if found is not None:
                at, curves = found
                window = max(1, min(smooth, len(at)))
                kernel = np.ones(window) / window
                sm = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
                x = np.arange(window, len(at) + 1)
                ax = axes[0][col]
                ax.plot(x, sm.mean(0), style, color=colours(i), label=v, linewidth=1.6)
                if len(sm) > 1:
                    ax.fill_between(x, sm.min(0), sm.max(0), color=colours(i), alpha=0.12)
            found = _curves(steps, v, mode, "eval_accuracy") if evals else None
            if found is not None:
                at, curves = found
                ax = axes[1][col]
                ax.plot(at, curves.mean(0), style, marker="o", color=colours(i), label=v, linewidth=1.6)
                if len(curves) > 1:
                    ax.fill_between(at, curves.min(0), curves.max(0), color=colours(i), alpha=0.12)
        axes[0][col].set_title(f"sync, N = {sync_ratio(mode)}" if mode.startswith("sync-") else mode)
        for r in range(rows):
            axes[r][col].set_xlabel("learner step")
            axes[r][col].grid(alpha=0.3)
    axes[0][0].set_ylabel(f"training reward ({smooth}-step mean)")
    if evals:
        axes[1][0].set_ylabel("held-out accuracy")
    fullest = max(range(len(modes)), key=lambda c: len(axes[0][c].get_lines()))  # the legend where most lines are
    axes[0][fullest].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
