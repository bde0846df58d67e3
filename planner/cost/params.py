"""Exact parameter inventory: every tensor the model has, its shape and how tensor parallelism
splits it; whole-model and per-rank counts follow from it.

Layer definitions: GPT-2 (Radford et al. 2019; HF GPT2Model), Llama (Touvron et al. 2023; HF
LlamaModel), BERT (HF BertForMaskedLM).  `count_parameters` equals `sum(p.numel())` of
runtime/model.py for every preset.  TP placements are PyTorch's: column-parallel weights and
biases Shard(0), row-parallel weights Shard(1) with replicated bias, vocab-parallel embedding and
output layer Shard(0) (Shoeybi et al. 2019, Sec. 3).

Names and order are the runtime's `named_parameters()` (its state-dict and checkpoint keys):
`embed.*` and `head.*` as listed; block tensor `<name>` of layer i (global index) is
`layers.{i}.<name>` (`layer_tensor_name`).

A job (planner/job.py) changes the inventory in two ways: `classify` replaces the output layer
by `head.classifier` (num_labels x h and a bias; never tied), and LoRA (planner/lora.py) adds
`<linear>.lora_A` (r x in) and `<linear>.lora_B` (out x r) after each targeted linear layer and
marks every other tensor frozen (the classifier stays trainable: it is new).

Mixture of experts (ModelSpec.moe; MoE layers by MoESpec.is_moe_layer, the others dense): the
MLP becomes `mlp.router.weight` [E, h] (+ `mlp.router.bias` [E] with linear_bias, GPT-OSS),
routed experts stacked on dim 0 as per-expert nn.Linear weights [E, out, in]
(`mlp.experts.gate|up|down` for SwiGLU, `mlp.experts.fc|proj` for GELU; biases
`mlp.experts.<name>_bias` [E, out]), shared experts `mlp.shared.gate|up|down` (a SwiGLU of
shared_ffn_hidden_size, TP-split like the dense MLP) and Qwen2-MoE's `mlp.shared_gate.weight`
[1, h].  Expert tensors carry `ep_dim` 0 (split over the expert-parallel group) and their
`tp_dim` is split over the expert-tensor-parallel group etp (Megatron-Core's expert layout);
router and shared-expert gate are replicated (Megatron-Core TopKRouter).
MLA (ModelSpec.mla, DeepSeek-V2 Sec. 2.1 eqs. 37-47; HF DeepseekV3Attention): `attn.q_a`
[q_lora, h] + `attn.q_a_norm` + `attn.q_b` [heads x (nope+rope), q_lora] (or `attn.q`
[heads x (nope+rope), h] when q_lora_rank is 0), `attn.kv_a` [kv_lora + rope, h] +
`attn.kv_a_norm` + `attn.kv_b` [heads x (nope+v), kv_lora], `attn.o` [h, heads x v]; the
down-projections are replicated under TP, the up-projections column-parallel (Megatron-Core
MLASelfAttention).  Qwen3's q/k norms are `attn.q_norm|k_norm.weight` [head_dim]; GPT-OSS's
sinks `attn.sinks` [heads], split with the heads."""

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from planner.spec import BERT_TYPE_VOCAB, ModelSpec


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple
    tp_dim: int | None = None  # dimension split across the TP group (etp for experts); None =
    #                            replicated
    ep_dim: int | None = None  # routed experts: the expert dimension, split across the EP group
    frozen: bool = False  # no gradient, no optimizer state (LoRA's base weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def expert(self) -> bool:
        return self.ep_dim is not None

    def local_shape(self, tp: int, tp_rank: int = 0, *, ep: int = 1, etp: int = 1,
                    ep_rank: int = 0, etp_rank: int = 0) -> tuple:
        """Shape on one TP rank (rank 0 holds the largest shard of an uneven split); an expert
        tensor is split over etp (not tp) and over ep on its expert dimension."""
        shape = list(self.shape)
        if self.ep_dim is not None:
            shape[self.ep_dim] = chunk_size(shape[self.ep_dim], ep, ep_rank)
            tp, tp_rank = etp, etp_rank
        if self.tp_dim is not None and tp > 1:
            shape[self.tp_dim] = chunk_size(shape[self.tp_dim], tp, tp_rank)
        return tuple(shape)


def chunk_size(n: int, parts: int, index: int) -> int:
    """Length of piece `index` when torch.chunk / DTensor Shard splits n into `parts`."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def _norm(name: str, spec: ModelSpec, dim: int = 0) -> list:
    h = dim or spec.hidden_size
    tensors = [ParamTensor(f"{name}.weight", (h,))]
    if spec.norm == "layernorm":
        tensors.append(ParamTensor(f"{name}.bias", (h,)))
    return tensors


def _linear(name: str, d_in: int, d_out: int, bias: bool, parallel: str) -> list:
    """nn.Linear weight [out, in]; parallel is 'col', 'row' or 'none'."""
    w_dim = {"col": 0, "row": 1, "none": None}[parallel]
    tensors = [ParamTensor(f"{name}.weight", (d_out, d_in), w_dim)]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", (d_out,), 0 if parallel == "col" else None))
    return tensors


def layer_tensor_name(layer: int, name: str) -> str:
    """Full name of block tensor `name` (from `block_tensors`) in layer `layer` (global index)."""
    return f"layers.{layer}.{name}"


def block_tensors(spec: ModelSpec, layer: int = 0) -> list:
    """Block `layer` (global index: MoE models mix dense and MoE blocks); names are per-block,
    `layer_tensor_name` gives the full name."""
    tensors = _norm("attn_norm", spec)
    tensors += _mla_tensors(spec) if spec.mla else _attention_tensors(spec)
    tensors += _norm("mlp_norm", spec)
    if spec.moe is not None and spec.moe.is_moe_layer(layer):
        return tensors + _moe_tensors(spec)
    return tensors + _mlp_tensors("mlp", spec, spec.ffn_hidden_size)


def _attention_tensors(spec: ModelSpec) -> list:
    h, q, kv, b = spec.hidden_size, spec.q_hidden_size, spec.kv_hidden_size, spec.linear_bias
    qkv = b or spec.qkv_bias
    tensors = _linear("attn.q", h, q, qkv, "col") + _linear("attn.k", h, kv, qkv, "col")
    tensors += _linear("attn.v", h, kv, qkv, "col") + _linear("attn.o", q, h, b, "row")
    if spec.qk_norm:
        tensors += _norm("attn.q_norm", spec, spec.head_dim)
        tensors += _norm("attn.k_norm", spec, spec.head_dim)
    if spec.attention_sinks:
        tensors.append(ParamTensor("attn.sinks", (spec.num_heads,), 0))
    return tensors


def _mla_tensors(spec: ModelSpec) -> list:
    m, h, n = spec.mla, spec.hidden_size, spec.num_heads
    assert m is not None
    if m.q_lora_rank:
        tensors = _linear("attn.q_a", h, m.q_lora_rank, False, "none")
        tensors += _norm("attn.q_a_norm", spec, m.q_lora_rank)
        tensors += _linear("attn.q_b", m.q_lora_rank, n * m.qk_head_dim, False, "col")
    else:
        tensors = _linear("attn.q", h, n * m.qk_head_dim, False, "col")
    tensors += _linear("attn.kv_a", h, m.kv_lora_rank + m.qk_rope_head_dim, False, "none")
    tensors += _norm("attn.kv_a_norm", spec, m.kv_lora_rank)
    tensors += _linear("attn.kv_b", m.kv_lora_rank, n * (m.qk_nope_head_dim + m.v_head_dim),
                       False, "col")
    return tensors + _linear("attn.o", n * m.v_head_dim, h, False, "row")


def _mlp_tensors(prefix: str, spec: ModelSpec, f: int) -> list:
    h, b = spec.hidden_size, spec.linear_bias
    if spec.mlp == "swiglu":
        return (_linear(f"{prefix}.gate", h, f, b, "col") + _linear(f"{prefix}.up", h, f, b, "col")
                + _linear(f"{prefix}.down", f, h, b, "row"))
    return _linear(f"{prefix}.fc", h, f, b, "col") + _linear(f"{prefix}.proj", f, h, b, "row")


def _experts(name: str, e: int, d_in: int, d_out: int, bias: bool, parallel: str) -> list:
    """Stacked per-expert linears [E, out, in]; etp splits out ('col') or in ('row')."""
    tensors = [ParamTensor(f"mlp.experts.{name}", (e, d_out, d_in),
                           1 if parallel == "col" else 2, ep_dim=0)]
    if bias:
        tensors.append(ParamTensor(f"mlp.experts.{name}_bias", (e, d_out),
                                   1 if parallel == "col" else None, ep_dim=0))
    return tensors


def _moe_tensors(spec: ModelSpec) -> list:
    moe, h, b = spec.moe, spec.hidden_size, spec.linear_bias
    assert moe is not None
    e, f = moe.num_experts, moe.expert_ffn_hidden_size
    tensors = _linear("mlp.router", h, e, b, "none")
    if spec.mlp == "swiglu":
        tensors += (_experts("gate", e, h, f, b, "col") + _experts("up", e, h, f, b, "col")
                    + _experts("down", e, f, h, b, "row"))
    else:
        tensors += _experts("fc", e, h, f, b, "col") + _experts("proj", e, f, h, b, "row")
    if moe.shared_ffn_hidden_size:
        tensors += _mlp_tensors("mlp.shared", spec, moe.shared_ffn_hidden_size)
    if moe.shared_expert_gate:
        tensors += _linear("mlp.shared_gate", h, 1, False, "none")
    return tensors


def embedding_tensors(spec: ModelSpec) -> list:
    h = spec.hidden_size
    tensors = [ParamTensor("embed.wte.weight", (spec.vocab_size, h), 0)]
    if spec.learned_positions:
        tensors.append(ParamTensor("embed.wpe.weight", (spec.max_seq_len, h)))
    if spec.arch == "bert":
        tensors.append(ParamTensor("embed.wtt.weight", (BERT_TYPE_VOCAB, h)))
        tensors += _norm("embed.norm", spec)
    return tensors


def _adapted(tensors: list, lora) -> list:
    """LoRA: lora_A (r x in) and lora_B (out x r) after each targeted linear layer's tensors,
    in the runtime's registration order (runtime/lora.py); every other tensor frozen."""
    names = set(lora.tensor_names())
    out = []
    for t in tensors:
        out.append(dataclasses.replace(t, frozen=True))
        base, leaf = t.name.rsplit(".", 1)
        is_last = leaf == "bias" or not any(u.name == f"{base}.bias" for u in tensors)
        if base in names and is_last:
            d_out, d_in = next(u.shape for u in tensors if u.name == f"{base}.weight")
            out += [ParamTensor(f"{base}.lora_A", (lora.rank, d_in)),
                    ParamTensor(f"{base}.lora_B", (d_out, lora.rank))]
    return out


def job_block_tensors(spec: ModelSpec, job=None, layer: int = 0) -> list:
    """Block `layer` as the job trains it (LoRA adds adapters and freezes the rest)."""
    tensors = block_tensors(spec, layer)
    return _adapted(tensors, job.lora) if job is not None and job.lora is not None else tensors


def _frozen(tensors: list, job) -> list:
    if job is None or job.lora is None:
        return tensors
    return [t if t.name.startswith("head.classifier") else
            dataclasses.replace(t, frozen=True) for t in tensors]


def classifier_tensors(spec: ModelSpec, num_labels: int) -> list:
    """Sequence classification head: the final norm (BERT: its MLM transform, dense + norm, as
    the pooler) and a num_labels x h classifier with bias, replacing the output layer."""
    h = spec.hidden_size
    tensors = _linear("head.dense", h, h, True, "none") if spec.arch == "bert" else []
    return tensors + _norm("head.norm", spec) + \
        _linear("head.classifier", h, num_labels, True, "none")


def head_tensors(spec: ModelSpec, holds_tied_copy: bool = False) -> list:
    """Final norm and output layer; BERT's MLM transform (dense + norm) and decoder bias.

    A tied output layer shares the word embedding; when the model is split into pipeline chunks,
    the last chunk keeps its own copy (Narayanan et al. 2021, Sec. 4.1), also under ZB-V where
    the first and last chunks share a rank; that copy is `head.output.weight` (the shared
    tensor is `embed.wte.weight`).  BERT's decoder bias is the output layer's bias."""
    h, v = spec.hidden_size, spec.vocab_size
    tensors = _linear("head.dense", h, h, True, "none") if spec.arch == "bert" else []
    tensors += _norm("head.norm", spec)
    if not spec.tie_embeddings or holds_tied_copy:
        tensors.append(ParamTensor("head.output.weight", (v, h), 0))
    if spec.arch == "bert":
        tensors.append(ParamTensor("head.output.bias", (v,), 0))
    return tensors


def job_head_tensors(spec: ModelSpec, job=None, holds_tied_copy: bool = False) -> list:
    if job is not None and job.trains_classifier:
        return _frozen(classifier_tensors(spec, job.num_labels), job)
    return _frozen(head_tensors(spec, holds_tied_copy), job)


def layer_kinds(spec: ModelSpec, layers) -> tuple:
    """(dense blocks, MoE blocks) among global layer ids `layers`."""
    moe = sum(spec.moe.is_moe_layer(i) for i in layers) if spec.moe is not None else 0
    return len(layers) - moe, moe


def _dense_layer(spec: ModelSpec) -> int:
    """A dense layer's id (0 when every layer is dense or the first layers are)."""
    if spec.moe is None or not spec.moe.is_moe_layer(0):
        return 0
    return next((i for i in range(spec.num_layers) if not spec.moe.is_moe_layer(i)), 0)


def _blocks_local(spec: ModelSpec, ids, job, tp: int, ep: int, etp: int, expert,
                  trainable_only: bool) -> int:
    """Elements of blocks `ids` on rank 0 of tp / ep / etp (one dense and one MoE block
    inventory, each counted once and multiplied)."""
    dense, moe = layer_kinds(spec, ids)
    n = 0
    for count, layer in ((dense, _dense_layer(spec)),
                         (moe, spec.moe.first_dense_layers if spec.moe is not None else 0)):
        if count:
            n += count * _tensors_local(job_block_tensors(spec, job, layer), tp, ep, etp, expert,
                                        trainable_only)
    return n


def count_parameters(spec: ModelSpec, job=None, trainable_only: bool = False) -> int:
    """All parameters of the model as the job builds it (tied weights counted once); with
    `trainable_only`, those that get gradients (LoRA: the adapters and a classifier)."""
    ends = _frozen(embedding_tensors(spec), job) + job_head_tensors(spec, job)
    return (_blocks_local(spec, range(spec.num_layers), job, 1, 1, 1, None, trainable_only)
            + _tensors_local(ends, 1, 1, 1, None, trainable_only))
def count_active_parameters(spec: ModelSpec, embeddings: bool = True) -> int:
    """Parameters one token passes through: the routed experts count top-k of E (Fedus et al.
    2022, Sec. 2; DeepSeek-V3's "37B activated"); the router, shared experts and every dense
    tensor in full.  `embeddings` False leaves out the input embedding table (a lookup, no
    matmul; GPT-OSS's model card counts active parameters without it)."""
    total = count_parameters(spec)
    if spec.moe is not None:
        moe = spec.moe
        routed = sum(t.numel for t in block_tensors(spec, moe.first_dense_layers) if t.expert)
        idle = routed * (moe.num_experts - moe.experts_per_token) // moe.num_experts
        total -= idle * moe.num_moe_layers(spec.num_layers)
    if not embeddings and not spec.tie_embeddings:
        total -= spec.vocab_size * spec.hidden_size
    return total


def rank_layer_ids(spec: ModelSpec, layout, pp_rank: int) -> tuple:
    """Global ids of the layers pipeline rank `pp_rank` holds, in order."""
    ids: list[int] = []
    start = 0
    for chunk, n in enumerate(layout.stage_layers(spec.num_layers)):
        if layout.chunk_rank(chunk) == pp_rank:
            ids += range(start, start + n)
        start += n
    return tuple(ids)


def rank_pieces(spec: ModelSpec, layout, pp_rank: int) -> tuple[Any, bool, bool, bool]:
    """(layers, holds the embedding, holds the head, head keeps a tied copy) of a pp rank;
    layers: the layer count of a dense model, the global layer ids of an MoE one."""
    first, last = layout.chunk_rank(0), layout.chunk_rank(layout.num_chunks - 1)
    if spec.moe is not None:
        layers = rank_layer_ids(spec, layout, pp_rank)
    else:
        layers = sum(layout.rank_chunk_layers(spec.num_layers)[pp_rank])
    # separate chunk modules: the last keeps its own tied copy even on the first chunk's rank
    return layers, pp_rank == first, pp_rank == last, layout.num_chunks > 1


@lru_cache(maxsize=256)
def dense_view(spec: ModelSpec) -> ModelSpec:
    """The model with a dense MLP of ffn_hidden_size in every layer: how the cost model prices
    a layer count of an MoE model (planner/cost/moe.py adds each MoE layer's difference)."""
    return dataclasses.replace(spec, moe=None) if spec.moe is not None else spec


def _ids(spec: ModelSpec, layers) -> tuple:
    """Layer ids from rank_pieces' `layers` (a count: layers 0.. of the dense view)."""
    if isinstance(layers, (tuple, list, range)):
        return tuple(layers)
    return tuple(range(int(layers)))


def _view(spec: ModelSpec, layers) -> ModelSpec:
    """A layer count of an MoE model counts dense blocks (dense_view); layer ids are exact."""
    return spec if isinstance(layers, (tuple, list, range)) else dense_view(spec)


def pieces_tensors(spec: ModelSpec, layers, embedding: bool, head: bool,
                   tied_copy: bool, job=None) -> list:
    spec = _view(spec, layers)
    tensors = [t for i in _ids(spec, layers) for t in job_block_tensors(spec, job, i)]
    if embedding:
        tensors = _frozen(embedding_tensors(spec), job) + tensors
    if head:
        tensors = tensors + job_head_tensors(spec, job, holds_tied_copy=tied_copy)
    return tensors


def rank_param_tensors(spec: ModelSpec, layout, pp_rank: int, job=None) -> list:
    """Every parameter tensor pipeline rank `pp_rank` holds (blocks repeated per layer)."""
    return pieces_tensors(spec, *rank_pieces(spec, layout, pp_rank), job=job)


def _job_key(job):
    """The part of a job the inventory depends on (a cache key)."""
    if job is None:
        return None
    return (job.task == "classify" and job.num_labels, job.lora)


def _tensors_local(tensors, tp: int, ep: int, etp: int, expert,
                   trainable_only: bool = False) -> int:
    """Elements on rank 0 of tp / ep / etp; `expert` None = all, True/False = only those;
    `trainable_only`: not the frozen ones."""
    return sum(math.prod(t.local_shape(tp, ep=ep, etp=etp)) for t in tensors
               if (expert is None or t.expert == expert) and not (trainable_only and t.frozen))


@lru_cache(maxsize=65536)
def _numel_of(spec: ModelSpec, tp: int, layers, embedding: bool, head: bool, tied_copy: bool,
              ep: int, etp: int, expert, job_key, trainable_only: bool, job) -> int:
    spec = _view(spec, layers)
    n = _blocks_local(spec, _ids(spec, layers), job, tp, ep, etp, expert, trainable_only)
    ends = pieces_tensors(spec, (), embedding, head, tied_copy, job)
    return n + _tensors_local(ends, tp, ep, etp, expert, trainable_only)


def _local_numel(spec: ModelSpec, tp: int, layers, embedding: bool, head: bool,
                 tied_copy: bool, job=None, trainable_only: bool = False, *, ep: int = 1,
                 etp: int = 1, expert=None) -> int:
    """Parameters of a rank's pieces on rank 0 of tp / ep / etp (with `trainable_only`, those
    trained; `expert` True/False: only the routed-expert / the other tensors)."""
    key = _job_key(job)
    layers = tuple(layers) if isinstance(layers, (tuple, list, range)) else int(layers)
    return _numel_of(spec, tp, layers, bool(embedding), bool(head), bool(tied_copy), ep, etp,
                     expert, key, trainable_only,
                     job if key is not None and key != (False, None) else None)


def rank_local_numel(spec: ModelSpec, layout, pp_rank: int, job=None, expert=None) -> int:
    """Parameters pipeline rank `pp_rank` holds on TP/EP rank 0 (cached: the search asks
    often); `expert` True/False counts only the routed-expert / the other tensors."""
    return _local_numel(spec, layout.tp, *rank_pieces(spec, layout, pp_rank), job,
                        ep=layout.ep, etp=layout.etp, expert=expert)


def block_params_local(spec: ModelSpec, tp: int, job=None, trainable_only: bool = False, *,
                       ep: int = 1, etp: int = 1, layer: int | None = None) -> int:
    """Parameters of one block on one TP (and EP/etp) rank (with `trainable_only`, those
    trained): block `layer`, or a block of the dense view when None."""
    if layer is None:
        spec, layer = dense_view(spec), 0
    return _tensors_local(job_block_tensors(spec, job, layer), tp, ep, etp, None, trainable_only)
