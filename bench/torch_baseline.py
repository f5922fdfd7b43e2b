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

Shapes are bench/train.py's (``--configs``: tiny, small, baby, d512, gpt2), vocabulary the config's
``model.vocab_size`` (263, the byte tokenizer, where it leaves it at 0; gpt2's 50304). Prints
tokens/s and MFU with jaxlm's FLOPs formula against the measured matmul peak in
bench/results/peak.json (if present) and, with ``--nominal``, a preset of ``jaxlm.hardware``'s table.
f32, and bf16 autocast with ``--bf16``. ``--device cuda`` runs on a GPU (fused CUDA AdamW, a
``torch.cuda.synchronize`` per step through the loss read-back, TF32 matmuls for f32 as XLA's
default); ``--compile`` wraps the model in ``torch.compile`` (the compile happens in the untimed
warm-up steps). Needs torch (and transformers for ``gpt2``: the ``hf`` extra); nothing is downloaded.

    python bench/torch_baseline.py [--configs tiny,small,baby] [--models nanogpt,gpt2] [--steps 20] [--bf16]
    python bench/torch_baseline.py --configs gpt2 --device cuda --compile --dtypes bfloat16 --nominal h100
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

    def __init__(
        self, config_name: str, kind: str = "nanogpt", *, seed: int = 0, device: str = "cpu", compile: bool = False
    ) -> None:
        torch.manual_seed(seed)
        config = jax_bench.make_config(config_name, "float32", {})
        m = config.model
        self.b, self.t = config.data.batch_size, config.data.seq_len
        self.kind, self.device = kind, torch.device(device)
        self.vocab = vocab = m.vocab_size or VOCAB
        if kind == "nanogpt":
            self.model = NanoGPT(vocab, max(m.max_len, self.t), m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim)
        elif kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            gpt = GPT2Config(
                vocab_size=vocab,
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
        self.model.to(self.device).train()
        self.optimizer = make_adamw(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.forward = torch.compile(self.model) if compile else self.model
        ids = torch.randint(0, VOCAB, (self.b, self.t + 1)).to(self.device)  # ids the byte tokenizer makes
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        self.tokens = self.b * self.t
        self.flops_per_step = (
            model_config.flops_per_token(dataclasses.replace(m, vocab_size=vocab), self.t) * self.b * self.t
        )
        self.optimizer_name = f"AdamW ({'fused' if self.optimizer.defaults.get('fused') else 'foreach'})"

    def step(self, bf16: bool = False) -> float:
        """One training step (forward, backward, clip 1.0, AdamW); returns the loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            if self.kind == "nanogpt":
                loss = self.forward(self.inputs, self.targets)
            else:
                loss = self.forward(self.inputs, labels=None).logits
                loss = F.cross_entropy(loss.float().view(-1, self.vocab), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # a host read-back: on a GPU the step's kernels have finished

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
    parser.add_argument("--configs", default="baby", help="bench/train.py GPT configs: tiny, small, baby, d512, gpt2")
    parser.add_argument("--models", default="nanogpt", help="references, comma-separated: nanogpt, gpt2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 2 warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="also time torch.autocast(bfloat16)")
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (autocast), comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in the warm-up)")
    parser.add_argument("--nominal", default=None, help="also MFU against a jaxlm.hardware preset, e.g. h100")
    parser.add_argument("--out", default=None, help="result path (default bench/results/torch_baseline.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # f32 matmuls as XLA's GPU default runs them
        torch.backends.cudnn.allow_tf32 = True
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] + (["bfloat16"] if args.bf16 else [])
    dtypes = list(dict.fromkeys(dtypes))
    peaks = common.measured_peaks() if args.device == "cpu" else None
    nominal = common.NOMINAL_PEAKS.get(args.nominal) if args.nominal else None
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}{', torch.compile' if args.compile else ''}", flush=True)
    rows = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
            ref = Trainer(name, kind, device=args.device, compile=args.compile)
            for dtype in dtypes:
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
                    "vocab": ref.vocab,
                    "device": args.device,
                    "compiled": args.compile,
                }
                if peaks:
                    row["mfu"] = ref.flops_per_step / step / peaks[dtype]
                mfu = f"  MFU {row['mfu']:.1%} of the measured {peaks[dtype] / 1e9:.1f} GFLOP/s" if peaks else ""
                if nominal:
                    row["mfu_nominal"] = ref.flops_per_step / step / nominal[dtype]
                    mfu += f"  MFU {row['mfu_nominal']:.1%} of {args.nominal}'s {nominal[dtype] / 1e12:.0f} TFLOP/s"
                rows.append(row)
                print(
                    f"  {name:<6} {kind:<8} {dtype:9s} {row['tokens_per_s']:8,.0f} tok/s  step {step * 1e3:.1f} ms "
                    f"(min {min(times) * 1e3:.1f}){mfu}",
                    flush=True,
                )
    payload = {"machine": common.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.device == "cuda":
        payload["cuda_device"] = torch.cuda.get_device_name()
    print("wrote", common.write_result("torch_baseline", {**payload, "rows": rows}, path=args.out))


if __name__ == "__main__":
    main()
