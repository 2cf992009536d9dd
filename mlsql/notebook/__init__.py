"""Jupyter: the %%mlsql magic, the MLSQL kernel, completion, training progress, the live device
monitor and the Jupyter server extension."""
