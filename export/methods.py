"""The exported methods: one tiny `nn.Module` wrapper per ExecuTorch method, over a TinyAlignVLM.

Method names follow ExecuTorch's LLM runner constants (`vision_encoder`, `token_embedding`,
`text_decoder`, `extension/llm/runner/constants.h`) plus ours (`retrieval_query`,
`rag_connector`). `method_specs` is the one place that fixes each method's argument order, dtypes,
shapes and dynamic dimensions; export, parity checks, the manifest and docs/bundle.md all read
it. Wrappers hold references to the model's parts and never copy weights; `build_methods`
sets up the KV cache on the model it is given, so callers pass a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tinyalign.config import ValueKind

# Method names (ExecuTorch runner constants + TinyAlign's own).
VISION_ENCODER = "vision_encoder"
TOKEN_EMBEDDING = "token_embedding"
RETRIEVAL_QUERY = "retrieval_query"
RAG_CONNECTOR = "rag_connector"
TEXT_DECODER = "text_decoder"
METHOD_NAMES = (VISION_ENCODER, TOKEN_EMBEDDING, RETRIEVAL_QUERY, RAG_CONNECTOR, TEXT_DECODER)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. `shape` entries are ints or the names of symbolic dims."""

    name: str
    dtype: str  # "float32" | "int64"
    shape: tuple


@dataclass(frozen=True)
class MethodSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict = field(default_factory=dict)  # symbolic dim -> (min, max)
    doc: str = ""

    def to_dict(self) -> dict:
        return {
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "dynamic_dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.dims.items()},
            "doc": self.doc,
        }


def method_specs(cfg) -> dict[str, MethodSpec]:
    """The argument order and shapes of every method for a ModelConfig (the single source)."""
    S, H, N, Dv = cfg.vision.image_size, cfg.lm.hidden_size, cfg.vision.num_tokens, cfg.vision.hidden_size
    V, max_len, r = cfg.lm.vocab_size, cfg.lm.max_seq_len, cfg.retrieval
    if r.value_kind is ValueKind.CAPTION:
        values = TensorSpec("values", "int64", (1, r.k, r.caption_len))
        t = r.caption_len
    else:
        values = TensorSpec("values", "float32", (1, r.k, r.value_tokens, r.value_dim))
        t = r.value_tokens
    key_dim = r.key_dim if r.recipe.value == "learned" else H
    return {
        VISION_ENCODER: MethodSpec(
            VISION_ENCODER,
            (TensorSpec("pixels", "float32", (1, 3, S, S)),),
            (TensorSpec("image_tokens", "float32", (1, N, H)), TensorSpec("feats", "float32", (1, N, Dv))),
            doc="preprocessed image -> (image tokens for the LM, vision features for retrieval_query)",
        ),
        TOKEN_EMBEDDING: MethodSpec(
            TOKEN_EMBEDDING,
            (TensorSpec("ids", "int64", (1, "T")),),
            (TensorSpec("embeds", "float32", (1, "T", H)),),
            dims={"T": (1, max_len)},
            doc="token ids (all >= 0) -> LM input embeddings",
        ),
        RETRIEVAL_QUERY: MethodSpec(
            RETRIEVAL_QUERY,
            (TensorSpec("feats", "float32", (1, N, Dv)), TensorSpec("text_ids", "int64", (1, "L")),
             TensorSpec("text_mask", "int64", (1, "L"))),
            (TensorSpec("query", "float32", (1, key_dim)),),
            dims={"L": (1, max_len)},
            doc="vision features + the prompt's ids (ids < 0, e.g. the image placeholder, are ignored) "
                "-> L2-normalised query for the bank",
        ),
        RAG_CONNECTOR: MethodSpec(
            RAG_CONNECTOR,
            (values,),
            (TensorSpec("memory_tokens", "float32", (1, r.k * t, H)),),
            doc="the k retrieved values (caption ids padded with -1, or latents) -> memory tokens",
        ),
        TEXT_DECODER: MethodSpec(
            TEXT_DECODER,
            (TensorSpec("embeds", "float32", (1, "T", H)), TensorSpec("input_pos", "int64", ("T",))),
            (TensorSpec("logits", "float32", (1, V)),),
            dims={"T": (1, max_len - 1)},
            doc="embeddings at positions input_pos (consecutive, starting where the last call ended) "
                "-> logits of the last position; updates the KV cache in place",
        ),
    }


# ---- wrappers ------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """`pixels [1, 3, S, S]` -> `(image_tokens [1, N, H], feats [1, N, Dv])`: one vision pass
    serves both the LM (image tokens first, so ExecuTorch's stock runner reads output 0) and the
    retrieval query (features)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        feats = self.model.image_features(pixels)  # [1, N, Dv]
        # The connector runs on [N, Dv]: a 3D input here is traced as expand + bmm, which
        # XNNPACK's linear fusion mis-handles once the weights are quantized (8w).
        tokens = self.model.image_tokens(feats.flatten(0, 1)).unsqueeze(0)  # [1, N, H]
        return tokens, feats


class TokenEmbedding(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.lm.embed_tokens

    def forward(self, ids):  # [1, T] -> [1, T, H]
        return self.embed(ids)


class RetrievalQuery(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.key_encoder = model.key_encoder

    def forward(self, feats, text_ids, text_mask):  # -> [1, dim]
        mask = text_mask * (text_ids >= 0).to(text_mask.dtype)
        return self.key_encoder(feats, text_ids.clamp(min=0), mask)


class RAGConnectorMethod(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, values):  # [1, k, L] ids or [1, k, m, d_v] -> [1, k * t, H]
        return self.model.memory_tokens(values)


class TextDecoder(nn.Module):
    """`embeds [1, T, H]`, `input_pos [T]` -> logits of the last position `[1, V]`; the static KV
    cache (set up by `build_methods`) is updated in place, so prefill and decode are one method."""

    def __init__(self, model):
        super().__init__()
        self.lm = model.lm

    def forward(self, embeds, input_pos):
        return self.lm(embeds, input_pos=input_pos)[:, -1]


WRAPPERS = {VISION_ENCODER: VisionEncoder, TOKEN_EMBEDDING: TokenEmbedding, RETRIEVAL_QUERY: RetrievalQuery,
            RAG_CONNECTOR: RAGConnectorMethod, TEXT_DECODER: TextDecoder}


def build_methods(model) -> dict[str, nn.Module]:
    """Wrappers for every method over `model`, in METHOD_NAMES order. Sets up a batch-1 KV cache
    of length `max_seq_len` on `model.lm` (pass a copy if the caller's model must stay as it was)."""
    model.eval()
    model.lm.setup_cache(1, model.cfg.lm.max_seq_len)
    return {name: WRAPPERS[name](model).eval() for name in METHOD_NAMES}


# ---- sample inputs and export shapes ---------------------------------------------------------
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def sample_inputs(spec: MethodSpec, *, sizes: dict | None = None, vocab: int = 2, seed: int = 0) -> tuple:
    """Random inputs for `spec` (symbolic dims from `sizes`, default 3). Int inputs are valid ids;
    `input_pos` counts from 0 and masks are ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"T": 3, "L": 3, **(sizes or {})}
    out = []
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.name == "input_pos":
            out.append(torch.arange(shape[0]))
        elif t.name == "text_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.dtype == "int64":
            out.append(torch.randint(0, vocab, shape, generator=g))
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)


def dynamic_shapes(spec: MethodSpec):
    """`torch.export` dynamic_shapes for `spec` (None when all shapes are static)."""
    if not spec.dims:
        return None
    dims = {k: torch.export.Dim(f"{spec.name}_{k}", min=lo, max=hi) for k, (lo, hi) in spec.dims.items()}
    out = []
    for t in spec.inputs:
        d = {i: dims[s] for i, s in enumerate(t.shape) if isinstance(s, str)}
        out.append(d or None)
    return tuple(out)
