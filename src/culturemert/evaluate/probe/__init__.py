"""Probing protocols (MARBLE v1 and CultureMERT's), with every probe of a sweep trained at once as one batched model.

Protocol ``marble`` (MARBLE "constrained" track, v1 code; see docs/evaluation.md for all protocols):

* probe = Linear(D -> hidden) -> ReLU -> Dropout(p) -> Linear(hidden -> n_tags), BCE-with-logits, Adam (no
  weight decay), ReduceLROnPlateau(mode=max, factor 0.5, patience 3) and early stopping (patience 10) on
  validation macro ROC-AUC, best-validation checkpoint kept for testing;
* a training step takes ``batch_size`` (64) *tracks* with all their windows: MARBLE's feature dataset returns one
  track's windows each carrying the track's labels and its collate function stacks them, so the BCE is the
  mean over every window of the batch (``benchmark/tasks/MTT/MTT_dataset.py`` ``train_collate_fn``,
  ``benchmark/models/probers.py`` ``training_step``); an epoch is one pass over the tracks;
* input = one hidden state, or a learned softmax-weighted sum of hidden states (weights initialised randn);
* validation/test track logits = mean of its windows' logits (``scatter_mean``); metrics at track level;
* grid = layers x learning rates x seeds; every selection (layer, lr, epoch) uses validation only; test
  numbers are reported for the validation-selected configuration, mean and std over seeds.

``marble-windows`` is the same with a step of ``batch_size`` windows (an epoch = one pass over the windows);
``culturemert-paper`` follows the CultureMERT authors' cross-cultural tagging code: recordings are cut
(makam 150 s, Hindustani 780 s, Carnatic 330 s) and each epoch trains on one random window per recording.

| file | owns |
|---|---|
| ``settings.py`` | protocols, ``ProbeSettings``, the grid (``ProbeSpec``), ``ProbeOutcome`` |
| ``streams.py`` | per-seed randomness shared by the batched trainer and the reference |
| ``batched.py`` | ``train_probes``: every probe of a sweep trained at once |
| ``reference.py`` | ``train_probe_reference``: one probe with plain torch modules, the oracle of the tests |
| ``run.py`` | selection on validation, summaries, ``run_probe`` and the results file |
"""

from culturemert.evaluate.probe.settings import (
    MARBLE_LRS,
    PAPER_TRUNCATION,
    PROTOCOLS,
    ProbeConfig,
    ProbeOutcome,
    ProbeSettings,
    ProbeSpec,
    Protocol,
    make_specs,
    truncation_seconds,
    weighted_sum_layers,
)
from culturemert.evaluate.probe.batched import train_probes, validation_monitor
from culturemert.evaluate.probe.reference import train_probe_reference
from culturemert.evaluate.probe.run import protocol_needs_disjoint_windows, results_digest, run_probe, run_probe_config, summarise

__all__ = [
    "MARBLE_LRS",
    "PAPER_TRUNCATION",
    "PROTOCOLS",
    "Protocol",
    "ProbeSettings",
    "ProbeConfig",
    "ProbeSpec",
    "ProbeOutcome",
    "make_specs",
    "weighted_sum_layers",
    "train_probes",
    "train_probe_reference",
    "summarise",
    "run_probe",
    "run_probe_config",
    "results_digest",
    "protocol_needs_disjoint_windows",
    "truncation_seconds",
    "validation_monitor",
]
