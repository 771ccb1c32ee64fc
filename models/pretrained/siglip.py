"""SigLIP vision tower (Zhai et al. 2023), ``google/siglip-so400m-patch14-384``: TokenFlow-XL's frozen
teacher and the initialisation of its semantic encoder.

As ``transformers`` ``SiglipVisionModel`` builds it: a patch conv (bias, VALID), a learned position
table (no class token), pre-LN encoder layers (``layer_norm1`` -> attention with separate q/k/v
projections, fused here into ``qkv`` -> residual; ``layer_norm2`` -> MLP fc1 -> GELU (tanh) -> fc2 ->
residual), ``post_layernorm``, and the attention-pooling ``head`` (a learned probe attends to the tokens
through a ``torch.nn.MultiheadAttention``, then probe + MLP(LayerNorm(probe))). LayerNorm eps 1e-6.

TokenFlow (``vq_model.py``, ``vq_loss.py``) uses ``hidden_states[-2]``, the output of the second-to-last
layer before ``post_layernorm``, for teacher and student alike; upstream freezes the unused last layer,
``post_layernorm`` and ``head``. Here that is a tower built with ``depth - 1`` layers and
``post_layernorm=False, head=False`` (:func:`params_from_torch` drops the unused keys), whose
``__call__`` is exactly that feature map.

Input: NHWC images normalised by :func:`preprocess` ((x - 0.5) / 0.5 of the [0, 1] image,
``ScalingLayerForSigLip``). Other input sizes than the table's: the table is resized bicubically with
PyTorch's kernel (``interpolate_pos_encoding=True`` in transformers).

Weights: ``model.safetensors`` of https://huggingface.co/google/siglip-so400m-patch14-384 (a
``SiglipModel``: the ``vision_model.`` keys are read, the text tower ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.resize import torch_bicubic
from models import layers
from models.pretrained import (clamped_normalise, merge_module, read_weights, regex_rename, require_file,
                               torch_to_params)
from tokenizers import vit

# so400m-patch14-384: width, depth, heads, mlp, patch, image size
SO400M = dict(width=1152, depth=27, heads=16, mlp_dim=4304, patch_size=14, grid=27)
PUBLISHED = "https://huggingface.co/google/siglip-so400m-patch14-384 (model.safetensors)"
MEAN = STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor / TokenFlow's ScalingLayerForSigLip


class AttentionPoolingHead(nnx.Module):
    """``SiglipMultiheadAttentionPoolingHead``: (B, N, W) -> (B, W)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, ln_eps: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.probe = vit.learned_embedding(rngs, (1, 1, width), 1.0, (None, None, "embed"))
        self.attention = vit.MultiheadAttention(width, heads, rngs=rngs, dtype=dtype)
        self.layernorm = vit.layer_norm(width, eps=ln_eps, rngs=rngs)
        self.mlp = layers.Mlp(width, mlp_dim, activation=vit.ACTIVATIONS["gelu_tanh"], rngs=rngs, dtype=dtype)

    def __call__(self, x):
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x, x)
        h = h + self.mlp(self.layernorm(h).astype(h.dtype))
        return h[:, 0]


class SiglipVision(nnx.Module):
    """(B, H, W, C) normalised -> tokens (B, (H/p)(W/p), width): the last built layer's output, after
    ``post_layernorm`` when it is built; ``pooled(x)`` -> the head's (B, width)."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int, grid: int,
                 in_channels: int = 3, post_layernorm: bool = True, head: bool = True, ln_eps: float = 1e-6,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        mlp_ratio = mlp_dim / width
        if int(width * mlp_ratio) != mlp_dim:
            raise ValueError(f"SigLIP mlp_dim={mlp_dim} is not representable as width x ratio for width={width}")
        self.grid = grid
        self.patch_embedding = vit.PatchEmbed(in_channels, width, patch_size, rngs=rngs, dtype=dtype)
        self.position_embedding = vit.learned_embedding(rngs, (grid * grid, width), 0.02)
        self.blocks = nnx.List([vit.ResidualAttentionBlock(width, heads, mlp_ratio=mlp_ratio, activation="gelu_tanh",
                                                           ln_eps=ln_eps, rngs=rngs, dtype=dtype)
                                for _ in range(depth)])
        self.post_layernorm = vit.layer_norm(width, eps=ln_eps, rngs=rngs) if post_layernorm else None
        self.head = AttentionPoolingHead(width, heads, mlp_dim, ln_eps=ln_eps, rngs=rngs,
                                         dtype=dtype) if head else None

    def position_table(self, h: int, w: int) -> jax.Array:
        pos = self.position_embedding[...]
        if (h, w) == (self.grid, self.grid):
            return pos
        table = torch_bicubic(pos.reshape(1, self.grid, self.grid, -1), (h, w))
        return table.reshape(h * w, -1)

    def __call__(self, x):
        p = self.patch_embedding.patch_size
        t = self.patch_embedding(x)
        t = t + self.position_table(x.shape[1] // p, x.shape[2] // p).astype(t.dtype)
        for block in self.blocks:
            t = block(t)
        return t if self.post_layernorm is None else self.post_layernorm(t).astype(t.dtype)

    def pooled(self, x):
        if self.head is None or self.post_layernorm is None:
            raise ValueError("SiglipVision built without post_layernorm/head has no pooled output")
        return self.head(self(x))


def preprocess(images):
    """Images in [-1, 1] (B, H, W, C) -> SigLIP input: upstream's ``ScalingLayerForSigLip`` (to [0, 1]
    through uint8 range with a clamp, then (x - 0.5) / 0.5); one channel is repeated to three."""
    return clamped_normalise(images, MEAN, STD)


HF_RENAMES = [
    (r"^embeddings\.patch_embedding\.", "patch_embedding.proj."),
    (r"^embeddings\.position_embedding\.weight$", "position_embedding"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^head\.attention\.in_proj_(weight|bias)$", r"head.attention.in_proj.\1"),
]


def vision_state_dict(state_dict: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The vision tower's keys of a ``SiglipModel`` / ``SiglipVisionModel`` state_dict (transformers 4
    ``vision_model.`` or 5 flat names; ``prefix`` first, e.g. TokenFlow's ``encoder_vqkd.``), with the
    q/k/v projections fused into ``self_attn.qkv``."""
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):].removeprefix("vision_model.")
        if k.startswith(("text_model.", "logit_")) or k.endswith("position_ids"):
            continue
        sd[k] = np.asarray(v, np.float32)
    for k in [k for k in sd if k.endswith(".self_attn.q_proj.weight")]:
        base = k[: -len("q_proj.weight")]
        for p in ("weight", "bias"):
            sd[base + f"qkv.{p}"] = np.concatenate([sd.pop(base + f"{x}_proj.{p}") for x in "qkv"])
    return sd


def params_from_torch(state_dict: dict, *, prefix: str = "", **kwargs) -> dict:
    """Pure params of ``SiglipVision(**kwargs)`` from a transformers state_dict; encoder layers past
    ``depth``, and ``post_layernorm``/``head`` when not built, are dropped (TokenFlow's
    ``hidden_states[-2]`` tower)."""
    sd = vision_state_dict(state_dict, prefix)
    depth = int(kwargs["depth"])
    drop = [k for k in sd if (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= depth)
            or (k.startswith("post_layernorm.") and not kwargs.get("post_layernorm", True))
            or (k.startswith("head.") and not kwargs.get("head", True))]
    for k in drop:
        sd.pop(k)
    abstract = layers.abstract_module(lambda rngs: SiglipVision(**kwargs, rngs=rngs))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(sd, expected, rename=regex_rename(HF_RENAMES), what="SigLIP vision state_dict")


def load_state_dict(path, config_field: str) -> dict:
    """A local ``model.safetensors`` / ``pytorch_model.bin`` of a SigLIP checkpoint."""
    path = require_file(path, what="SigLIP weights", config_field=config_field, published=PUBLISHED)
    return read_weights(path)


def tokenflow_kwargs(*, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int, grid: int,
                     in_channels: int = 3) -> dict:
    """The ``hidden_states[-2]`` tower of a ``depth``-layer SigLIP: ``depth - 1`` layers, no
    ``post_layernorm``, no head."""
    return dict(width=width, depth=depth - 1, heads=heads, mlp_dim=mlp_dim, patch_size=patch_size, grid=grid,
                in_channels=in_channels, post_layernorm=False, head=False)


def merge(params, **kwargs) -> SiglipVision:
    abstract = layers.abstract_module(lambda rngs: SiglipVision(**kwargs, rngs=rngs))
    return merge_module(abstract, params)
