"""Host-side data: tokenizers, tfds sources, objectives and the grain pipeline.

Nothing in this package imports jax, flax, optax or orbax (checked by import-linter), so
data loading stays on the host and can run in worker processes.
"""
