"""Experiment configuration: every key with its one default, parsing, overrides, validation.

A config file in ``configs/`` defines ``get_config(arg: str) -> ConfigDict`` that starts from
:func:`base_config` and changes fields. The command line selects it with
``--config path/to/file.py:arg`` and overrides any field with ``--config.section.key=value``.
Before anything is built, :func:`validate` turns the ConfigDict into frozen dataclasses; the
rest of jaxlm only ever sees those.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import traceback
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxlm import logical_axes
from jaxlm.common_types import ConfigError

# Names accepted by the dispatch dicts of the layers above (they assert they agree with these,
# see tests/config_lib_test.py); kept here so a bad name fails before anything is built.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("decoder_only", "encoder_only", "encoder_decoder", "rnn"),
    "model.position": ("learned", "sinusoidal", "relative", "rope", "alibi", "none"),
    "model.attention": ("xla", "dot_product", "blockwise", "ring"),
    "model.rope_scaling": ("none", "linear", "ntk", "dynamic", "yarn", "llama3"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.activation": ("gelu", "gelu_exact", "relu", "silu", "swiglu", "geglu"),
    "model.rnn_cell": ("lstm", "gru"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.grad_barrier": ("auto", "on", "off"),
    "model.fuse_qkv": ("auto", "on", "off"),
    "model.matmul_dtype": ("auto", "compute", "float32"),
    "data.source": ("builtin", "files", "tfds", "synthetic", "oracle"),
    "data.tokenizer": ("byte", "char", "sentencepiece_unigram", "sentencepiece_bpe", "hf"),
    "data.objective": (
        "causal_lm",
        "masked_lm",
        "nsp",
        "span_corruption",
        "seq2seq",
        "classification",
        "token_classification",
        "qa",
    ),
    "task.head": ("auto", "none", "classification", "regression", "token_classification", "qa"),
    "task.pooling": ("auto", "cls", "last", "mean"),
    "task.qa_impossible": ("drop", "mark"),
    "data.document": ("file", "line", "paragraph"),
    "data.synthetic.kind": ("markov", "copy", "reverse"),
    "data.format": ("auto", "text", "jsonl", "csv", "tsv"),
    "data.on_decode_error": ("replace", "error"),
    "data.long_documents": ("split", "truncate"),
    "data.packing": ("auto", "concat", "windows", "first_fit", "best_fit"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.nonfinite_policy": ("skip", "stop"),
    "train.cond_update": ("auto", "on", "off"),
    "gan.mode": ("none", "seqgan", "gumbel"),
    "gan.generator": ("lstm", "transformer"),
    "gan.discriminator": ("cnn", "transformer", "lstm"),
    "gan.loss": ("standard", "nonsaturating", "minimax", "hinge", "rsgan", "wgan_gp"),
    "gan.temperature_schedule": ("exp", "linear", "none"),
    "gan.gumbel_feed": ("hard", "soft"),
    "peft.adapter_kind": ("houlsby", "pfeiffer"),
}

# config.peft.method: 'none' or a comma-separated combination of these (jaxlm/peft.py implements them).
PEFT_METHODS: tuple[str, ...] = ("lora", "dora", "adapter", "prefix", "prompt", "ia3", "bitfit")


# Which model kinds train on which pre-training objective.
OBJECTIVE_KINDS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("decoder_only", "rnn"),
    "masked_lm": ("encoder_only",),
    "nsp": ("encoder_only",),
    "span_corruption": ("encoder_decoder",),
    # Encoder-decoder text-to-text, or a decoder-only model with the loss on the target part.
    "seq2seq": ("encoder_decoder", "decoder_only"),
    "classification": ("encoder_only", "decoder_only"),
    "token_classification": ("encoder_only", "decoder_only"),
    "qa": ("encoder_only", "decoder_only"),
}

# The task head each fine-tuning objective trains (config.task.head='auto').
OBJECTIVE_HEADS: dict[str, str] = {
    "classification": "classification",
    "token_classification": "token_classification",
    "qa": "qa",
}


def base_config() -> ml_collections.ConfigDict:
    """Return the config with every key at its single default, locked against new keys."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "decoder_only"
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 0  # 0: same as num_heads (plain multi-head attention)
    c.model.embed_dim = 256
    c.model.mlp_dim = 1024
    c.model.max_len = 256
    c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    # The model's vocabulary arrays (embedding, LM head) are padded to a multiple of this; the padded
    # ids are never looked up and their logits are sliced off before any softmax (jaxlm/models/vocab.py).
    # 0 = auto: 128 on GPU/TPU, the f32 SIMD width on a CPU (16 AVX-512, 8 AVX2; bench/README.md), resolved
    # once and saved in the workdir's config.json; 1 = no padding. The mesh axes sharding the vocabulary
    # always divide the padded size as well.
    c.model.vocab_multiple = 0
    c.model.dropout_rate = 0.0
    c.model.position = "learned"
    c.model.attention = "xla"
    c.model.norm = "layernorm"
    c.model.activation = "gelu"
    c.model.tie_embeddings = True
    c.model.dtype = "float32"  # compute dtype of activations and matmul operands
    c.model.param_dtype = "float32"
    c.model.scan_layers = False
    c.model.remat = "none"
    # Materialise the residual-stream gradient once per sublayer (jaxlm/nn/barrier.py): auto = on
    # for the CPU backend, where XLA would otherwise recompute it in every consumer; off on GPU/TPU.
    c.model.grad_barrier = "auto"
    # Query/key/value projections as one matmul over the concatenated kernels (same parameters).
    # auto = on for the CPU backend, where it was measured; off elsewhere, since concatenating
    # kernels that are sharded over heads (tensor parallelism) costs a reshuffle.
    c.model.fuse_qkv = "auto"
    # Operand dtype of the matmuls when model.dtype is bfloat16 (jaxlm/nn/matmul.py): auto = bf16
    # where the hardware multiplies bf16 natively (GPU, TPU, CPUs with avx512_bf16 or AMX) and
    # float32 on CPUs without bf16 dot instructions (AVX2), where bf16 matmuls are slower than
    # float32 ones; compute = always model.dtype; float32 = always float32.
    c.model.matmul_dtype = "auto"
    c.model.pre_norm = True  # pre-LayerNorm (GPT-2, T5); False: post-LayerNorm (original Transformer, BERT)
    c.model.norm_eps = 1e-5
    c.model.use_bias = True  # biases in dense layers (False for T5 / LLaMA style)
    c.model.num_decoder_layers = 0  # encoder_decoder: decoder depth (0 = num_layers)
    c.model.type_vocab_size = 2  # encoder_only: token-type (segment A/B) embeddings; 0 disables
    c.model.relative_buckets = 32  # position='relative': T5 buckets
    c.model.relative_max_distance = 128
    c.model.rope_max_wavelength = 10_000.0
    c.model.rope_scale = 1.0  # position interpolation factor for longer context (> 1 stretches)
    # RoPE context extension (jaxlm/nn/positions.py RopeScaling): none | linear | ntk | dynamic | yarn |
    # llama3, by rope_scaling_factor. rope_scale > 1 with rope_scaling='none' still means linear.
    c.model.rope_scaling = "none"
    c.model.rope_scaling_factor = 1.0
    c.model.rope_original_max_len = 0  # the training context length (yarn, llama3, dynamic); 0 = model.max_len
    c.model.rope_yarn_beta_fast = 32.0
    c.model.rope_yarn_beta_slow = 1.0
    c.model.rope_yarn_attention_factor = 0.0  # 0 = YaRN's 0.1 ln(factor) + 1
    c.model.rope_llama3_low_freq_factor = 1.0
    c.model.rope_llama3_high_freq_factor = 4.0
    # Sliding-window attention: 0 = full; (w,) every layer; (0, 128) a per-layer list cycled over the
    # layers (here: global, local, global, ...). CLI: --config.model.attention_window=0,128
    c.model.attention_window = (0,)
    c.model.rnn_cell = "lstm"  # kind='rnn': lstm or gru; uses embed_dim and mlp_dim as hidden size

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"
    c.data.files = ""  # comma-separated globs, for source='files'
    c.data.eval_files = ""  # comma-separated globs; if set, evaluation reads these instead
    c.data.name = ""  # catalog dataset name, for source='tfds'
    c.data.data_dir = ""  # where prepared datasets live; '' = ~/.cache/jaxlm/datasets
    c.data.tokenizer = "byte"
    c.data.tokenizer_path = ""  # an existing tokenizer (directory, .model or tokenizer.json) instead of training one
    # Vocabulary size when a tokenizer is trained; 0 = automatic: sentencepiece 8000 capped at what the
    # corpus supports (with a notice), char every character. An explicit size the corpus cannot fill is an error.
    c.data.tokenizer_vocab_size = 0
    c.data.seq_len = 256
    c.data.batch_size = 16  # global batch, across all devices and hosts
    c.data.objective = "causal_lm"
    c.data.seed = 0
    # Shards the training documents are split into, fixed for a run so its batches do not
    # depend on the process count (0: one per process of the first run; a resumed run keeps it).
    c.data.num_shards = 0
    c.data.document = "file"  # what one document is: a file, a line, or a blank-line paragraph
    c.data.eval_fraction = 0.05  # share of documents (or of a single document) held out
    c.data.format = "auto"  # format of data.files: auto (by extension), text, jsonl, csv, tsv
    c.data.fields = ""  # record fields, e.g. 'text=review_body,label=stars' ('' = as in the files / catalog)
    c.data.on_decode_error = "replace"  # invalid UTF-8: replace (with a warning naming file and offset) or error
    # causal_lm: 'concat' cuts the concatenated stream into rows (documents cross rows);
    # 'windows' trains on rows at random offsets of the tokenized text held in memory (nanoGPT's
    # get_batch: same loss per token as nanoGPT's recipe, where 'concat' reads one document's
    # chunks in order and ends 0.33 nats worse, bench/recipe_parity.py); 'first_fit' / 'best_fit'
    # pack whole documents with segment ids, attention never crossing them. 'auto': 'windows' for
    # local text (builtin, files, synthetic), 'concat' for streamed catalog datasets (tfds).
    c.data.packing = "auto"
    c.data.long_documents = "split"  # documents longer than seq_len: split into pieces or truncate
    c.data.train_split = ""  # source='tfds': split to train on ('' = the catalog's, e.g. 'train[:10%]')
    c.data.eval_split = ""  # source='tfds': split to evaluate on ('' = the catalog's)
    c.data.download = False  # source='tfds': allow downloading and preparing a missing dataset
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.kind = "markov"
    c.data.synthetic.vocab_size = 16
    c.data.synthetic.concentration = 0.3  # Dirichlet concentration of the transition rows
    c.data.synthetic.num_train_tokens = 1_000_000
    c.data.synthetic.num_eval_tokens = 100_000
    c.data.synthetic.seed = 0
    c.data.synthetic.min_len = 8  # copy / reverse: source length range
    c.data.synthetic.max_len = 32

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr_ratio = 0.1  # final learning rate as a fraction of lr
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_norms_and_biases = False
    c.optim.clip_norm = 1.0  # 0 disables clipping
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    # Cadences follow the final num_steps unless set: log_every 0 = min(50, num_steps/10),
    # eval_every -1 = num_steps/4 (0 disables periodic eval; a final eval still runs),
    # checkpoint.every_steps 0 = num_steps/4 (both capped at 10,000).
    c.train.log_every = 0
    c.train.eval_every = -1
    c.train.eval_steps = 10  # batches per evaluation in training, sampled across the split (0 = all; jaxlm eval: all)
    # FLOP/s per device, for MFU; 0 = by device kind and model.dtype from jaxlm/hardware.py
    # (H100, A100, TPU v4/v5e/v5p/v6e); on a CPU, this machine's probed matmul peak (cached per CPU).
    c.train.peak_flops = 0.0
    c.train.progress = True  # progress bar on stderr
    # A step whose loss or gradients are not finite never updates the state. 'skip' carries on
    # and stops after max_nonfinite_steps such steps in a row; 'stop' stops at the first one.
    # JAX's persistent compilation cache, so a restarted run skips most compilation
    # ('' = $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/jaxlm/xla; 'none' disables it).
    c.train.compile_cache_dir = ""
    c.train.nonfinite_policy = "skip"
    c.train.max_nonfinite_steps = 10
    # How a non-finite step is kept out of the state: 'on' runs the optimizer update inside a
    # lax.cond, 'off' selects element-wise between new and old state; 'auto' = on for the CPU
    # backend only, where it is faster and smaller (steps.lm.train_step, bench/README.md).
    c.train.cond_update = "auto"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0: num_steps / 4 (see train.log_every)
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.init_from = ""  # a workdir whose latest params initialise a new run
    c.checkpoint.preemption_grace_s = 120.0  # after SIGTERM: save and exit 0 within this, else exit 143

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    c.mesh.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})

    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ml_collections.ConfigDict(
        {name: ",".join(axes or ()) for name, axes in logical_axes.DEFAULT_RULES}
    )

    c.decode = ml_collections.ConfigDict()
    c.decode.temperature = 1.0  # 0 is greedy
    c.decode.top_k = 0  # 0 disables
    c.decode.top_p = 1.0  # 1 disables
    c.decode.max_new_tokens = 200
    c.decode.beam_size = 1  # > 1: beam search (jaxlm.beam_search; sampling settings are then unused)
    # Beam search ranks finished beams by sum log p / (generated length ** length_penalty), as
    # transformers does: > 0 favours longer outputs, < 0 shorter ones.
    c.decode.length_penalty = 1.0
    # Beam search: true stops once beam_size beams have finished; false once no running beam can
    # beat the worst finished one at its current length (transformers' flag and heuristic).
    c.decode.early_stopping = False
    c.decode.num_samples = 1
    c.decode.seed = 0

    # Fine-tuning tasks (config.data.objective = classification | token_classification | qa |
    # seq2seq). Record fields are the canonical names (text, pair, label, tokens, tags, question,
    # context, answers, source, target); config.data.fields maps a dataset's own names onto them.
    c.task = ml_collections.ConfigDict()
    c.task.head = "auto"  # auto: the objective's head; 'regression' = one output trained with MSE
    c.task.num_labels = 0  # 0: len(labels), or the catalog dataset's label count
    c.task.labels = ""  # comma-separated label values in class order ('' = the dataset's / 0..num_labels-1)
    c.task.pooling = "auto"  # auto: [CLS] pooler for encoders, last non-padding token for decoders
    c.task.prefix = ""  # seq2seq: text put before every source, e.g. 'summarize: '
    c.task.targets_len = 0  # seq2seq: target length in tokens (0 = data.seq_len)
    c.task.max_question_len = 64  # qa: question tokens kept
    c.task.max_answer_len = 30  # qa: longest answer span (tokens) predict and eval consider
    c.task.qa_impossible = "drop"  # qa: an answer cut off by seq_len: drop the example or mark it unanswerable

    # Lightweight fine-tuning (jaxlm/peft.py): a frozen base (config.checkpoint.init_from) and a small
    # trainable tree. method: none or a comma-separated combination of PEFT_METHODS, e.g. 'lora,bitfit'.
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "none"
    c.peft.targets = "attn/(query|value)"  # regexes over parameter paths (comma-separated) that LoRA/DoRA/IA3 adapt
    c.peft.rank = 8  # LoRA/DoRA rank r
    c.peft.alpha = 16.0  # LoRA/DoRA scale alpha / r
    c.peft.dropout = 0.0  # dropout on the LoRA/DoRA input (training only)
    c.peft.adapter_dim = 64  # bottleneck adapters: hidden size
    c.peft.adapter_kind = "houlsby"  # houlsby: after attention and MLP; pfeiffer: after the MLP only
    c.peft.num_virtual_tokens = 20  # prefix / prompt tuning
    c.peft.trainable = "head/|pooler/"  # extra regexes over parameter paths kept trainable (the task head)
    c.peft.init_scale = 0.01  # std of LoRA A (B starts at zero, so the adapted model starts as the base)

    # Text GANs (jaxlm/main/gan.py runs them when mode != 'none'; configs/seqgan.py documents them).
    c.gan = ml_collections.ConfigDict()
    c.gan.mode = "none"  # seqgan: REINFORCE with Monte-Carlo rollouts; gumbel: Gumbel-softmax (RelGAN)
    c.gan.generator = "lstm"  # lstm (g_embed_dim / g_hidden_dim) or transformer (config.model, decoder-only)
    c.gan.discriminator = "cnn"  # cnn (SeqGAN/Texygen), transformer (encoder classifier), lstm
    c.gan.loss = "standard"
    c.gan.g_embed_dim = 32  # the SeqGAN generator: embedding 32, hidden 32
    c.gan.g_hidden_dim = 32
    c.gan.d_embed_dim = 64
    c.gan.d_hidden_dim = 64  # lstm discriminator state / transformer discriminator width
    c.gan.d_num_layers = 2  # transformer discriminator depth
    c.gan.d_num_heads = 4
    # cnn discriminator: SeqGAN's filter widths and counts (widths longer than the sequence are skipped).
    c.gan.d_filter_sizes = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20)
    c.gan.d_num_filters = (100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160)
    c.gan.d_dropout = 0.25  # SeqGAN keeps 0.75
    c.gan.spectral_norm = False  # spectral normalization of every discriminator weight matrix
    c.gan.spectral_norm_iterations = 3  # power iterations per forward pass (stateless, see jaxlm/nn/spectral_norm.py)
    c.gan.pretrain_g_steps = 0  # MLE updates of G (or pretrain_g_epochs passes over the data; not both)
    c.gan.pretrain_g_epochs = 0
    c.gan.pretrain_d_steps = 0  # discriminator updates (each d_epochs updates on one real/fake batch)
    c.gan.adv_rounds = 0  # adversarial rounds: g_steps G updates, then d_steps D batches x d_epochs updates
    c.gan.g_steps = 1
    c.gan.d_steps = 5
    c.gan.d_epochs = 3
    c.gan.num_rollouts = 16
    c.gan.rollout_update_rate = 0.8  # rollout = rate * rollout + (1 - rate) * G after each G update
    # Gumbel-softmax: inverse temperature beta (RelGAN's convention) goes 1 -> max_temperature over the rounds.
    c.gan.max_temperature = 100.0
    c.gan.temperature_schedule = "exp"
    c.gan.gumbel_feed = "hard"  # next input: the sampled token (RelGAN) or the relaxed one-hot itself
    c.gan.gp_weight = 10.0  # wgan_gp penalty weight
    c.gan.g_lr = 0.01  # MLE pretraining (SeqGAN: Adam 0.01, clip 5)
    c.gan.adv_g_lr = 0.01  # adversarial G updates
    c.gan.d_lr = 1e-4
    c.gan.b1 = 0.9
    c.gan.b2 = 0.999
    c.gan.weight_decay = 0.0
    c.gan.clip_norm = 5.0  # 0 disables
    c.gan.oracle_num_train = 10_000  # data.source='oracle': samples of length data.seq_len as training data
    c.gan.oracle_num_test = 2_000  # held-out oracle samples for NLL_test
    c.gan.eval_num_samples = 1_000  # G samples scored by the oracle (NLL_oracle) and for distinct-n
    c.gan.eval_bleu_samples = 0  # samples for BLEU-2..5 / Self-BLEU-2..5 (nltk, method1 smoothing); 0 disables
    c.gan.eval_bleu_references = 1_000  # held-out references for BLEU

    c.lock()
    return c


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parse a config-file argument ``'size=tiny,foo=bar'`` into a dict of strings."""
    out: dict[str, str] = {}
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not key=value; write e.g. ':size=tiny'")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:arg]`` by calling its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}; give a path like configs/gpt.py")
    module_spec = importlib.util.spec_from_file_location("jaxlm_user_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--config: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:  # also IndentationError, TabError
        raise ConfigError(f"{path}:{e.lineno or 0}: {type(e).__name__}: {e.msg}; fix the config file") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: any error is reported as one line
        raise ConfigError(_user_code_error(path, e, "while loading it")) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path!r} defines no get_config(arg)")
    try:
        config = module.get_config(arg)
    except ConfigError:
        raise
    except (AttributeError, KeyError) as e:  # a locked ConfigDict rejects unknown keys
        raise ConfigError(_user_code_error(path, e, "in get_config") + "; see config_lib.base_config()") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(_user_code_error(path, e, "in get_config")) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: get_config in {path!r} must return a ConfigDict")
    return config


def _user_code_error(path: str, e: BaseException, where: str) -> str:
    """``path:LINE: Type: message`` for an exception raised by the code of config file ``path``."""
    line = 0
    target = os.path.realpath(path)
    for frame in traceback.extract_tb(e.__traceback__):
        if os.path.realpath(frame.filename) == target:
            line = frame.lineno or 0  # the innermost line of the config file itself
    location = f"{path}:{line}" if line else path
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    # A locked ConfigDict lists every other field after the key: keep the first sentence.
    text = (text.strip().splitlines() or [type(e).__name__])[0].split(". Other fields present")[0]
    if text.count("'") % 2 and text.startswith("'"):  # ml_collections quotes its whole message
        text = text[1:]
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{location}: {type(e).__name__}: {text} ({where}); fix the config file"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("'\"")
    return text.splitlines()[0] if text else type(e).__name__


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Parse an override string into the type of the current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, int):
        try:
            value = ast.literal_eval(text.replace("_", ""))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"--config.{key}={text}: expected an integer")
        return value
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(v.strip() for v in text.split(",") if v.strip())
        return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    raise ConfigError(f"--config.{key}: cannot be set from the command line")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> None:
    """Apply ``{'model.num_layers': '4', ...}`` in place, rejecting unknown keys."""
    for key, text in overrides.items():
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(f"--config.{key}: unknown key {part!r} in {where}; valid keys: " + ", ".join(known))
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a section; set one of its keys instead")
        value = _parse_value(text, current, key)
        with node.unlocked():
            node[parts[-1]] = value


# --------------------------------------------------------------------------------------
# Frozen, validated config.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model; see base_config() for the meaning of each field."""

    kind: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    mlp_dim: int
    max_len: int
    vocab_size: int
    vocab_multiple: int
    dropout_rate: float
    position: str
    attention: str
    norm: str
    activation: str
    tie_embeddings: bool
    dtype: str
    param_dtype: str
    scan_layers: bool
    remat: str
    grad_barrier: str
    fuse_qkv: str
    matmul_dtype: str
    pre_norm: bool
    norm_eps: float
    use_bias: bool
    num_decoder_layers: int
    type_vocab_size: int
    relative_buckets: int
    relative_max_distance: int
    rope_max_wavelength: float
    rope_scale: float
    rnn_cell: str
    rope_scaling: str
    rope_scaling_factor: float
    rope_original_max_len: int
    rope_yarn_beta_fast: float
    rope_yarn_beta_slow: float
    rope_yarn_attention_factor: float
    rope_llama3_low_freq_factor: float
    rope_llama3_high_freq_factor: float
    attention_window: tuple[int, ...]
    # Derived from config.peft by validate(), not config keys (never in config.json): the modules
    # lightweight fine-tuning adds to the forward pass (jaxlm.nn.adapters, jaxlm.nn.virtual_tokens).
    # adapter_dim 0 = no bottleneck adapters; prefix_tokens / prompt_tokens 0 = none.
    adapter_dim: int = dataclasses.field(default=0, kw_only=True, metadata={"derived": True})
    adapter_kind: str = dataclasses.field(default="houlsby", kw_only=True, metadata={"derived": True})
    prefix_tokens: int = dataclasses.field(default=0, kw_only=True, metadata={"derived": True})
    prompt_tokens: int = dataclasses.field(default=0, kw_only=True, metadata={"derived": True})

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the vocabulary arrays: ``vocab_size`` rounded up to ``vocab_multiple`` (0 and 1: unpadded).

        The one place the padded size is computed; ``vocab_multiple`` is resolved (auto, mesh) by
        ``jaxlm.main.experiment.resolve_vocab_multiple`` before a model is built.
        """
        m = max(self.vocab_multiple, 1)
        return -(-self.vocab_size // m) * m


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic source with known statistics."""

    kind: str
    vocab_size: int
    concentration: float
    num_train_tokens: int
    num_eval_tokens: int
    seed: int
    min_len: int
    max_len: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from and how they are made."""

    source: str
    files: str
    eval_files: str
    name: str
    data_dir: str
    tokenizer: str
    tokenizer_path: str
    tokenizer_vocab_size: int
    seq_len: int
    batch_size: int
    objective: str
    seed: int
    num_shards: int
    document: str
    eval_fraction: float
    format: str
    fields: str
    on_decode_error: str
    packing: str
    long_documents: str
    train_split: str
    eval_split: str
    download: bool
    synthetic: SyntheticConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup, decay schedule, clipping and gradient accumulation."""

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    schedule: str
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decay_norms_and_biases: bool
    clip_norm: float
    grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of training and how often to log and evaluate."""

    num_steps: int
    log_every: int
    eval_every: int
    eval_steps: int
    peak_flops: float
    progress: bool
    compile_cache_dir: str
    nonfinite_policy: str
    max_nonfinite_steps: int
    cond_update: str


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing."""

    every_steps: int
    max_to_keep: int
    async_save: bool
    init_from: str
    preemption_grace_s: float


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes per named axis within a slice (shape) and across slices (dcn)."""

    shape: dict[str, int]
    dcn_shape: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Logical axis name -> comma-separated mesh axes ('' replicates)."""

    rules: dict[str, str]

    def as_tuples(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        """The rules in the form flax.linen's logical partitioning takes."""
        out = []
        for name, axes in self.rules.items():
            parts = tuple(a.strip() for a in axes.split(",") if a.strip())
            out.append((name, parts or None))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Sampling settings for generation."""

    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    beam_size: int
    length_penalty: float
    early_stopping: bool
    num_samples: int
    seed: int


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Fine-tuning task: which head, its labels and the task's data options."""

    head: str
    num_labels: int
    labels: str
    pooling: str
    prefix: str
    targets_len: int
    max_question_len: int
    max_answer_len: int
    qa_impossible: str

    @property
    def label_list(self) -> list[str]:
        """``labels`` split on commas (empty when not given)."""
        return [v.strip() for v in self.labels.split(",") if v.strip()]


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Lightweight fine-tuning: which methods, what they adapt and what else trains (see base_config())."""

    method: str
    targets: str
    rank: int
    alpha: float
    dropout: float
    adapter_dim: int
    adapter_kind: str
    num_virtual_tokens: int
    trainable: str
    init_scale: float

    @property
    def methods(self) -> tuple[str, ...]:
        """``method`` split on commas, without 'none' (empty: no PEFT)."""
        return tuple(m.strip() for m in self.method.split(",") if m.strip() and m.strip() != "none")


@dataclasses.dataclass(frozen=True)
class GanConfig:
    """Text GAN: models, losses and the pretrain / adversarial schedule (see base_config())."""

    mode: str
    generator: str
    discriminator: str
    loss: str
    g_embed_dim: int
    g_hidden_dim: int
    d_embed_dim: int
    d_hidden_dim: int
    d_num_layers: int
    d_num_heads: int
    d_filter_sizes: tuple
    d_num_filters: tuple
    d_dropout: float
    spectral_norm: bool
    spectral_norm_iterations: int
    pretrain_g_steps: int
    pretrain_g_epochs: int
    pretrain_d_steps: int
    adv_rounds: int
    g_steps: int
    d_steps: int
    d_epochs: int
    num_rollouts: int
    rollout_update_rate: float
    max_temperature: float
    temperature_schedule: str
    gumbel_feed: str
    gp_weight: float
    g_lr: float
    adv_g_lr: float
    d_lr: float
    b1: float
    b2: float
    weight_decay: float
    clip_norm: float
    oracle_num_train: int
    oracle_num_test: int
    eval_num_samples: int
    eval_bleu_samples: int
    eval_bleu_references: int


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole validated experiment configuration."""

    seed: int
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig
    sharding: ShardingConfig
    decode: DecodeConfig
    task: TaskConfig
    gan: GanConfig
    peft: PeftConfig


def _to_dataclass(cls: type, value: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and leaf types."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.{path} must be a section, got {value!r}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"unknown key config.{_dotted(path, unknown[0])}; valid keys: {', '.join(names)}")
    missing = [n for n in names if n not in value]
    if missing:
        raise ConfigError(f"config.{_dotted(path, missing[0])} is missing; start from base_config()")
    kwargs = {}
    for name in names:
        kwargs[name] = _coerce(hints[name], value[name], _dotted(path, name))
    return cls(**kwargs)


# Resolving the annotations is most of validate()'s time; they never change.
_type_hints = functools.cache(typing.get_type_hints)


def _dotted(path: str, name: str) -> str:
    # The top level has the empty path: 'optim.lr', not '.optim.lr' (printed as config..optim.lr).
    return f"{path}.{name}" if path else str(name)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _to_dataclass(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.{path} must be a section")
        _, vtype = typing.get_args(hint)
        return {k: _coerce(vtype, v, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.{path}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.{path}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.{path}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"config.{path}={value!r} must be finite")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config.{path}={value!r} must be a string")
        return value
    if isinstance(hint, types.UnionType) or origin is not None:
        return value
    return value


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
    """Check every field and cross-field constraint; return the frozen config.

    Raises ConfigError with a one-line message naming the field and the fix.
    """
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    cfg: Config = _to_dataclass(Config, raw, "")
    for dotted, valid in CHOICES.items():
        section, _, rest = dotted.partition(".")
        obj: Any = getattr(cfg, section)
        for part in rest.split("."):
            obj = getattr(obj, part)
        _check(obj in valid, f"config.{dotted}={obj!r} is not one of: {', '.join(valid)}")

    m, d, o, t, ck = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    for name in ("num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len"):
        _check(getattr(m, name) > 0, f"config.model.{name}={getattr(m, name)} must be > 0")
    _check(
        m.embed_dim % m.num_heads == 0,
        f"config.model.num_heads={m.num_heads} must divide config.model.embed_dim="
        f"{m.embed_dim}; pick e.g. num_heads={_divisor_near(m.embed_dim, m.num_heads)}",
    )
    _check(m.num_kv_heads >= 0, "config.model.num_kv_heads must be >= 0 (0 = num_heads)")
    if m.num_kv_heads:
        _check(
            m.num_heads % m.num_kv_heads == 0,
            f"config.model.num_kv_heads={m.num_kv_heads} must divide config.model.num_heads={m.num_heads}",
        )
    if m.position == "rope":
        _check(
            m.head_dim % 2 == 0,
            f"config.model.position='rope' needs an even head dim, but embed_dim/num_heads = {m.head_dim}",
        )
        _check(m.rope_scale > 0, "config.model.rope_scale must be > 0")
        _check(
            m.rope_scaling == "none" or m.rope_scale == 1.0,
            f"config.model.rope_scale={m.rope_scale} and rope_scaling={m.rope_scaling!r} both rescale RoPE; "
            "set rope_scaling_factor instead of rope_scale",
        )
        _check(m.rope_scaling_factor > 0, "config.model.rope_scaling_factor must be > 0")
        _check(m.rope_original_max_len >= 0, "config.model.rope_original_max_len must be >= 0 (0 = model.max_len)")
        _check(
            m.rope_yarn_beta_fast > m.rope_yarn_beta_slow > 0,
            "config.model.rope_yarn_beta_fast must exceed rope_yarn_beta_slow, both > 0",
        )
        _check(m.rope_yarn_attention_factor >= 0, "config.model.rope_yarn_attention_factor must be >= 0 (0 = default)")
        _check(
            m.rope_llama3_high_freq_factor > m.rope_llama3_low_freq_factor > 0,
            "config.model.rope_llama3_high_freq_factor must exceed rope_llama3_low_freq_factor, both > 0",
        )
    windows = m.attention_window if isinstance(m.attention_window, (tuple, list)) else (m.attention_window,)
    _check(
        len(windows) > 0 and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows),
        f"config.model.attention_window={m.attention_window!r} must be integers >= 0 (0 = full), e.g. 128 or 0,128",
    )
    _check(
        len(windows) <= m.num_layers,
        f"config.model.attention_window has {len(windows)} entries but the model has {m.num_layers} layers",
    )
    _check(
        all(w <= d.seq_len for w in windows),
        f"config.model.attention_window={tuple(windows)} exceeds config.data.seq_len={d.seq_len} (a window that long "
        "is full attention); use 0 for full attention or a smaller window",
    )
    if m.attention == "ring":
        _check(m.kind != "rnn", "config.model.attention='ring' needs a Transformer, not kind='rnn'; use xla")
        seq_devices = cfg.mesh.shape.get("sequence", 1) * cfg.mesh.dcn_shape.get("sequence", 1)
        _check(
            seq_devices < 1 or d.seq_len % seq_devices == 0,
            f"config.data.seq_len={d.seq_len} must be a multiple of the {seq_devices} sequence devices "
            "(config.mesh.shape.sequence) for model.attention='ring'",
        )
    if m.position == "alibi":
        _check(
            m.kind == "decoder_only",
            f"config.model.position='alibi' is supported for decoder_only models, not kind={m.kind!r}; "
            "use relative or learned",
        )
    _check(m.norm_eps > 0, "config.model.norm_eps must be > 0")
    _check(m.num_decoder_layers >= 0, "config.model.num_decoder_layers must be >= 0 (0 = num_layers)")
    _check(m.type_vocab_size >= 0, "config.model.type_vocab_size must be >= 0")
    _check(
        m.relative_buckets >= 2 and m.relative_max_distance > m.relative_buckets // 2,
        "config.model.relative_buckets must be >= 2 and relative_max_distance > relative_buckets/2",
    )
    _check(m.vocab_size >= 0, "config.model.vocab_size must be >= 0 (0 = the tokenizer's)")
    _check(
        m.vocab_multiple >= 0,
        f"config.model.vocab_multiple={m.vocab_multiple} must be >= 0 (0 = auto for the hardware, 1 = no padding)",
    )
    _check(
        0.0 <= m.dropout_rate < 1.0,
        f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1)",
    )
    _check(
        m.kind in OBJECTIVE_KINDS[d.objective],
        f"config.data.objective={d.objective!r} does not train config.model.kind={m.kind!r}; "
        f"it trains: {', '.join(OBJECTIVE_KINDS[d.objective])}",
    )
    _check(d.tokenizer_vocab_size >= 0, "config.data.tokenizer_vocab_size must be >= 0")
    if d.tokenizer == "hf":
        _check(
            bool(d.tokenizer_path), "config.data.tokenizer='hf' needs config.data.tokenizer_path=path/to/tokenizer.json"
        )
    _check(d.seq_len > 0, f"config.data.seq_len={d.seq_len} must be > 0")
    _check(
        d.seq_len <= m.max_len,
        f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={m.max_len}; raise max_len or lower seq_len",
    )
    _check(d.num_shards >= 0, "config.data.num_shards must be >= 0 (0 = one per process)")
    if d.num_shards:
        _check(
            d.batch_size % d.num_shards == 0,
            f"config.data.num_shards={d.num_shards} must divide config.data.batch_size={d.batch_size}",
        )
    _check(d.batch_size > 0, f"config.data.batch_size={d.batch_size} must be > 0")
    _check(
        0.0 <= d.eval_fraction < 1.0,
        f"config.data.eval_fraction={d.eval_fraction} must be in [0, 1)",
    )
    if d.source == "files":
        _check(bool(d.files.strip()), "config.data.files is empty; set it to a glob like '~/corpus/*.txt'")
    if d.source == "tfds":
        _check(bool(d.name), "config.data.name is empty; name a tfds dataset like 'tiny_shakespeare'")
    s = d.synthetic
    _check(s.vocab_size >= 2, "config.data.synthetic.vocab_size must be >= 2")
    _check(s.concentration > 0, "config.data.synthetic.concentration must be > 0")
    _check(o.lr > 0, f"config.optim.lr={o.lr} must be > 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "config.optim.min_lr_ratio must be in [0, 1]")
    _check(o.warmup_steps >= 0, "config.optim.warmup_steps must be >= 0")
    _check(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, "config.optim.b1 and b2 must be in [0, 1)")
    _check(o.eps > 0, "config.optim.eps must be > 0")
    _check(o.weight_decay >= 0, "config.optim.weight_decay must be >= 0")
    _check(o.clip_norm >= 0, "config.optim.clip_norm must be >= 0 (0 disables clipping)")
    _check(o.grad_accum_steps >= 1, "config.optim.grad_accum_steps must be >= 1")
    _check(
        d.batch_size % o.grad_accum_steps == 0,
        f"config.optim.grad_accum_steps={o.grad_accum_steps} must divide config.data.batch_size={d.batch_size}",
    )
    _check(t.num_steps > 0, f"config.train.num_steps={t.num_steps} must be > 0")
    _check(t.log_every >= 0, f"config.train.log_every={t.log_every} must be >= 0 (0 = from num_steps)")
    _check(t.eval_every >= -1, "config.train.eval_every must be >= -1 (0 = only at the end, -1 = from num_steps)")
    _check(t.eval_steps >= 0, f"config.train.eval_steps={t.eval_steps} must be >= 0 (0 = the whole split)")
    _check(t.peak_flops >= 0, "config.train.peak_flops must be >= 0 (FLOP/s per device; 0 = by device kind)")
    _check(t.max_nonfinite_steps >= 1, "config.train.max_nonfinite_steps must be >= 1")
    _check(ck.preemption_grace_s > 0, "config.checkpoint.preemption_grace_s must be > 0 seconds")
    _check(ck.every_steps >= 0, f"config.checkpoint.every_steps={ck.every_steps} must be >= 0 (0 = from num_steps)")
    _check(ck.max_to_keep > 0, f"config.checkpoint.max_to_keep={ck.max_to_keep} must be > 0")
    for field in ("shape", "dcn_shape"):
        sizes = getattr(cfg.mesh, field)
        _check(
            set(sizes) == set(logical_axes.MESH_AXES),
            f"config.mesh.{field} must have exactly the axes {', '.join(logical_axes.MESH_AXES)}",
        )
        _check(
            sum(1 for v in sizes.values() if v == -1) <= (1 if field == "shape" else 0)
            and all(v == -1 or v >= 1 for v in sizes.values()),
            f"config.mesh.{field} sizes must be >= 1"
            + (" with at most one -1 (filled from the device count)" if field == "shape" else ""),
        )
    for name, axes in cfg.sharding.rules.items():
        _check(name in logical_axes.ALL_AXES, f"config.sharding.rules.{name} is not a logical axis")
        for axis in (a.strip() for a in axes.split(",") if a.strip()):
            _check(
                axis in logical_axes.MESH_AXES,
                f"config.sharding.rules.{name}={axes!r}: {axis!r} is not a mesh axis "
                f"({', '.join(logical_axes.MESH_AXES)})",
            )
    dc = cfg.decode
    _check(dc.temperature >= 0, "config.decode.temperature must be >= 0 (0 is greedy)")
    _check(dc.top_k >= 0, "config.decode.top_k must be >= 0 (0 disables)")
    _check(0.0 < dc.top_p <= 1.0, "config.decode.top_p must be in (0, 1]")
    _check(dc.max_new_tokens > 0, "config.decode.max_new_tokens must be > 0")
    _check(dc.beam_size >= 1, "config.decode.beam_size must be >= 1")
    _check(math.isfinite(dc.length_penalty), "config.decode.length_penalty must be a finite number (0: plain sums)")
    _check(dc.num_samples >= 1, "config.decode.num_samples must be >= 1")
    _check(
        dc.beam_size == 1 or dc.num_samples <= dc.beam_size,
        f"config.decode.num_samples={dc.num_samples} exceeds config.decode.beam_size={dc.beam_size}; "
        "beam search returns at most beam_size outputs",
    )
    tk = cfg.task
    _check(tk.num_labels >= 0, f"config.task.num_labels={tk.num_labels} must be >= 0 (0 = from the labels)")
    if tk.num_labels and tk.label_list:
        _check(
            tk.num_labels == len(tk.label_list),
            f"config.task.num_labels={tk.num_labels} disagrees with the {len(tk.label_list)} config.task.labels; "
            "set one of them",
        )
    _check(len(set(tk.label_list)) == len(tk.label_list), "config.task.labels has a repeated label")
    _check(tk.targets_len >= 0, "config.task.targets_len must be >= 0 (0 = config.data.seq_len)")
    _check(tk.max_question_len > 0, "config.task.max_question_len must be > 0")
    _check(tk.max_answer_len > 0, "config.task.max_answer_len must be > 0")
    head = task_head(cfg)
    if head != "none":
        _check(
            m.kind in ("encoder_only", "decoder_only"),
            f"config.task.head={head!r} attaches to encoder_only or decoder_only models, not config.model.kind="
            f"{m.kind!r}",
        )
    if tk.head not in ("auto", "none") and d.objective in OBJECTIVE_HEADS:
        want = OBJECTIVE_HEADS[d.objective]
        ok = tk.head == want or (want == "classification" and tk.head == "regression")
        _check(ok, f"config.task.head={tk.head!r} does not fit config.data.objective={d.objective!r}; use auto")
    _validate_gan(cfg)
    _validate_peft(cfg)
    return _resolve_cadence(_with_peft_modules(cfg))


def _validate_peft(cfg: Config) -> None:
    p = cfg.peft
    names = [n.strip() for n in p.method.split(",") if n.strip()]
    _check(bool(names), "config.peft.method is empty; use none or a combination of: " + ", ".join(PEFT_METHODS))
    for name in names:
        _check(
            name in PEFT_METHODS or (name == "none" and len(names) == 1),
            f"config.peft.method={p.method!r}: {name!r} is not one of: none, {', '.join(PEFT_METHODS)} "
            "(combine with commas, e.g. lora,bitfit)",
        )
    _check(len(set(names)) == len(names), f"config.peft.method={p.method!r} names a method twice")
    _check(not {"lora", "dora"} <= set(names), "config.peft.method combines lora and dora; dora already includes lora")
    _check(p.rank > 0, f"config.peft.rank={p.rank} must be > 0")
    _check(math.isfinite(p.alpha) and p.alpha > 0, f"config.peft.alpha={p.alpha} must be > 0")
    _check(0.0 <= p.dropout < 1.0, f"config.peft.dropout={p.dropout} must be in [0, 1)")
    _check(p.adapter_dim > 0, f"config.peft.adapter_dim={p.adapter_dim} must be > 0")
    _check(p.num_virtual_tokens > 0, f"config.peft.num_virtual_tokens={p.num_virtual_tokens} must be > 0")
    _check(math.isfinite(p.init_scale) and p.init_scale >= 0, "config.peft.init_scale must be >= 0")
    for field in ("targets", "trainable"):
        for pattern in (x.strip() for x in getattr(p, field).split(",") if x.strip()):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config.peft.{field}: {pattern!r} is not a regular expression ({e})") from None
    _validate_peft_modules(cfg, names)


# Model kinds each forward-pass PEFT method fits (jaxlm.nn.adapters, jaxlm.nn.virtual_tokens).
PEFT_MODULE_KINDS: dict[str, tuple[str, ...]] = {
    "adapter": ("decoder_only", "encoder_only", "encoder_decoder"),
    "prefix": ("decoder_only", "encoder_only"),
    "prompt": ("decoder_only", "encoder_only", "encoder_decoder"),
}


def _validate_peft_modules(cfg: Config, names: list[str]) -> None:
    """Adapters, prefixes and prompts change the model: which models and attention settings take them."""
    m, p = cfg.model, cfg.peft
    _check(
        not {"prefix", "prompt"} <= set(names),
        f"config.peft.method={p.method!r} combines prefix and prompt tuning; pick one",
    )
    for name in names:
        kinds = PEFT_MODULE_KINDS.get(name)
        if kinds is None:
            continue
        _check(
            m.kind in kinds,
            f"config.peft.method={p.method!r}: {name} needs config.model.kind in {', '.join(kinds)}, "
            f"not {m.kind!r}; use lora, dora, ia3 or bitfit there",
        )
        if name == "adapter":
            continue
        _check(
            m.attention not in ("blockwise", "ring"),
            f"config.peft.method={p.method!r}: {name} tuning needs config.model.attention=xla or dot_product "
            f"(its virtual tokens are attended across packed segments, which {m.attention} masks cannot express)",
        )
        windows = m.attention_window if isinstance(m.attention_window, (tuple, list)) else (m.attention_window,)
        _check(
            not any(windows),
            f"config.peft.method={p.method!r}: {name} tuning needs full attention; set config.model.attention_window=0",
        )
        if m.position in ("learned", "sinusoidal"):
            _check(
                cfg.data.seq_len + p.num_virtual_tokens <= m.max_len,
                f"config.peft.num_virtual_tokens={p.num_virtual_tokens}: the virtual tokens take positions "
                f"0..{p.num_virtual_tokens - 1}, so config.data.seq_len={cfg.data.seq_len} plus them exceeds "
                f"config.model.max_len={m.max_len}; set config.data.seq_len={m.max_len - p.num_virtual_tokens} "
                "or fewer virtual tokens",
            )


def _with_peft_modules(cfg: Config) -> Config:
    """Fill the derived ModelConfig fields that make the model grow config.peft's modules."""
    methods, p = cfg.peft.methods, cfg.peft
    model = dataclasses.replace(
        cfg.model,
        adapter_dim=p.adapter_dim if "adapter" in methods else 0,
        adapter_kind=p.adapter_kind,
        prefix_tokens=p.num_virtual_tokens if "prefix" in methods else 0,
        prompt_tokens=p.num_virtual_tokens if "prompt" in methods else 0,
    )
    return dataclasses.replace(cfg, model=model)


def _validate_gan(cfg: Config) -> None:
    """The text-GAN section (only checked in depth when ``config.gan.mode`` is not 'none')."""
    g, d = cfg.gan, cfg.data
    _check(
        d.source != "oracle" or g.mode != "none",
        "config.data.source='oracle' is the SeqGAN oracle for text GANs; set config.gan.mode=seqgan or gumbel",
    )
    if g.mode == "none":
        return
    for name in (
        "g_embed_dim",
        "g_hidden_dim",
        "d_embed_dim",
        "d_hidden_dim",
        "d_num_layers",
        "d_num_heads",
        "g_steps",
        "d_steps",
        "d_epochs",
        "num_rollouts",
        "spectral_norm_iterations",
        "oracle_num_train",
        "oracle_num_test",
        "eval_num_samples",
        "eval_bleu_references",
    ):
        _check(getattr(g, name) > 0, f"config.gan.{name}={getattr(g, name)} must be > 0")
    for name in ("pretrain_g_steps", "pretrain_g_epochs", "pretrain_d_steps", "adv_rounds", "eval_bleu_samples"):
        _check(getattr(g, name) >= 0, f"config.gan.{name}={getattr(g, name)} must be >= 0")
    _check(
        not (g.pretrain_g_steps and g.pretrain_g_epochs),
        "config.gan.pretrain_g_steps and pretrain_g_epochs are both set; set one of them (the other to 0)",
    )
    _check(
        g.pretrain_g_steps + g.pretrain_g_epochs + g.pretrain_d_steps + g.adv_rounds > 0,
        "config.gan has nothing to train; set pretrain_g_epochs, pretrain_g_steps, pretrain_d_steps or adv_rounds",
    )
    _check(
        g.d_embed_dim % g.d_num_heads == 0 or g.discriminator != "transformer",
        f"config.gan.d_num_heads={g.d_num_heads} must divide config.gan.d_embed_dim={g.d_embed_dim}",
    )
    sizes, counts = tuple(g.d_filter_sizes), tuple(g.d_num_filters)
    _check(
        len(sizes) == len(counts) and len(sizes) > 0,
        "config.gan.d_filter_sizes and d_num_filters must be non-empty and of the same length",
    )
    _check(
        all(isinstance(v, int) and v > 0 for v in sizes + counts),
        "config.gan.d_filter_sizes and d_num_filters must be positive integers",
    )
    _check(
        g.discriminator != "cnn" or min(sizes) <= d.seq_len,
        f"config.gan.d_filter_sizes: every width exceeds config.data.seq_len={d.seq_len}; add a smaller width",
    )
    _check(0.0 <= g.d_dropout < 1.0, f"config.gan.d_dropout={g.d_dropout} must be in [0, 1)")
    _check(0.0 <= g.rollout_update_rate <= 1.0, "config.gan.rollout_update_rate must be in [0, 1]")
    _check(g.max_temperature >= 1.0, f"config.gan.max_temperature={g.max_temperature} must be >= 1 (1 = constant)")
    _check(g.gp_weight >= 0, "config.gan.gp_weight must be >= 0")
    for name in ("g_lr", "adv_g_lr", "d_lr"):
        _check(getattr(g, name) > 0, f"config.gan.{name}={getattr(g, name)} must be > 0")
    _check(0.0 <= g.b1 < 1.0 and 0.0 <= g.b2 < 1.0, "config.gan.b1 and b2 must be in [0, 1)")
    _check(g.weight_decay >= 0 and g.clip_norm >= 0, "config.gan.weight_decay and clip_norm must be >= 0")
    _check(
        d.source in ("oracle", "builtin", "files"),
        f"config.data.source={d.source!r}: text GANs train on 'oracle', 'builtin' or 'files' data",
    )
    _check(
        g.generator != "transformer" or cfg.model.kind == "decoder_only",
        "config.gan.generator='transformer' is config.model's decoder-only model; set config.model.kind=decoder_only",
    )


def task_head(cfg: Config) -> str:
    """The task head the model carries: 'none' for pre-training objectives and seq2seq."""
    head = cfg.task.head
    if head == "auto":
        head = OBJECTIVE_HEADS.get(cfg.data.objective, "none")
        if head == "classification" and cfg.task.num_labels == 1:
            head = "regression"
    return head


def _resolve_cadence(cfg: Config) -> Config:
    """Fill the cadences left at 0 (log, checkpoint) or -1 (eval) from the final ``num_steps``.

    Config files leave them unset so that ``--config.train.num_steps=N`` on a preset moves
    them too (a preset's own figures would otherwise stay fixed).
    """
    n = cfg.train.num_steps
    t, ck = cfg.train, cfg.checkpoint
    log_every = t.log_every or max(1, min(50, n // 10))
    eval_every = t.eval_every if t.eval_every >= 0 else max(1, min(n // 4, 10_000))
    every_steps = ck.every_steps or max(1, min(n // 4, 10_000))
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(t, log_every=log_every, eval_every=eval_every),
        checkpoint=dataclasses.replace(ck, every_steps=every_steps),
    )


def _divisor_near(n: int, k: int) -> int:
    # Search outwards from k (bounded), not over range(n): n may be a huge fuzzed value.
    for delta in range(0, min(max(n, k), 4096)):
        for d in (k - delta, k + delta):
            if 1 <= d <= n and n % d == 0:
                return d
    return 1


def to_json(config: Config | ml_collections.ConfigDict) -> str:
    """Serialize a config to JSON (for the workdir's config.json)."""
    raw = _config_keys(config) if isinstance(config, Config) else config.to_dict()
    return json.dumps(raw, indent=2, sort_keys=False)


def _config_keys(obj: Any) -> Any:
    """``dataclasses.asdict`` without the derived fields (they are recomputed by validate())."""
    if dataclasses.is_dataclass(obj):
        fields = [f for f in dataclasses.fields(obj) if not f.metadata.get("derived")]
        return {f.name: _config_keys(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, dict):
        return {k: _config_keys(v) for k, v in obj.items()}
    return obj


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a locked ConfigDict from :func:`to_json` output, on top of base_config().

    Keys missing from an older file keep their defaults, except ``model.vocab_multiple``: 1
    (unpadded, as such files' checkpoints are); keys the current version does not know are rejected.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"saved config is not valid JSON ({e.msg} at line {e.lineno}); fix it or use a new workdir"
        ) from None
    config = base_config()
    _merge(config, raw, "")
    if isinstance(raw.get("model"), Mapping) and "vocab_multiple" not in raw["model"]:
        # Written before vocabulary padding existed: its checkpoints hold unpadded arrays.
        config.model.vocab_multiple = 1
    return config


def _merge(node: ml_collections.ConfigDict, raw: Mapping[str, Any], path: str) -> None:
    if not isinstance(raw, Mapping):
        where = path.rstrip(".") or "the top level"
        raise ConfigError(f"saved config: {where} must be a section, got {raw!r:.60}; fix it or use a new workdir")
    for key, value in raw.items():
        if key not in node:
            raise ConfigError(f"saved config has unknown key {path}{key}; it was written by a newer jaxlm")
        if isinstance(node[key], ml_collections.ConfigDict):
            _merge(node[key], value, f"{path}{key}.")
        else:
            current = node[key]
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            try:
                with node.unlocked():
                    node[key] = value
            except (TypeError, ValueError):  # ml_collections keeps each field's type
                kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
                raise ConfigError(
                    f"saved config: {path}{key}={value!r:.60} must be {kind.get(type(current), 'a list')}; "
                    "fix it or use a new workdir"
                ) from None


def flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping to dotted keys."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overrides_from_argv(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``--config.a.b=v`` / ``--config.a.b v`` arguments from the rest."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value: write {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return overrides, rest
