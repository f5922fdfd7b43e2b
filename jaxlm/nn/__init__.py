"""Flax linen primitives: norms, masks, linears, embeddings/positions, attention."""
