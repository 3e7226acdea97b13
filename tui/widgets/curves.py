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


def curve_title(keys: list[str]) -> str:
    """What the curves are: a prior's are bits per code (and its baselines'), not a loss."""
    if not keys:
        return "no metrics yet"
    if all(k.endswith("_bits") for k in keys):
        return "bits per code per epoch"
    if all(k in VQVAE_CURVES for k in keys):
        return "reconstruction loss per epoch"
    return "loss per epoch"


class LossCurves(PlotextPlot):
    DEFAULT_CSS = """
    LossCurves { min-height: 8; }
    """

    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        keys = curve_keys(rows)
        plt.title(curve_title(keys))
        plt.xlabel("epoch")
        for key in keys:
            points = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows)
                      if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                plt.plot(list(xs), list(ys), label=key, marker="braille")
        self.refresh()
