"""The figures: PNGs next to the pages (when matplotlib is installed) and in TensorBoard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_pyplot() -> Any:
    """matplotlib.pyplot on a file-only backend, or None when the `report` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Figures:
    """Names each figure on its page whether or not it can be drawn (the pages never depend on matplotlib);
    with matplotlib, saves it as a PNG next to the pages and logs it to TensorBoard."""

    def __init__(self, out: Path, plt: Any, tensorboard: Path | None):
        self.out, self.plt, self.written = out, plt, []
        self.tensorboard = None
        if plt is not None and tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            # The figures are redrawn whole: drop older event files, whose same-tag figures TensorBoard would mix in.
            for stale in tensorboard.glob("events.out.tfevents.*"):
                stale.unlink()
            self.tensorboard = SummaryWriter(str(tensorboard))

    def add(self, name: str, draw: Callable[[Any], Any], caption: str) -> list[str]:
        """Draw `name`.png with `draw(plt)` when matplotlib is there; the Markdown that shows it either way."""
        if self.plt is not None:
            fig = draw(self.plt)
            path = self.out / f"{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
            self.written.append(path)
            if self.tensorboard is not None:
                self.tensorboard.add_figure(f"report/{name}", fig, global_step=0, close=False)
            self.plt.close(fig)
        return [f"![{caption}]({name}.png)", "", f"{caption}.", ""]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
