"""What README.md claims of its command 1, stated once for the code that checks it.

``resofilter run`` with no overrides (README command 1) ends with a log line saying whether its final
accuracy lies in the band the README gives; ``tests/test_run.py`` checks that the README states this
band. It is a claim about one documented command, not a setting of the pipeline, so it is not in the
config tree.
"""

from __future__ import annotations

# The band of README command 1's final accuracy (the default model and recipe; README "Quick start"): the same
# weights on every machine, float32 kernels that round differently by CPU kind.
COMMAND_1_ACCURACY: tuple[float, float] = (0.70, 0.80)
