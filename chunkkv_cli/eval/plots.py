"""Plots for `chunkkv eval` (matplotlib, Agg backend, imported only here and only when plotting)."""

from __future__ import annotations

from pathlib import Path

from chunkkv_cli.registry import REFERENCE


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict, out: Path) -> list[Path]:
    """Every plot the task has, written into `out`; returns the files."""
    out = Path(out)
    if results["task"] == "needle":
        files = needle_heatmaps(results, out)
    elif results["task"] == "similarity":
        files = similarity_heatmaps(results, out)
    else:
        files = []
    if results["task"] != "similarity" and len(results["settings"]["ratios"]) > 1:
        files.append(score_lines(results, out))
    return files


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def needle_heatmaps(results: dict, out: Path) -> list[Path]:
    """One PNG, a row of panels per method (one panel per ratio): depth (rows) x context length (columns), green = found."""
    plt = _pyplot()
    needle = results["needle"]
    lengths, depths, grid = needle["lengths"], needle["depths"], needle["grid"]
    n_cols = max(len(by_ratio) for by_ratio in grid.values())
    width = 1.8 + (1.0 + 0.9 * len(lengths)) * n_cols
    fig, axes = plt.subplots(len(grid), n_cols, figsize=(width, 0.6 + 3.0 * len(grid)), squeeze=False, sharey=True,
                             layout="constrained")  # fmt: skip
    for row_axes, (method, by_ratio) in zip(axes, grid.items()):
        for ax in row_axes[len(by_ratio):]:
            ax.set_visible(False)  # the reference (full cache) has one point; other methods one per ratio
        for ax, (ratio, rows) in zip(row_axes, by_ratio.items()):
            image = _needle_panel(ax, rows, lengths, depths)
            ax.set_ylabel(f"{method}\nneedle depth" if ax is row_axes[0] else "")
            title = "full cache" if method == REFERENCE else f"ratio {ratio}"
            ax.set_title(f"{method}, {title}: {_found(rows)}", fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="needle found")
    fig.suptitle(f"Needle in a haystack ({results['model']})", fontsize=11)
    return [_save(plt, fig, out / "needle.png")]


def _needle_panel(ax, rows, lengths, depths):
    values = [[float("nan") if v is None else v for v in row] for row in rows]
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    for row, line in enumerate(rows):
        for col, value in enumerate(line):
            ax.text(col, row, "–" if value is None else f"{value:.2g}", ha="center", va="center", fontsize=8)
    return image


def _found(rows) -> str:
    values = [v for row in rows for v in row if v is not None]
    return f"{sum(values) / len(values):.0%} found" if values else "not run"


def similarity_heatmaps(results: dict, out: Path) -> list[Path]:
    """One PNG per ratio: a layer x layer Jaccard heatmap for each method, side by side."""
    plt = _pyplot()
    sim = results["similarity"]
    files = []
    for ratio in sorted({r for by_ratio in sim["matrix"].values() for r in by_ratio}, key=float):
        methods = [m for m in sim["matrix"] if ratio in sim["matrix"][m]]
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False, layout="constrained")
        for ax, method in zip(axes[0], methods):
            image = ax.imshow(sim["matrix"][method][ratio], cmap="viridis", vmin=0, vmax=1, origin="lower")
            ax.set_title(f"{method}: adjacent J = {sim['adjacent'][method][ratio]:.1%}", fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer" if ax is axes[0][0] else "")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Jaccard of kept indices")
        fig.suptitle(f"Kept-index similarity between layers, ratio {ratio} ({results['model']})", fontsize=11, y=1.03)
        files.append(_save(plt, fig, out / f"similarity-r{ratio}.png"))
    return files


def score_lines(results: dict, out: Path) -> Path:
    """Headline score against the kept ratio, one line per method (fullkv as a dashed reference)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for method, row in results["table"].items():
        if method == REFERENCE:
            if row.get("1") is not None:
                ax.axhline(row["1"], color="black", linestyle="--", linewidth=1, label="fullkv")
            continue
        points = sorted((float(r), v) for r, v in row.items() if v is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xlabel("fraction of KV kept")
    ax.set_ylabel(results["metric"])
    ax.set_title(f"{results['task']} ({results['model']})", fontsize=11)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "scores.png")


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
