"""Training freeze sweeps (TensorFlow, imported inside functions only).

``config`` (the options) -> ``plan`` (the trials, a trial's stages and data sources) ->
``prepare`` (the run folder before training) -> ``sweep`` (run the trials, the table) ->
``fit`` (one trial's order of work) over ``trial`` (the opened trial), ``stage_data``
(a stage's datasets), ``head_init`` (the linear-probe head), ``epochs`` / ``loop`` (the
epochs, checkpoints, resume), ``cache`` (frozen-prefix caches), ``bnstats``, and
``measure`` (the evaluation into ``metrics.json``); ``strategy`` and ``distributed`` run
trials over several devices or on Ray. Classical heads, Grad-CAM and reports are in
:mod:`transfer.analysis`.
"""
