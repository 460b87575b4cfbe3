"""What a training run records: ``metrics.jsonl`` (one JSON record per logged step, validation point or event),
``train.log``, TensorBoard scalars, and ``loss_curve.png`` (:mod:`culturemert.train.curves`).

Only the main rank writes; on the other ranks every method is a no-op, so callers never branch on the rank. On
resume the metrics file is cut back to the resumed step (records of steps that are about to be redone go, torn
lines too; a run that starts afresh drops them all), so a resumed run's log equals an uninterrupted run's.

TensorBoard names (stable): ``train/<scalar>`` for every numeric field of a step record (``train/loss``,
``train/pred_loss``, ``train/lr``, ``train/grad_norm``, ...), ``train/culture_loss/<culture>``,
``valid/<culture>/<metric>`` (``loss``, ``pred_loss``, ``acc``, ``ce_<k>``, ``acc_<k>``, ``cqt_mse``) and
``valid/new_mean``, all against the global step.
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

__all__ = ["RunLog"]

_VALID_SCALARS = ("loss", "pred_loss", "acc", "cqt_mse")


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
        # set by the validation monitor: drawn highlighted / used for the best-export mean in the plot
        self.protected: list[str] = []
        self.new: list[str] = []

    def open(self, resumed_step: int) -> None:
        """Start appending; records past ``resumed_step`` are dropped (-1: a fresh start, every record goes)."""
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
        if self._tb is None:
            return
        step = record.get("global_step", 0)
        if "loss" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "global_step":
                    self._tb.add_scalar(f"train/{k}", v, step)
            for culture, v in (record.get("culture_loss") or {}).items():
                self._tb.add_scalar(f"train/culture_loss/{culture}", v, step)
        elif record.get("kind") == "validation":
            for culture, metrics in record["cultures"].items():
                for k, v in metrics.items():
                    if k in _VALID_SCALARS or k.startswith(("ce_", "acc_")):
                        self._tb.add_scalar(f"valid/{culture}/{k}", v, step)
            if record.get("new_mean") is not None and math.isfinite(record["new_mean"]):
                self._tb.add_scalar("valid/new_mean", record["new_mean"], step)

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
        from culturemert.train.curves import plot_run

        return plot_run(self.metrics_path, self.out / "loss_curve.png", self.title, protected=self.protected,
                        new=self.new)
