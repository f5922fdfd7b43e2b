"""Programs: one flat, top-to-bottom function per program (train, eval, generate, ...)."""
