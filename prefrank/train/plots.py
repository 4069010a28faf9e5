"""PNG plots of a run's metrics.jsonl (matplotlib, headless; imported when a plot is drawn, so the trainer
runs without it and only the plot is skipped)."""


def _series(rows, key):
    points = [(row["step"], row[key]) for row in rows if key in row and row[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(rows, path, title=""):
    """Loss, reward margins, reward / eval accuracies against the step, one panel each. ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for row in rows for k in row}
    margin_keys = sorted(k for k in keys if "margin" in k)
    accuracy_keys = sorted(k for k in keys if "accurac" in k)
    panels = [("loss", ["loss"]), ("reward margin", margin_keys), ("accuracy", accuracy_keys)]
    panels = [(name, ks) for name, ks in panels if ks]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for axis, (name, panel_keys) in zip(axes[0], panels, strict=True):
        for key in panel_keys:
            steps, values = _series(rows, key)
            axis.plot(steps, values, marker="o" if len(steps) < 8 else None, label=key)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
