"""Building the corpus: choosing and parsing pieces, rendering them in worker processes, splits, and the
CSV/JSON outputs; resumable (finished audio files are kept when the settings are unchanged)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any


from culturemert.config import StrictModel
from culturemert.errors import DataError
from culturemert.corpus.config import (
    MIN_NOTES,
    PARSER_VERSION,
    RENDER_VERSION,
    CorpusConfig,
    CorpusSettingsChanged,
    SplitFractions,
    piece_rng,
)
from culturemert.corpus.parse import ParsedPiece, dedupe_key, mode_tag, parse_task
from culturemert.corpus.render import (
    AdditiveRenderer,
    FluidSynthRenderer,
    audio_complete,
    encode_audio,
    make_renderer,
    piece_render_params,
    render_piece_audio,
    renderer_identity,
    resolve_renderer,
)
from culturemert.files import atomic_write_bytes, atomic_write_text, json_text
from culturemert.workers import ProcessMap
from culturemert.corpus.sources import PRIMARY_TAG, SOURCE_DESCRIPTIONS, SourcePiece, scan_sources

log = logging.getLogger(__name__)


_WORKER: dict[str, Any] = {}


def _worker_init(config_json: str) -> None:
    config = CorpusConfig.model_validate_json(config_json)
    _WORKER["config"] = config
    _WORKER["renderer"] = None


def _worker_renderer() -> FluidSynthRenderer | AdditiveRenderer:
    if _WORKER.get("renderer") is None:
        _WORKER["renderer"] = make_renderer(_WORKER["config"])
    return _WORKER["renderer"]


def _render_task(task: tuple[str, dict[str, Any], str]) -> tuple[str, str | None, str]:
    """Render one piece to ``path``; returns (piece id, error or None, synthesiser name)."""
    piece_id, parsed_json, path = task
    config: CorpusConfig = _WORKER["config"]
    try:
        renderer = _worker_renderer()
        parsed = ParsedPiece.from_json(parsed_json)
        params = piece_render_params(config, piece_id)
        samples = render_piece_audio(renderer, parsed, params, config)
        atomic_write_bytes(Path(path), encode_audio(samples, config.sample_rate, config.audio_format))
        return piece_id, None, renderer.name
    except Exception as exc:  # noqa: BLE001 - reported per piece
        return piece_id, f"{type(exc).__name__}: {exc}", ""


# ----------------------------------------------------------------------------------------------------------------
# building


class CorpusSummary(StrictModel):
    """What ``build_corpus`` produced."""

    out_dir: Path
    csv_path: Path
    json_path: Path
    n_pieces: int
    pieces_per_culture: dict[str, int]
    pieces_per_split: dict[str, dict[str, int]]
    rendered: int
    resumed: int
    parse_failures: int
    render_failures: int
    synthesizer: str
    soundfont: str | None
    parse_s: float  # scanning the sources + parsing the chosen tunes (0 parse time when cached)
    render_s: float
    elapsed_s: float


def assign_splits(piece_ids_by_culture: dict[str, list[str]], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Piece-level split per culture: a seeded permutation of the sorted ids, cut at the fractions."""
    out: dict[str, str] = {}
    for culture in sorted(piece_ids_by_culture):
        ids = sorted(piece_ids_by_culture[culture])
        order = piece_rng("split", seed, culture).permutation(len(ids))
        n_train = int(round(fractions.train * len(ids)))
        n_valid = int(round(fractions.valid * len(ids)))
        n_valid = min(n_valid, len(ids) - n_train)
        for rank, index in enumerate(order):
            out[ids[index]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return out


def _candidate_order(culture: str, pieces: list[SourcePiece], seed: int) -> list[SourcePiece]:
    """Seeded shuffle, pieces carrying the culture's primary tag (e.g. an Irish tune type) first."""
    order = piece_rng("select", seed, culture).permutation(len(pieces))
    shuffled = [pieces[i] for i in order]
    prefix = PRIMARY_TAG.get(culture)
    if prefix is None:
        return shuffled
    return sorted(shuffled, key=lambda p: 0 if any(t.startswith(prefix) for t in p.tags) else 1)


def _notes_cache_key(piece: SourcePiece) -> str:
    import music21

    parser = f"v{PARSER_VERSION}-" + (f"music21-{music21.__version__}" if piece.kind == "abc" else "symbtr")
    return hashlib.sha256(f"{parser}\x1f{piece.kind}\x1f{piece.text}".encode()).hexdigest()[:24]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recorded_sizes(pieces_csv: Path) -> dict[str, int]:
    """path -> byte size of the audio as the previous build wrote it (empty when there is no pieces.csv)."""
    try:
        with pieces_csv.open(newline="", encoding="utf-8") as fh:
            return {row["path"]: int(row["bytes"]) for row in csv.DictReader(fh) if row.get("bytes")}
    except (OSError, KeyError, ValueError):
        return {}


def _fingerprint(config: CorpusConfig) -> dict[str, Any]:
    """Settings that the bytes of a piece's audio depend on. A different fingerprint makes resume unsafe."""
    fields = config.model_dump(
        mode="json",
        include={"duration_s", "sample_rate", "seed", "instrument_programs", "tempo_bpm", "symbtr_time_scale",
                 "velocity", "transpose_semitones", "loop_gap_s", "fade_out_s", "target_rms_dbfs", "polyphony",
                 "audio_format"},
    )
    return {"render_version": RENDER_VERSION, **fields, **renderer_identity(config)}


def _select_and_parse(
    config: CorpusConfig,
    sources: dict[str, list[SourcePiece]],
    cache_path: Path,
    runner: ProcessMap,
) -> tuple[dict[str, list[tuple[SourcePiece, ParsedPiece]]], int]:
    """Parse candidates in seeded order until each culture has its quota of distinct pieces."""
    cache: dict[str, Any] = _load_json(cache_path) or {}
    cache_dirty = False
    chosen: dict[str, list[tuple[SourcePiece, ParsedPiece]]] = {c: [] for c in sources}
    seen_keys: dict[str, set[tuple[float, ...]]] = {c: set() for c in sources}
    queues = {c: _candidate_order(c, pieces, config.seed) for c, pieces in sources.items()}
    cursor = {c: 0 for c in sources}
    failures = 0
    while True:
        batch: list[SourcePiece] = []
        for culture, queue in queues.items():
            missing = config.count_for(culture) - len(chosen[culture])
            if missing <= 0 or cursor[culture] >= len(queue):
                continue
            take = int(math.ceil(missing * 1.05)) + 4  # margin for duplicates and parse failures
            batch.extend(queue[cursor[culture] : cursor[culture] + take])
            cursor[culture] += take
        if not batch:
            break
        keys = {p.piece_id: _notes_cache_key(p) for p in batch}
        todo = [(p.piece_id, p.kind, p.text) for p in batch if keys[p.piece_id] not in cache]
        for piece_id, parsed_json, error in runner.map(parse_task, todo, "parse"):
            cache[keys[piece_id]] = {"parsed": parsed_json, "error": error}
            cache_dirty = True
        # accept in candidate order (not completion order) so the selection is deterministic
        for piece in batch:
            entry = cache[keys[piece.piece_id]]
            if entry["parsed"] is None:
                failures += 1
                log.debug("parse failed for %s (%s): %s", piece.piece_id, piece.source, entry["error"])
                continue
            parsed = ParsedPiece.from_json(entry["parsed"])
            if len(parsed.notes) < MIN_NOTES:
                continue
            key = dedupe_key(parsed)
            if key in seen_keys[piece.culture] or len(chosen[piece.culture]) >= config.count_for(piece.culture):
                continue
            seen_keys[piece.culture].add(key)
            chosen[piece.culture].append((piece, parsed))
    if cache_dirty:
        atomic_write_text(cache_path, json.dumps(cache, separators=(",", ":")) + "\n")
    for culture, items in chosen.items():
        wanted = config.count_for(culture)
        if len(items) < wanted:
            log.warning("%s: only %d distinct pieces available (asked for %d)", culture, len(items), wanted)
    return chosen, failures


def _piece_tags(culture: str, piece: SourcePiece, parsed: ParsedPiece) -> list[str]:
    tags = [f"culture--{culture}", *piece.tags]
    mode = mode_tag(culture, parsed)
    if mode:
        tags.append(mode)
    if parsed.meter:
        tags.append(f"meter--{parsed.meter}")
    return list(dict.fromkeys(tags))


def build_corpus(config: CorpusConfig, out_dir: str | os.PathLike, progress: bool = True,
                 overwrite: bool = False) -> CorpusSummary:
    """Build (or resume) the corpus in ``out_dir``; returns counts and where the CSV/JSON are.

    Resumes when ``out_dir`` holds a build with the same rendering fingerprint: pieces whose audio file is
    complete are not rendered again. A different fingerprint raises :class:`DataError` unless ``overwrite``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requested = config
    config = resolve_renderer(config)
    fingerprint = _fingerprint(config)
    build_marker = out / ".corpus-build.json"
    previous = _load_json(build_marker)
    if previous is not None and previous != fingerprint and not overwrite:
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        raise CorpusSettingsChanged(f"{out} holds a corpus rendered with different settings ({', '.join(changed)}); "
                                    "use another --out directory or --overwrite")
    if previous != fingerprint:
        if previous is not None:
            for stale in (out / "audio").rglob("*") if (out / "audio").is_dir() else []:
                if stale.is_file():
                    stale.unlink()
        atomic_write_text(build_marker, json_text(fingerprint))

    with ProcessMap(config.workers, initializer=_worker_init, initargs=(config.model_dump_json(),), unit="piece",
                    progress=progress) as runner:
        return _build(config, requested, out, fingerprint, runner, started)


def _build(config: CorpusConfig, requested: CorpusConfig, out: Path, fingerprint: dict[str, Any],
           runner: ProcessMap, started: float) -> CorpusSummary:
    sources = scan_sources(config)
    log.info("candidates: %s", ", ".join(f"{c} {len(p)}" for c, p in sources.items()))
    chosen, parse_failures = _select_and_parse(config, sources, out / ".notes-cache.json", runner)
    parsed_at = time.perf_counter()
    log.info("scanned and parsed in %.1f s (%d parse failures)", parsed_at - started, parse_failures)

    ids_by_culture = {c: [p.piece_id for p, _ in items] for c, items in chosen.items()}
    splits = assign_splits(ids_by_culture, config.splits, config.seed)
    expected_frames = int(round(config.duration_s * config.sample_rate))
    ext = config.audio_format
    recorded_bytes = _recorded_sizes(out / "pieces.csv")
    rows: list[dict[str, Any]] = []
    tasks: list[tuple[str, dict[str, Any], str]] = []
    resumed = 0
    for culture in sorted(chosen):
        for piece, parsed in sorted(chosen[culture], key=lambda item: item[0].piece_id):
            rel = Path("audio") / culture / f"{piece.piece_id}.{ext}"
            params = piece_render_params(config, piece.piece_id)
            rows.append({"piece": piece, "parsed": parsed, "rel": rel.as_posix(), "params": params,
                         "split": splits[piece.piece_id], "tags": _piece_tags(culture, piece, parsed)})
            if audio_complete(out / rel, expected_frames, config.sample_rate, recorded_bytes.get(rel.as_posix())):
                resumed += 1
            else:
                tasks.append((piece.piece_id, parsed.to_json(), str(out / rel)))

    failed: dict[str, str] = {}
    synth_names: Counter[str] = Counter()
    for piece_id, error, synth_name in runner.map(_render_task, tasks, "render"):
        if error:
            failed[piece_id] = error
            log.warning("render failed for %s: %s", piece_id, error)
        else:
            synth_names[synth_name] += 1
    rows = [r for r in rows if r["piece"].piece_id not in failed]
    rendered_at = time.perf_counter()
    log.info("rendered %d pieces in %.1f s with %s", len(tasks) - len(failed), rendered_at - parsed_at,
             config.synthesizer)

    # corpus.csv: usable as a prepare manifest (path, culture, split) and as an evaluation CSV (path, split, tags)
    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(["path", "culture", "split", "tags"])
    for r in rows:
        writer.writerow([r["rel"], r["piece"].culture, r["split"], "|".join(r["tags"])])
    csv_path = out / "corpus.csv"
    atomic_write_text(csv_path, csv_buffer.getvalue())

    detail = io.StringIO()
    writer = csv.writer(detail, lineterminator="\n")
    writer.writerow(["id", "path", "bytes", "culture", "split", "source", "title", "program", "tempo_bpm",
                     "time_scale", "transpose", "n_notes"])
    for r in rows:
        p, params = r["piece"], r["params"].to_json()
        tempo = params["tempo_bpm"] if r["parsed"].time_unit == "quarter" else ""
        scale = params["time_scale"] if r["parsed"].time_unit == "second" else ""
        writer.writerow([p.piece_id, r["rel"], (out / r["rel"]).stat().st_size, p.culture, r["split"], p.source,
                         p.title, params["program"], tempo, scale, params["transpose"], len(r["parsed"].notes)])
    atomic_write_text(out / "pieces.csv", detail.getvalue())

    per_culture = Counter(r["piece"].culture for r in rows)
    per_split: dict[str, dict[str, int]] = {}
    for r in rows:
        per_split.setdefault(r["piece"].culture, {"train": 0, "valid": 0, "test": 0})[r["split"]] += 1
    tag_counts: dict[str, Counter[str]] = {}
    for r in rows:
        for tag in r["tags"]:
            tag_counts.setdefault(tag.split("--", 1)[0], Counter())[tag] += 1
    programs = Counter((r["piece"].culture, r["params"].program) for r in rows)
    identity = renderer_identity(config)
    unexpected = {name for name in synth_names if name != identity["synthesizer"]}
    if unexpected:  # pragma: no cover - workers build exactly the resolved renderer
        raise DataError(f"pieces were rendered with {sorted(unexpected)} instead of {identity['synthesizer']}")
    try:
        import music21

        music21_version = music21.__version__
    except ImportError:  # pragma: no cover
        music21_version = None
    report = {
        "config": requested.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "synthesizer": identity["synthesizer"],
        "soundfont": identity.get("soundfont"),
        "n_pieces": len(rows),
        "pieces_per_culture": dict(sorted(per_culture.items())),
        "pieces_per_split": dict(sorted(per_split.items())),
        "tags": {kind: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
                 for kind, counts in sorted(tag_counts.items())},
        "programs_per_culture": {c: {str(p): programs[(c, p)] for p in config.instrument_programs}
                                 for c in sorted(per_culture)},
        "sources": {
            c: {"description": SOURCE_DESCRIPTIONS[c],
                "files": sorted({r["piece"].source for r in rows if r["piece"].culture == c})
                if c != "turkish" else [str(config.symbtr)],
                "candidates": len(sources[c])}
            for c in sorted(sources)
        },
        "music21_version": music21_version,
        "parse_failures": parse_failures,
        "render_failures": dict(sorted(failed.items())),
    }
    json_path = out / "corpus.json"
    atomic_write_text(json_path, json_text(report))

    elapsed = time.perf_counter() - started
    summary = CorpusSummary(
        out_dir=out,
        csv_path=csv_path,
        json_path=json_path,
        n_pieces=len(rows),
        pieces_per_culture=dict(sorted(per_culture.items())),
        pieces_per_split=dict(sorted(per_split.items())),
        rendered=len(tasks) - len(failed),
        resumed=resumed,
        parse_failures=parse_failures,
        render_failures=len(failed),
        synthesizer=identity["synthesizer"],
        soundfont=identity.get("soundfont"),
        parse_s=round(parsed_at - started, 2),
        render_s=round(rendered_at - parsed_at, 2),
        elapsed_s=round(elapsed, 2),
    )
    log.info("corpus: %d pieces (%s), %d rendered, %d resumed, %.1f s -> %s", len(rows),
             ", ".join(f"{c} {n}" for c, n in summary.pieces_per_culture.items()), summary.rendered, resumed,
             elapsed, csv_path)
    return summary
