"""Training logs: a CSV of every logged step, TensorBoard scalars and PNG curves."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path


class RunLog:
    """Append-only CSV (``log.csv``) plus optional TensorBoard events (``tb/``).

    Columns grow as new terms appear (the file is rewritten then). On resume, rows after the
    resumed step are dropped so a resumed run's log equals an uninterrupted one.
    """

    def __init__(self, folder: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(folder) / "log.csv"
        self.rows: list[dict[str, float]] = []
        if self.path.exists() and resume_step > 0:
            with self.path.open(newline="", encoding="utf-8") as f:
                self.rows = [
                    {k: float(v) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f)
                    if float(r["step"]) <= resume_step
                ]
        self._write_all()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(Path(folder) / "tb"), purge_step=resume_step + 1)

    @property
    def columns(self) -> list[str]:
        cols: list[str] = ["step"]
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def _write_all(self) -> None:
        with self.path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` at ``step`` (merged into the row of that step if it exists)."""
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": float(step), **values})
        self._write_all()  # a few thousand rows at most: rewriting keeps columns right
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k.replace(".", "/"), v, step)

    def close(self) -> None:
        self._write_all()
        if self.tb is not None:
            self.tb.close()


def plot_curves(log_csv: Path, png: Path, title: str = "") -> None:
    """Loss terms (log scale) and validation Dice against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(log_csv).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k != "step"]
    for r in rows:
        keys += [k for k in r if k not in keys and k != "step"]
    losses = [k for k in keys if k.startswith("loss")]
    vals = [k for k in keys if k.startswith("val.")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, names, ylabel in ((axes[0], losses, "loss"), (axes[1], vals, "validation Dice")):
        for k in names:
            pts = [(float(r["step"]), float(r[k])) for r in rows if r.get(k) not in (None, "")]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k.split(".", 1)[-1], marker="o" if ax is axes[1] else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if names:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if losses:
        axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
