"""Weight-space model merging (see :mod:`culturemert.merge.engine`)."""

from culturemert.merge.engine import *  # noqa: F401,F403
from culturemert.merge.engine import (  # noqa: F401
    DEFAULT_DENSITY,
    DEFAULT_DROP_RATE,
    DEFAULT_LAMBDA,
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    LoadedInputs,
    load_inputs,
    merge_loaded,
    open_inputs_lazily,
)
