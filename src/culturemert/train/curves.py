"""The figure of a training run, ``loss_curve.png``: the curves people read while a run trains and after.

Three panels over the global step, stage boundaries marked on each:

(a) training loss per culture (masked prediction + CQT of the clips of that culture in each mixed batch): the raw
    per-step series faint, an exponential moving average bold (raw losses of a CPU-sized batch swing by a factor
    of two from step to step); the mixed total when the log has no per-culture values;
(b) validation loss per culture at each validation point, protected cultures (the forgetting alarm's) drawn thick
    with their tolerance limit dashed, alarms as red triangles, the mean over the new traditions (what selects
    ``exports/best``) dotted with the best point starred;
(c) the learning rate on its own axis (re-warming and re-decay per stage are visible there).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from culturemert.files import read_jsonl

__all__ = ["ema", "ema_alpha", "plot_run", "read_run"]


def ema_alpha(n: int) -> float:
    """Smoothing factor for ``n`` points: ``1 - 1/w`` with a window ``w = n / 20`` clipped to [1, 200] (1: none)."""
    window = min(max(n / 20.0, 1.0), 200.0)
    return 1.0 - 1.0 / window


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing):
    ``s_t = alpha * s_{t-1} + (1 - alpha) * x_t`` from ``s_{-1} = 0``, reported as ``s_t / (1 - alpha^(t+1))``."""
    out, s, weight = [], 0.0, 0.0
    for x in values:
        s = alpha * s + (1.0 - alpha) * x
        weight = alpha * weight + (1.0 - alpha)
        out.append(s / weight)
    return out


def read_run(metrics_path: str | Path) -> dict[str, Any]:
    """The series of a run's ``metrics.jsonl``: per-culture training loss, validation points, LR, stages, events."""
    train: dict[str, tuple[list[int], list[float]]] = {}
    total: tuple[list[int], list[float]] = ([], [])
    lr: tuple[list[int], list[float]] = ([], [])
    valid: list[dict[str, Any]] = []
    stages: dict[str, int] = {}
    skipped: list[int] = []
    alarms: list[dict[str, Any]] = []
    for rec in read_jsonl(metrics_path):
        step = rec.get("global_step")
        if rec.get("kind") == "validation":
            valid.append(rec)
            stages.setdefault(rec.get("stage", "?"), step)
            continue
        if rec.get("event") == "forgetting":
            alarms.append(rec)
            continue
        if "loss" not in rec:
            continue
        # a step record's global_step counts the step just taken: the stage started one step earlier
        stages.setdefault(rec.get("stage", "?"), step - 1)
        if rec.get("skipped"):
            skipped.append(step)
            continue
        if rec.get("lr") is not None:
            lr[0].append(step)
            lr[1].append(rec["lr"])
        if rec["loss"] is not None and math.isfinite(rec["loss"]):
            total[0].append(step)
            total[1].append(rec["loss"])
        for culture, value in (rec.get("culture_loss") or {}).items():
            if value is not None and math.isfinite(value):
                xs, ys = train.setdefault(culture, ([], []))
                xs.append(step)
                ys.append(value)
    return {"train": train, "total": total, "lr": lr, "valid": valid, "stages": stages, "skipped": skipped,
            "alarms": alarms}


def plot_run(
    metrics_path: str | Path,
    target: str | Path,
    title: str,
    *,
    protected: Sequence[str] = (),
    new: Sequence[str] = (),
) -> Path | None:
    """Draw ``target`` from ``metrics_path`` (see the module docstring). None when no step has been logged yet."""
    from culturemert.plotting import pyplot, save_figure

    run = read_run(metrics_path)
    if not run["total"][0]:
        return None
    plt = pyplot()
    fig, (ax_t, ax_v, ax_lr) = plt.subplots(
        3, 1, figsize=(9, 9), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.3]}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    valid_cultures = sorted({c for rec in run["valid"] for c in rec["cultures"]})
    cultures = sorted(set(run["train"]) | set(valid_cultures))
    color = {c: colors[i % len(colors)] for i, c in enumerate(cultures)}

    # (a) training loss per culture
    series = run["train"] or {"all (mixed)": run["total"]}
    for culture, (xs, ys) in sorted(series.items()):
        c = color.get(culture, "black")
        ax_t.plot(xs, ys, color=c, lw=0.6, alpha=0.22)
        ax_t.plot(xs, ema(ys, ema_alpha(len(ys))), color=c, lw=1.6,
                  label=f"{culture}{' (protected)' if culture in protected else ''}")
    if run["skipped"]:
        low = min(min(ys) for _, ys in series.values() if ys)
        ax_t.plot(run["skipped"], [low] * len(run["skipped"]), "rx", ms=4, label="skipped step")
    ax_t.set_ylabel("training loss\n(nats / masked frame)")
    ax_t.set_title(f"{title}: training loss per culture (EMA, raw faint)", fontsize=10)
    ax_t.legend(fontsize=7, ncol=2)

    # (b) validation loss per culture
    starts = list(run["stages"].items())
    last_step = max([run["total"][0][-1], *(r["global_step"] for r in run["valid"])])
    spans = {name: (start, starts[i + 1][1] if i + 1 < len(starts) else last_step)
             for i, (name, start) in enumerate(starts)}
    if run["valid"]:
        metric = run["valid"][-1].get("metric", "loss")
        for culture in valid_cultures:
            pts = [(r["global_step"], r["cultures"][culture][metric]) for r in run["valid"] if culture in r["cultures"]]
            is_protected = culture in protected
            ax_v.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color[culture],
                      lw=2.8 if is_protected else 1.2, ms=4 if is_protected else 3,
                      label=f"{culture} (protected)" if is_protected else culture)
            # each stage's limit (its start value + tolerance) as a segment over that stage
            drawn = False
            for stage, (lo, hi) in spans.items():
                limits = [r["limits"][culture] for r in run["valid"]
                          if r.get("stage") == stage and culture in r.get("limits", {})]
                if limits:
                    ax_v.hlines(limits[-1], lo, hi, color=color[culture], ls="--", lw=0.9,
                                label=None if drawn else f"{culture} tolerance limit")
                    drawn = True
        means = [(r["global_step"], r["new_mean"]) for r in run["valid"]
                 if r.get("new_mean") is not None and math.isfinite(r["new_mean"])]
        if means:
            ax_v.plot([m[0] for m in means], [m[1] for m in means], ":", color="black", lw=1.2,
                      label=f"mean of new ({', '.join(new)})" if new else "mean of new traditions")
            best = min(means, key=lambda m: m[1])
            ax_v.plot([best[0]], [best[1]], "*", color="gold", mec="black", ms=13, label="best (exports/best)")
        for alarm in run["alarms"]:
            ax_v.plot([alarm["global_step"]], [alarm["value"]], "v", color="red", ms=9)
        if run["alarms"]:
            ax_v.plot([], [], "v", color="red", ms=9, label="forgetting alarm")
        ax_v.set_ylabel(f"validation {metric}\n(held-out crops)")
        ax_v.legend(fontsize=7, ncol=2)
    else:
        ax_v.text(0.5, 0.5, "no validation points (see train.log)", ha="center", va="center",
                  transform=ax_v.transAxes, color="grey")
    ax_v.set_title("validation loss per culture (same crops and masks at every point)", fontsize=10)

    # (c) learning rate
    ax_lr.plot(run["lr"][0], run["lr"][1], color="tab:purple", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("global step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    for name, step in run["stages"].items():
        for ax in (ax_t, ax_v, ax_lr):
            ax.axvline(step, color="grey", ls="--", lw=0.7)
        ax_t.text(step, 1.0, f" {name}", transform=ax_t.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    fig.tight_layout()
    return save_figure(fig, target)
