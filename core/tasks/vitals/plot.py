"""One patient's twin on one page: each vital with the twin's band, NEWS2, the alerts and the onset."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the file-only backend

from .generator import UNITS  # noqa: E402
from .twin import TwinTrace  # noqa: E402
from .windows import FORECAST_SIGNALS  # noqa: E402

__all__ = ["plot_trace"]


def plot_trace(trace: TwinTrace, path: Path, *, title: str) -> None:
    rows = len(FORECAST_SIGNALS) + 1
    figure, axes = plt.subplots(rows, 1, figsize=(9.0, 1.6 * rows), sharex=True)
    for position, name in enumerate(FORECAST_SIGNALS):
        axis = axes[position]
        axis.fill_between(trace.times_h, trace.lower[:, position], trace.upper[:, position], color="tab:blue", alpha=0.2, label="twin 90 % band")
        axis.plot(trace.times_h, trace.observed[:, position], ".", markersize=2.5, color="black", label="observed")
        axis.set_ylabel(f"{name}\n({UNITS[name]})", fontsize=8)
    axes[-1].step(trace.times_h, trace.news2, where="post", color="tab:orange", label="NEWS2")
    axes[-1].axhline(5, color="tab:orange", linestyle=":", linewidth=1)
    axes[-1].set_ylabel("NEWS2", fontsize=8)
    axes[-1].set_xlabel("hours since admission")
    for axis in axes:
        for alert in trace.alerts:
            axis.axvspan(alert.start_h, alert.end_h, color="tab:red", alpha=0.12)
        if trace.onset_h is not None:
            axis.axvline(trace.onset_h, color="tab:red", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    axes[0].set_title(str(title)[:96].replace("$", r"\$") + " — red: twin alerts, dashed: labelled onset", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
