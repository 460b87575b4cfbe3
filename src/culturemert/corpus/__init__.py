"""The offline multi-cultural corpus: real symbolic music rendered to 24 kHz audio with culture tags.

Sources (all installable from PyPI / Debian, nothing downloaded at build time):

* ``chinese``  -- Essen folk songs ``han1`` + ``han2`` from the music21 wheel (province from the ``O:`` field);
* ``german``   -- German-language Central-European Essen collections (Erk, Altdeutsche, Böhme, Fink, Kinderlieder,
  DVA, Zuccalmaglio, Lothringen, Luxemburg; region from ``O:``);
* ``irish``    -- O'Neill's *Music of Ireland* (1850) from the music21 wheel (tune type from ``R:``);
* ``scottish`` -- Aird's *Selection of Scotch, English, Irish and Foreign Airs* (optional, not in the default set);
* ``turkish``  -- SymbTr makam scores (txt format, microtonal; makam/form/usul from the file name), only when a
  SymbTr folder or ``symbtr-txt*.tar.gz`` archive is given.

Pipeline: scan the sources as text (cheap) -> choose candidates per culture in a seeded order -> parse only
those (music21 for ABC, a few lines of code for SymbTr) -> drop duplicates on (culture, first 40 pitches) ->
render each piece to a fixed duration with one instrument pool for every culture (FluidSynth + a General-MIDI
soundfont; a pure-numpy additive synthesiser when libfluidsynth is missing) -> RMS-normalise -> write
``audio/<culture>/<id>.flac`` atomically -> ``corpus.csv`` + ``pieces.csv`` + ``corpus.json``.

Everything random is derived from ``(seed, piece id)``, so the same seed gives the same CSV and the same audio
bytes whatever the number of workers and whichever worker renders which piece. FluidSynth keeps voice state
from note to note (voice slots, filters, reverb/chorus buffers) that no reset fully clears, so every piece gets
a fresh synthesiser (reverb/chorus off): a piece renders identically whatever was rendered before it (tested).

| file | owns |
|---|---|
| ``config.py`` | ``CorpusConfig``, version constants, seeded helpers |
| ``sources.py`` | scanning ABC (music21 wheel) and SymbTr sources |
| ``parse.py`` | parsing pieces into notes and tags |
| ``render.py`` | note scheduling and the two renderers |
| ``build.py`` | ``build_corpus``: selection, worker pool, splits, outputs |
"""

from culturemert.corpus.config import (
    ALL_CULTURES,
    DEFAULT_CULTURES,
    CorpusConfig,
    CorpusSettingsChanged,
    SplitFractions,
    koma53_to_semitones,
)
from culturemert.corpus.sources import SourcePiece, scan_sources
from culturemert.corpus.parse import ParsedPiece, parse_abc_tune, parse_symbtr_text
from culturemert.corpus.render import (
    DEBIAN_SOUNDFONTS,
    AdditiveRenderer,
    FluidSynthRenderer,
    RenderParams,
    ScheduledNote,
    make_renderer,
    piece_render_params,
    render_piece_audio,
    resolve_renderer,
    resolve_soundfont,
    schedule_notes,
)
from culturemert.corpus.build import CorpusSummary, assign_splits, build_corpus

__all__ = [
    "CorpusSettingsChanged",
    "ALL_CULTURES",
    "DEFAULT_CULTURES",
    "DEBIAN_SOUNDFONTS",
    "AdditiveRenderer",
    "CorpusConfig",
    "CorpusSummary",
    "FluidSynthRenderer",
    "ParsedPiece",
    "RenderParams",
    "ScheduledNote",
    "SourcePiece",
    "SplitFractions",
    "assign_splits",
    "build_corpus",
    "koma53_to_semitones",
    "make_renderer",
    "parse_abc_tune",
    "parse_symbtr_text",
    "piece_render_params",
    "render_piece_audio",
    "resolve_renderer",
    "resolve_soundfont",
    "scan_sources",
    "schedule_notes",
]
