"""Reports from probe results: the encoder leaderboard, paper-layout tables (Markdown + CSV), layer-wise curves
of all encoders per dataset, the transfer matrix, and what embedding cost per encoder.

Inputs are ``results.json`` files written by ``culturemert probe`` / ``evaluate`` (one per model x dataset).
Every cell is the test metric of the validation-selected configuration, mean ± std over seeds, in percent
(as in the paper). The transfer matrix shows, for each model and dataset, the difference to a named base
model; its spread is sqrt(std_model² + std_base²), the std of a difference of independent seed means' runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from culturemert.files import atomic_write_text
from culturemert.errors import DataError
from culturemert.plotting import pyplot, save_figure

__all__ = ["load_runs", "write_report", "leaderboard", "PAPER_DATASET_ORDER"]

#: Column order of the paper's tables; other datasets follow in order of appearance.
PAPER_DATASET_ORDER = ("makam", "hindustani", "carnatic", "lyra", "fma", "magnatagatune")
_DATASET_TITLES = {
    "makam": "Turkish-makam", "hindustani": "Hindustani", "carnatic": "Carnatic", "lyra": "Lyra",
    "fma": "FMA-medium", "magnatagatune": "MTAT",
}


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Probe results from files or folders (folders are searched recursively for ``results.json``)."""
    runs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("results.json")) if p.is_dir() else [p]
        if not files:
            raise DataError(f"{p}: no results.json found")
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: results file not found")
            try:
                run = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}: not valid JSON ({exc})") from None
            if "summary" not in run or "model" not in run or "dataset" not in run:
                raise DataError(f"{f}: not a probe results file (needs model, dataset, summary)")
            run["_path"] = str(f)
            runs.append(run)
    return runs


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    first = [v for v in preferred if v in seen]
    return first + [v for v in seen if v not in first]


def _cell(run: dict[str, Any] | None, metric: str, split: str = "test") -> tuple[float, float] | None:
    if run is None:
        return None
    stats = run["summary"]["selected"].get(split)
    if not stats:
        return None
    return 100.0 * stats[metric]["mean"], 100.0 * stats[metric]["std"]


def _fmt(cell: tuple[float, float] | None) -> str:
    return "–" if cell is None else f"{cell[0]:.1f} ± {cell[1]:.1f}"


def _table(
    models: list[str], datasets: list[str], index: dict[tuple[str, str], dict[str, Any]], metrics: tuple[str, str], split: str
) -> tuple[list[list[str]], list[list[Any]]]:
    """(markdown rows, csv rows) with one 'a / b' cell per dataset and the plain average of all numbers."""
    md_rows, csv_rows = [], []
    for model in models:
        md, row = [model], [model]
        numbers: list[float] = []
        for ds in datasets:
            cells = [_cell(index.get((model, ds)), m, split) for m in metrics]
            md.append(" / ".join(_fmt(c) for c in cells))
            for c in cells:
                row += [None, None] if c is None else [round(c[0], 4), round(c[1], 4)]
                if c is not None:
                    numbers.append(c[0])
        complete = len(numbers) == len(datasets) * len(metrics)
        avg = sum(numbers) / len(numbers) if complete and numbers else None
        md.append("–" if avg is None else f"{avg:.1f}")
        row.append(None if avg is None else round(avg, 4))
        md_rows.append(md)
        csv_rows.append(row)
    return md_rows, csv_rows


def _selected_layer(run: dict[str, Any]) -> str:
    """The validation-selected layer; for the weighted sum, also the best single layer."""
    summary = run["summary"]
    layer = str(summary["selected"]["layer"])
    if layer == "weighted":
        single = summary.get("best_single_layer")
        return "weighted sum" + (f" (best single: {single['layer']})" if single else "")
    return f"layer {layer}"


def leaderboard(
    runs: list[dict[str, Any]], split: str = "test"
) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """(encoders best first, datasets, cells): encoders ranked by their mean ``split`` ROC-AUC over the datasets
    they all have results on (ties keep the input order); a cell holds ``roc_auc``/``ap`` (mean, std) in percent
    and the selected ``layer``."""
    models = _ordered(r["model"] for r in runs)
    datasets = _ordered((r["dataset"] for r in runs), PAPER_DATASET_ORDER)
    index = {(r["model"], r["dataset"]): r for r in runs}
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for (m, d), run in index.items():
        roc, ap = _cell(run, "roc_auc", split), _cell(run, "ap", split)
        if roc is not None and ap is not None:
            cells[(m, d)] = {"roc_auc": roc, "ap": ap, "layer": _selected_layer(run)}
    common = [d for d in datasets if all((m, d) in cells for m in models)] or datasets

    def score(m: str) -> float:
        values = [cells[(m, d)]["roc_auc"][0] for d in common if (m, d) in cells]
        return sum(values) / len(values) if values else -math.inf

    ranked = sorted(models, key=lambda m: (-score(m), models.index(m)))
    return ranked, datasets, cells


def _mib(n: Any) -> str:
    return "–" if not n else f"{n / 2**20:.0f}"


def _rate(v: Any) -> str:
    return "clip" if v is None else f"{float(v):g}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow(["" if v is None else v for v in r])
    atomic_write_text(path, buf.getvalue())


def _layer_key(layer: str) -> float:
    return math.inf if layer == "weighted" else float(layer)


def _plot_layers(path: Path, dataset: str, runs: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, split in zip(axes, ("valid", "test")):
        for run in runs:
            layers = sorted((k for k in run["summary"]["layers"] if k != "weighted"), key=_layer_key)
            infos = [run["summary"]["layers"][k] for k in layers]
            if not layers or split not in infos[0]:
                continue
            xs = [int(k) for k in layers]
            mean = [100 * i[split]["roc_auc"]["mean"] for i in infos]
            std = [100 * i[split]["roc_auc"]["std"] for i in infos]
            line = ax.plot(xs, mean, marker="o", ms=3, label=run["model"])[0]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
            weighted = run["summary"]["layers"].get("weighted")
            if weighted and split in weighted:
                ax.axhline(100 * weighted[split]["roc_auc"]["mean"], color=line.get_color(), ls="--", lw=1)
        ax.set_title(f"{_DATASET_TITLES.get(dataset, dataset)} — {split} ROC-AUC (best lr per layer)")
        ax.set_xlabel("hidden state index (0 = the encoder's input-side state)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ROC-AUC (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: weighted sum", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _plot_transfer(path: Path, models: list[str], datasets: list[str], delta, spread, metric: str, base: str) -> None:
    plt = pyplot()
    import numpy as np

    values = np.array([[np.nan if d is None else d for d in row] for row in delta], dtype=float)
    finite = values[np.isfinite(values)]
    limit = max(1e-6, float(np.abs(finite).max())) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.6 * len(datasets) + 2.5, 0.7 * len(models) + 1.8))
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(models)):
        for j in range(len(datasets)):
            if delta[i][j] is None:
                ax.text(j, i, "–", ha="center", va="center", fontsize=8)
            else:
                ax.text(j, i, f"{delta[i][j]:+.1f}\n±{spread[i][j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(datasets)), [_DATASET_TITLES.get(d, d) for d in datasets], rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_title(f"Δ test {metric} (points) vs {base}; ± = seed spread")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_report(
    runs: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    base: str | None = None,
    transfer_metrics: Sequence[str] = ("roc_auc", "ap"),
) -> dict[str, Path]:
    """Write report.md, roc_auc_ap.csv, f1.csv, layers.csv, layers_<dataset>.png, transfer.csv and
    transfer_<metric>.png into ``out_dir``; returns the written paths by name."""
    if not runs:
        raise DataError("no probe results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = _ordered(r["model"] for r in runs)
    datasets = _ordered((r["dataset"] for r in runs), PAPER_DATASET_ORDER)
    index = {(r["model"], r["dataset"]): r for r in runs}  # a later run of the same pair wins
    written: dict[str, Path] = {}
    titles = [_DATASET_TITLES.get(d, d) for d in datasets]
    split = "test" if all("test" in r["summary"]["selected"] for r in runs) else "valid"

    # leaderboard: datasets x encoders, best encoder first
    ranked, _, cells = leaderboard(runs, split)
    lb_md_rows, lb_csv_rows = [], []
    for ds, title in zip(datasets, titles):
        md_row, csv_row = [title], [ds]
        for m in ranked:
            c = cells.get((m, ds))
            md_row.append("–" if c is None else f"{_fmt(c['roc_auc'])} / {_fmt(c['ap'])} ({c['layer']})")
            csv_row += [None] * 5 if c is None else [round(c["roc_auc"][0], 4), round(c["roc_auc"][1], 4),
                                                      round(c["ap"][0], 4), round(c["ap"][1], 4), c["layer"]]
        lb_md_rows.append(md_row)
        lb_csv_rows.append(csv_row)
    means = []
    for m in ranked:
        values = [cells[(m, d)]["roc_auc"][0] for d in datasets if (m, d) in cells]
        means.append(sum(values) / len(values) if len(values) == len(datasets) else None)
    lb_md_rows.append(["**mean ROC-AUC**"] + ["–" if v is None else f"**{v:.1f}**" for v in means])
    lb_md_rows.append(["**rank**"] + [str(i + 1) for i in range(len(ranked))])
    lb_header = ["dataset"] + ranked
    leaderboard_md = _markdown(lb_header, lb_md_rows)
    atomic_write_text(out / "leaderboard.md", f"# Leaderboard ({split} split)\n\nCells: ROC-AUC / AP in %, mean ± std "
                      "over probe seeds, of the validation-selected configuration (its layer in brackets); encoders "
                      "ranked by mean ROC-AUC.\n\n" + leaderboard_md + "\n")
    written["leaderboard.md"] = out / "leaderboard.md"
    _write_csv(out / "leaderboard.csv", ["dataset"] + [f"{m}_{k}" for m in ranked for k in
                                                       ("roc_auc_mean", "roc_auc_std", "ap_mean", "ap_std", "layer")],
               lb_csv_rows)
    written["leaderboard.csv"] = out / "leaderboard.csv"

    # encoders and what embedding them cost: per (encoder, dataset) in the CSV; per encoder in the report, summed
    # over its datasets (a track shared by two datasets is computed once, under the first)
    encoder_lines, cost_rows, cost_md = [], [], []
    for m in ranked:
        first = next(r for r in runs if r["model"] == m)
        enc = first.get("encoder") or {}
        if enc:
            params = enc.get("num_parameters")
            encoder_lines.append(
                f"- {m}: {enc.get('family')} from `{first.get('model_source', m)}`, {enc.get('sample_rate')} Hz input, "
                f"{_rate(enc.get('frame_rate'))} frames/s, {enc.get('num_hidden_states')} hidden states x "
                f"{enc.get('dim')}" + (f", {params / 1e6:.2f} M parameters" if params else "")
                + f", remote code: {'**yes** (--trust-remote-code)' if enc.get('trust_remote_code') else 'no'}"
            )
        total: dict[str, Any] = {"computed": 0, "audio_seconds": 0.0, "seconds": 0.0, "peak": 0, "kind": "",
                                 "from_cache": True, "any": False}
        for ds in datasets:
            run = index.get((m, ds))
            emb = (run or {}).get("embedding")
            if not emb:
                continue
            rtf = emb.get("real_time_factor")
            cost_rows.append([m, ds, enc.get("family"), enc.get("sample_rate"), enc.get("frame_rate"),
                              enc.get("num_hidden_states"), bool(enc.get("trust_remote_code")), emb.get("computed"),
                              emb.get("cached"), emb.get("audio_seconds"), emb.get("seconds"), emb.get("forward_seconds"),
                              rtf, emb.get("peak_memory_bytes"), emb.get("memory_kind"), enc.get("device"),
                              emb.get("world_size"), bool(emb.get("from_cache"))])
            total["any"] = True
            total["computed"] += int(emb.get("computed") or 0)
            total["audio_seconds"] += float(emb.get("audio_seconds") or 0.0)
            total["seconds"] += float(emb.get("seconds") or 0.0)
            total["peak"] = max(total["peak"], int(emb.get("peak_memory_bytes") or 0))
            total["kind"] = emb.get("memory_kind") or total["kind"]
            total["from_cache"] = total["from_cache"] and bool(emb.get("from_cache"))
        if total["any"]:
            rtf = total["seconds"] / total["audio_seconds"] if total["audio_seconds"] > 0 else None
            cost_md.append([m, str(enc.get("device", "")), str(total["computed"]), f"{total['audio_seconds']:.0f}",
                            f"{total['seconds']:.1f}", "–" if rtf is None else f"{rtf:.4f}",
                            "–" if rtf is None else f"{1 / rtf:.0f}", _mib(total["peak"]), str(total["kind"]),
                            "yes" if total["from_cache"] else "no"])
    if cost_rows:
        _write_csv(out / "embedding.csv", ["model", "dataset", "family", "sample_rate", "frame_rate", "hidden_states",
                                           "trust_remote_code", "tracks_computed", "tracks_cached", "audio_seconds",
                                           "wall_seconds", "forward_seconds", "real_time_factor", "peak_memory_bytes",
                                           "memory_kind", "device", "world_size", "stats_from_cache"], cost_rows)
        written["embedding.csv"] = out / "embedding.csv"

    md_main, csv_main = _table(models, datasets, index, ("roc_auc", "ap"), split)
    header_csv = ["model"] + [f"{d}_{m}_{s}" for d in datasets for m in ("roc_auc", "ap") for s in ("mean", "std")] + ["avg"]
    _write_csv(out / "roc_auc_ap.csv", header_csv, csv_main)
    written["roc_auc_ap.csv"] = out / "roc_auc_ap.csv"
    md_f1, csv_f1 = _table(models, datasets, index, ("micro_f1", "macro_f1"), split)
    header_f1 = ["model"] + [f"{d}_{m}_{s}" for d in datasets for m in ("micro_f1", "macro_f1") for s in ("mean", "std")] + ["avg"]
    _write_csv(out / "f1.csv", header_f1, csv_f1)
    written["f1.csv"] = out / "f1.csv"

    # layer-wise curves
    layer_rows = []
    for ds in datasets:
        ds_runs = [index[(m, ds)] for m in models if (m, ds) in index]
        for run in ds_runs:
            for layer, info in sorted(run["summary"]["layers"].items(), key=lambda kv: _layer_key(kv[0])):
                row = [run["model"], ds, layer, info["lr"]]
                for sp in ("valid", "test"):
                    for m in ("roc_auc", "ap"):
                        stats = info.get(sp, {}).get(m)
                        row += [None, None] if stats is None else [stats["mean"], stats["std"]]
                layer_rows.append(row)
        png = out / f"layers_{ds}.png"
        _plot_layers(png, ds, ds_runs)
        written[png.name] = png
    _write_csv(out / "layers.csv", ["model", "dataset", "layer", "lr", "valid_roc_auc_mean", "valid_roc_auc_std",
                                    "valid_ap_mean", "valid_ap_std", "test_roc_auc_mean", "test_roc_auc_std",
                                    "test_ap_mean", "test_ap_std"], layer_rows)
    written["layers.csv"] = out / "layers.csv"

    # transfer matrix vs base
    base = base or models[0]
    if base not in models:
        raise DataError(f"base model {base!r} has no results (models: {', '.join(models)})")
    transfer_rows = []
    transfer_md = []
    for metric in transfer_metrics:
        delta, spread = [], []
        for m in models:
            drow, srow = [], []
            for ds in datasets:
                a, b = _cell(index.get((m, ds)), metric, split), _cell(index.get((base, ds)), metric, split)
                if a is None or b is None:
                    drow.append(None)
                    srow.append(None)
                    continue
                drow.append(a[0] - b[0])
                srow.append(math.sqrt(a[1] ** 2 + b[1] ** 2))
                transfer_rows.append([m, ds, metric, base, round(a[0] - b[0], 4), round(srow[-1], 4)])
            delta.append(drow)
            spread.append(srow)
        png = out / f"transfer_{metric}.png"
        _plot_transfer(png, models, datasets, delta, spread, metric, base)
        written[png.name] = png
        rows = [[m] + ["–" if d is None else f"{d:+.1f} ± {s:.1f}" for d, s in zip(dr, sr)] for m, dr, sr in zip(models, delta, spread)]
        transfer_md.append(f"### Δ {metric} vs {base}\n\n" + _markdown(["model"] + titles, rows) + f"\n\n![]({png.name})\n")
    _write_csv(out / "transfer.csv", ["model", "dataset", "metric", "base", "delta", "spread"], transfer_rows)
    written["transfer.csv"] = out / "transfer.csv"

    excluded_lines = []
    for r in runs:
        for sp, tags in r.get("excluded_tags", {}).items():
            if tags:
                excluded_lines.append(f"- {r['model']} / {r['dataset']} / {sp}: {', '.join(tags)}")
    def _protocol(run: dict[str, Any]) -> str:  # results written before protocols were named ran window batching
        return str(run.get("protocol", "marble-windows (unrecorded)"))

    def _selection_note(run: dict[str, Any]) -> str:
        fallback = run.get("protocol_details", {}).get("selection_fallback")
        return f"; selected on validation loss (fallback: {fallback})" if fallback else ""

    selected_lines = [
        f"- {r['model']} / {r['dataset']}: layer {r['summary']['selected']['layer']}, lr {r['summary']['selected']['lr']:g}"
        f" (protocol {_protocol(r)}{_selection_note(r)})"
        for r in runs
    ]
    protocols = _ordered(_protocol(r) for r in runs)
    protocol_line = f"Protocol: {', '.join(protocols)} (docs/evaluation.md)."
    if len(protocols) > 1:
        protocol_line += " **Runs of different protocols are mixed in these tables: their numbers are not comparable.**"
    text = [
        "# Probe results",
        "",
        protocol_line,
        "",
        f"Cells: {split} metric (%) of the validation-selected layer and learning rate, mean ± std over seeds. "
        "Avg. = plain mean of all numbers in the row (as in the paper).",
        "",
        "## Leaderboard (datasets x encoders, best first)",
        "",
        "ROC-AUC / AP (selected layer); encoders ranked by mean ROC-AUC.",
        "",
        leaderboard_md,
        "",
        "## Encoders",
        "",
        *(encoder_lines or ["- (no encoder information in these results)"]),
        "",
        "## Embedding cost",
        "",
        "Per encoder, summed over the datasets (per dataset: embedding.csv). Wall time and peak memory of the run "
        "that computed the features (`from cache`: the numbers are those of that earlier run; this run did no "
        "model forward). RTF = wall seconds per second of audio (lower is faster). Memory: CUDA peak allocation "
        "on a GPU, else the process's peak resident set during embedding (imports included).",
        "",
        _markdown(["encoder", "device", "tracks computed", "audio s", "wall s", "RTF", "x real time", "peak MiB",
                   "memory", "from cache"], cost_md) if cost_md else "- (no embedding statistics in these results)",
        "",
        "## ROC-AUC / AP",
        "",
        _markdown(["model"] + titles + ["Avg."], md_main),
        "",
        "## micro-F1 / macro-F1 (threshold 0.5; macro-F1 over every tag, as scikit-learn)",
        "",
        _markdown(["model"] + titles + ["Avg."], md_f1),
        "",
        "## Cross-cultural transfer",
        "",
        *transfer_md,
        "## Layer-wise curves (all encoders per dataset)",
        "",
        *[f"![]({f'layers_{ds}.png'})" for ds in datasets],
        "",
        "## Selected configurations (validation)",
        "",
        *selected_lines,
        "",
        "## Tags excluded from macro ROC-AUC and AP (no positive or no negative example in the split)",
        "",
        *(excluded_lines or ["- none"]),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(text))
    written["report.md"] = out / "report.md"
    return written
