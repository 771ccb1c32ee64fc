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
import ml_collections
import numpy as np
import optax
from flax import nnx

from models import layers
from models.pretrained import merge_module, regex_rename, torch_to_params
from tokenizers import losses, maskgit_vqgan, quantizers, vit
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
    """TiTok with Tail Token Drop.

    ``stage``: 1 -- ``decode`` returns the logits over the VQGAN codes (upstream
    ``finetune_decoder: False``); 2 -- ``decode`` returns images through the soft pixel path
    (``finetune_decoder: True``). ``vqgan`` (the MaskGIT VQGAN's config) adds ``pixel_quantize``
    and ``pixel_decoder`` (upstream has them in stage 2 only; here stage 1 may carry the frozen
    teacher's copies too, with ``teacher_encoder`` its encoder for the proxy codes, so a stage-1
    workdir is self-contained: its images decode through argmax + the VQGAN decoder, as
    upstream's stage-1 evaluation does).
    """

    def __init__(self, *, image_size: int, enc_patch_size: int, dec_patch_size: int, encoder_size, decoder_size,
                 num_latent_tokens: int, token_size: int, codebook_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = True, target_codebook_size: int = 1024, in_channels: int = 3, stage: int = 1,
                 vqgan: dict | None = None, teacher_encoder: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        if stage not in (1, 2):
            raise ValueError(f"One-D-Piece stage={stage}: 1 (proxy-code CE) or 2 (pixel decoder fine-tuning)")
        if stage == 2 and vqgan is None:
            raise ValueError("One-D-Piece stage 2 needs the MaskGIT VQGAN config (vqgan=...) for its pixel decoder")
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
        pixel_encoder = pixel_quantize = pixel_decoder = None
        if vqgan is not None:
            kw = maskgit_vqgan.vqgan_kwargs({**vqgan, "num_channels": in_channels})
            if kw["num_embeddings"] != target_codebook_size:
                raise ValueError(f"the VQGAN has {kw['num_embeddings']} codes but the decoder predicts "
                                 f"{target_codebook_size}")
            net = dict(hidden_channels=kw["hidden_channels"], channel_mult=kw["channel_mult"],
                       num_res_blocks=kw["num_res_blocks"], z_channels=kw["z_channels"], num_channels=in_channels,
                       rngs=rngs)
            if teacher_encoder:
                pixel_encoder = maskgit_vqgan.Encoder(**net)
            pixel_quantize = quantizers.VectorQuantizer(kw["num_embeddings"], kw["z_channels"], rngs=rngs)
            pixel_decoder = maskgit_vqgan.Decoder(**net)
        self.pixel_encoder = nnx.data(pixel_encoder)
        self.pixel_quantize = nnx.data(pixel_quantize)
        self.pixel_decoder = nnx.data(pixel_decoder)

    def encode(self, images):
        """images (B, H, W, C) in [0, 1] -> (z_q (B, N, token_size), info with ``indices`` (B, N))."""
        z = self.encoder(images, self.latent_tokens[...])
        return self.quantize(z)

    def decode(self, z_q, length=None, keep=None):
        """Tokens (B, n, token_size), n <= N -> logits (stage 1) or images (stage 2) from the first
        ``length`` tokens (an int: upstream's slice; an int array () / (B,): a mask), or from those
        ``keep`` (n,) / (B, n) marks."""
        logits = self._logits(z_q, length, keep)
        if self.stage == 1:
            return logits
        return self.pixel_decoder(self.soft_pixel_latents(logits))

    def _logits(self, z_q, length, keep):
        if length is not None:
            if isinstance(length, int):
                z_q = z_q[:, :length]
            else:
                keep = vit.prefix_mask(length, z_q.shape[1])
        return self.decoder(z_q, keep)

    def decode_pixels(self, z_q, length=None, keep=None):
        """Images (B, H, W, C), nominally [0, 1], not clamped: stage 2 the soft decode; stage 1
        argmax over the logits -> the VQGAN codebook -> its decoder (upstream's stage-1 evaluation)."""
        if self.pixel_decoder is None:
            raise ValueError("this One-D-Piece model has no pixel decoder (built without vqgan=...)")
        logits = self._logits(z_q, length, keep)
        if self.stage == 2:
            return self.pixel_decoder(self.soft_pixel_latents(logits))
        return self.pixel_decoder(self.pixel_quantize.lookup(jnp.argmax(logits, axis=-1)))

    def proxy_codes(self, images):
        """The frozen teacher's codes (B, g, g) of [0, 1] images (stage 1's CE targets)."""
        return self.pixel_quantize.nearest(self.pixel_encoder(images))

    def soft_pixel_latents(self, logits):
        """softmax over the VQGAN codes times its codebook (the stage-2 *soft* decode)."""
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhwk,kd->bhwd", probs, self.pixel_quantize.embedding[...],
                          precision=jax.lax.Precision.HIGHEST)

    def decode_tokens(self, indices, length=None):
        """Code indices (B, n) with n <= N -> decode of their (normalised) codebook entries."""
        return self.decode(self.quantize.lookup(indices), length=length)


def model_kwargs(config) -> dict:
    """OneDPiece constructor arguments from a run config (``config.model``, ``config.data``)."""
    m = config.model
    return dict(image_size=int(config.data.image_size), enc_patch_size=int(m.enc_patch_size),
                dec_patch_size=int(m.dec_patch_size),
                encoder_size=(int(m.encoder.width), int(m.encoder.depth), int(m.encoder.heads)),
                decoder_size=(int(m.decoder.width), int(m.decoder.depth), int(m.decoder.heads)),
                num_latent_tokens=int(m.num_latent_tokens), token_size=int(m.token_size),
                codebook_size=int(m.codebook_size), commitment_cost=float(m.commitment_cost),
                use_l2_norm=bool(m.use_l2_norm), target_codebook_size=int(m.vqgan.num_embeddings),
                in_channels=int(config.data.channels), stage=int(m.stage), vqgan=m.vqgan.to_dict(),
                teacher_encoder=int(m.stage) == 1)


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
    abstract = layers.abstract_module(lambda rngs: OneDPiece(**kwargs, rngs=rngs))
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    return torch_to_params(state_dict, expected, rename=regex_rename(TORCH_RENAMES), what="One-D-Piece checkpoint")


def import_one_d_piece(state_dict, config) -> dict:
    """A released tokenizer (HF ``pytorch_model.bin``/``model.safetensors``) or a training checkpoint's
    ``ema_model/pytorch_model.bin``. Released tokenizers are stage 2; a stage-1 checkpoint takes its
    frozen teacher (``pixel_*``) from ``config.model.vqgan_weights``."""
    kwargs = model_kwargs(config)
    has_pixels = any(k.startswith("pixel_") for k in state_dict)
    if not has_pixels:  # a stage-1 checkpoint: the frozen teacher comes from the VQGAN file
        vq = maskgit_vqgan.load_vqgan_torch(config.model.vqgan_weights, "config.model.vqgan_weights")
        state_dict = {**state_dict, **{"pixel_" + k: v for k, v in vq.items()
                                       if kwargs["teacher_encoder"] or not k.startswith("encoder.")}}
    elif kwargs["teacher_encoder"]:
        raise ValueError("a stage-2 checkpoint (it has pixel_* keys) needs config.model.stage=2")
    return params_from_torch(state_dict, kwargs)


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
    return merge_module(layers.abstract_module(lambda rngs: OneDPiece(**kwargs, rngs=rngs)), params)


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


# ----------------------------------------------------------------------------
# Training (config.model.name == "one_d_piece"): stage 1 and stage 2 in one method
# ----------------------------------------------------------------------------

# Upstream's weight-decay exclusions (utils/train_utils.py create_optimizer): 1-D parameters and any
# whose name contains one of these.
NO_DECAY_NAMES = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "scale")
# What each stage trains (the rest is frozen: no update, no weight decay).
FROZEN = {1: ("pixel_encoder", "pixel_quantize", "pixel_decoder"), 2: ("encoder", "quantize", "latent_tokens")}


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def decay_mask(params):
    """True where AdamW's weight decay applies: matrices/kernels whose path names none of NO_DECAY_NAMES."""
    def one(path, p):
        names = _path_names(path)
        return p.ndim > 1 and not any(word in name for name in names for word in NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(one, params)


def frozen_mask(params, stage: int):
    return {k: jax.tree.map(lambda _: k in FROZEN[stage], v) for k, v in params.items()}


def ema_decay(step, rate: float, warmup: bool):
    """diffusers EMAModel (upstream): min((1 + s) / (10 + s), rate) with warmup, else rate."""
    if not warmup:
        return jnp.asarray(rate, jnp.float32)
    s = step.astype(jnp.float32)
    return jnp.minimum((1.0 + s) / (10.0 + s), rate)


def _workdir_params(workdir, name: str) -> dict:
    from trainers import checkpoint, decode, sharding
    from trainers.method import get_method

    config = checkpoint.read_config(workdir)
    if config.model.name != name:
        raise ValueError(f"{workdir} holds a {config.model.name!r} run, expected {name!r}")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, params, _ = decode.restore_params(workdir, ModelDef(get_method(config)), mesh)
    return jax.tree.map(np.asarray, params), config


class OneDPieceMethod(Method):
    """One-D-Piece training, ``config.model.stage`` 1 or 2, with its own train state and step.

    Stage 1: CE between the decoder's logits (after Tail Token Drop) and the frozen MaskGIT
    VQGAN's proxy codes + ``quantizer_weight`` x VQ loss. Stage 2 (initialised from a stage-1
    workdir, ``config.model.init_from``): encoder, quantizer and latent tokens frozen; the ViT
    decoder and the VQGAN's codebook and decoder train on L2 + ``perceptual_weight`` x
    ConvNeXt-S logit MSE + ``discriminator_weight`` x hinge G-loss from ``discriminator_start``;
    the MaskGIT-style discriminator trains on hinge + ``lecam_weight`` x LeCAM.
    Images: the loop's [-1, 1] are mapped to upstream's [0, 1].
    """

    kind = "tokenizer"
    latent_type = "codes"

    def __init__(self, config):
        super().__init__(config)
        self.kwargs = model_kwargs(config)
        self.stage = int(config.model.stage)
        self._model_def = None
        self._convnext = None

    # -- config, network, tokenizer interface
    def validate_config(self, config) -> None:
        m = config.model
        size = int(config.data.image_size)
        for field in ("enc_patch_size", "dec_patch_size"):
            if size % int(m[field]):
                raise ValueError(f"config.data.image_size={size} is not divisible by config.model.{field}={m[field]}")
        for part in ("encoder", "decoder"):
            if int(m[part].width) % int(m[part].heads):
                raise ValueError(f"config.model.{part}.width={m[part].width} is not divisible by heads={m[part].heads}")
        maskgit_vqgan.validate_vqgan_config(m.vqgan, "config.model.vqgan")
        f = 2 ** (len(m.vqgan.channel_mult) - 1)
        if f != int(m.dec_patch_size):
            raise ValueError(f"config.model.dec_patch_size={m.dec_patch_size} must equal the VQGAN's downsampling "
                             f"factor {f} (the decoder predicts one VQGAN code per patch)")
        if not 1 <= int(m.tail_drop_max) <= int(m.num_latent_tokens):
            raise ValueError(f"config.model.tail_drop_max={m.tail_drop_max}: in [1, num_latent_tokens="
                             f"{m.num_latent_tokens}] (released checkpoints: N - 1, see the notes)")
        if self.stage == 1:
            if not m.vqgan_weights:
                raise ValueError("config.model.vqgan_weights is empty: stage 1 needs the MaskGIT VQGAN teacher "
                                 f"({maskgit_vqgan.CHECKPOINT_URL}, or a workdir of configs/maskgit_vqgan.py)")
        for field in ("vqgan_weights", "init_from"):
            if m[field] and not Path(m[field]).exists():
                raise ValueError(f"config.model.{field}={m[field]!r} does not exist")
        if self.stage == 2 and m.loss.perceptual_weight > 0:
            self.convnext_params()  # a missing ConvNeXt file fails here, before compilation
        if self.stage == 2 and int(size) % (2 ** int(m.loss.disc_stages)):
            raise ValueError(f"config.data.image_size={size} must be divisible by 2^config.model.loss.disc_stages")

    def create_model(self, rngs: nnx.Rngs) -> OneDPiece:
        return OneDPiece(**self.kwargs, rngs=rngs)

    @property
    def model_def(self) -> ModelDef:
        if self._model_def is None:
            self._model_def = ModelDef(self)
        return self._model_def

    def encode(self, model: OneDPiece, images, length: int | None = None):
        """images (B, H, W, C) in [-1, 1] -> codes (B, N) int32, or their first ``length`` (variable
        length: the tokens are ordered, the first k describe the whole image)."""
        _, info = model.encode((images + 1.0) / 2.0)
        codes = info["indices"]
        return codes if length is None else codes[:, :length]

    def decode(self, model: OneDPiece, codes):
        """codes (B, k), any k <= N -> images (B, H, W, C) in [-1, 1] (clamped, as upstream's scripts)."""
        z_q = model.quantize.lookup(codes)
        return jnp.clip(model.decode_pixels(z_q), 0.0, 1.0) * 2.0 - 1.0

    def reconstruct(self, model: OneDPiece, images, length=None):
        z_q, _ = model.encode((images + 1.0) / 2.0)
        return jnp.clip(model.decode_pixels(z_q, length=length), 0.0, 1.0) * 2.0 - 1.0

    def loss(self, model, batch, rng):
        raise TypeError("one_d_piece trains with its own train_step (init_train_state/train_step)")

    # -- frozen networks
    def convnext_params(self):
        if self._convnext is None:
            from models.pretrained import convnext

            self._convnext = convnext.load_params(self.config.model.loss.convnext_path)
        return self._convnext

    def pretrained(self) -> dict:
        """The loaded pretrained parts as numpy (cached; read eagerly even when called inside a trace):
        ``vqgan`` (teacher / pixel decoder init) and ``stage1`` (stage 2's initialisation)."""
        if not hasattr(self, "_pretrained"):
            m = self.config.model
            out = {}
            with jax.ensure_compile_time_eval():
                if m.vqgan_weights:
                    out["vqgan"] = jax.tree.map(np.asarray, maskgit_vqgan.load_vqgan_params(
                        m.vqgan_weights, maskgit_vqgan.vqgan_kwargs(
                            {**m.vqgan.to_dict(), "num_channels": self.kwargs["in_channels"]}),
                        "config.model.vqgan_weights"))
                if self.stage == 2 and m.init_from:
                    out["stage1"] = _workdir_params(m.init_from, "one_d_piece")[0]
            self._pretrained = out
        return self._pretrained

    def _initial_params(self, rng):
        """Fresh params with the pretrained parts loaded (VQGAN teacher, stage-1 weights)."""
        params, rest = self.model_def.init(rng)
        loaded = self.pretrained()
        if "vqgan" in loaded:
            vq = loaded["vqgan"]
            params["pixel_quantize"], params["pixel_decoder"] = vq["quantize"], vq["decoder"]
            if "pixel_encoder" in params:
                params["pixel_encoder"] = vq["encoder"]
        if "stage1" in loaded:
            keys = ("encoder", "decoder", "latent_tokens", "quantize") + (
                () if "vqgan" in loaded else ("pixel_quantize", "pixel_decoder"))
            for key in keys:
                if key in loaded["stage1"]:
                    params[key] = loaded["stage1"][key]
        return jax.tree.map(jnp.asarray, params), rest

    # -- the train state and step
    def _optimizers(self):
        from trainers.optim import make_schedule

        o, lc = self.config.optim, self.config.model.loss
        chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
        tx = optax.chain(*chain, optax.adamw(make_schedule(o, self.config.num_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                                             weight_decay=o.weight_decay, mask=decay_mask))
        d_o = ml_collections.ConfigDict(o.to_dict())
        d_o.lr, d_o.min_lr = float(lc.disc_lr), min(float(o.min_lr), float(lc.disc_lr))
        # Upstream's discriminator scheduler runs over the steps after discriminator_start.
        d_schedule = make_schedule(d_o, max(1, self.config.num_steps - int(lc.discriminator_start)))
        d_tx = optax.chain(*chain, optax.adamw(d_schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                               weight_decay=o.weight_decay, mask=decay_mask))
        return tx, d_tx, make_schedule(o, self.config.num_steps)

    def _discriminator(self, rngs):
        lc = self.config.model.loss
        return losses.MaskGITDiscriminator(self.kwargs["in_channels"], int(lc.disc_hidden), int(lc.disc_stages),
                                           rngs=rngs)

    def init_train_state(self, rng):
        """Keys: step, params, ema_params, opt_state, rest; stage 2 adds ``disc`` {params, opt_state},
        ``lecam`` {real, fake} (EMAs of the mean logits) and ``convnext`` (frozen, {} when unused)."""
        k_gen, k_disc = jax.random.split(rng)
        params, rest = self._initial_params(k_gen)
        params = jax.tree.map(jnp.asarray, params)
        tx, d_tx, _ = self._optimizers()
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": jax.tree.map(jnp.copy, params),
                 "opt_state": tx.init(params), "rest": rest}
        if self.stage == 2:
            disc = nnx.to_pure_dict(nnx.split(self._discriminator(nnx.Rngs(k_disc)), nnx.Param, ...)[1])
            zero = jnp.zeros((), jnp.float32)
            conv = self.convnext_params() if self.config.model.loss.perceptual_weight > 0 else {}
            state.update(disc={"params": disc, "opt_state": d_tx.init(disc)}, lecam={"real": zero, "fake": zero},
                         convnext=jax.tree.map(jnp.asarray, conv))
        return state

    def train_state_shardings(self, abstract_state, mesh):
        from trainers import sharding as sh
        from trainers.train import opt_state_shardings

        repl = sh.replicated(mesh)
        gen = self.model_def.param_shardings(mesh)
        opt = lambda abstract_opt, param_sh: opt_state_shardings(abstract_opt, param_sh, repl)  # noqa: E731

        out = {"step": repl, "params": gen, "ema_params": gen, "opt_state": opt(abstract_state["opt_state"], gen),
               "rest": self.model_def.rest_shardings(mesh)}
        if self.stage == 2:
            disc = nnx.to_pure_dict(sh.state_shardings(nnx.split(layers.abstract_module(
                self._discriminator), nnx.Param, ...)[1], mesh))
            out.update(disc={"params": disc, "opt_state": opt(abstract_state["disc"]["opt_state"], disc)},
                       lecam={"real": repl, "fake": repl}, convnext=jax.tree.map(lambda _: repl,
                                                                                   abstract_state["convnext"]))
        return out

    def _tail_keep(self, rng):
        """Tail Token Drop: one k ~ U{1..tail_drop_max} for the whole batch (upstream torch.randint(1, N + 1))."""
        m = self.config.model
        n = int(m.num_latent_tokens)
        if not m.tail_token_drop:
            return None, jnp.asarray(n, jnp.int32)
        k = vit.sample_prefix_length(rng, n, high=int(m.tail_drop_max))
        return vit.prefix_mask(k, n), k

    def train_step(self, state, batch, rng):
        m, lc = self.config.model, self.config.model.loss
        tx, d_tx, schedule = self._optimizers()
        x = (batch["image"] + 1.0) / 2.0
        step = state["step"]
        keep, k = self._tail_keep(rng)
        frozen = frozen_mask(state["params"], self.stage)
        metrics = {"kept_tokens": k.astype(jnp.float32), "lr": schedule(step)}

        if self.stage == 1:
            def objective(params):
                model = self.model_def.merge(params, state["rest"])
                proxy = jax.lax.stop_gradient(model.proxy_codes(x)).reshape(x.shape[0], -1)
                z_q, info = model.encode(x)
                logits = model.decoder(z_q, keep)
                logits = logits.reshape(x.shape[0], -1, logits.shape[-1]).astype(jnp.float32)
                ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, proxy))
                loss = ce + float(lc.quantizer_weight) * info["quantizer_loss"]
                usage = quantizers.code_usage(info["indices"], model.quantize.codebook_size)
                return loss, {"reconstruction_loss": ce, "quantizer_loss": info["quantizer_loss"],
                              "commitment_loss": info["commitment_loss"], "codebook_loss": info["codebook_loss"],
                              "code_usage": usage["usage"], "code_perplexity": usage["perplexity"],
                              "proxy_accuracy": jnp.mean(jnp.argmax(logits, -1) == proxy)}
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
            new = {}
        else:
            from models.pretrained import convnext

            disc_abstract = layers.abstract_module(self._discriminator)
            gan_on = step >= int(lc.discriminator_start)
            factor = jnp.where(gan_on, float(lc.discriminator_factor), 0.0)

            def objective(params):
                model = self.model_def.merge(params, state["rest"])
                z_q, info = model.encode(x)  # frozen: no gradient reaches it (upstream no_grad)
                z_q = jax.lax.stop_gradient(z_q)
                recon = model.decode(z_q, keep=keep)
                rec = jnp.mean(jnp.square(x - recon)) * float(lc.reconstruction_weight)
                loss = rec
                out = {"reconstruction_loss": rec}
                if lc.perceptual_weight > 0:
                    p = convnext.perceptual_logits_loss(convnext.merge(state["convnext"]), recon, x)
                    loss = loss + float(lc.perceptual_weight) * p
                    out["perceptual_loss"] = p
                disc = losses.merge_module(disc_abstract, state["disc"]["params"])
                g = -jnp.mean(disc(recon))
                loss = loss + float(lc.discriminator_weight) * factor * g
                out.update(gan_loss=g, discriminator_factor=factor)
                return loss, (out, recon)

            (loss, (aux, recon)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
            recon = jax.lax.stop_gradient(recon)
            lecam = state["lecam"]

            def d_objective(dparams):
                disc = losses.merge_module(disc_abstract, dparams)
                real, fake = disc(x), disc(recon)
                d = losses.hinge_d_loss(real, fake)
                reg = losses.lecam_regularization(jnp.mean(real), jnp.mean(fake), lecam["real"], lecam["fake"])
                return float(lc.discriminator_factor) * d + float(lc.lecam_weight) * reg, (d, reg, real, fake)

            (d_total, (d_loss, reg, real, fake)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
                state["disc"]["params"])
            d_updates, d_opt = d_tx.update(d_grads, state["disc"]["opt_state"], state["disc"]["params"])
            d_params = optax.apply_updates(state["disc"]["params"], d_updates)
            decay = float(lc.lecam_decay)
            new_lecam = {"real": decay * lecam["real"] + (1 - decay) * jnp.mean(real),
                         "fake": decay * lecam["fake"] + (1 - decay) * jnp.mean(fake)}
            # The discriminator trains only from discriminator_start (upstream skips its step before).
            keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(gan_on, a, b), new, old)  # noqa: E731
            new = {"disc": keep_old({"params": d_params, "opt_state": d_opt}, state["disc"]),
                   "lecam": keep_old(new_lecam, lecam)}
            aux.update(d_loss=d_loss, d_total=d_total, lecam_loss=reg, logits_real=jnp.mean(real),
                       logits_fake=jnp.mean(fake))

        params, opt_state, grads = losses.masked_update(tx, grads, state["opt_state"], state["params"], frozen)
        rate = ema_decay(step, float(self.config.ema_rate), bool(m.ema_warmup))
        ema = losses.ema_update(state["ema_params"], params, rate)
        metrics.update(aux, loss=loss, grad_norm=optax.global_norm(grads), ema_decay=rate)
        return {**state, **new, "step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state}, metrics

