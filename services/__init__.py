"""Long-running Ray actors: labeling pool, label store, model registry and promotion, job submission."""
