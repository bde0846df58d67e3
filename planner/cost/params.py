"""Exact parameter counts, whole-model and per pipeline/tensor-parallel rank.

Counts follow the layer definitions of each family (GPT-2: Radford et al. 2019 and HF GPT2Model;
Llama: Touvron et al. 2023 and HF LlamaModel; BERT: HF BertForMaskedLM) and equal
`sum(p.numel())` of runtime/model.py for every preset (tests/test_runtime_model.py)."""

from dataclasses import dataclass

from planner.spec import BERT_TYPE_VOCAB, ModelSpec


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ParamShare:
    """Parameters of a piece of the model as one tensor-parallel rank holds them."""
    sharded: int     # split across the TP group: this is one rank's (largest) share
    replicated: int  # held in full by every TP rank (norms, row-parallel biases, positions)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def __add__(self, other: "ParamShare") -> "ParamShare":
        return ParamShare(self.sharded + other.sharded, self.replicated + other.replicated)


def norm_params(spec: ModelSpec) -> int:
    return spec.hidden_size * (2 if spec.norm == "layernorm" else 1)


def layer_share(spec: ModelSpec, tp: int = 1) -> ParamShare:
    """One transformer block: attention (column-parallel q/k/v, row-parallel o), MLP, 2 norms."""
    h, kv, f = spec.hidden_size, spec.kv_hidden_size, spec.ffn_hidden_size
    attn_w = h * h + 2 * h * kv + h * h
    mlp_w = (3 if spec.mlp == "swiglu" else 2) * h * f
    sharded = attn_w + mlp_w
    replicated = 2 * norm_params(spec)
    if spec.linear_bias:
        sharded += h + 2 * kv + (2 * f if spec.mlp == "swiglu" else f)  # column-parallel biases
        replicated += 2 * h                                              # row-parallel biases
    return ParamShare(sharded // tp, replicated)


def embedding_share(spec: ModelSpec, tp: int = 1) -> ParamShare:
    """Word embedding (vocab-parallel), learned positions, BERT token types and embedding norm."""
    h = spec.hidden_size
    replicated = spec.max_seq_len * h if spec.learned_positions else 0
    if spec.arch == "bert":
        replicated += BERT_TYPE_VOCAB * h + norm_params(spec)
    return ParamShare(_ceil_div(spec.vocab_size, tp) * h, replicated)


def head_share(spec: ModelSpec, tp: int = 1, holds_tied_copy: bool = False) -> ParamShare:
    """Final norm and output projection (vocab-parallel); BERT's MLM transform instead.

    A tied output layer shares the word embedding; on a pipeline whose first and last stages
    differ, the last stage keeps its own copy (Narayanan et al. 2021, Sec. 4.1)."""
    h, v = spec.hidden_size, spec.vocab_size
    if spec.arch == "bert":
        replicated = h * h + h + norm_params(spec)  # dense + LayerNorm of the MLM transform
        sharded = _ceil_div(v, tp)                  # decoder bias
    else:
        replicated, sharded = norm_params(spec), 0
    if not spec.tie_embeddings or holds_tied_copy:
        sharded += _ceil_div(v, tp) * h
    return ParamShare(sharded, replicated)


def count_parameters(spec: ModelSpec) -> int:
    """All trainable parameters of the model (tied weights counted once)."""
    return (embedding_share(spec).total + spec.num_layers * layer_share(spec).total
            + head_share(spec).total)


def rank_param_shares(spec: ModelSpec, layout) -> list:
    """ParamShare of each pipeline rank: its chunks' layers, the embedding on the rank running
    the first chunk and the head on the rank running the last chunk."""
    layer = layer_share(spec, layout.tp)
    first, last = layout.chunk_rank(0), layout.chunk_rank(layout.num_chunks - 1)
    shares = []
    for rank, chunks in enumerate(layout.rank_chunk_layers(spec.num_layers)):
        share = ParamShare(layer.sharded * sum(chunks), layer.replicated * sum(chunks))
        if rank == first:
            share = share + embedding_share(spec, layout.tp)
        if rank == last:
            share = share + head_share(spec, layout.tp, holds_tied_copy=first != last)
        shares.append(share)
    return shares
