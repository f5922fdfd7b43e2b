"""GPT-style decoder-only language model on the built-in corpus (or your files).

Train the demo model (a few minutes on 2 CPU cores):

    jaxlm train --config configs/gpt.py:size=small --workdir runs/gpt-small

Sizes: tiny (tests, seconds), small (the demo), base (GPT-2 small shape, for accelerators).
Any field can be overridden, e.g. ``--config.model.num_layers=6 --config.data.files='~/corpus/*.txt'
--config.data.source=files``.
"""

from jaxlm import config_lib

SIZES = {
    # name: (num_layers, num_heads, embed_dim, mlp_dim, seq_len, batch_size, num_steps, lr, warmup)
    "tiny": (2, 4, 64, 256, 64, 8, 100, 3e-3, 10),
    # small: the quick start, sized to finish in ~5 minutes with the install on 2 AVX2 cores at <= 1.9
    # nats/byte on the whole validation split (python bench/quickstart.py; bench/results/quickstart.json).
    # Batch 8 x 128 for 1,000 steps at lr 3e-3 reaches 1.87 in 0.77x the time of the preset until
    # 2026-12-04 (1,300 steps at lr 2e-3: 1.81); at lr 2e-3 1,000 steps reach 1.92, at 4e-3 1.88; 900
    # steps 1.92, 1,100 steps 1.84; batch 16 for 600 steps 1.87 in 1.13x the time.
    "small": (4, 4, 128, 512, 128, 8, 1000, 3e-3, 100),
    "base": (12, 12, 768, 3072, 1024, 64, 100_000, 6e-4, 2000),
}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg)
    size = args.pop("size", "small")
    if size not in SIZES:
        raise config_lib.ConfigError(f"configs/gpt.py: size={size!r} is not one of: {', '.join(SIZES)}")
    if args:
        raise config_lib.ConfigError(f"configs/gpt.py: unknown argument {next(iter(args))!r}; only size=...")
    layers, heads, embed, mlp, seq_len, batch, steps, lr, warmup = SIZES[size]
    c = config_lib.base_config()
    c.model.kind = "decoder_only"
    c.model.num_layers = layers
    c.model.num_heads = heads
    c.model.embed_dim = embed
    c.model.mlp_dim = mlp
    c.model.max_len = seq_len  # learned positions past the training length would be untrained
    c.decode.max_new_tokens = seq_len - 16  # room for a short prompt
    c.data.seq_len = seq_len
    c.data.batch_size = batch
    c.train.num_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    return c
