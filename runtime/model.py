"""The reference transformer (GPT, Llama and BERT families) built from a planner ModelSpec.

Module names are the checkpoint's fully-qualified names and do not depend on how the model is
split: `embed.*`, `layers.<global index>.*`, `head.*`. A pipeline chunk is the same class built
with a subset of layers (the ModuleDict keeps global indices) and with or without embed/head.

Names, order, shapes and TP shard dimensions are those planner/cost/params.py lists, tensor by
tensor (tests/test_param_names.py). GPT-2: Radford et al. 2019 / HF GPT2Model; Llama: Touvron
et al. 2023 / HF LlamaModel; BERT: HF BertForMaskedLM. Build on the meta device,
parallelise, then `materialize(model, device, seed)`: every tensor is drawn from a generator
seeded by its canonical name, so any layout starts from the same weights."""

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.spec import BERT_TYPE_VOCAB, ModelSpec
from runtime.recompute import op_policy_contexts

INIT_STD = 0.02  # GPT-2 / BERT initializer_range


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm (Zhang & Sennrich 2019) saving only its input and the fp32 1/rms per token, as
    fused GPU kernels do; torch.rms_norm's CPU composite also keeps the normalised tensor."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least
        rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x.to(acc) * rstd * weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        grad_w = (g * xhat).sum(dim=tuple(range(g.ndim - 1)))
        gw = g * weight.to(rstd.dtype)
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in its input's dtype, also under autocast (which would otherwise save an fp32
    copy of a 16-bit input), as with FSDP2's 16-bit parameters."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype),
                                self.bias.to(x.dtype), self.eps)


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return LayerNorm(spec.hidden_size, eps=spec.norm_eps)


def rope_tables(spec: ModelSpec, device) -> tuple:
    """cos/sin of rotary embeddings (Su et al. 2021), HF `rotate_half` convention."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    angles = torch.outer(torch.arange(spec.max_seq_len, device=device).float(), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim)."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, kv, bias = spec.hidden_size, spec.kv_hidden_size, spec.linear_bias
        self.q = nn.Linear(h, h, bias=bias)
        self.k = nn.Linear(h, kv, bias=bias)
        self.v = nn.Linear(h, kv, bias=bias)
        self.o = nn.Linear(h, h, bias=bias)
        self.head_dim, self.causal = spec.head_dim, spec.causal
        self.use_rope, self.dropout = not spec.learned_positions, spec.dropout
        self.recompute_core = False  # selective recompute (Korthikanti et al. 2022, Sec. 5)

    def _core(self, q, k, v):
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        # Under TP the projections return this rank's heads only (local tensors).
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos[:s], sin[:s]), apply_rope(k, cos[:s], sin[:s])
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            out = self._core(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, f, bias = spec.hidden_size, spec.ffn_hidden_size, spec.linear_bias
        self.swiglu = spec.mlp == "swiglu"
        if self.swiglu:  # Shazeer 2020
            self.gate = nn.Linear(h, f, bias=bias)
            self.up = nn.Linear(h, f, bias=bias)
            self.down = nn.Linear(f, h, bias=bias)
        else:
            self.fc = nn.Linear(h, f, bias=bias)
            self.proj = nn.Linear(f, h, bias=bias)
        # GPT-2's gelu_new; a BERT checkpoint's exact (erf) GELU when loaded from one
        # (runtime/hf_weights.py): same saved tensor, so the same activation memory.
        self.gelu_approximate = "tanh"

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.proj(F.gelu(self.fc(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """Pre-LN block (GPT, Llama) or post-LN block (BERT)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm, self.attn = _norm(spec), Attention(spec)
        self.mlp_norm, self.mlp = _norm(spec), MLP(spec)
        self.drop = nn.Dropout(spec.dropout)
        self.post_ln = spec.arch == "bert"
        self.recompute_full = False  # full recompute: keep only the block input
        self.recompute_op = False    # torchtitan's op-level policy (runtime/recompute.py)

    def _forward(self, x, cos, sin):
        if self.post_ln:
            x = self.attn_norm(x + self.drop(self.attn(x, cos, sin)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def forward(self, x, cos, sin):
        if self.recompute_full and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        if self.recompute_op and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False,
                              context_fn=op_policy_contexts)
        return self._forward(x, cos, sin)


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec, words_only: bool = False):
        super().__init__()
        h = spec.hidden_size
        self.wte = nn.Embedding(spec.vocab_size, h)
        self.wpe = self.wtt = self.norm = None
        if spec.learned_positions and not words_only:
            self.wpe = nn.Embedding(spec.max_seq_len, h)
        if spec.arch == "bert" and not words_only:
            self.wtt = nn.Embedding(BERT_TYPE_VOCAB, h)
            self.norm = _norm(spec)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, tokens):
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        if self.wtt is not None:  # one segment: token type 0 everywhere
            x = x + self.wtt.weight[0]
        if torch.is_autocast_enabled(x.device.type):  # a 16-bit residual stream, as under FSDP2
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class Head(nn.Module):
    """Final norm and vocabulary projection; for BERT the MLM transform (dense, GELU, norm).
    With `num_labels` (sequence classification) a num_labels x h `classifier` with bias replaces
    the vocabulary projection: it scores every position, and the loss reads the pooled one
    (runtime/tasks.py: the first token of an encoder, the last text token of a decoder)."""

    def __init__(self, spec: ModelSpec, num_labels: int | None = None):
        super().__init__()
        h = spec.hidden_size
        self.dense = nn.Linear(h, h) if spec.arch == "bert" else None
        self.norm = _norm(spec)
        self.output = self.classifier = None
        if num_labels:
            self.classifier = nn.Linear(h, num_labels)
        else:
            self.output = nn.Linear(h, spec.vocab_size, bias=spec.arch == "bert")

    def forward(self, x):
        if self.dense is not None:
            x = F.gelu(self.dense(x))
        head = self.classifier if self.classifier is not None else self.output
        assert head is not None
        return head(self.norm(x))


class Transformer(nn.Module):
    """The whole model, or one pipeline chunk of it (layers `layer_ids`, embed and/or head)."""

    rope_cos: torch.Tensor  # buffers (register_buffer)
    rope_sin: torch.Tensor

    def __init__(self, spec: ModelSpec, layer_ids=None, has_embed=True, has_head=True,
                 num_labels: int | None = None):
        super().__init__()
        self.spec = spec
        ids = range(spec.num_layers) if layer_ids is None else layer_ids
        self.embed = Embedding(spec) if has_embed else None
        self.layers = nn.ModuleDict({str(i): Block(spec) for i in ids})
        self.head = Head(spec, num_labels) if has_head else None
        if self.head is not None and self.head.output is not None and spec.tie_embeddings \
                and self.embed is not None:
            self.head.output.weight = self.embed.wte.weight
        # else: a pipeline chunk without the embedding keeps its own copy of the word
            # embedding, kept equal by an all-reduce of the two gradients (Narayanan et al.
            # 2021, Sec. 4.1); its canonical name is embed.wte.weight.
        cos, sin = rope_tables(spec, None)  # follows the default device (meta when building)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # set for bf16/fp16 compute without FSDP mixed precision
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, x):
        if self.autocast_dtype is None:
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self._forward(x)

    def _forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x = layer(x, self.rope_cos, self.rope_sin)
        if self.head is not None:
            x = self.head(x)
        return x

    def retie(self) -> None:
        """Re-tie the output projection to the word embedding (after TP replaced both)."""
        if self.embed is not None and self.head is not None and self.spec.tie_embeddings \
                and self.head.output is not None \
                and self.head.output.weight is not self.embed.wte.weight:
            self.head.output.weight = self.embed.wte.weight


def canonical_name(spec: ModelSpec, fqn: str) -> str:
    """The name a parameter has in the whole model (the tied copy maps to the embedding)."""
    if spec.tie_embeddings and fqn == "head.output.weight":
        return "embed.wte.weight"
    return fqn


def _init_full(spec: ModelSpec, name: str, shape, seed: int, device) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, identical on every rank."""
    # Drawn on the target device type (fast for GPU-sized models); every rank of one device
    # type draws the same values.
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "lora_B":  # LoRA: B = 0, training starts from the base model (Hu et al. 2021)
        return torch.zeros(shape, device=device)
    if leaf == "bias" or ("norm" in name and leaf == "weight" and len(shape) == 1):
        return (torch.ones if leaf == "weight" else torch.zeros)(shape, device=device)
    std = INIT_STD
    if name.endswith(("attn.o.weight", "mlp.proj.weight", "mlp.down.weight")):
        std /= math.sqrt(2 * spec.num_layers)  # GPT-2 residual-projection scaling
    return torch.randn(shape, generator=gen, device=device) * std


@torch.no_grad()
def materialize(model: Transformer, device, seed: int = 0) -> None:
    """Allocate a (possibly parallelised) meta model on `device` and fill it deterministically."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    model.to_empty(device=device)
    model.retie()  # to_empty gives each name its own tensor
    for name, param in model.named_parameters():
        full = _init_full(model.spec, canonical_name(model.spec, name), param.shape, seed,
                          device).to(param.dtype)
        if isinstance(param, DTensor):
            # Every rank draws the same full tensor, so no source rank is needed.
            local = distribute_tensor(full, param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
    cos, sin = rope_tables(model.spec, device)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)


def set_recompute(model: Transformer, mode: str, every: int = 1) -> None:
    """'none' | 'selective' (attention core) | 'op' (torchtitan's op-level policy) | 'full'
    (each block keeps only its input), on every `every`-th block by global index - blocks
    every-1, 2*every-1, ... (torchtitan's selective-layer counter; planner.cost.pipeline
    .recomputed) - the others none."""
    for name, block in model.layers.items():
        assert isinstance(block, Block)
        on = (int(name) + 1) % every == 0
        block.recompute_full = on and mode == "full"
        block.recompute_op = on and mode == "op"
        block.attn.recompute_core = on and mode == "selective"
