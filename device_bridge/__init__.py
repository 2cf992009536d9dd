"""MLSQL device bridge: package format, on-device agent, client, hub and rollout.

The agent side imports only this package, onnxruntime, numpy, starlette/uvicorn
and cryptography, so that it installs on a small device.
"""

__version__ = "0.1.0"
