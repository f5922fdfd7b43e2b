"""jaxlm: a JAX research framework for language models."""

__version__ = "0.1.0"
