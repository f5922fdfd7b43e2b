"""Spectral normalization (Miyato et al., 2018) as a pure function of the weights.

``W / sigma(W)`` with ``sigma`` the largest singular value of the linear map the weight is:
a kernel whose last axis is the output (dense ``[D, F]``, convolution ``[width, E, F]``,
attention output ``[N, H, D]``, embedding ``[V, E]``) as ``[prod(shape[:-1]), shape[-1]]``;
attention query / key / value kernels ``[D, N, H]`` (one input axis, two output axes) as
``[D, N*H]`` (:func:`as_matrix`). ``sigma`` is estimated by
``iterations`` steps of power iteration started from a fixed vector each call, with the
singular vectors held constant for the gradient (as in the paper).

Unlike ``flax.linen.SpectralNorm`` no ``u`` vector is carried between steps in a mutable
collection: the state stays {params, optimizer}, the function is the same under jit, grad,
sharding and checkpoint resume, and a few iterations per call cost little for the
discriminator sizes of text GANs. Power iteration from a fixed start underestimates
``sigma`` until it converges, so the normalized matrix may have a spectral norm slightly above
1 with few iterations (tested in tests/nn/spectral_norm_test.py).

:func:`normalize_tree` applies it to every parameter with two or more dimensions, for use with
``flax.linen.map_variables`` on a whole module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Parameters with one input axis and several output axes (attention projections [D, N, H]).
FIRST_AXIS_INPUT = ("query", "key", "value")


def as_matrix(w: jnp.ndarray, *, first_axis_input: bool = False) -> jnp.ndarray:
    """``w`` as the ``[inputs, outputs]`` matrix whose spectral norm is normalized."""
    return w.reshape((w.shape[0], -1)) if first_axis_input else w.reshape((-1, w.shape[-1]))


def spectral_norm_estimate(w: jnp.ndarray, iterations: int = 1, *, first_axis_input: bool = False) -> jnp.ndarray:
    """Power-iteration estimate of the largest singular value of ``as_matrix(w)`` (float32).

    No gradient flows through the singular vectors, only through ``w`` in ``u^T W v``.
    """
    m = as_matrix(w, first_axis_input=first_axis_input).astype(jnp.float32)
    v = jnp.ones((m.shape[1],), jnp.float32) / jnp.sqrt(m.shape[1])
    mt = jax.lax.stop_gradient(m)
    u = mt @ v
    for _ in range(iterations):
        u = mt @ v
        u = u / (jnp.linalg.norm(u) + 1e-12)
        v = mt.T @ u
        v = v / (jnp.linalg.norm(v) + 1e-12)
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    return u @ m @ v


def spectral_normalize(w: jnp.ndarray, iterations: int = 1, *, first_axis_input: bool = False) -> jnp.ndarray:
    """``w / sigma(w)`` in ``w``'s dtype."""
    sigma = spectral_norm_estimate(w, iterations, first_axis_input=first_axis_input)
    return (w.astype(jnp.float32) / jnp.maximum(sigma, 1e-12)).astype(w.dtype)


def normalize_tree(params: Any, iterations: int = 1) -> Any:
    """Every leaf with ``ndim >= 2`` spectrally normalized; vectors (biases, norm scales) unchanged."""

    def one(path: tuple, w: jnp.ndarray) -> jnp.ndarray:
        if w.ndim < 2:
            return w
        names = [str(getattr(p, "key", p)) for p in path]
        first = w.ndim == 3 and len(names) >= 2 and names[-2] in FIRST_AXIS_INPUT
        return spectral_normalize(w, iterations, first_axis_input=first)

    return jax.tree_util.tree_map_with_path(one, params)
