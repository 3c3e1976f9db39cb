"""Reading an AGC sweep's results (`agc_sweep.run_sweep`): stability, tables and plots.

Everything here works from the recorded results (the sweep's results.json) alone, so the
figures can be redrawn without retraining (`plot_from_file`, `scripts/agc_sweep.py
--plot_only`).
"""

from __future__ import annotations

from typing import Any

from nfnets_jax import files
from nfnets_jax.experiments import agc_sweep


def _top1(run: dict[str, Any], chance: float) -> float:
    """The final top-1 of a run; chance for a diverged one."""
    return chance if run["diverged"] or run["final_top1"] is None else run["final_top1"]


def is_stable(run: dict[str, Any], chance: float, margin: float) -> bool:
    """Stable: the loss stayed finite and the final top-1 is at least chance + margin."""
    return not run["diverged"] and _top1(run, chance) >= chance + margin


def stable_learning_rates(results: dict[str, Any], margin: float = 0.2) -> list[dict[str, Any]]:
    """Per batch size, the largest stable lr multiple (and peak lr) without and with AGC.

    With AGC: any clipping > 0 stable at that multiple. None where no multiple was stable.
    """
    chance = 1.0 / results["meta"]["num_classes"]
    runs = list(results["runs"].values())
    rows = []
    for batch in sorted({r["batch_size"] for r in runs}):
        row: dict[str, Any] = {"batch_size": batch}
        for name, with_agc in (("no_agc", False), ("agc", True)):
            stable = [
                r
                for r in runs
                if r["batch_size"] == batch
                and (r["clipping"] > 0) == with_agc
                and is_stable(r, chance, margin)
            ]
            best = max(stable, key=lambda r: r["lr_multiple"], default=None)
            row[f"{name}_multiple"] = best["lr_multiple"] if best else None
            row[f"{name}_peak_lr"] = best["peak_learning_rate"] if best else None
        rows.append(row)
    return rows


def _grid(results: dict[str, Any]) -> tuple[list[int], list[float], list[float]]:
    """The batch sizes, lr multiples and clippings present in the results."""
    runs = results["runs"].values()
    return tuple(sorted({r[k] for r in runs}) for k in ("batch_size", "lr_multiple", "clipping"))


def _find(results: dict[str, Any], batch: int, multiple: float, clipping: float) -> Any:
    return results["runs"].get(agc_sweep.run_key(batch, multiple, clipping))


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: per batch size and lr multiple, top-1 at each clipping (x = diverged)."""
    batches, multiples, clippings = _grid(results)
    names = ["off" if c == 0 else f"{c:g}" for c in clippings]
    lines = [
        "| batch | lr x | peak lr | " + " | ".join(f"clip {n}" for n in names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for batch in batches:
        for multiple in multiples:
            cells, peak = [], None
            for clipping in clippings:
                run = _find(results, batch, multiple, clipping)
                if run is None:
                    cells.append("-")
                    continue
                peak = run["peak_learning_rate"]
                if run["diverged"]:
                    cells.append(f"x @{run['diverged_step']}/{run['total_steps']}")
                else:
                    cells.append(f"{100 * run['final_top1']:.1f}")
            peak_text = "-" if peak is None else f"{peak:.3g}"
            lines.append(f"| {batch} | {multiple:g} | {peak_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stable(results: dict[str, Any], margin: float = 0.2) -> str:
    """A Markdown table of `stable_learning_rates`."""
    lines = ["| batch | largest stable lr x (no AGC) | with AGC |", "|---|---|---|"]
    for row in stable_learning_rates(results, margin):
        cells = []
        for name in ("no_agc", "agc"):
            multiple = row[f"{name}_multiple"]
            cells.append(
                "none" if multiple is None else f"{multiple:g}x (lr {row[f'{name}_peak_lr']:.3g})"
            )
        lines.append(f"| {row['batch_size']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _best_agc(results: dict[str, Any], batch: int, multiple: float, clippings: list[float]):
    """The AGC run (clipping > 0) with the highest final top-1 at a point, or None."""
    chance = 1.0 / results["meta"]["num_classes"]
    runs = [_find(results, batch, multiple, c) for c in clippings if c > 0]
    runs = [r for r in runs if r is not None]
    return max(runs, key=lambda r: (_top1(r, chance), not r["diverged"]), default=None)


def _draw(ax: Any, xs: list[float], runs: list[Any], chance: float, **style: Any) -> None:
    """One line of final top-1; diverged runs drawn at chance as red crosses."""
    points = [(x, r) for x, r in zip(xs, runs) if r is not None]
    ax.plot([x for x, _ in points], [_top1(r, chance) for _, r in points], marker="o", **style)
    bad = [x for x, r in points if r["diverged"]]
    if bad:
        ax.plot(bad, [chance] * len(bad), "x", color="red", markersize=9, mew=2, zorder=5)


def plot(results: dict[str, Any], output_dir: str, dpi: int = 80) -> list[str]:
    """Writes agc_sweep_batch.png and agc_sweep_clipping.png from recorded results.

    (a) batch: final top-1 against batch size, without AGC and with the best clipping per
    batch (labelled), one panel per lr multiple. (b) clipping: top-1 against the clipping
    threshold ('off' first), one line per batch size, one panel per lr multiple. Diverged
    runs are red crosses at chance level. Returns the PNG paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    chance = 1.0 / results["meta"]["num_classes"]
    batches, multiples, clippings = _grid(results)
    paths = []
    for name, draw in (("batch", _draw_batch), ("clipping", _draw_clipping)):
        fig, axes = plt.subplots(
            1, len(multiples), figsize=(3.2 * len(multiples), 3), squeeze=False
        )
        for ax, multiple in zip(axes[0], multiples):
            draw(ax, results, multiple, chance)
            ax.set_title(f"lr {multiple:g}x linear scaling", fontsize=9)
        path = files.join(output_dir, f"agc_sweep_{name}.png")
        paths.append(_finish(fig, axes, chance, path, dpi))
    return paths


def _draw_batch(ax: Any, results: dict[str, Any], multiple: float, chance: float) -> None:
    """Panel (a) at one lr multiple: no AGC and the best AGC run against batch size."""
    batches, _, clippings = _grid(results)
    plain = [_find(results, b, multiple, 0.0) for b in batches]
    agc = [_best_agc(results, b, multiple, clippings) for b in batches]
    _draw(ax, batches, plain, chance, label="no AGC", color="tab:gray")
    _draw(ax, batches, agc, chance, label="AGC (best clip)", color="tab:blue")
    for batch, run in zip(batches, agc):
        if run is not None:
            xy = (batch, _top1(run, chance))
            ax.annotate(f"{run['clipping']:g}", xy, (2, -9), "data", "offset points", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")


def _draw_clipping(ax: Any, results: dict[str, Any], multiple: float, chance: float) -> None:
    """Panel (b) at one lr multiple: top-1 against the threshold, a line per batch size."""
    batches, _, clippings = _grid(results)
    positions = list(range(len(clippings)))
    for batch in batches:
        runs = [_find(results, batch, multiple, c) for c in clippings]
        _draw(ax, positions, runs, chance, label=f"batch {batch}")
    ax.set_xticks(positions, ["off" if c == 0 else f"{c:g}" for c in clippings], fontsize=7)
    ax.set_xlabel("clipping threshold")


def _finish(fig: Any, axes: Any, chance: float, path: str, dpi: int) -> str:
    """Common labels, a chance line and the legend; saves and closes the figure."""
    from matplotlib import pyplot as plt

    for ax in axes[0]:
        ax.axhline(chance, color="red", linewidth=0.5, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test top-1 (x = diverged)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def plot_from_file(output_dir: str, margin: float = 0.2) -> str:
    """Re-plots a recorded sweep (no training); returns the tables as Markdown."""
    results = agc_sweep.load_results(output_dir)
    if not results["runs"]:
        raise ValueError(f"No recorded runs in {files.join(output_dir, agc_sweep.RESULTS_FILE)}.")
    plot(results, output_dir)
    return format_table(results) + "\n\n" + format_stable(results, margin)
