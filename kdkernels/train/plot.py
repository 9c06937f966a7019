"""The training and evaluation curves of ``metrics.jsonl`` as one PNG (needs matplotlib)."""

from __future__ import annotations

from kdkernels.train.loop import read_metrics

__all__ = ["plot_metrics"]


def plot_metrics(metrics_path: str, png_path: str) -> bool:
    """Training loss per run (left) and each run's evaluation metrics (right); False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    runs = sorted({r["run"] for r in records}, key=[r["run"] for r in records].index)
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train = [(r["step"], r["loss"]) for r in records if r["run"] == run and "loss" in r]
        if train:
            ax_loss.plot(*zip(*train), label=run, linewidth=0.8)
        evals = [r for r in records if r["run"] == run and "eval" in r]
        for key in (evals[0]["eval"] if evals else {}):
            ax_eval.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o", markersize=3,
                         label=f"{run}: {key}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training", yscale="log")
    ax_eval.set(xlabel="step", title="held-out evaluation")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True
