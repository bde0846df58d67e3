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
marks every other tensor frozen (the classifier stays trainable: it is new)."""

import math
from dataclasses import dataclass
from functools import lru_cache

from planner.spec import BERT_TYPE_VOCAB, ModelSpec


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple
    tp_dim: int | None = None  # dimension split across the TP group; None = replicated
    frozen: bool = False  # no gradient, no optimizer state (LoRA's base weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int, tp_rank: int = 0) -> tuple:
        """Shape on one TP rank (rank 0 holds the largest shard of an uneven split)."""
        if self.tp_dim is None or tp == 1:
            return self.shape
        shape = list(self.shape)
        shape[self.tp_dim] = chunk_size(shape[self.tp_dim], tp, tp_rank)
        return tuple(shape)


def chunk_size(n: int, parts: int, index: int) -> int:
    """Length of piece `index` when torch.chunk / DTensor Shard splits n into `parts`."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def _norm(name: str, spec: ModelSpec) -> list:
    h = spec.hidden_size
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


def block_tensors(spec: ModelSpec) -> list:
    """One transformer block; names are per-block, `layer_tensor_name` gives the full name."""
    h, kv, f, b = spec.hidden_size, spec.kv_hidden_size, spec.ffn_hidden_size, spec.linear_bias
    tensors = _norm("attn_norm", spec)
    tensors += _linear("attn.q", h, h, b, "col") + _linear("attn.k", h, kv, b, "col")
    tensors += _linear("attn.v", h, kv, b, "col") + _linear("attn.o", h, h, b, "row")
    tensors += _norm("mlp_norm", spec)
    if spec.mlp == "swiglu":
        tensors += _linear("mlp.gate", h, f, b, "col") + _linear("mlp.up", h, f, b, "col")
        tensors += _linear("mlp.down", f, h, b, "row")
    else:
        tensors += _linear("mlp.fc", h, f, b, "col") + _linear("mlp.proj", f, h, b, "row")
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
        out.append(ParamTensor(t.name, t.shape, t.tp_dim, frozen=True))
        base, leaf = t.name.rsplit(".", 1)
        is_last = leaf == "bias" or not any(u.name == f"{base}.bias" for u in tensors)
        if base in names and is_last:
            d_out, d_in = next(u.shape for u in tensors if u.name == f"{base}.weight")
            out += [ParamTensor(f"{base}.lora_A", (lora.rank, d_in)),
                    ParamTensor(f"{base}.lora_B", (d_out, lora.rank))]
    return out


def job_block_tensors(spec: ModelSpec, job=None) -> list:
    """One block as the job trains it (LoRA adds adapters and freezes the rest)."""
    tensors = block_tensors(spec)
    return _adapted(tensors, job.lora) if job is not None and job.lora is not None else tensors


def _frozen(tensors: list, job) -> list:
    if job is None or job.lora is None:
        return tensors
    return [t if t.name.startswith("head.classifier") else
            ParamTensor(t.name, t.shape, t.tp_dim, frozen=True) for t in tensors]


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


def count_parameters(spec: ModelSpec, job=None, trainable_only: bool = False) -> int:
    """All parameters of the model as the job builds it (tied weights counted once); with
    `trainable_only`, those that get gradients (LoRA: the adapters and a classifier)."""
    tensors = (_frozen(embedding_tensors(spec), job) + job_block_tensors(spec, job) *
               spec.num_layers + job_head_tensors(spec, job))
    return sum(t.numel for t in tensors if not (trainable_only and t.frozen))


def rank_pieces(spec: ModelSpec, layout, pp_rank: int) -> tuple[int, bool, bool, bool]:
    """(layers, holds the embedding, holds the head, head keeps a tied copy) of a pp rank."""
    first, last = layout.chunk_rank(0), layout.chunk_rank(layout.num_chunks - 1)
    layers = sum(layout.rank_chunk_layers(spec.num_layers)[pp_rank])
    # separate chunk modules: the last keeps its own tied copy even on the first chunk's rank
    return layers, pp_rank == first, pp_rank == last, layout.num_chunks > 1


def pieces_tensors(spec: ModelSpec, layers: int, embedding: bool, head: bool,
                   tied_copy: bool, job=None) -> list:
    tensors = job_block_tensors(spec, job) * layers
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


@lru_cache(maxsize=65536)
def _numel_of(spec: ModelSpec, tp: int, layers: int, embedding: bool, head: bool,
              tied_copy: bool, job_key, trainable_only: bool, job) -> int:
    return sum(math.prod(t.local_shape(tp))
               for t in pieces_tensors(spec, layers, embedding, head, tied_copy, job)
               if not (trainable_only and t.frozen))


def _local_numel(spec: ModelSpec, tp: int, layers: int, embedding: bool, head: bool,
                 tied_copy: bool, job=None, trainable_only: bool = False) -> int:
    """Parameters of a rank's pieces on TP rank 0 (with `trainable_only`, those trained)."""
    key = _job_key(job)
    return _numel_of(spec, tp, int(layers), bool(embedding), bool(head), bool(tied_copy), key,
                     trainable_only, job if key is not None and key != (False, None) else None)


def rank_local_numel(spec: ModelSpec, layout, pp_rank: int, job=None) -> int:
    """Parameters pipeline rank `pp_rank` holds on TP rank 0 (cached: the search asks often)."""
    return _local_numel(spec, layout.tp, *rank_pieces(spec, layout, pp_rank), job=job)


def block_params_local(spec: ModelSpec, tp: int, job=None, trainable_only: bool = False) -> int:
    """Parameters of one block on one TP rank (with `trainable_only`, those trained)."""
    return sum(math.prod(t.local_shape(tp)) for t in job_block_tensors(spec, job)
               if not (trainable_only and t.frozen))
