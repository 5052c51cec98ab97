"""Torch networks and the shared training framework.

* :mod:`verse_cli.nets.train` -- dataset discovery, splits, devices, the generic
  :func:`~verse_cli.nets.train.fit` loop (checkpoints, resume, seeds, progress, log) and
  model bundles (:func:`~verse_cli.nets.train.save_bundle` / ``load_bundle``).
* :mod:`verse_cli.nets.detect_net` -- the coarse 3D spine-heatmap CNN of ``verse detect``
  and its training data pipeline.

Importing this package does not import torch; each submodule does so itself.
"""
