"""Text GANs: SeqGAN (policy gradient with Monte-Carlo rollouts) and Gumbel-softmax (RelGAN style).

The SeqGAN synthetic-oracle experiment (10,000 oracle samples of length 20, vocabulary 5,000;
SeqGAN's LSTM generator and CNN discriminator):

    jaxlm train --config configs/seqgan.py:data=oracle --workdir runs/seqgan-oracle
    jaxlm train --config configs/seqgan.py:data=oracle,mode=gumbel --workdir runs/gumbel-oracle
    jaxlm generate --workdir runs/seqgan-oracle --format ids --num_samples 100   # Texygen's file format

On short lines of the built-in corpus (or ``--config.data.source=files --config.data.files=...``):

    jaxlm train --config configs/seqgan.py:data=builtin --workdir runs/seqgan-text
    jaxlm generate --workdir runs/seqgan-text --format text --num_samples 20

Arguments (comma-separated): ``data=oracle|builtin`` (default oracle), ``mode=seqgan|gumbel``,
``generator=lstm|transformer`` (the decoder-only Transformer of ``config.model``),
``discriminator=cnn|transformer|lstm``, ``loss=standard|nonsaturating|minimax|hinge|rsgan|wgan_gp``
(default standard for seqgan, rsgan for gumbel, as in RelGAN), ``size=paper|tiny`` (tiny: tests).

``size=paper`` follows the reference code where it can on a CPU: G pre-trained by MLE for 30
epochs (Adam 0.01, batch 64, clip 5), D pre-trained for 200 batches x 3 epochs, then adversarial
rounds of 1 G update and 5 D batches x 3 epochs (SeqGAN; its D epochs run over each set of
negatives, here over one batch of them). Gumbel-softmax rounds are 1 G update and 5 D updates with
Adam 1e-4 and an inverse temperature growing to 100 (RelGAN). See bench/seqgan.py for the
measured figures and README.md ("Text GANs").
"""

from jaxlm import config_lib

ARGS = {
    "data": ("oracle", "builtin"),
    "mode": ("seqgan", "gumbel"),
    "generator": ("lstm", "transformer"),
    "discriminator": ("cnn", "transformer", "lstm"),
    "loss": ("standard", "nonsaturating", "minimax", "hinge", "rsgan", "wgan_gp"),
    "size": ("paper", "tiny"),
}


def get_config(arg: str | None = None):
    """The text-GAN config for the given arguments (see the module docstring)."""
    args = config_lib.parse_arg(arg)
    for key, value in args.items():
        if key not in ARGS:
            raise config_lib.ConfigError(f"configs/seqgan.py: unknown argument {key!r}; valid: {', '.join(ARGS)}")
        if value not in ARGS[key]:
            raise config_lib.ConfigError(f"configs/seqgan.py: {key}={value!r} is not one of: {', '.join(ARGS[key])}")
    data = args.get("data", "oracle")
    mode = args.get("mode", "seqgan")
    size = args.get("size", "paper")
    c = config_lib.base_config()
    g = c.gan
    g.mode = mode
    g.generator = args.get("generator", "lstm")
    g.discriminator = args.get("discriminator", "cnn")
    g.loss = args.get("loss", "standard" if mode == "seqgan" else "rsgan")

    # The Transformer generator / discriminator sizes (config.model is the generator's model).
    c.model.kind = "decoder_only"
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.embed_dim = 64
    c.model.mlp_dim = 256
    c.model.max_len = 64
    c.model.position = "learned"

    c.data.batch_size = 64
    c.data.seed = 0
    if data == "oracle":
        c.data.source = "oracle"
        c.data.seq_len = 20
    else:
        c.data.source = "builtin"
        c.data.document = "line"
        c.data.tokenizer = "sentencepiece_bpe"
        c.data.tokenizer_vocab_size = 2000
        c.data.seq_len = 32
        g.eval_bleu_samples = 200
        g.eval_bleu_references = 1000

    g.pretrain_g_epochs = 30
    g.pretrain_d_steps = 200
    g.adv_rounds = 50
    g.g_steps = 1
    if mode == "seqgan":
        g.d_steps, g.d_epochs = 5, 3
        g.adv_g_lr = 0.01
        g.d_lr = 1e-4
    else:
        g.d_steps, g.d_epochs = 5, 1
        g.adv_g_lr = 1e-4
        g.d_lr = 1e-4
        g.max_temperature = 100.0
        g.temperature_schedule = "exp"
    c.train.log_every = 50
    c.train.eval_every = 5 * (10_000 // 64)  # every 5 epochs of the oracle data
    c.checkpoint.every_steps = 500

    if size == "tiny":  # seconds on a CPU: the tests
        c.data.batch_size = 8
        g.oracle_num_train = 64
        g.oracle_num_test = 16
        g.eval_num_samples = 16
        g.pretrain_g_epochs = 0
        g.pretrain_g_steps = 3
        g.pretrain_d_steps = 2
        g.adv_rounds = 2
        g.d_steps, g.d_epochs = 1, 2
        g.num_rollouts = 2
        g.d_embed_dim = 16
        g.d_filter_sizes = (1, 2, 3, 5)
        g.d_num_filters = (4, 4, 4, 4)
        g.d_hidden_dim = 16
        g.d_num_layers = 1
        g.d_num_heads = 2
        c.model.num_layers = 1
        c.model.embed_dim = 32
        c.model.mlp_dim = 64
        c.model.num_heads = 2
        c.train.log_every = 2
        c.train.eval_every = 0
        c.checkpoint.every_steps = 3
        if data != "oracle":
            c.data.tokenizer = "byte"
            g.eval_bleu_samples = 8
            g.eval_bleu_references = 16
    return c
