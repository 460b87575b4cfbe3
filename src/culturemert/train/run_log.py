"""What a training run records: ``metrics.jsonl`` (one JSON record per logged step or event), ``train.log``,
TensorBoard scalars, and ``loss_curve.png``.

Only the main rank writes; on the other ranks every method is a no-op, so callers never branch on the rank. On
resume the metrics file is cut back to the resumed step (records of steps that are about to be redone go, torn
lines too), so a resumed run's log equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from culturemert.errors import ConfigError
from culturemert.files import atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

__all__ = ["RunLog", "plot_loss_curve"]


class RunLog:
    """The logs of one run in ``out_dir``; call :meth:`open` once the resumed step is known, :meth:`close` at the end.

    Raises:
        ConfigError: ``tensorboard="on"`` without the tensorboard package.
    """

    def __init__(self, out_dir: Path, *, is_main: bool, tensorboard: Literal["auto", "on", "off"], title: str) -> None:
        self.out = Path(out_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.is_main = is_main
        self.tensorboard = tensorboard
        self.title = title
        self._metrics: Any = None
        self._handler: logging.Handler | None = None
        self._tb: Any = None

    def open(self, resumed_step: int) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():  # drop records past the resumed step (and a torn last line)
            keep = [
                r for r in read_jsonl(self.metrics_path)
                if r.get("global_step", -1) <= resumed_step or r.get("event") == "resume"
            ]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        handler = logging.FileHandler(self.out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("culturemert").addHandler(handler)
        self._handler = handler
        if self.tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed
                if self.tensorboard == "on":
                    raise ConfigError("runtime.tensorboard: on, but the tensorboard package is not installed") from None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a step's scalars, or an event); numeric fields of step records go to TensorBoard."""
        if not self.is_main or self._metrics is None:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None and "loss" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "global_step":
                    self._tb.add_scalar(f"train/{k}", v, record["global_step"])

    def event(self, kind: str, message: str, global_step: int, **fields: Any) -> None:
        """Log ``message`` (warning unless ``kind == "info"``) and record it as ``{"event": kind, ...}``."""
        (log.info if kind == "info" else log.warning)("%s", message)
        self.write({"event": kind, "message": message, "global_step": global_step, **fields})

    def close(self) -> None:
        if not self.is_main:
            return
        if self._metrics is not None:
            with contextlib.suppress(Exception):
                self._metrics.close()
            self._metrics = None
        if self._handler is not None:
            logging.getLogger("culturemert").removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot(self) -> Path | None:
        """``loss_curve.png`` from ``metrics.jsonl``; None on other ranks or before the first logged step."""
        if not self.is_main:
            return None
        return plot_loss_curve(self.metrics_path, self.out / "loss_curve.png", self.title)


def plot_loss_curve(metrics_path: Path, target: Path, title: str) -> Path | None:
    """Total and masked-prediction loss per optimizer step, stage boundaries and skipped steps marked.

    Returns ``target``, or None when the log holds no finite loss yet.
    """
    from culturemert.plotting import pyplot, save_figure

    steps, loss, pred, skipped = [], [], [], []
    boundaries: dict[str, int] = {}
    for rec in read_jsonl(metrics_path):
        if "loss" not in rec:
            continue
        boundaries.setdefault(rec.get("stage", "?"), rec["global_step"])
        if rec.get("skipped"):
            skipped.append(rec["global_step"])
        if rec["loss"] is not None and math.isfinite(rec["loss"]):
            steps.append(rec["global_step"])
            loss.append(rec["loss"])
            pred.append(rec.get("pred_loss", float("nan")))
    if not steps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, loss, lw=0.8, label="total loss")
    ax.plot(steps, pred, lw=0.8, label="masked prediction (sum over codebooks)")
    for name, s in boundaries.items():
        ax.axvline(s, color="grey", ls="--", lw=0.6)
        ax.text(s, ax.get_ylim()[1], f" {name}", va="top", fontsize=7, color="grey")
    if skipped:
        ax.plot(skipped, [min(loss)] * len(skipped), "rx", ms=4, label="skipped step")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per masked frame)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, target)
