"""The T5 encoder (Raffel et al. 2020), frozen, as TexTok's text encoder; any size by config.

Network as Hugging Face ``transformers`` ``T5EncoderModel``
(``models/t5/modeling_t5.py``, itself a port of Mesh-TensorFlow's T5): token
embedding (no scaling, no absolute positions), pre-norm blocks of
self-attention and a feed-forward layer, T5's RMS ``layer_norm`` (no mean, no
bias, float32 statistics), a final layer norm. Attention has no 1/sqrt(d)
scaling (T5 folds it into the initialisation) and adds a learned relative
position bias, bucketed as in Mesh-TF (bidirectional: 32 buckets, exact up to
8, logarithmic to 128), computed once by block 0 and shared by every block.
Feed-forward: ``relu`` (T5 v1.0) or ``gated-gelu`` (T5 v1.1, FLAN-T5:
``gelu_new(wi_0 x) * wi_1 x``).

Checkpoints: the published Hugging Face checkpoints
(``config.json`` + ``model.safetensors`` / sharded safetensors with
``model.safetensors.index.json`` / ``pytorch_model.bin``), full
encoder-decoder ones included (the decoder is ignored). TexTok uses T5-XL at
256 px and T5-XXL at 512 px (``google/t5-v1_1-xl``, ``google/t5-v1_1-xxl``).

Layout: token ids (batch, length) int32, attention mask (batch, length) (1 =
token, 0 = padding); output hidden states (batch, length, d_model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module

HF_URL = "https://huggingface.co/{repo}"

# Published T5 v1.1 sizes (the TexTok choice is v1.1: gated-GELU; the repos' config.json files).
PRESETS: dict[str, dict[str, Any]] = {
    "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's hyper-parameters; field names as ``transformers.T5Config``."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "relu" (T5 v1.0) | "gated-gelu" (v1.1) | "gated-relu" | "gelu"

    def __post_init__(self):
        act = self.feed_forward_proj.split("-")[-1]
        if act not in _ACTIVATIONS or len(self.feed_forward_proj.split("-")) > 2:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: one of relu, gelu, gated-relu, "
                             "gated-gelu (optionally with gelu_new)")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "T5Config":
        if name not in PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Config":
        """From a Hugging Face ``config.json`` (extra keys, e.g. decoder fields, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _gelu_new(x):
    return jax.nn.gelu(x, approximate=True)  # transformers' "gelu_new": the tanh approximation


_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": _gelu_new, "gelu_new": _gelu_new}


# ----------------------------------------------------------------------------
# Relative position bias
# ----------------------------------------------------------------------------


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Mesh-TF's bidirectional bucketing of (memory - query) positions; int32, same shape.

    Computed in numpy float32 in transformers' order of operations, so the
    integer truncation at bucket edges matches exactly. Shapes are static, so
    the table is a trace-time constant.
    """
    rel = np.asarray(relative_position, np.int64)
    num_buckets //= 2
    buckets = (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


# ----------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------


def t5_layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight; statistics in float32."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return weight * (x * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class T5LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x):
        return t5_layer_norm(x, self.weight[...], self.eps)


def _linear(din: int, dout: int, names, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    return layers.dense(din, dout, names, use_bias=False, rngs=rngs, dtype=dtype,
                        kernel_init=nnx.initializers.normal(din ** -0.5))


class T5SelfAttention(nnx.Module):
    """q, k, v, o without bias; unscaled scores + position bias + padding mask; softmax in float32."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = _linear(cfg.d_model, inner, ("embed", "heads"), rngs, dtype)
        self.k = _linear(cfg.d_model, inner, ("embed", "heads"), rngs, dtype)
        self.v = _linear(cfg.d_model, inner, ("embed", "heads"), rngs, dtype)
        self.o = _linear(inner, cfg.d_model, ("heads", "embed"), rngs, dtype)

    def __call__(self, x, bias):
        """x (B, L, D); bias (B or 1, H, L, L) = position bias + additive mask."""
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) + bias
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v.astype(jnp.float32)).astype(v.dtype)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, self.num_heads * self.d_kv))


class T5FeedForward(nnx.Module):
    """``DenseReluDense``: wi -> act -> wo, or gated: act(wi_0 x) * wi_1 x -> wo."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.act = _ACTIVATIONS[cfg.feed_forward_proj.split("-")[-1]]
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs, dtype)
            self.wi_1 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs, dtype)
        else:
            self.wi = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs, dtype)
        self.wo = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = T5SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = T5FeedForward(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, bias):
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """(input_ids (B, L) int, attention_mask (B, L) or None) -> last hidden state (B, L, d_model)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype,
                                embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")))
        # Block 0's relative_attention_bias: (buckets, heads).
        self.relative_attention_bias = nnx.Param(
            nnx.initializers.normal(cfg.d_model ** -0.5)(rngs.params(), (cfg.relative_attention_num_buckets,
                                                                         cfg.num_heads)),
            out_sharding=(None, "heads"))
        self.blocks = nnx.List([T5Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, length: int) -> jax.Array:
        """(1, H, L, L) learned bias of the bucketed relative position (memory - query)."""
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        values = self.relative_attention_bias[...][jnp.asarray(buckets)]  # (L, L, H)
        return values.transpose(2, 0, 1)[None].astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        b, n = input_ids.shape
        bias = self.position_bias(n)
        if attention_mask is not None:  # transformers: (1 - mask) * finfo(float32).min, added to the scores
            bias = bias + (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * jnp.finfo(jnp.float32).min
        x = self.shared(input_ids)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Checkpoints: Hugging Face layout -> params
# ----------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _missing(path: Path, what: str, repo: str | None) -> FileNotFoundError:
    where = HF_URL.format(repo=repo) if repo else "the model's Hugging Face repository (e.g. " + \
        ", ".join(HF_URL.format(repo=f"google/{n}") for n in ("t5-v1_1-xl", "t5-v1_1-xxl")) + ")"
    return FileNotFoundError(
        f"T5 encoder: {what} not found at {path}. The published checkpoints are at {where} "
        "(files config.json, model.safetensors or pytorch_model.bin, spiece.model); download them on a "
        "machine with internet access and copy the folder here.")


def load_state_dict(path: str | Path, repo: str | None = None) -> dict[str, np.ndarray]:
    """{key: float32 array} from a checkpoint folder or file (safetensors, sharded or not, or pytorch_model.bin)."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).exists():
                return load_state_dict(path / name, repo)
        raise _missing(path, f"none of the weight files {', '.join(WEIGHT_FILES)}", repo)
    if not path.exists():
        raise _missing(path, f"weight file {path.name}", repo)
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.values())):
            if not (path.parent / shard).exists():
                raise _missing(path.parent / shard, f"shard {shard} (listed in {path.name})", repo)
            out.update(load_state_dict(path.parent / shard, repo))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    from trainers import torchfile

    return {k: np.asarray(v, np.float32) for k, v in torchfile.load_state_dict(path).items()}


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """{key: float32 array} of a ``.safetensors`` file, bfloat16 included (numpy has no bfloat16:
    the 16 stored bits are the high half of a float32). Format: 8-byte little-endian header size,
    a JSON header {key: {dtype, shape, data_offsets}}, then the raw little-endian data."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}; a T5 checkpoint stores floats")
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[key] = arr.astype(np.float32).reshape(info["shape"])
    return out


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: T5Config) -> dict:
    """Pure params of :class:`T5Encoder` from a transformers T5 state_dict (encoder keys; Linear (out, in))."""
    sd = state_dict
    emb_key = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    if emb_key not in sd:
        raise KeyError("T5 checkpoint has neither shared.weight nor encoder.embed_tokens.weight")

    def get(key, shape):
        if key not in sd:
            raise KeyError(f"T5 checkpoint is missing {key} (is it a T5 checkpoint of this size? "
                           f"{cfg.num_layers} layers, feed_forward_proj={cfg.feed_forward_proj!r})")
        value = np.asarray(sd[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"T5 checkpoint {key} has shape {value.shape}, the config expects {shape}")
        return value

    inner = cfg.num_heads * cfg.d_kv
    params: dict = {
        "shared": {"embedding": get(emb_key, (cfg.vocab_size, cfg.d_model))},
        "relative_attention_bias": get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                       (cfg.relative_attention_num_buckets, cfg.num_heads)),
        "final_layer_norm": {"weight": get("encoder.final_layer_norm.weight", (cfg.d_model,))},
        "blocks": {},
    }
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer"
        attn = {n: {"kernel": get(f"{p}.0.SelfAttention.{n}.weight", (inner, cfg.d_model) if n != "o"
                                  else (cfg.d_model, inner)).T} for n in ("q", "k", "v", "o")}
        ff_names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
        ff = {n: {"kernel": get(f"{p}.1.DenseReluDense.{n}.weight", (cfg.d_model, cfg.d_ff) if n == "wo"
                                else (cfg.d_ff, cfg.d_model)).T} for n in ff_names}
        params["blocks"][i] = {"attn_norm": {"weight": get(f"{p}.0.layer_norm.weight", (cfg.d_model,))},
                               "attn": attn,
                               "ff_norm": {"weight": get(f"{p}.1.layer_norm.weight", (cfg.d_model,))},
                               "ff": ff}
    return params


def read_config(folder: str | Path, repo: str | None = None) -> T5Config:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise _missing(path, "config.json", repo)
    return T5Config.from_dict(json.loads(path.read_text()))


def build(cfg: T5Config, params: dict | None = None, *, dtype=jnp.float32) -> T5Encoder:
    """A T5Encoder with ``params`` (pure dict, e.g. from :func:`params_from_hf`); random if None."""
    model = layers.abstract_module(lambda rngs: T5Encoder(cfg, rngs=rngs, dtype=dtype)) if params is not None \
        else T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    return merge_module(model, params) if params is not None else model


def load_pretrained(folder: str | Path, *, repo: str | None = None, dtype=jnp.float32) -> tuple[T5Encoder, T5Config]:
    """(encoder, config) from a Hugging Face checkpoint folder (config.json + weights)."""
    cfg = read_config(folder, repo)
    return build(cfg, params_from_hf(load_state_dict(folder, repo), cfg), dtype=dtype), cfg
