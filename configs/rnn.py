"""LSTM (or GRU) language-model baseline on the built-in corpus (or your files).

Train the demo model on CPU:

    jaxlm train --config configs/rnn.py:size=small --workdir runs/rnn-small

Sizes: tiny (tests, seconds), small (the CPU demo), base (a 2-layer, 1024-unit LSTM with 1024-wide
tied embeddings and dropout 0.5, in the spirit of Zaremba et al. 2014's large model). The
hidden size of the recurrent layers is ``config.model.mlp_dim``; the embedding width is
``embed_dim``; the output projection is tied when both are equal. A GRU:
``--config.model.rnn_cell=gru``. Attention fields (num_heads, position, ...) are unused.
"""

from jaxlm import config_lib

SIZES = {
    # name: (num_layers, embed_dim, hidden (mlp_dim), seq_len, batch_size, num_steps, lr, warmup, dropout)
    "tiny": (2, 64, 64, 64, 8, 100, 3e-3, 10, 0.0),
    "small": (2, 256, 256, 128, 16, 600, 3e-3, 30, 0.2),
    "base": (2, 1024, 1024, 256, 64, 100_000, 1e-3, 1000, 0.5),
}


def get_config(arg: str | None = None):
    """The RNN config of the given ``size=tiny|small|base`` (default small)."""
    args = config_lib.parse_arg(arg)
    size = args.pop("size", "small")
    if size not in SIZES:
        raise config_lib.ConfigError(f"configs/rnn.py: size={size!r} is not one of: {', '.join(SIZES)}")
    if args:
        raise config_lib.ConfigError(f"configs/rnn.py: unknown argument {next(iter(args))!r}; only size=...")
    layers, embed, hidden, seq_len, batch, steps, lr, warmup, dropout = SIZES[size]
    c = config_lib.base_config()
    c.model.kind = "rnn"
    c.model.rnn_cell = "lstm"
    c.model.num_layers = layers
    c.model.embed_dim = embed
    c.model.mlp_dim = hidden
    c.model.max_len = max(seq_len, 256)
    c.model.dropout_rate = dropout
    c.model.position = "none"
    c.model.tie_embeddings = True
    c.model.use_bias = True
    c.data.objective = "causal_lm"
    c.data.seq_len = seq_len
    c.data.batch_size = batch
    c.train.num_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    c.optim.weight_decay = 0.01
    return c
