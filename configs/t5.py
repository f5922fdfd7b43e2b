"""T5-style encoder-decoder with span corruption on the built-in corpus (or your files).

Train the demo model on CPU:

    jaxlm train --config configs/t5.py:size=small --workdir runs/t5-small

Sizes: tiny (tests, seconds), small (the CPU demo), base (the shape of T5-small v1.0: 6 + 6
layers, 8 heads, 512 wide, 2048 MLP; for accelerators). The architecture is T5's: shared
relative position bias per stack (32 buckets, max distance 128), pre-RMSNorm (eps 1e-6), no
biases, ReLU MLP, embeddings tied between encoder, decoder and output (with T5's ``D**-0.5``
output rescaling); see ``jaxlm/models/encoder_decoder.py`` for the Hugging Face weight mapping.
T5 v1.1: ``--config.model.activation=geglu --config.model.tie_embeddings=false``.
"""

from jaxlm import config_lib

SIZES = {
    # name: (enc layers, dec layers, num_heads, embed_dim, mlp_dim, seq_len, batch_size, num_steps, lr, warmup, dropout)
    "tiny": (2, 2, 4, 64, 256, 64, 8, 100, 3e-3, 10, 0.0),
    "small": (4, 4, 4, 256, 1024, 128, 16, 600, 2e-3, 60, 0.1),
    "base": (6, 6, 8, 512, 2048, 512, 128, 524_288, 1e-3, 10_000, 0.1),
}


def get_config(arg: str | None = None):
    """The T5 config of the given ``size=tiny|small|base`` (default small)."""
    args = config_lib.parse_arg(arg)
    size = args.pop("size", "small")
    if size not in SIZES:
        raise config_lib.ConfigError(f"configs/t5.py: size={size!r} is not one of: {', '.join(SIZES)}")
    if args:
        raise config_lib.ConfigError(f"configs/t5.py: unknown argument {next(iter(args))!r}; only size=...")
    enc, dec, heads, embed, mlp, seq_len, batch, steps, lr, warmup, dropout = SIZES[size]
    c = config_lib.base_config()
    c.model.kind = "encoder_decoder"
    c.model.num_layers = enc
    c.model.num_decoder_layers = dec
    c.model.num_heads = heads
    c.model.embed_dim = embed
    c.model.mlp_dim = mlp
    c.model.max_len = max(seq_len, 256)
    c.model.dropout_rate = dropout
    c.model.position = "relative"
    c.model.relative_buckets = 32
    c.model.relative_max_distance = 128
    c.model.pre_norm = True
    c.model.norm = "rmsnorm"
    c.model.norm_eps = 1e-6
    c.model.activation = "relu"
    c.model.use_bias = False
    c.model.tie_embeddings = True
    c.data.objective = "span_corruption"
    c.data.seq_len = seq_len
    c.data.batch_size = batch
    c.train.num_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    c.optim.weight_decay = 0.01
    return c
