"""PyTorch references on this CPU for bench/train.py's GPTs: a nanoGPT-style model and ``transformers`` GPT-2.

``nanogpt`` (the default, the strongest reasonable eager reference): written here after Karpathy's
nanoGPT ``model.py``: token + learned position embeddings, pre-LayerNorm blocks with one fused
``c_attn`` QKV linear, ``F.scaled_dot_product_attention(is_causal=True)`` (PyTorch's fused CPU
flash kernel), GELU (tanh, as jaxlm's ``gelu``) MLP of ``mlp_dim``, final LayerNorm, LM head
tied to the token embedding, biases everywhere (as jaxlm's ``use_bias=True``), no dropout,
GPT-2 initialization (normal 0.02, residual projections 0.02 / sqrt(2 L)). Trained with
``torch.optim.AdamW`` (the fused CPU implementation where this torch has one, else foreach),
``clip_grad_norm_(1.0)``, cross-entropy over every position: nanoGPT's ``train.py`` step.

``gpt2``: ``transformers.GPT2LMHeadModel`` with the same shapes (what the first version of this
file measured).

Shapes are bench/train.py's (``--configs``: tiny, small, baby, d512), vocabulary 263 (the byte
tokenizer). Prints tokens/s and MFU with jaxlm's FLOPs formula against the measured matmul peak
in bench/results/peak.json (if present). f32, and bf16 autocast with ``--bf16``. Needs torch
(and transformers for ``gpt2``: the ``hf`` extra); nothing is downloaded.

    python bench/torch_baseline.py [--configs tiny,small,baby] [--models nanogpt,gpt2] [--steps 20] [--bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import train as jax_bench  # noqa: E402
from torch import nn  # noqa: E402

from jaxlm.models import config as model_config  # noqa: E402

VOCAB = 263  # the byte tokenizer's ids


class Block(nn.Module):
    """nanoGPT's pre-LayerNorm block: fused QKV, SDPA causal attention, GELU MLP."""

    def __init__(self, d: int, heads: int, f: int, bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc = nn.Linear(d, f, bias=bias)
        self.mlp_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: embeddings, blocks, final LayerNorm, LM head tied to the token embedding.

    ``bias=False`` drops every Linear and LayerNorm bias (nanoGPT's ``train.py`` default).
    """

    def __init__(self, vocab: int, max_len: int, layers: int, d: int, heads: int, f: int, bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.h = nn.ModuleList(Block(d, heads, f, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of ``targets`` given ``idx`` (both ``[B, T]``), reduced by ``reduction``."""
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def make_adamw(params: Any, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.99)) -> Any:
    """``torch.optim.AdamW``: the fused CPU kernel where this torch has one, else the foreach one."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)


class Trainer:
    """One reference model at one bench/train.py config, with its optimizer and one fixed random batch."""

    def __init__(self, config_name: str, kind: str = "nanogpt", *, seed: int = 0) -> None:
        torch.manual_seed(seed)
        config = jax_bench.make_config(config_name, "float32", {})
        m = config.model
        self.b, self.t = config.data.batch_size, config.data.seq_len
        self.kind = kind
        if kind == "nanogpt":
            self.model = NanoGPT(VOCAB, max(m.max_len, self.t), m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim)
        elif kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            gpt = GPT2Config(
                vocab_size=VOCAB,
                n_positions=max(m.max_len, self.t),
                n_embd=m.embed_dim,
                n_layer=m.num_layers,
                n_head=m.num_heads,
                n_inner=m.mlp_dim,
                activation_function="gelu_new",
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
                bos_token_id=0,
                eos_token_id=0,
            )
            self.model = GPT2LMHeadModel(gpt)
        else:
            raise ValueError(f"unknown reference {kind!r}: nanogpt or gpt2")
        self.model.train()
        self.optimizer = make_adamw(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        ids = torch.randint(0, VOCAB, (self.b, self.t + 1))
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        self.tokens = self.b * self.t
        self.flops_per_step = (
            model_config.flops_per_token(dataclasses.replace(m, vocab_size=VOCAB), self.t) * self.b * self.t
        )
        self.optimizer_name = f"AdamW ({'fused' if self.optimizer.defaults.get('fused') else 'foreach'})"

    def step(self, bf16: bool = False) -> float:
        """One training step (forward, backward, clip 1.0, AdamW); returns the loss."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if self.kind == "nanogpt":
                loss = self.model(self.inputs, self.targets)
            else:
                loss = self.model(self.inputs, labels=None).logits
                loss = F.cross_entropy(loss.float().view(-1, VOCAB), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def time_block(self, steps: int, bf16: bool = False) -> list[float]:
        """Seconds per step of ``steps`` steps after one untimed step."""
        self.step(bf16)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step(bf16)
            times.append(time.perf_counter() - t0)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="baby", help="bench/train.py GPT configs: tiny, small, baby, d512")
    parser.add_argument("--models", default="nanogpt", help="references, comma-separated: nanogpt, gpt2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 2 warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="also time torch.autocast(bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = common.measured_peaks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
            ref = Trainer(name, kind)
            for dtype in ["float32"] + (["bfloat16"] if args.bf16 else []):
                ref.time_block(1, dtype == "bfloat16")  # warm-up
                times = ref.time_block(args.steps, dtype == "bfloat16")
                step = statistics.median(times)
                row = {
                    "config": name,
                    "model": kind,
                    "optimizer": ref.optimizer_name,
                    "dtype": dtype,
                    "batch": ref.b,
                    "seq_len": ref.t,
                    "tokens_per_s": ref.tokens / step,
                    "step_s": step,
                    "step_s_min": min(times),
                    "step_s_all": times,
                    "flops_per_step": ref.flops_per_step,
                }
                if peaks:
                    row["mfu"] = ref.flops_per_step / step / peaks[dtype]
                rows.append(row)
                mfu = f"  MFU {row['mfu']:.1%} of the measured {peaks[dtype] / 1e9:.1f} GFLOP/s" if peaks else ""
                print(
                    f"  {name:<6} {kind:<8} {dtype:9s} {row['tokens_per_s']:8,.0f} tok/s  step {step * 1e3:.1f} ms "
                    f"(min {min(times) * 1e3:.1f}){mfu}",
                    flush=True,
                )
    payload = {"machine": common.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print("wrote", common.write_result("torch_baseline", {**payload, "rows": rows}))


if __name__ == "__main__":
    main()
