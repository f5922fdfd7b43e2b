"""The closed vocabulary of logical axis names, and the default rules mapping them to a mesh.

Modules name the axes of every parameter and of activations at block boundaries with these
names; the mesh axes they land on are chosen by ``config.sharding.rules``. Parameter axes and
activation axes are distinct so that, for example, FSDP can shard the embedding dimension of
weights without sharding the hidden dimension of activations.
"""

from __future__ import annotations

# Parameter axes.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"
NORM = "norm"
POSITIONS = "positions"

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_KV_LENGTH = "act_kv_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_HEAD_DIM = "act_head_dim"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

PARAM_AXES = (EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS, NORM, POSITIONS)
ACTIVATION_AXES = (
    ACT_BATCH,
    ACT_LENGTH,
    ACT_KV_LENGTH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV_HEADS,
    ACT_HEAD_DIM,
    ACT_MLP,
    ACT_VOCAB,
)
ALL_AXES = PARAM_AXES + ACTIVATION_AXES

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axes (a tuple shards over several mesh axes; None replicates).
# Batch is split over data and fsdp (FSDP is data parallel for activations); weights are
# split over fsdp on their embed dim and over tensor on heads / mlp / vocab (Megatron style).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, ("sequence",)),
    (ACT_KV_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, ("tensor",)),
    (ACT_KV_HEADS, ("tensor",)),
    (ACT_HEAD_DIM, None),
    (ACT_MLP, ("tensor",)),
    (ACT_VOCAB, ("tensor",)),
    (EMBED, ("fsdp",)),
    (MLP, ("tensor",)),
    (HEADS, ("tensor",)),
    (KV_HEADS, ("tensor",)),
    (HEAD_DIM, None),
    (VOCAB, ("tensor",)),
    (LAYERS, None),
    (NORM, None),
    (POSITIONS, None),
)
