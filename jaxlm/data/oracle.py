"""The SeqGAN synthetic-data oracle (host side, NumPy): its arrays, samples and NLL.

The oracle is the fixed, randomly initialised LSTM language model that SeqGAN (Yu et al.,
AAAI 2017), LeakGAN, RankGAN, MaliGAN and Texygen use as the "real data" distribution:
vocabulary V = 5000, embedding E = 32, hidden H = 32, sequences of length 20 that start from
token 0 (embedded as the first input) with ``h0 = c0 = 0``. Its arrays ship inside the package
(``seqgan_oracle.npz``, converted from the reference code's ``save/target_params_py3.pkl``;
read with ``allow_pickle=False``). One step, for input embedding x and state (h, c)::

    i = sigmoid(x W_i + h U_i + b_i);  f = sigmoid(x W_f + h U_f + b_f);  o = sigmoid(x W_o + h U_o + b_o)
    c~ = tanh(x W_c + h U_c + b_c);    c' = f * c + i * c~;              h' = o * tanh(c')
    logits = h' W_out + b_out

This module is the host-side reference (this layer never imports jax); the training data and
the NLL_oracle metric come from the jitted sampler and scorer in ``jaxlm.models.gan.oracle``
(NumPy needs minutes for 10,000 samples over 5,000 tokens, XLA seconds).

Shapes: N sequences, T length, V vocab, E embedding, H hidden.
"""

from __future__ import annotations

import os

import numpy as np

ORACLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seqgan_oracle.npz")
ORACLE_NAMES = (
    "embedding",
    "W_i",
    "U_i",
    "b_i",
    "W_f",
    "U_f",
    "b_f",
    "W_o",
    "U_o",
    "b_o",
    "W_c",
    "U_c",
    "b_c",
    "W_out",
    "b_out",
)
START_TOKEN = 0  # the oracle's first input
VOCAB_SIZE = 5000
SEQ_LEN = 20


def load_oracle(path: str = ORACLE_FILE) -> dict[str, np.ndarray]:
    """The oracle's float32 arrays by name (see the module docstring)."""
    with np.load(path, allow_pickle=False) as z:
        return {name: np.asarray(z[name], np.float32) for name in ORACLE_NAMES}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def step(p: dict[str, np.ndarray], x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """One oracle step: ``x [N, E], h, c [N, H] -> (logits [N, V], h', c')``."""
    i = _sigmoid(x @ p["W_i"] + h @ p["U_i"] + p["b_i"])
    f = _sigmoid(x @ p["W_f"] + h @ p["U_f"] + p["b_f"])
    o = _sigmoid(x @ p["W_o"] + h @ p["U_o"] + p["b_o"])
    c_new = f * c + i * np.tanh(x @ p["W_c"] + h @ p["U_c"] + p["b_c"])
    h_new = o * np.tanh(c_new)
    return h_new @ p["W_out"] + p["b_out"], h_new, c_new


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(p: dict[str, np.ndarray], tokens: np.ndarray) -> float:
    """The oracle's mean per-token negative log-likelihood (nats) of ``tokens [N, T]``."""
    n, length = tokens.shape
    x = np.broadcast_to(p["embedding"][START_TOKEN], (n, p["embedding"].shape[1]))
    h = np.zeros((n, p["W_i"].shape[1]), np.float32)
    c = np.zeros_like(h)
    total = 0.0
    for t in range(length):
        logits, h, c = step(p, x, h, c)
        logp = _log_softmax(logits.astype(np.float64))
        total -= float(logp[np.arange(n), tokens[:, t]].sum())
        x = p["embedding"][tokens[:, t]]
    return total / (n * length)
