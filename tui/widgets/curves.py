"""Loss curves through plotext (textual-plotext): train and validation reconstruction for the
RVQ-VAE, and for the prior every ``*_bits`` column (its bits per code and the unigram/bigram
baselines) — whichever the metric rows carry."""

from __future__ import annotations

from typing import Any

from textual_plotext import PlotextPlot

VQVAE_CURVES = ("train_recon", "val_recon")


def curve_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The columns worth a curve, in a stable order."""
    keys: list[str] = [k for k in VQVAE_CURVES if any(isinstance(r.get(k), (int, float)) for r in rows)]
    bits = sorted({k for r in rows for k, v in r.items() if k.endswith("_bits") and isinstance(v, (int, float))})
    return keys + bits


class LossCurves(PlotextPlot):
    DEFAULT_CSS = """
    LossCurves { min-height: 8; }
    """

    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        keys = curve_keys(rows)
        plt.title("loss per epoch" if keys else "no metrics yet")
        plt.xlabel("epoch")
        for key in keys:
            points = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows)
                      if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                plt.plot(list(xs), list(ys), label=key, marker="braille")
        self.refresh()
