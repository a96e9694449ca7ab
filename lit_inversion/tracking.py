"""Logging helpers that work for any Lightning logger (per-target series use their own step)."""

from __future__ import annotations

import lightning as L


def log_scalars(module: L.LightningModule, metrics: dict[str, float], step: int) -> None:
    for logger in module.loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_text(module: L.LightningModule, tag: str, text: str, step: int) -> None:
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, step)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (TensorBoard's text tab renders it); cell text cannot break the layout."""
    def cell(text: str) -> str:
        return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
