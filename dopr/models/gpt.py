"""A compact GPT (decoder-only transformer, pre-LayerNorm, learned positions).

Every matrix that multiplies an activation is an ``nn.Linear`` (fused q/k/v, attention output,
MLP in/out, and an untied LM head), so a layer-input preconditioner that hooks ``nn.Linear`` sees
all of them; embeddings and norms stay with the plain gradient preconditioner. The head is untied
because a tied head would share one weight between an embedding (no layer input) and a Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, bias)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=bias), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(ids) -> logits`` of shape (batch, time, vocab)."""

    def __init__(self, vocab_size: int, max_seq_len: int, n_layers: int = 2, d_model: int = 64,
                 n_heads: int = 4, bias: bool = False):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, bias) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2 scaling: residual-branch outputs shrink with depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.max_seq_len}")
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """See :func:`generate`; never runs past ``max_seq_len``."""
        budget = min(max_new_tokens, self.max_seq_len - prompt_ids.shape[1])
        return generate(self, prompt_ids, budget, eos_id, temperature, generator)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue equal-length prompts (batch, t0) with any ``model(ids) -> logits``; greedy when
    ``temperature == 0``, else sampled from softmax(logits / temperature).

    Returns the new tokens (batch, <= max_new_tokens). Rows that emitted ``eos_id`` keep emitting
    it, and decoding stops early once every row has. No KV cache: sequences here are short.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = prompt_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return ids[:, prompt_ids.shape[1]:]
