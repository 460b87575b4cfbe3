"""culturemert: adapt MERT music foundation models to the world's musical traditions.

Pipeline stages, one module each: ``data`` (manifests, shards, loader), ``teachers`` (EnCodec / k-means
tokens, CQT targets), ``model`` (MERT backbone + pre-training heads), ``objective`` (masked prediction +
CQT reconstruction), ``train`` (continual pre-training recipes), ``merge`` (weight-space merging),
``evaluate`` (embedding extraction and MARBLE-protocol probing). ``cli`` is a thin layer on top.
"""

__version__ = "0.1.0"
