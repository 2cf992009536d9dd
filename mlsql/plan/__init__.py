"""Planning: a statement's tree as a short list of typed steps, and the TRANSFORM it fits."""
