"""The notebook side of the device bridge: the workspace's devices and groups, DEPLOY, remote
ML.PREDICT and device metrics."""
