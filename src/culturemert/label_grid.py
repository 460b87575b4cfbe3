"""The label grid: 24 kHz audio, one teacher code per 320-sample hop, 75 codes per second.

This is the project's central invariant, defined here and nowhere else.

* **Audio.** Everything that is pre-trained on is mono at :data:`SAMPLE_RATE` = 24 000 Hz (MERT-v1's rate).
* **Labels.** Every teacher (EnCodec 24 kHz RVQ, k-means) emits one code per codebook per :data:`HOP_LENGTH` =
  320 samples, i.e. :data:`FRAME_RATE` = 75 Hz. A clip of ``L`` samples owns ``label_frames(L) = ceil(L / 320)``
  codes, exactly what EnCodec 24 kHz produces (it pads the last partial hop); code ``k`` covers samples
  ``[320k, 320k + 320)``.
* **Model frames.** MERT's conv stack (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: total stride 320, receptive
  field 400) yields ``floor((L - 400) / 320) + 1`` frames (``culturemert.model.num_frames_for`` computes it from
  any config); frame ``k`` spans samples ``[320k, 320k + 400)`` and is paired with code ``k``. The last code of a
  clip whose length is a multiple of 320 has no frame; the objective drops it.
* **Crops.** Training crops start and end on the grid, so a crop of ``crop_samples(s)`` samples starting at sample
  ``320 j`` takes codes ``j .. j + crop_samples(s) / 320 - 1``.
"""

from __future__ import annotations

from culturemert.errors import DataError

__all__ = ["SAMPLE_RATE", "HOP_LENGTH", "FRAME_RATE", "label_frames", "crop_samples", "check_label_alignment"]

SAMPLE_RATE = 24_000  # Hz
HOP_LENGTH = 320  # samples per label frame
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 75.0 Hz


def label_frames(num_samples: int) -> int:
    """Label frames owned by ``num_samples`` samples of 24 kHz audio: ``ceil(num_samples / 320)``.

    Raises:
        ValueError: ``num_samples`` < 0.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return -(-int(num_samples) // HOP_LENGTH)


def crop_samples(seconds: float) -> int:
    """A crop length on the grid: ``seconds`` rounded to the nearest whole number of 320-sample hops, in samples."""
    return int(round(seconds * SAMPLE_RATE / HOP_LENGTH)) * HOP_LENGTH


def check_label_alignment(num_samples: int, num_labels: int, tolerance: int = 1) -> None:
    """Raise :class:`DataError` when a label sequence does not fit its audio on the 75 Hz grid.

    ``num_labels`` may differ from ``ceil(num_samples / 320)`` by at most ``tolerance`` frames (rounding of
    externally produced labels); anything more means the labels belong to another file or sample rate.
    """
    expected = label_frames(num_samples)
    if abs(int(num_labels) - expected) > tolerance:
        raise DataError(
            f"label length {num_labels} does not match audio of {num_samples} samples: expected "
            f"ceil({num_samples}/{HOP_LENGTH}) = {expected} (+-{tolerance}); were the labels made from another file "
            f"or at another sample rate?"
        )
