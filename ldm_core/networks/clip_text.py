"""CLIP text encoders of the SD family, with ComfyUI's prompt-weighting semantics.

`ClipTextEncoder` runs the modules of transformers' `CLIPTextModel` (embeddings, layers,
final LayerNorm) plus an optional bias-free `text_projection`, so its state-dict keys
are those of `CLIPTextModelWithProjection` (`text_model.embeddings.token_embedding.weight`,
...): the SD1.x / SDXL CLIP-L file keys. OpenCLIP towers (SD2.x ViT-H, SDXL bigG) are
mapped through `clip_keys`. The forward is written out here rather than delegated to
transformers' `forward` because SD needs what that does not give: token embeddings
replaced by textual-inversion vectors, any intermediate layer with or without the final
norm, and the pooled position ComfyUI uses (the first end token, else the last position).

Layer selection (ComfyUI's `CLIPSetLastLayer`): `layer_idx` None is the last layer
after the final LayerNorm; k < 0 is the output of layer n+k+1 (-1 last, -2 penultimate),
k >= 0 that of layer k+1; the final LayerNorm is applied to it only if
`layer_norm_hidden_state`. |k| > n falls back to None, as ComfyUI does. The pooled
output always comes from the normed last layer, whatever the layer chosen.
"""
from __future__ import annotations

import enum
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_core.errors import ConfigError, LdmError, PromptError, StateDictMismatchError
from ldm_core.networks import clip_keys
from ldm_core.networks.config import TextEncoderConfig
from ldm_core.networks.strict_load import load_strict
from ldm_core.networks.weight_cast import compute_dtype

START_TOKEN = 49406  # <|startoftext|> of every CLIP BPE vocabulary SD uses
END_TOKEN = 49407  # <|endoftext|>
_PLACEHOLDER = 0  # token id at positions whose embedding is given as a vector; never END_TOKEN

# One 77-position chunk of a tokenized prompt: (token id or embedding vector [D], weight).
Chunk = Sequence[tuple["int | Tensor", float]]


class _Default(enum.Enum):
    FROM_CONFIG = "from config"


FROM_CONFIG = _Default.FROM_CONFIG  # "use the encoder config's value" (None is a real layer_idx)


def _hf_config(config: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, max_position_embeddings=config.max_positions,
        hidden_act=config.hidden_act, projection_dim=config.projection_dim or config.hidden_size,
        layer_norm_eps=1e-5, bos_token_id=START_TOKEN, eos_token_id=END_TOKEN,
        attn_implementation="sdpa",
    )


def resolve_layer(num_layers: int, layer_idx: int | None) -> int | None:
    """0-based index of the layer whose output is the hidden state; None: the normed last layer."""
    if layer_idx is None or abs(layer_idx) > num_layers:
        return None
    if layer_idx == num_layers:  # ComfyUI would fail here too: no layer has that index
        raise ConfigError(f"layer_idx {layer_idx} is out of range for {num_layers} layers; use -1 .. -{num_layers}")
    return layer_idx if layer_idx >= 0 else num_layers + layer_idx


def _check_openclip_layout(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Strict key and shape check in the file's own OpenCLIP names (logit_scale optional)."""
    expected = {k: tuple(v.shape) for k, v in clip_keys.hf_to_openclip(model.state_dict()).items()}
    present = {k: tuple(v.shape) for k, v in sd.items() if k not in clip_keys.OPENCLIP_UNUSED}
    problems = []
    if missing := sorted(expected.keys() - present.keys()):
        problems.append(f"{len(missing)} missing: {', '.join(missing[:8])}")
    if unexpected := sorted(present.keys() - expected.keys()):
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}")
    if wrong := sorted(
        f"{k} (file {present[k]}, model {expected[k]})" for k in expected.keys() & present.keys()
        if present[k] != expected[k]
    ):
        problems.append(f"{len(wrong)} of the wrong shape: {', '.join(wrong[:8])}")
    if problems:
        raise StateDictMismatchError(
            f"{what}: the weights do not fit the architecture ({'; '.join(problems)}). The file is of "
            "another model variant than detected, or damaged; pass the right config."
        )


class ClipTextEncoder(nn.Module):
    """A CLIP text transformer: tokens [B, L] (L <= max_positions) -> (hidden [B, L, D], pooled)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(_hf_config(config))
        if hasattr(self.text_model, "text_model"):
            raise LdmError("ldm_core needs transformers >= 5.6 (flat CLIPTextModel); upgrade transformers")
        p = config.projection_dim
        self.text_projection = None if p is None else nn.Linear(config.hidden_size, p, bias=False)

    @classmethod
    def from_state_dict(
        cls, config: TextEncoderConfig, sd: Mapping[str, Tensor], dtype: torch.dtype | None = None
    ) -> ClipTextEncoder:
        """Build from a text tower's weights (checkpoint prefix already stripped), strictly.

        `sd` is in `config.key_format`: "hf" errors name the canonical `text_model.` keys
        (the file's own, less a missing `text_model.` level); "openclip" errors name the
        file's OpenCLIP keys. `dtype` None keeps float32. Tensors of the right dtype are
        used in place (no copy), so memory-mapped weights stay mapped.
        """
        what = f"text encoder {config.name}"
        with torch.device("meta"):
            model = cls(config).to(dtype or torch.float32)
        if config.key_format == "openclip":
            _check_openclip_layout(model, sd, what)
        load_strict(model, clip_keys.to_hf(sd, config.key_format), what)
        emb = model.text_model.embeddings
        emb.position_ids = torch.arange(config.max_positions, device=emb.token_embedding.weight.device)[None]
        return model.eval().requires_grad_(False)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    @torch.no_grad()
    def forward(
        self,
        tokens: Tensor | None = None,
        embeds: Tensor | None = None,
        *,
        layer_idx: int | None | _Default = FROM_CONFIG,
        layer_norm_hidden_state: bool | _Default = FROM_CONFIG,
    ) -> tuple[Tensor, Tensor]:
        """Hidden states [B, L, D] of the chosen layer, and pooled [B, P] (projected if the model has P).

        `embeds` [B, L, D]: token embeddings to use instead of looking `tokens` up (TI
        vectors in place). `tokens` then only locate the pooled position: the first
        END_TOKEN per row, or the last position if there is none or no tokens are given.
        """
        if layer_idx is FROM_CONFIG:
            layer_idx = self.config.layer_idx
        if layer_norm_hidden_state is FROM_CONFIG:
            layer_norm_hidden_state = self.config.layer_norm_hidden_state
        if embeds is None:
            if tokens is None:
                raise PromptError("ClipTextEncoder needs tokens or embeds")
            embeds = self.token_embedding(tokens)
        tm = self.text_model
        length = embeds.shape[1]
        if length > self.config.max_positions:
            limit = self.config.max_positions
            raise PromptError(f"{length} tokens in one chunk; {self.config.name} takes at most {limit}")
        x = embeds.to(compute_dtype(tm.final_layer_norm))
        x = x + tm.embeddings.position_embedding.weight[:length].to(x.dtype)
        # Additive causal mask, as transformers and ComfyUI build it (works for eager and SDPA).
        causal = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu_(1)
        keep = resolve_layer(self.config.num_layers, layer_idx)  # type: ignore[arg-type]
        hidden = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, causal[None, None])
            if i == keep:
                hidden = x
        last = tm.final_layer_norm(x)
        if hidden is None:
            hidden = last
        elif layer_norm_hidden_state:
            hidden = tm.final_layer_norm(hidden)
        pooled = last[torch.arange(last.shape[0], device=last.device), self._pooled_positions(tokens, last)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    @staticmethod
    def _pooled_positions(tokens: Tensor | None, last: Tensor) -> Tensor:
        batch, length = last.shape[:2]
        if tokens is None:
            return torch.full((batch,), length - 1, device=last.device)
        is_end = tokens.to(last.device) == END_TOKEN
        return torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), length - 1)

    def empty_chunk(self, length: int | None = None) -> list[int]:
        """Start, end, then pad tokens: what weights are measured against (ComfyUI `gen_empty_tokens`)."""
        length = length or self.config.max_positions
        return ([START_TOKEN, END_TOKEN] + [self.config.pad_token] * length)[:length]

    @torch.no_grad()
    def _embed(self, rows: Sequence[Sequence[int | Tensor]]) -> tuple[Tensor, Tensor]:
        """Token ids [N, L] and token embeddings [N, L, D], TI vectors in place of their positions."""
        device = self.token_embedding.weight.device
        width = self.config.hidden_size
        ids, vectors = [], []
        for r, row in enumerate(rows):
            ids.append([])
            for j, item in enumerate(row):
                if isinstance(item, numbers.Integral) and not isinstance(item, bool):
                    ids[-1].append(int(item))
                elif torch.is_tensor(item) and tuple(item.shape) == (width,):
                    ids[-1].append(_PLACEHOLDER)
                    vectors.append((r, j, item))
                else:
                    shape = tuple(item.shape) if torch.is_tensor(item) else type(item).__name__
                    raise PromptError(
                        f"chunk {r}, position {j}: expected a token id or an embedding vector of width "
                        f"{width} for {self.config.name}, got {shape}; the embedding is for another model"
                    )
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        embeds = self.token_embedding(tokens)
        for r, j, vector in vectors:
            embeds[r, j] = vector.to(embeds)
        return tokens, embeds

    def encode_token_weights(
        self,
        chunks: Sequence[Chunk],
        layer_idx: int | None | _Default = FROM_CONFIG,
        layer_norm_hidden_state: bool | _Default = FROM_CONFIG,
    ) -> tuple[Tensor, Tensor]:
        """ComfyUI's `encode_token_weights`: chunks -> (cond [1, S*L, D] float32, pooled [1, P] float32).

        All chunks (each L items, usually 77) run as one batch. If any weight is not 1, an
        empty chunk runs with them and each weighted position becomes
        (z - z_empty) * w + z_empty. Pooled comes from the first chunk (from the empty
        chunk when there are no chunks, whose encoding is then the cond).
        """
        lengths = {len(c) for c in chunks}
        if len(lengths) > 1:
            raise PromptError(f"chunks of different lengths {sorted(lengths)}; the tokenizer pads every chunk alike")
        length = lengths.pop() if lengths else self.config.max_positions
        rows: list[Sequence[int | Tensor]] = [[item for item, _ in c] for c in chunks]
        weights = torch.tensor([[float(w) for _, w in c] for c in chunks], dtype=torch.float32).reshape(-1, length)
        weighted = bool((weights != 1.0).any())
        if weighted or not chunks:
            rows.append(self.empty_chunk(length))
        tokens, embeds = self._embed(rows)
        z, pooled = self(tokens, embeds, layer_idx=layer_idx, layer_norm_hidden_state=layer_norm_hidden_state)
        z, pooled = z.float(), pooled[:1].float()
        if not chunks:
            return z, pooled
        cond = z[: len(chunks)]
        if weighted:
            w = weights.to(z.device)[..., None]
            z_empty = z[-1:]
            cond = torch.where(w != 1.0, (cond - z_empty) * w + z_empty, cond)
        return cond.reshape(1, -1, z.shape[-1]), pooled


class TextEncoderSet(nn.Module):
    """A family's text encoders, by config name; cond = their features side by side (SDXL: L then G).

    The token axis is cut to the shortest encoder's, and pooled comes from the last
    encoder (SD1: CLIP-L, SD2: ViT-H, SDXL and refiner: bigG), as ComfyUI does.
    """

    def __init__(self, encoders: Sequence[ClipTextEncoder]) -> None:
        super().__init__()
        names = [e.config.name for e in encoders]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"text encoders need distinct names, got {names}")
        self.encoders = nn.ModuleDict({e.config.name: e for e in encoders})

    @classmethod
    def from_state_dicts(
        cls,
        configs: Sequence[TextEncoderConfig],
        sds: Sequence[Mapping[str, Tensor]],
        dtype: torch.dtype | None = None,
    ) -> TextEncoderSet:
        if len(configs) != len(sds):
            raise ConfigError(f"{len(configs)} text encoder configs but {len(sds)} state dicts")
        return cls([ClipTextEncoder.from_state_dict(c, sd, dtype) for c, sd in zip(configs, sds)])

    def encode_token_weights(
        self, chunks: Mapping[str, Sequence[Chunk]], layer_idx: int | None | _Default = FROM_CONFIG
    ) -> tuple[Tensor, Tensor]:
        """`chunks[name]` per encoder -> (cond [1, T, sum of D], pooled [1, P] of the last encoder)."""
        if missing := [name for name in self.encoders if name not in chunks]:
            raise PromptError(f"no tokens for text encoder(s) {missing}; got {sorted(chunks)}")
        outs = [enc.encode_token_weights(chunks[name], layer_idx) for name, enc in self.encoders.items()]
        tokens = min(cond.shape[1] for cond, _ in outs)
        return torch.cat([cond[:, :tokens] for cond, _ in outs], dim=-1), outs[-1][1]


__all__ = [
    "ClipTextEncoder", "TextEncoderSet", "Chunk", "FROM_CONFIG", "START_TOKEN", "END_TOKEN", "resolve_layer",
]
