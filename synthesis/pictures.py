"""Pictures people look at instead of numbers: mel spectrograms, drawn one way everywhere.

Figure + Agg canvas, never pyplot: pyplot keeps global state that concurrent requests and
worker threads would trample.
"""

from __future__ import annotations

import io

import numpy as np


def mel_figure(
    mel: np.ndarray,
    sample_rate: int | None = None,
    hop_length: int | None = None,
    size: tuple[float, float] = (6.0, 2.2),
    axes: bool = True,
):
    """A figure of a [n_mels, frames] log-mel; time in seconds when the rate and hop are given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mel = np.asarray(mel, dtype=np.float32)
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    extent = None
    if sample_rate and hop_length:
        extent = (0.0, mel.shape[1] * hop_length / sample_rate, 0.0, float(mel.shape[0]))
    ax.imshow(
        mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest", extent=extent
    )
    if axes:
        ax.set_xlabel("seconds" if extent else "frame")
        ax.set_ylabel("mel band")
        fig.tight_layout(pad=0.3)
    else:
        ax.set_axis_off()
        fig.subplots_adjust(0, 0, 1, 1)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def rgb_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def mel_png(mel: np.ndarray, **options) -> bytes:
    return png_bytes(mel_figure(mel, **options))
