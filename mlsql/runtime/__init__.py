"""What runs a plan: the session, one step handler per kind of step, and the model registry."""
