"""BERT-style encoder (masked-LM + next-sentence heads) on the built-in corpus (or your files).

Train the demo model on CPU:

    jaxlm train --config configs/bert.py:size=small --workdir runs/bert-small

Sizes: tiny (tests, seconds), small (the CPU demo), base (BERT-base shape: 12 layers, 12 heads,
768 wide, 3072 MLP, 512 positions; for accelerators). The architecture is BERT's: learned
positions, token-type embeddings, post-LayerNorm (eps 1e-12) with an embedding LayerNorm,
exact-erf GELU, biases, tied MLM decoder (see ``jaxlm/models/encoder_only.py`` for the
Hugging Face weight mapping). Any field can be overridden, e.g. ``--config.model.pre_norm=true``.
"""

from jaxlm import config_lib

SIZES = {
    # name: (num_layers, num_heads, embed_dim, mlp_dim, seq_len, batch_size, num_steps, lr, warmup, dropout)
    "tiny": (2, 4, 64, 256, 64, 8, 100, 3e-3, 10, 0.0),
    "small": (4, 4, 256, 1024, 128, 16, 600, 1e-3, 60, 0.1),
    "base": (12, 12, 768, 3072, 512, 256, 1_000_000, 1e-4, 10_000, 0.1),
}


def get_config(arg: str | None = None):
    """The BERT config of the given ``size=tiny|small|base`` (default small)."""
    args = config_lib.parse_arg(arg)
    size = args.pop("size", "small")
    if size not in SIZES:
        raise config_lib.ConfigError(f"configs/bert.py: size={size!r} is not one of: {', '.join(SIZES)}")
    if args:
        raise config_lib.ConfigError(f"configs/bert.py: unknown argument {next(iter(args))!r}; only size=...")
    layers, heads, embed, mlp, seq_len, batch, steps, lr, warmup, dropout = SIZES[size]
    c = config_lib.base_config()
    c.model.kind = "encoder_only"
    c.model.num_layers = layers
    c.model.num_heads = heads
    c.model.embed_dim = embed
    c.model.mlp_dim = mlp
    c.model.max_len = max(seq_len, 512 if size == "base" else 256)
    c.model.dropout_rate = dropout
    c.model.position = "learned"
    c.model.pre_norm = False
    c.model.norm = "layernorm"
    c.model.norm_eps = 1e-12
    c.model.activation = "gelu_exact"
    c.model.use_bias = True
    c.model.tie_embeddings = True
    c.model.type_vocab_size = 2
    c.data.objective = "masked_lm"
    c.data.seq_len = seq_len
    c.data.batch_size = batch
    c.train.num_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    c.optim.schedule = "linear"
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    return c
