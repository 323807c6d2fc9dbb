"""The stages: each reads a composed config (and the previous stage's manifest), calls the
library and writes its outputs with a manifest last.

``score`` → ``select`` → ``finetune`` → ``evaluate``, and ``run`` for all four; ``embedded``
builds the embedded default (synthetic benchmark + base model); ``context`` resolves a
config into concrete paths; ``config_check`` validates a config without loading weights.
The library packages (data, models, features, selection, training, evaluation, reporting)
never import from here.
"""
