# Makes the config tree the package `resofilter.conf` once installed (pyproject.toml maps it), so
# Hydra finds it as `pkg://resofilter.conf` from any directory. The YAML files are package data.
