"""OpenAI CLIP visual tower (Radford et al. 2021), ViT-B/16: TokenFlow-B's frozen teacher and the
initialisation of its semantic encoder (``tokenflow/tokenizer/clip/model.py``, a vendored OpenAI CLIP
with ``return_patch_tokens`` and ``interpolate_pos_encoding``).

``VisionTransformer``: ``conv1`` (patch conv, no bias) -> ``[class_embedding; patches] +
positional_embedding`` -> ``ln_pre`` -> pre-LN residual blocks (QuickGELU MLP, ``nn.MultiheadAttention``)
-> ``ln_post``. ``__call__`` returns the ``ln_post``-ed patch tokens (``return_patch_tokens`` /
``return_all_tokens``, both drop the class token); ``project`` multiplies by ``visual.proj``
(TokenFlow's teacher target ``encode_image(x, return_all_tokens=True) @ visual.proj``, 512-d for
ViT-B/16); ``image_features`` is CLIP's pooled embedding ``ln_post(cls) @ proj``.

Other input sizes than the table's: :func:`interpolate_pos_embed` as upstream (DINO's bicubic
``scale_factor`` resize with the +0.1 offset, torch's kernel). Input: NHWC images normalised by
:func:`preprocess` (``ScalingLayerForClip``) for the teacher; TokenFlow's clipb *student* sees raw
[-1, 1] pixels (upstream's ``scaling_layer`` is None there).

Weights: OpenAI's ``ViT-B-16.pt`` (TorchScript; ``visual.`` keys) from
https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt
(``clip.load("ViT-B/16")``), or ``open_clip`` ``ViT-B-16`` / ``quickgelu`` ``openai`` (same visual names),
or Hugging Face ``openai/clip-vit-base-patch16`` (:func:`openai_from_hf`).
"""

from __future__ import annotations

import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.resize import torch_bicubic
from models import layers
from models.pretrained import (clamped_normalise, merge_module, read_weights, regex_rename, require_file,
                               torch_to_params)
from tokenizers import vit

VIT_B_16 = dict(width=768, depth=12, heads=12, patch_size=16, grid=14, output_dim=512)
PUBLISHED = ("https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4"
             "ecb61988df416f/ViT-B-16.pt (clip.load('ViT-B/16')) or huggingface.co/openai/clip-vit-base-patch16")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def interpolate_pos_embed(pos: jax.Array, grid: int) -> jax.Array:
    """(1, 1 + g*g, E) -> (1, 1 + grid*grid, E) as CLIP's/BEiT's ``interpolate_pos_encoding``: the patch
    part resized bicubically with ``scale_factor=(grid + 0.1) / g`` (torch's kernel and coordinate
    map), the class row kept."""
    g = int(round((pos.shape[1] - 1) ** 0.5))
    if g == grid:
        return pos
    factor = (grid + 0.1) / math.sqrt(g * g)
    patch = torch_bicubic(pos[:, 1:].reshape(1, g, g, -1), None, scale_factor=(factor, factor))
    return jnp.concatenate([pos[:, :1], patch.reshape(1, grid * grid, -1)], axis=1)


class VisionTransformer(nnx.Module):
    """(B, H, W, C) -> patch tokens (B, (H/p)(W/p), width) after ``ln_post``; ``output_dim`` builds
    ``proj`` (width, output_dim) (None: deleted, as TokenFlow's student)."""

    def __init__(self, *, width: int, depth: int, heads: int, patch_size: int, grid: int, in_channels: int = 3,
                 output_dim: int | None = None, activation: str = "quick_gelu", rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv1 = vit.PatchEmbed(in_channels, width, patch_size, rngs=rngs, use_bias=False, dtype=dtype)
        self.class_embedding = vit.learned_embedding(rngs, (1, 1, width), width**-0.5, (None, None, "embed"))
        self.positional_embedding = vit.learned_embedding(rngs, (1, grid * grid + 1, width), width**-0.5,
                                                          (None, "position", "embed"))
        self.ln_pre = vit.layer_norm(width, rngs=rngs)
        self.blocks = nnx.List([vit.ResidualAttentionBlock(width, heads, activation=activation, rngs=rngs, dtype=dtype)
                                for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)
        self.proj = (vit.learned_embedding(rngs, (width, output_dim), width**-0.5, ("embed", None))
                     if output_dim else None)

    def tokens(self, x):
        """All tokens [cls; patches] after the blocks, before ``ln_post``."""
        t = self.conv1(x)
        b, n, w = t.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(t.dtype), (b, 1, w))
        pos = interpolate_pos_embed(self.positional_embedding[...], int(round(n**0.5)))
        t = self.ln_pre(jnp.concatenate([cls, t], axis=1) + pos.astype(t.dtype)).astype(t.dtype)
        for block in self.blocks:
            t = block(t)
        return t

    def __call__(self, x):
        return self.ln_post(self.tokens(x)[:, 1:])

    def project(self, tokens):
        if self.proj is None:
            raise ValueError("CLIP VisionTransformer built without proj (output_dim=None)")
        return tokens @ self.proj[...].astype(tokens.dtype)

    def image_features(self, x):
        return self.project(self.ln_post(self.tokens(x)[:, 0]))


def preprocess(images):
    """Images in [-1, 1] (B, H, W, C) -> CLIP input: upstream's ``ScalingLayerForClip`` (to [0, 1] through
    the uint8 range with a clamp, then CLIP mean/std); one channel is repeated to three."""
    return clamped_normalise(images, MEAN, STD)


RENAMES = [
    (r"^conv1\.weight$", "conv1.proj.weight"),
    (r"^transformer\.resblocks\.", "blocks."),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def visual_state_dict(state_dict: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The visual tower of an OpenAI/open_clip CLIP state_dict (``visual.`` keys of a full model, or a
    bare visual tower; ``prefix`` first, e.g. TokenFlow's ``encoder_vqkd.``), in OpenAI names."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def params_from_torch(state_dict: dict, *, prefix: str = "", **kwargs) -> dict:
    """Pure params of ``VisionTransformer(**kwargs)`` from an OpenAI CLIP visual state_dict (``proj`` is
    dropped when ``output_dim`` is None, as ``load_clip_vision``)."""
    sd = visual_state_dict(state_dict, prefix)
    if not kwargs.get("output_dim"):
        sd.pop("proj", None)
    for key in ("class_embedding", "positional_embedding"):
        if key in sd:
            sd[key] = sd[key].reshape((1, -1, sd[key].shape[-1]))
    abstract = layers.abstract_module(lambda rngs: VisionTransformer(**kwargs, rngs=rngs))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(sd, expected, rename=regex_rename(RENAMES), what="CLIP visual state_dict")


def openai_from_hf(hf: dict) -> dict[str, np.ndarray]:
    """A ``transformers`` ``CLIPVisionModel(WithProjection)`` state_dict in OpenAI CLIP visual names
    (q/k/v fused into ``in_proj``; ``visual_projection.weight`` -> ``proj`` transposed)."""
    sd, hf = {}, {k.removeprefix("vision_model."): np.asarray(v) for k, v in hf.items()}
    sd["conv1.weight"] = hf["embeddings.patch_embedding.weight"]
    sd["class_embedding"] = hf["embeddings.class_embedding"]
    sd["positional_embedding"] = hf["embeddings.position_embedding.weight"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            sd[f"{ours}.{p}"] = hf[f"{theirs}.{p}"]
    if "visual_projection.weight" in hf:
        sd["proj"] = hf["visual_projection.weight"].T
    n = len({k.split(".")[2] for k in hf if k.startswith("encoder.layers.")})
    for i in range(n):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            sd[b + f"attn.in_proj_{p}"] = np.concatenate([hf[a + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            sd[b + f"attn.out_proj.{p}"] = hf[a + f"self_attn.out_proj.{p}"]
            sd[b + f"ln_1.{p}"], sd[b + f"ln_2.{p}"] = hf[a + f"layer_norm1.{p}"], hf[a + f"layer_norm2.{p}"]
            sd[b + f"mlp.c_fc.{p}"], sd[b + f"mlp.c_proj.{p}"] = hf[a + f"mlp.fc1.{p}"], hf[a + f"mlp.fc2.{p}"]
    return sd


def load_state_dict(path, config_field: str) -> dict:
    """A local OpenAI ``ViT-B-16.pt`` (TorchScript archive), open_clip ``.bin``/``.pth``, or Hugging Face
    ``model.safetensors`` (converted by :func:`openai_from_hf`) CLIP checkpoint."""
    path = require_file(path, what="CLIP ViT-B/16 weights", config_field=config_field, published=PUBLISHED)
    script = False
    if path.suffix != ".safetensors" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # OpenAI's .pt is a TorchScript archive (read, never run)
            script = any("/code/" in name for name in archive.namelist())
    if script:
        from trainers import torchfile

        sd = torchfile.torchscript_state_dict(path)
    else:
        sd = read_weights(path)
    if any(k.startswith("vision_model.") or k.startswith("embeddings.") for k in sd):
        sd = openai_from_hf({k: v for k, v in sd.items() if not k.startswith("text_")})
    return sd


def merge(params, **kwargs) -> VisionTransformer:
    abstract = layers.abstract_module(lambda rngs: VisionTransformer(**kwargs, rngs=rngs))
    return merge_module(abstract, params)
