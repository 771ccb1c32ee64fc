"""One-D-Piece: the TiTok 1D tokenizer with Tail Token Drop (variable-length discrete tokens).

Paper: "One-D-Piece: Image Tokenizer Meets Quality-Controllable Compression"
(arXiv 2501.10064); code turingmotors/One-D-Piece (``modeling/one_d_piece.py`` on an
early bytedance/1d-tokenizer: ``modeling/titok.py``, ``modeling/modules/blocks.py``,
``modeling/quantizer/quantizer.py``, ``modeling/modules/losses.py``).

* Encoder (``TiTokEncoder``): patch embedding, ``[class, patches] + pos``, then N latent
  tokens (+ their pos) appended; ``ln_pre``, pre-LN blocks, ``ln_post`` on the latent tokens,
  and upstream's *legacy* width reduction: the (B, N, W) tokens are reshaped row-major to
  (B, W, N) -- no transpose -- before the 1x1 ``conv_out`` to ``token_size``. This mixes tokens
  and channels; the released weights depend on it, so it is reproduced literally.
* VQ: 4096 x 12, l2-normalised codes, commitment 0.25, straight-through (tokenizers/quantizers.py).
* Decoder (``TiTokDecoder``): ``[class, g*g mask tokens] + pos``, then the first k latent tokens
  (``decoder_embed`` + pos[:k]); output positions 1..g*g -> ``ln_post`` -> ``ffn`` (1x1 W->2W, tanh,
  2W->1024): logits over the MaskGIT-VQGAN codes. Stage 2 adds the *soft* pixel path: softmax
  over the 1024 codes times ``pixel_quantize`` codebook -> ``pixel_decoder`` (MaskGIT VQGAN).
* Tail Token Drop: while training, one k ~ U{1..N} per step for the whole batch; the decoder
  sees only the first k tokens (after quantization, both stages). Shapes stay static under
  jit: dropped tokens stay in the sequence but no query attends to them, which equals
  removing them (tokenizers/vit.py ``key_mask``).

Layouts: images NHWC in [0, 1] inside the networks (MaskGIT's convention; the method converts
the loop's [-1, 1]); tokens (B, N, token_size); logits (B, g, g, 1024).

Order: the networks, the tokenizer, checkpoint conversion and the golden fixture, the
two-stage training method (stage 1: CE on proxy codes; stage 2: L2 + ConvNeXt-logit
perceptual + MaskGIT-style hinge GAN with LeCAM).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from models.pretrained import regex_rename, torch_to_params
from tokenizers import maskgit_vqgan, quantizers, vit
from trainers.method import Method, ModelDef

# Upstream's literal size tables (TiTokEncoder/TiTokDecoder): width, depth, heads.
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


# ----------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------


class TiTokEncoder(nnx.Module):
    """(B, H, W, C) in [0, 1], latent tokens (N, W) -> (B, N, token_size) (or (B, N, W) before the
    width reduction)."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 num_latent_tokens: int, token_size: int, in_channels: int = 3, rngs: nnx.Rngs, dtype=jnp.float32):
        self.grid = image_size // patch_size
        self.width, self.num_latent_tokens, self.token_size = width, num_latent_tokens, token_size
        scale = width ** -0.5
        self.patch_embed = vit.PatchEmbed(in_channels, width, patch_size, rngs=rngs, dtype=dtype)
        self.class_embedding = vit.learned_embedding(rngs, (1, width), scale)
        self.positional_embedding = vit.learned_embedding(rngs, (self.grid ** 2 + 1, width), scale)
        self.latent_token_positional_embedding = vit.learned_embedding(rngs, (num_latent_tokens, width), scale)
        self.ln_pre = vit.layer_norm(width, rngs=rngs)
        self.transformer = nnx.List([vit.ResidualAttentionBlock(width, heads, rngs=rngs, dtype=dtype)
                                     for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)
        self.conv_out = layers.dense(width, token_size, ("embed", None), rngs=rngs)  # 1x1 conv

    def __call__(self, images, latent_tokens, *, needs_width_reduction: bool = True):
        b = images.shape[0]
        x = self.patch_embed(images)
        x = jnp.concatenate([jnp.broadcast_to(self.class_embedding[...], (b, 1, self.width)), x], axis=1)
        x = x + self.positional_embedding[...]
        latents = jnp.broadcast_to(latent_tokens + self.latent_token_positional_embedding[...],
                                   (b, self.num_latent_tokens, self.width))
        x = self.ln_pre(jnp.concatenate([x, latents], axis=1))
        for block in self.transformer:
            x = block(x)
        latents = self.ln_post(x[:, 1 + self.grid ** 2:])
        if not needs_width_reduction:
            return latents
        # Legacy reshape (B, N, W) -> (B, W, N) WITHOUT a transpose, then the 1x1 conv over W.
        scrambled = latents.reshape(b, self.width, self.num_latent_tokens)
        return jnp.einsum("bwn,wc->bnc", scrambled, self.conv_out.kernel[...]) + self.conv_out.bias[...]


class TiTokDecoder(nnx.Module):
    """(B, N, token_size) tokens and an optional keep mask over them -> (B, g, g, target_codebook_size)."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 num_latent_tokens: int, token_size: int, target_codebook_size: int = 1024, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.grid = image_size // patch_size
        self.width, self.num_latent_tokens = width, num_latent_tokens
        scale = width ** -0.5
        self.decoder_embed = layers.dense(token_size, width, (None, "embed"), rngs=rngs)
        self.class_embedding = vit.learned_embedding(rngs, (1, width), scale)
        self.positional_embedding = vit.learned_embedding(rngs, (self.grid ** 2 + 1, width), scale)
        self.mask_token = vit.learned_embedding(rngs, (1, 1, width), scale, names=(None, None, "embed"))
        self.latent_token_positional_embedding = vit.learned_embedding(rngs, (num_latent_tokens, width), scale)
        self.ln_pre = vit.layer_norm(width, rngs=rngs)
        self.transformer = nnx.List([vit.ResidualAttentionBlock(width, heads, rngs=rngs, dtype=dtype)
                                     for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)
        self.ffn_in = layers.dense(width, 2 * width, ("embed", "mlp"), rngs=rngs)  # upstream ffn.0 (1x1 conv)
        self.ffn_out = layers.dense(2 * width, target_codebook_size, ("mlp", "vocab"), rngs=rngs)  # ffn.2

    def __call__(self, tokens, keep=None):
        """``keep``: None (all N tokens) or bool (N,) / (B, N); dropped tokens are never attended to."""
        b, n, _ = tokens.shape
        if n > self.num_latent_tokens:
            raise ValueError(f"decoder got {n} tokens; it has {self.num_latent_tokens} positions")
        x = self.decoder_embed(tokens) + self.latent_token_positional_embedding[...][:n]
        queries = jnp.broadcast_to(self.mask_token[...], (b, self.grid ** 2, self.width))
        queries = jnp.concatenate([jnp.broadcast_to(self.class_embedding[...], (b, 1, self.width)), queries], axis=1)
        x = self.ln_pre(jnp.concatenate([queries + self.positional_embedding[...], x], axis=1))
        mask = None
        if keep is not None:
            keep = jnp.asarray(keep, bool)
            lead = jnp.ones(keep.shape[:-1] + (1 + self.grid ** 2,), bool)
            mask = vit.key_mask(jnp.concatenate([lead, keep], axis=-1))
        for block in self.transformer:
            x = block(x, mask=mask)
        x = self.ln_post(x[:, 1:1 + self.grid ** 2])
        logits = self.ffn_out(jnp.tanh(self.ffn_in(x)))
        return logits.reshape(b, self.grid, self.grid, -1)


# ----------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------


class OneDPiece(nnx.Module):
    """TiTok with Tail Token Drop. ``stage == 2`` (upstream ``finetune_decoder``) adds the MaskGIT
    pixel codebook and decoder; ``decode`` then returns images (B, H, W, C) (nominally [0, 1],
    not clamped) instead of logits."""

    def __init__(self, *, image_size: int, enc_patch_size: int, dec_patch_size: int, encoder_size, decoder_size,
                 num_latent_tokens: int, token_size: int, codebook_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = True, target_codebook_size: int = 1024, in_channels: int = 3, stage: int = 1,
                 vqgan: dict | None = None, rngs: nnx.Rngs, dtype=jnp.float32):
        ew, ed, eh = encoder_size
        dw, dd, dh = decoder_size
        self.num_latent_tokens, self.token_size, self.stage = num_latent_tokens, token_size, stage
        self.encoder = TiTokEncoder(image_size=image_size, patch_size=enc_patch_size, width=ew, depth=ed, heads=eh,
                                    num_latent_tokens=num_latent_tokens, token_size=token_size,
                                    in_channels=in_channels, rngs=rngs, dtype=dtype)
        self.decoder = TiTokDecoder(image_size=image_size, patch_size=dec_patch_size, width=dw, depth=dd, heads=dh,
                                    num_latent_tokens=num_latent_tokens, token_size=token_size,
                                    target_codebook_size=target_codebook_size, rngs=rngs, dtype=dtype)
        self.latent_tokens = vit.learned_embedding(rngs, (num_latent_tokens, ew), ew ** -0.5)
        self.quantize = quantizers.VectorQuantizer(codebook_size, token_size, commitment_cost=commitment_cost,
                                                   use_l2_norm=use_l2_norm, rngs=rngs)
        if stage == 2:
            v = {**(vqgan or {}), "num_channels": in_channels}
            kw = maskgit_vqgan.vqgan_kwargs(v)
            if kw["num_embeddings"] != target_codebook_size:
                raise ValueError(f"stage 2: the VQGAN has {kw['num_embeddings']} codes but the decoder predicts "
                                 f"{target_codebook_size}")
            self.pixel_quantize = quantizers.VectorQuantizer(kw["num_embeddings"], kw["z_channels"], rngs=rngs)
            self.pixel_decoder = maskgit_vqgan.Decoder(
                hidden_channels=kw["hidden_channels"], channel_mult=kw["channel_mult"],
                num_res_blocks=kw["num_res_blocks"], z_channels=kw["z_channels"], num_channels=in_channels, rngs=rngs)

    def encode(self, images):
        """images (B, H, W, C) in [0, 1] -> (z_q (B, N, token_size), info with ``indices`` (B, N))."""
        z = self.encoder(images, self.latent_tokens[...])
        return self.quantize(z)

    def decode(self, z_q, length=None, keep=None):
        """Tokens (B, N, token_size) -> logits (stage 1) or images (stage 2) from the first ``length``
        tokens (an int, or an int array () / (B,)), or from those ``keep`` (N,) / (B, N) marks."""
        if length is not None:
            if isinstance(length, int):
                z_q = z_q[:, :length]  # a static length: upstream's slice
            else:
                keep = vit.prefix_mask(length, z_q.shape[1])
        logits = self.decoder(z_q, keep)
        if self.stage == 1:
            return logits
        return self.pixel_decoder(self.soft_pixel_latents(logits))

    def soft_pixel_latents(self, logits):
        """softmax over the VQGAN codes times its codebook (the stage-2 *soft* decode)."""
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhwk,kd->bhwd", probs, self.pixel_quantize.embedding[...],
                          precision=jax.lax.Precision.HIGHEST)

    def decode_tokens(self, indices, length=None):
        """Code indices (B, n) with n <= N -> decode of their (normalised) codebook entries."""
        return self.decode(self.quantize.lookup(indices), length=length)


def model_kwargs(m, channels: int) -> dict:
    """OneDPiece constructor arguments from ``config.model``."""
    return dict(image_size=int(m.image_size), enc_patch_size=int(m.enc_patch_size), dec_patch_size=int(m.dec_patch_size),
                encoder_size=(int(m.encoder.width), int(m.encoder.depth), int(m.encoder.heads)),
                decoder_size=(int(m.decoder.width), int(m.decoder.depth), int(m.decoder.heads)),
                num_latent_tokens=int(m.num_latent_tokens), token_size=int(m.token_size),
                codebook_size=int(m.codebook_size), commitment_cost=float(m.commitment_cost),
                use_l2_norm=bool(m.use_l2_norm), target_codebook_size=int(m.vqgan.num_embeddings),
                in_channels=int(channels), stage=int(m.stage), vqgan=dict(m.vqgan))


# ----------------------------------------------------------------------------
# Checkpoint conversion (released One-D-Piece / TiTok checkpoints) and the golden fixture
# ----------------------------------------------------------------------------

TORCH_RENAMES = [
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^encoder\.patch_embed\.", "encoder.patch_embed.proj."),
    (r"^decoder\.ffn\.0\.", "decoder.ffn_in."),
    (r"^decoder\.ffn\.2\.", "decoder.ffn_out."),
]

RELEASED = {
    "s": "https://huggingface.co/turing-motors/One-D-Piece-S-256",
    "b": "https://huggingface.co/turing-motors/One-D-Piece-B-256",
    "l": "https://huggingface.co/turing-motors/One-D-Piece-L-256",
}


def params_from_torch(state_dict, kwargs) -> dict:
    """Pure params of :class:`OneDPiece` from upstream's state_dict (``encoder.*``, ``decoder.*``,
    ``latent_tokens``, ``quantize.embedding.weight``, and in stage 2 ``pixel_quantize.*`` and
    ``pixel_decoder.*``); EMA/training-only keys of a training checkpoint are refused by name."""
    abstract = nnx.eval_shape(lambda: OneDPiece(**kwargs, rngs=nnx.Rngs(0)))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(state_dict, expected, rename=regex_rename(TORCH_RENAMES), what="One-D-Piece checkpoint")


def import_one_d_piece(state_dict, config) -> dict:
    """A released tokenizer (HF ``pytorch_model.bin``/``model.safetensors``) or a training checkpoint's
    ``ema_model/pytorch_model.bin``; the config's ``model.stage`` must match (released: stage 2)."""
    return params_from_torch(state_dict, model_kwargs(config.model, config.data.channels))


def load_state_dict(path):
    """torch ``.bin``/``.pt`` or ``.safetensors`` -> numpy state_dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (released One-D-Piece tokenizers: "
                                f"{', '.join(RELEASED.values())}; MaskGIT-VQGAN: {maskgit_vqgan.CHECKPOINT_URL})")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    from trainers import torchfile

    return torchfile.load_state_dict(path)


IMPORTERS = {"one_d_piece": import_one_d_piece}


def _merge(kwargs, params) -> OneDPiece:
    abstract = nnx.eval_shape(lambda: OneDPiece(**kwargs, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    state = jax.tree.map(lambda v: v, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def fixture_kwargs(meta) -> dict:
    c = meta["constructor"]
    vq = c["config"]["model"]["vq_model"]
    tables = c["size_tables"]
    size = lambda t: (int(t["width"]), int(t["num_layers"]), int(t["num_heads"]))  # noqa: E731
    return dict(image_size=int(c["config"]["dataset"]["preprocessing"]["crop_size"]),
                enc_patch_size=int(vq["vit_enc_patch_size"]), dec_patch_size=int(vq["vit_dec_patch_size"]),
                encoder_size=size(tables["encoder"]), decoder_size=size(tables["decoder"]),
                num_latent_tokens=int(vq["num_latent_tokens"]), token_size=int(vq["token_size"]),
                codebook_size=int(vq["codebook_size"]), commitment_cost=float(vq["commitment_cost"]),
                use_l2_norm=bool(vq["use_l2_norm"]), stage=2 if vq.get("finetune_decoder") else 1)


def fixture_check(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    kwargs = fixture_kwargs(meta)
    if kwargs["stage"] != 1:
        raise ValueError("one_d_piece fixture: only finetune_decoder=False (stage 1) fixtures are defined")
    model = _merge(kwargs, params_from_torch(params, kwargs))
    x = jnp.asarray(inputs["pixel_values"]).transpose(0, 2, 3, 1)
    k = int(inputs["length"])
    tok = lambda a: np.asarray(a).transpose(0, 2, 1)[:, :, None, :]  # (B, N, C) -> (B, C, 1, N)  # noqa: E731
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    pre = jax.jit(lambda x: model.encoder(x, model.latent_tokens[...], needs_width_reduction=False))(x)
    z = jax.jit(lambda x: model.encoder(x, model.latent_tokens[...]))(x)
    z_q, info = model.quantize(z)
    decode = jax.jit(model.decode, static_argnums=1)
    indices = info["indices"]
    return {"encoder_latents_prereduction": np.asarray(pre), "encoder_latents": tok(z), "z_quantized": tok(z_q),
            "indices": np.asarray(indices)[:, None, :], "quantizer_loss": np.asarray(info["quantizer_loss"]),
            "commitment_loss": np.asarray(info["commitment_loss"]), "codebook_loss": np.asarray(info["codebook_loss"]),
            "logits_full": nchw(decode(z_q, None)), "logits_len_k": nchw(decode(z_q, k)),
            "logits_tokens_full": nchw(jax.jit(model.decode_tokens)(indices)),
            "logits_tokens_len_k": nchw(jax.jit(lambda i: model.decode_tokens(i, k))(indices))}


FIXTURE_CHECKS = {"one_d_piece": fixture_check}
