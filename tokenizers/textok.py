"""TexTok (Zha et al., "Language-Guided Image Tokenization for Generation", CVPR 2025): a 1D tokenizer
whose tokenizer and detokenizer both read the image's caption, and a DiT on its tokens.

No official code exists; the dataflow follows the paper (``shared/methods/textok_paper.md`` s.2):

    P = Linear(patchify_p(I)) (hw, D);  L (N, D) learned image tokens;  T_e = T W_te (N_t, D)
    [., Z^, .] = E([P; L; T_e]) ;  Z = Z^ W_z (N, d)                 # keep the N image-token outputs
    M (hw, D) learned patch tokens;  Z_d = Z W_zd;  T_d = T W_td     # separate text projections
    [Y^, ., .] = D([M; Z_d; T_d]) ;  I^ = unpatchify(Y^ W_pix)       # keep the hw patch outputs

T = E_T5(caption) (N_t, D_t) is the frozen T5 encoder's output (models/pretrained/t5.py), computed
once per caption and cached with the data (trainers/captions.py); padded text positions are masked
out of every attention. The text-free baseline is the same network with ``text_inject = "none"``
(the paper's comparison is one flag; ``"encoder"``/``"decoder"`` are its injection ablations).

Implementation choices (the paper does not say; each is a config field, ``config.model``):

* ``latent``: ``"kl"`` (default; MAETok's table lists TexTok's latent as KL): the head predicts
  2d channels (mean, log-variance), Z is a posterior sample, ``loss.kl_weight`` 1e-6; or ``"ae"``.
  ``logvar_init``: the log-variance bias at init (0 = unit posterior noise, as LDM's KL-VAEs
  start; short demo runs start it low so the tokens carry the image from the first steps).
* ``pos_embed``: learned absolute embedding over the whole concatenated sequence (hw + N + N_t),
  one per encoder and decoder, init ``width**-0.5 * N(0, 1)`` (TiTok); ViT blocks as TiTok's
  (tokenizers/vit.py, pre-LN), ``ln_pre`` after the embedding and ``ln_post`` before the heads.
* ``patch_size`` 8 at 256 px / 16 at 512 px (1024 patch tokens), ``text_length`` N_t 128.
* Loss (``config.model.loss``): L2 + ``perceptual_weight`` LPIPS + ``gan_weight`` x generator loss
  of a StyleGAN discriminator (tokenizers/losses.py) with LeCAM (``lecam_weight``), MAGVIT-v2
  defaults: 0.1 / 0.1 / 1e-3, discriminator from ``disc_start``, no adaptive weight.

The plateau (why the demo's ``quick`` recipe is what it is; probes on ``demo,quick,t8``, batch 32): the
ViT pair first learns the mean image (MSE ~0.21 on the digits) and sits there. Its encoder's tokens
hardly vary between images (their std over a batch 0.04-0.2, against 2-3 over all entries) and its
decoder ignores them (each image decoded from another image's tokens: the same MSE); a captioned run
reads its caption first (under another image's caption the MSE rises by 0.02-0.08) and its tokens
later. No bug: overfitting one batch of 64, the decoder starts to read its tokens after 100-150 steps
at lr 1e-3 or 3e-3 and patch 8 or 4 alike (MSE 0.21/0.17/0.19 at step 150, 0.23-0.27 from another
image's tokens); on the stream a zero-initialised pixel head or width 128 do not shorten the plateau;
a constant lr 3e-3 leaves it after ~250 steps (MSE 0.097 at step 300 on a held batch; 0.056 at 600,
``evaluate``), while the earlier 1e-3 decayed by a cosine to 1e-4 over 400 steps never did (MSE
0.227, text or not, at 8, 16 and 32 tokens). One probe more (not adopted): position tables, learned
tokens and patch queries at unit std instead of ``width**-0.5`` leave the plateau ~80 steps sooner
(MSE 0.144 / 0.066 at steps 200 / 300, against 0.198 / 0.097). ``evaluate`` reports both reads (``mse_other_tokens``, ``mse_other_caption``) and the
mean image's MSE (``mse_mean_image``) beside the reconstruction error.

Captions in the batch (trainers/captions.py): ``caption_emb`` (B, K, N_t, D_t), ``caption_mask``
(B, K, N_t), ``caption_valid`` (B, K); every step draws one valid caption per image with its rng.

The generator (:class:`TexTokDiT`): DiT with patch size 1 on the N x d tokens (one DiT token per 1D
token, fixed 1-D sin-cos positions), class-conditional, with DiT's Gaussian diffusion or SiT's flow
(``config.model.objective``, models/dit.py); trained on cached tokens ((1, N, d) per image, as
``trainers/latents.py`` reads them). Class-conditional decoding follows the paper's protocol: the
detokenizer reads a caption drawn (seeded) from a per-class pool (``decode(..., labels=...)``).

Order: the network, the tokenizer method (objective, GAN step), the token cache, the generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from models.pretrained import merge_module
from models import dit as dit_lib
from tokenizers import losses, vit
from tokenizers.kl_vae import gaussian_parameters, posterior_kl, posterior_sample
from trainers.method import Method, ModelDef

TEXT_INJECT = ("both", "encoder", "decoder", "none")
LATENTS = ("kl", "ae")
DISCRIMINATORS = ("stylegan", "patchgan")

# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------


class TexTokViT(nnx.Module):
    """The ViT shared by both halves: learned positions over [tokens; text], ln_pre, blocks, ln_post.

    ``__call__(x (B, L0, D), text (B, N_t, D) or None, text_mask (B, N_t) or None) -> (B, L0, D)``:
    the text tokens join the sequence (masked where padded) and their outputs are dropped.
    """

    def __init__(self, *, width, depth, num_heads, mlp_ratio, length, text_length, rngs, dtype):
        self.length, self.text_length = length, text_length
        scale = width ** -0.5
        self.pos_embed = vit.learned_embedding(rngs, (length + text_length, width), scale)
        self.ln_pre = vit.layer_norm(width, rngs=rngs)
        self.blocks = nnx.List([vit.ResidualAttentionBlock(width, num_heads, mlp_ratio=mlp_ratio, rngs=rngs,
                                                           dtype=dtype) for _ in range(depth)])
        self.ln_post = vit.layer_norm(width, rngs=rngs)

    def __call__(self, x, text=None, text_mask=None):
        from trainers.sharding import constrain

        b, n0, _ = x.shape
        mask = None
        if text is not None:
            x = jnp.concatenate([x, text.astype(x.dtype)], axis=1)
            text_mask = jnp.broadcast_to(text_mask.astype(bool), text.shape[:2])
            keep = jnp.concatenate([jnp.ones((b, n0), bool), text_mask], axis=1)
            mask = vit.key_mask(keep)  # no query attends to padded text
        x = x + self.pos_embed[...][: x.shape[1]].astype(x.dtype)
        x = constrain(self.ln_pre(x).astype(x.dtype), ("act_batch", "act_len", "act_embed"))
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.ln_post(x[:, :n0]).astype(x.dtype)


class TexTokEncoder(nnx.Module):
    """E: images (B, H, W, C) [+ text (B, N_t, D_t), mask] -> (B, N, 2d) moments ("kl") or (B, N, d) ("ae")."""

    def __init__(self, *, image_size, patch_size, in_channels, width, depth, num_heads, mlp_ratio, num_tokens,
                 token_channels, latent, text_dim, text_length, rngs, dtype, logvar_init=0.0):
        grid = image_size // patch_size
        self.num_patches, self.num_tokens = grid * grid, num_tokens
        self.patch_embed = vit.PatchEmbed(in_channels, width, patch_size, rngs=rngs, dtype=dtype)
        self.latent_tokens = vit.learned_embedding(rngs, (num_tokens, width), width ** -0.5)  # L
        self.text_proj = layers.dense(text_dim, width, (None, "embed"), rngs=rngs, dtype=dtype) if text_dim else None
        self.vit = TexTokViT(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             length=self.num_patches + num_tokens, text_length=text_length if text_dim else 0,
                             rngs=rngs, dtype=dtype)
        # W_z. "kl": channels [mean (d); log-variance (d)]; the log-variance bias starts at logvar_init.
        bias = (lambda key, shape, dtype=jnp.float32: jnp.concatenate(
            [jnp.zeros((token_channels,), dtype), jnp.full((token_channels,), logvar_init, dtype)])) \
            if latent == "kl" else layers.zeros
        self.head = layers.dense(width, token_channels * (2 if latent == "kl" else 1), ("embed", None),
                                 bias_init=bias, rngs=rngs, dtype=dtype)

    def __call__(self, images, text=None, text_mask=None):
        p = self.patch_embed(images)
        latent = jnp.broadcast_to(self.latent_tokens[...].astype(p.dtype), (p.shape[0], *self.latent_tokens.shape))
        t = self.text_proj(text) if self.text_proj is not None else None
        h = self.vit(jnp.concatenate([p, latent], axis=1), t, text_mask)
        return self.head(h[:, self.num_patches:]).astype(jnp.float32)


class TexTokDecoder(nnx.Module):
    """D: tokens (B, N, d) [+ text (B, N_t, D_t), mask] -> images (B, H, W, C)."""

    def __init__(self, *, image_size, patch_size, out_channels, width, depth, num_heads, mlp_ratio, num_tokens,
                 token_channels, text_dim, text_length, rngs, dtype):
        grid = image_size // patch_size
        self.num_patches, self.patch_size, self.out_channels = grid * grid, patch_size, out_channels
        self.patch_tokens = vit.learned_embedding(rngs, (self.num_patches, width), width ** -0.5)  # M
        self.token_proj = layers.dense(token_channels, width, (None, "embed"), rngs=rngs, dtype=dtype)  # W_zd
        self.text_proj = layers.dense(text_dim, width, (None, "embed"), rngs=rngs, dtype=dtype) if text_dim else None
        self.vit = TexTokViT(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             length=self.num_patches + num_tokens, text_length=text_length if text_dim else 0,
                             rngs=rngs, dtype=dtype)
        self.head = layers.dense(width, patch_size * patch_size * out_channels, ("embed", None), rngs=rngs,
                                 dtype=dtype)  # W_pix

    def __call__(self, z, text=None, text_mask=None):
        zd = self.token_proj(z.astype(self.token_proj.dtype))
        m = jnp.broadcast_to(self.patch_tokens[...].astype(zd.dtype), (z.shape[0], *self.patch_tokens.shape))
        t = self.text_proj(text) if self.text_proj is not None else None
        h = self.vit(jnp.concatenate([m, zd], axis=1), t, text_mask)
        pixels = self.head(h[:, : self.num_patches])
        return layers.unpatchify(pixels, self.patch_size, self.out_channels).astype(jnp.float32)


class TexTok(nnx.Module):
    """Tokenizer + detokenizer. ``text_inject`` says which half reads the caption ("none" = baseline)."""

    def __init__(self, *, image_size, patch_size, channels, width, depth, num_heads, mlp_ratio=4.0,
                 decoder_width=None, decoder_depth=None, decoder_num_heads=None, num_tokens, token_channels=8,
                 latent="kl", logvar_init=0.0, text_inject="both", text_dim=0, text_length=0, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        if text_inject not in TEXT_INJECT:
            raise ValueError(f"text_inject={text_inject!r}: one of {TEXT_INJECT}")
        self.latent, self.text_inject, self.token_channels = latent, text_inject, token_channels
        enc_text = text_dim if text_inject in ("both", "encoder") else 0
        dec_text = text_dim if text_inject in ("both", "decoder") else 0
        self.encoder = TexTokEncoder(image_size=image_size, patch_size=patch_size, in_channels=channels, width=width,
                                     depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_tokens=num_tokens,
                                     token_channels=token_channels, latent=latent, text_dim=enc_text,
                                     text_length=text_length, rngs=rngs, dtype=dtype, logvar_init=logvar_init)
        self.decoder = TexTokDecoder(image_size=image_size, patch_size=patch_size, out_channels=channels,
                                     width=decoder_width or width, depth=decoder_depth or depth,
                                     num_heads=decoder_num_heads or num_heads, mlp_ratio=mlp_ratio,
                                     num_tokens=num_tokens, token_channels=token_channels, text_dim=dec_text,
                                     text_length=text_length, rngs=rngs, dtype=dtype)

    @property
    def uses_text(self) -> bool:
        return self.text_inject != "none"

    def encode(self, images, text=None, text_mask=None):
        """-> moments (B, N, 2d) ("kl"; mean, log-variance) or tokens (B, N, d) ("ae")."""
        use = self.text_inject in ("both", "encoder")
        return self.encoder(images, text if use else None, text_mask if use else None)

    def decode(self, z, text=None, text_mask=None):
        use = self.text_inject in ("both", "decoder")
        return self.decoder(z, text if use else None, text_mask if use else None)

    def __call__(self, images, text=None, text_mask=None, eps=None):
        """(reconstruction, moments or tokens); a posterior sample with noise ``eps`` (B, N, d) for "kl"."""
        out = self.encode(images, text, text_mask)
        z = posterior_sample(out, eps) if self.latent == "kl" else out
        return self.decode(z, text, text_mask), out


def model_kwargs(config, text_shape=None) -> dict:
    """TexTok constructor arguments from ``config.model`` (and the caption cache's (N_t, D_t))."""
    m = config.model
    text_length, text_dim = text_shape if text_shape is not None else (0, 0)
    if m.text_inject == "none":
        text_length, text_dim = 0, 0
    return dict(image_size=int(config.data.image_size), patch_size=int(m.patch_size), channels=int(config.data.channels),
                width=int(m.width), depth=int(m.depth), num_heads=int(m.num_heads), mlp_ratio=float(m.mlp_ratio),
                decoder_width=int(m.get("decoder_width", 0)) or None, decoder_depth=int(m.get("decoder_depth", 0)) or None,
                decoder_num_heads=int(m.get("decoder_num_heads", 0)) or None, num_tokens=int(m.num_tokens),
                token_channels=int(m.token_channels), latent=m.latent, logvar_init=float(m.get("logvar_init", 0.0)),
                text_inject=m.text_inject,
                text_dim=int(text_dim), text_length=int(text_length))


def choose_caption(batch, rng):
    """One valid caption per image, uniformly: (text (B, N_t, D_t), mask (B, N_t)) from the batch's K captions."""
    valid = batch["caption_valid"].astype(bool)
    logits = jnp.where(valid, 0.0, -jnp.inf)
    j = jax.random.categorical(rng, logits, axis=-1)
    take = lambda a: jnp.take_along_axis(a, j.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]  # noqa: E731
    return take(batch["caption_emb"]), take(batch["caption_mask"])


class _Shapes:
    """Duck-typed ModelDef (param/rest shardings) of a module that is not the method's model."""

    def __init__(self, abstract):
        _, self.params, self.rest = nnx.split(abstract, nnx.Param, ...)

    def param_shardings(self, mesh):
        from trainers import sharding

        return nnx.to_pure_dict(sharding.state_shardings(self.params, mesh))

    def rest_shardings(self, mesh):
        from trainers import sharding

        return nnx.to_pure_dict(sharding.state_shardings(self.rest, mesh))


# ----------------------------------------------------------------------------
# The tokenizer method
# ----------------------------------------------------------------------------


class TexTokMethod(Method):
    """TexTok (config.model.name == "textok"): tokenizer + detokenizer trained with L2 + LPIPS + StyleGAN
    GAN + LeCAM in the one loop (its own ``train_step``: generator and discriminator optimizers).

    Tokenizer contract (trainers/decode.py): ``encode(model, images, text, text_mask)`` -> posterior
    moments (B, 1, N, 2d) (``latent_type`` "moments"; "latents" for the deterministic head) and
    ``decode(model, latents, labels=..., rng=...)`` on generator-space latents (B, 1, N, d) x
    ``scale_factor``; without the caption, decode draws one per image from its class's pool.
    """

    kind = "tokenizer"

    def data_source(self, source):
        """Training records carry their image's cached caption embeddings (trainers/captions.py)."""
        from trainers import captions

        return captions.with_captions(source, self.config)

    def __init__(self, config):
        super().__init__(config)
        self._model_def = None
        self._text_shape = None
        self._lpips_params = None
        self._pool = None

    @property
    def latent_type(self) -> str:
        return "moments" if self.config.model.latent == "kl" else "latents"

    @property
    def scale_factor(self) -> float:
        return float(self.config.model.get("scale_factor", 1.0))

    @property
    def uses_text(self) -> bool:
        return self.config.model.text_inject != "none"

    def text_shape(self):
        """(N_t, D_t) of the cached caption embeddings (None for the text-free baseline)."""
        if not self.uses_text:
            return None
        if self._text_shape is None:
            from trainers import captions

            _, length, dim = captions.text_shape(self.config)
            self._text_shape = (length, dim)
        return self._text_shape

    # -- config, network
    def validate_config(self, config) -> None:
        m, lc = config.model, config.model.loss
        if m.text_inject not in TEXT_INJECT:
            raise ValueError(f"config.model.text_inject={m.text_inject!r}: one of {TEXT_INJECT} ('none' = baseline)")
        if m.latent not in LATENTS:
            raise ValueError(f"config.model.latent={m.latent!r}: one of {LATENTS}")
        if config.data.image_size % m.patch_size:
            raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        for prefix in ("", "decoder_"):
            width, heads = int(m.get(prefix + "width", 0) or m.width), int(m.get(prefix + "num_heads", 0) or m.num_heads)
            if width % heads:
                raise ValueError(f"config.model.{prefix}width={width} is not divisible by "
                                 f"config.model.{prefix}num_heads={heads}")
        if m.num_tokens < 1 or m.token_channels < 1:
            raise ValueError(f"config.model.num_tokens={m.num_tokens}, token_channels={m.token_channels} must be >= 1")
        if self.uses_text and not config.data.get("captions", ""):
            raise ValueError(f"config.model.text_inject={m.text_inject!r} reads captions but config.data.captions is "
                             "empty: name a caption embedding cache (python -m trainers.captions embed) or 'demo'")
        if lc.disc_loss not in losses.DISCRIMINATOR_LOSSES:
            raise ValueError(f"config.model.loss.disc_loss={lc.disc_loss!r}: one of {sorted(losses.DISCRIMINATOR_LOSSES)}")
        if lc.gen_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"config.model.loss.gen_loss={lc.gen_loss!r}: one of hinge, non_saturating")
        if lc.discriminator not in DISCRIMINATORS:
            raise ValueError(f"config.model.loss.discriminator={lc.discriminator!r}: one of {DISCRIMINATORS}")
        if lc.discriminator == "stylegan" and config.data.image_size % 2 ** len(lc.disc_channel_multipliers):
            raise ValueError(f"config.model.loss.disc_channel_multipliers={tuple(lc.disc_channel_multipliers)}: "
                             f"config.data.image_size={config.data.image_size} must be divisible by "
                             f"2**{len(lc.disc_channel_multipliers)}")
        if self.uses_text:
            self.text_shape()  # a missing caption cache fails here
            if m.text_length and self.text_shape()[0] != m.text_length:
                raise ValueError(f"config.model.text_length={m.text_length} but the caption cache holds "
                                 f"{self.text_shape()[0]} tokens per caption (config.text.max_length when embedded)")
        if lc.perceptual_weight > 0:
            self.lpips_params()  # a missing VGG16 file fails here, before compilation

    def create_model(self, rngs: nnx.Rngs) -> TexTok:
        return TexTok(**model_kwargs(self.config, self.text_shape()), rngs=rngs,
                      dtype=jnp.dtype(self.config.compute_dtype))

    @property
    def model_def(self) -> ModelDef:
        if self._model_def is None:
            self._model_def = ModelDef(self)
        return self._model_def

    def lpips_params(self) -> dict:
        if self._lpips_params is None:
            lc = self.config.model.loss
            self._lpips_params = losses.load_lpips_params(lc.vgg_path, lc.get("lpips_lin_path", ""))
        return self._lpips_params

    def _text(self, text, text_mask, what: str):
        if self.uses_text and (text is None or text_mask is None):
            raise ValueError(f"TexTok ({self.config.model.text_inject!r} text) {what} with a caption: pass the "
                             "cached caption embedding and its mask (trainers/captions.py)")
        return text, text_mask

    # -- tokenizer interface
    def encode(self, model: TexTok, images, text=None, text_mask=None) -> jax.Array:
        """images (B, H, W, C) in [-1, 1] -> moments (B, 1, N, 2d) (or tokens (B, 1, N, d) for "ae")."""
        text, text_mask = self._text(text, text_mask, "encodes")
        return model.encode(images, text, text_mask)[:, None]

    def caption_pool(self):
        """Per-class caption pools (C, P, N_t, D_t), (C, P, N_t) of the tokenizer's caption cache (seeded)."""
        if self._pool is None:
            from trainers import captions

            cache = captions.CaptionCache(captions.resolve(self.config))
            s = self.config.sample
            self._pool = cache.class_pool(int(self.config.data.num_classes), int(s.get("caption_pool_size", 16)),
                                          int(s.get("caption_seed", 0)))
        return self._pool

    def pool_captions(self, labels, rng):
        """Class-conditional decoding's captions: one from the label's pool per image (the paper's protocol)."""
        emb, mask = self.caption_pool()
        j = jax.random.randint(rng, labels.shape, 0, emb.shape[1])
        return jnp.asarray(emb)[labels, j], jnp.asarray(mask)[labels, j]

    def decode(self, model: TexTok, latents, labels=None, rng=None, text=None, text_mask=None) -> jax.Array:
        """Generator-space latents (B, 1, N, d) (or (B, N, d)) x scale_factor -> images (B, H, W, C).

        The caption: ``text``/``text_mask`` if given, else drawn from each ``labels``' pool with ``rng``
        (default PRNGKey(config.sample.caption_seed)).
        """
        z = jnp.reshape(latents, (latents.shape[0], -1, self.config.model.token_channels)) / self.scale_factor
        if self.uses_text and text is None:
            if labels is None:
                raise ValueError("TexTok decodes with a caption: pass text/text_mask, or labels to draw one from "
                                 "the class's caption pool (decode(model, latents, labels=...))")
            rng = jax.random.PRNGKey(int(self.config.sample.get("caption_seed", 0))) if rng is None else rng
            text, text_mask = self.pool_captions(labels, rng)
        return model.decode(z, text, text_mask)

    def write_latent_cache(self, params, rest, out, *, npz: str = "", batch_size: int = 64, mesh=None,
                           progress: bool = True) -> dict:
        """trainers/cache_latents.py's hook: TexTok encodes each image with its caption, so the cache is
        written from ``config.data`` joined with ``config.data.captions`` (:func:`write_token_cache`)."""
        del mesh  # one process, the default device
        if npz:
            raise ValueError(f"--npz={npz}: TexTok encodes each image with its caption and an .npz of images has "
                             "none; encode config.data (with config.data.captions) instead")
        return write_token_cache(self.config, params, rest, out, batch_size=batch_size, progress=progress)

    def reconstruct(self, model: TexTok, images, text=None, text_mask=None) -> jax.Array:
        """Images through the posterior mean with their own caption: what the loop logs as reconstructions."""
        text, text_mask = self._text(text, text_mask, "reconstructs")
        out = model.encode(images, text, text_mask)
        z = gaussian_parameters(out)[0] if model.latent == "kl" else out
        return model.decode(z, text, text_mask)

    def reconstruct_batch(self, model: TexTok, batch) -> jax.Array:
        """Reconstruction of a data batch (its first caption per image)."""
        text = batch["caption_emb"][:, 0] if self.uses_text else None
        mask = batch["caption_mask"][:, 0] if self.uses_text else None
        return self.reconstruct(model, batch["image"], text, mask)

    def swapped_reconstructions(self, model: TexTok, batch) -> dict:
        """{"own": reconstructions (posterior mean, first caption), "other_tokens": each image decoded from the
        next image's tokens under its own caption, and (captioned runs) "other_caption": from its own tokens
        under the next image's caption}: how much the decoder reads its tokens and its caption."""
        x = batch["image"]
        text = batch["caption_emb"][:, 0] if self.uses_text else None
        mask = batch["caption_mask"][:, 0] if self.uses_text else None
        self._text(text, mask, "reconstructs")
        out = model.encode(x, text, mask)
        z = gaussian_parameters(out)[0] if model.latent == "kl" else out
        roll = lambda a: None if a is None else jnp.roll(a, 1, axis=0)  # noqa: E731
        recons = {"own": model.decode(z, text, mask), "other_tokens": model.decode(roll(z), text, mask)}
        if self.uses_text:
            recons["other_caption"] = model.decode(z, roll(text), roll(mask))
        return recons

    # -- the objective
    def _inputs(self, batch, rng):
        rng_caption, rng_eps = jax.random.split(rng)
        text, mask = choose_caption(batch, rng_caption) if self.uses_text else (None, None)
        x = batch["image"]
        m = self.config.model
        eps = jax.random.normal(rng_eps, (x.shape[0], m.num_tokens, m.token_channels))
        return x, text, mask, eps

    def _reconstruction_loss(self, model, x, text, mask, eps, lpips_params):
        """L2 + perceptual_weight * LPIPS + kl_weight * KL (KL summed per image, averaged); (loss, recon, metrics)."""
        lc = self.config.model.loss
        recon, out = model(x, text, mask, eps)
        rec = jnp.mean(jnp.square(recon - x))
        loss, metrics = rec, {"rec_loss": rec}
        if lc.perceptual_weight > 0:
            lpips = merge_module(losses.lpips_abstract(), lpips_params)
            p = jnp.mean(lpips(jax.lax.stop_gradient(x), recon))
            loss, metrics["p_loss"] = loss + lc.perceptual_weight * p, p
        if model.latent == "kl":
            kl = jnp.mean(posterior_kl(out))
            loss, metrics["kl_loss"] = loss + lc.kl_weight * kl, kl
        return loss, recon, metrics

    def loss(self, model, batch, rng):
        """The objective without the GAN term (the plain one-optimizer path)."""
        x, text, mask, eps = self._inputs(batch, rng)
        lpips = self.lpips_params() if self.config.model.loss.perceptual_weight > 0 else None
        loss, _, metrics = self._reconstruction_loss(model, x, text, mask, eps, lpips)
        return loss, {**metrics, "loss": loss}

    # -- GAN training: generator and discriminator optimizers
    def discriminator(self, rngs: nnx.Rngs):
        lc, d = self.config.model.loss, self.config.data
        if lc.discriminator == "stylegan":
            return losses.StyleGANDiscriminator(int(d.image_size), int(d.channels), int(lc.disc_filters),
                                                tuple(lc.disc_channel_multipliers), lc.get("disc_downsample", "blur"),
                                                rngs=rngs)
        return losses.NLayerDiscriminator(int(d.channels), int(lc.disc_filters), int(lc.disc_layers), rngs=rngs)

    def _disc_abstract(self):
        return layers.abstract_module(self.discriminator)

    @property
    def gan(self) -> bool:
        return self.config.model.loss.gan_weight > 0

    def init_train_state(self, rng) -> dict:
        """Keys: ``step``, tokenizer ``params``/``ema_params``/``opt_state``/``rest``, ``disc`` =
        {``params``, ``rest``, ``opt_state``}, ``lecam`` EMAs, frozen ``lpips`` params ({} if unused)."""
        from trainers.optim import make_optimizer

        k_gen, k_disc = jax.random.split(rng)
        params, rest = self.model_def.init(k_gen)
        _, dp, dr = nnx.split(self.discriminator(nnx.Rngs(k_disc)), nnx.Param, ...)
        dp, dr = nnx.to_pure_dict(dp), nnx.to_pure_dict(dr)
        tx, _ = make_optimizer(self.config)
        zero = jnp.zeros((), jnp.float32)
        lpips = self.lpips_params() if self.config.model.loss.perceptual_weight > 0 else {}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": jax.tree.map(jnp.copy, params),
                "opt_state": tx.init(params), "rest": rest,
                "disc": {"params": dp, "rest": dr, "opt_state": tx.init(dp)},
                "lecam": {"real": zero, "fake": zero}, "lpips": jax.tree.map(jnp.asarray, lpips)}

    def train_state_shardings(self, abstract_state, mesh) -> dict:
        from trainers import sharding, train

        repl = sharding.replicated(mesh)
        gen = train.state_shardings({"opt_state": abstract_state["opt_state"]}, self.model_def, mesh)
        disc_shapes = _Shapes(self._disc_abstract())
        disc = train.state_shardings({"opt_state": abstract_state["disc"]["opt_state"]}, disc_shapes, mesh)
        lpips = (_Shapes(losses.lpips_abstract()).param_shardings(mesh) if abstract_state["lpips"] else {})
        return {"step": repl, "params": gen["params"], "ema_params": gen["params"], "opt_state": gen["opt_state"],
                "rest": gen["rest"], "disc": {"params": disc["params"], "rest": disc["rest"],
                                              "opt_state": disc["opt_state"]},
                "lecam": {"real": repl, "fake": repl}, "lpips": lpips}

    def train_step(self, state, batch, rng):
        """One tokenizer update (reconstruction + gan_weight x disc factor x G-loss) and, with the GAN on,
        one discriminator update (D-loss + lecam_weight x LeCAM) on the real images and this step's
        reconstructions."""
        from trainers.optim import make_optimizer

        lc = self.config.model.loss
        tx, schedule = make_optimizer(self.config)
        x, text, mask, eps = self._inputs(batch, rng)
        step = state["step"]
        disc_abstract = self._disc_abstract()
        disc_factor = losses.adopt_weight(1.0, step, lc.disc_start) if self.gan else jnp.zeros(())

        def objective(params):
            model = self.model_def.merge(params, state["rest"])
            loss, recon, metrics = self._reconstruction_loss(model, x, text, mask, eps, state["lpips"] or None)
            if self.gan:
                disc = merge_module(disc_abstract, state["disc"]["params"], state["disc"]["rest"])
                g_loss = losses.generator_loss(disc(recon, train=True), lc.gen_loss)
                loss = loss + lc.gan_weight * disc_factor * g_loss
                metrics["g_loss"] = g_loss
            return loss, (recon, metrics)

        (loss, (recon, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rate = self.config.ema_rate
        ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state["ema_params"], params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
        new_state = {**state, "step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state}
        if not self.gan:
            return new_state, metrics

        recon = jax.lax.stop_gradient(recon)
        lecam = state["lecam"]

        def d_objective(disc_params):
            disc = merge_module(disc_abstract, disc_params, state["disc"]["rest"])
            logits_real, logits_fake = disc(x, train=True), disc(recon, train=True)
            d_loss = losses.DISCRIMINATOR_LOSSES[lc.disc_loss](logits_real, logits_fake)
            reg = losses.lecam_regularization(logits_real, logits_fake, lecam["real"], lecam["fake"])
            rest = nnx.to_pure_dict(nnx.split(disc, nnx.Param, ...)[2])
            return disc_factor * (d_loss + lc.lecam_weight * reg), (rest, logits_real, logits_fake, d_loss, reg)

        (d_total, (d_rest, real, fake, d_loss, reg)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
            state["disc"]["params"])
        d_updates, d_opt = tx.update(d_grads, state["disc"]["opt_state"], state["disc"]["params"])
        new_state["disc"] = {"params": optax.apply_updates(state["disc"]["params"], d_updates), "rest": d_rest,
                             "opt_state": d_opt}
        new_state["lecam"] = {"real": losses.lecam_update(lecam["real"], real, lc.lecam_decay),
                              "fake": losses.lecam_update(lecam["fake"], fake, lc.lecam_decay)}
        metrics.update(d_loss=d_loss, d_total=d_total, lecam=reg, disc_factor=disc_factor,
                       logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))
        return new_state, metrics




# ----------------------------------------------------------------------------
# The token cache: every image's posterior moments under its caption, for the generator
# ----------------------------------------------------------------------------


def write_token_cache(tok_config, params, rest, out: str | Path, *, batch_size: int = 64,
                      progress: bool = False) -> dict:
    """Encode every usable image of ``tok_config.data`` with its first caption into a latent cache
    (trainers/latents.py layout: record = int32 label + float32 (2, 1, N, C) [image, flipped image],
    ``latent_type`` of the tokenizer; metadata as trainers/cache_latents.py writes it, with
    ``latent_std`` for the generator's ``config.tokenizer.scale``). Single process; what
    ``python -m trainers.cache_latents --tokenizer_workdir=TEXTOK_RUN`` runs (the method's
    ``write_latent_cache`` hook)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    from trainers import captions, data, latents

    if jax.process_count() > 1:
        raise ValueError("the TexTok token cache is written by one process (run cache_latents without --distributed)")
    method = TexTokMethod(tok_config)
    model_def = method.model_def
    source, _ = data.record_source(tok_config)
    source = captions.with_captions(source, tok_config)
    prep = data.Preprocess(tok_config.data.image_size, tok_config.data.channels, False, data.min_image_side(tok_config))

    @jax.jit
    def encode(params, rest, images, text, mask):
        model = model_def.merge(params, rest)
        both = jnp.concatenate([images, images[:, :, ::-1]])
        t2 = None if text is None else jnp.concatenate([text, text])
        m2 = None if mask is None else jnp.concatenate([mask, mask])
        moments = method.encode(model, both, t2, m2)
        return jnp.stack([moments[: images.shape[0]], moments[images.shape[0]:]], axis=1)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = "latents-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(out / name), "group_size:1")
    count, shape = 0, None
    sums = np.zeros(3)  # view 0: sum z, sum z^2, count (z a posterior sample, in expectation)
    bar = tqdm(total=len(source), desc=f"encoding -> {out}", disable=not progress, unit="img")

    def flush(items):
        nonlocal count, shape
        pad = batch_size - len(items)
        stack = lambda k: np.stack([it[k] for it in items] + [items[-1][k]] * pad)  # noqa: E731
        text = stack("caption_emb")[:, 0] if method.uses_text else None
        mask = stack("caption_mask")[:, 0] if method.uses_text else None
        moments = np.asarray(encode(params, rest, stack("image"), text, mask))[: len(items)]
        shape = moments.shape[1:]
        v = moments[:, 0].astype(np.float64)
        if method.latent_type == "moments":
            mean, logvar = np.split(v, 2, axis=-1)
            sums[:] += [mean.sum(), (mean ** 2 + np.exp(np.clip(logvar, -30.0, 20.0))).sum(), mean.size]
        else:
            sums[:] += [v.sum(), (v ** 2).sum(), v.size]
        for mo, it in zip(moments.astype(np.float32), items):
            writer.write(latents.LABEL.pack(int(it["label"])) + mo.tobytes())
        count += len(items)
        bar.update(len(items))

    try:
        items = []
        for i in range(len(source)):
            item = prep(source[i], np.random.default_rng(0))
            if item is None:
                continue
            items.append(item)
            if len(items) == batch_size:
                flush(items)
                items = []
        if items:
            flush(items)
    finally:
        writer.close()
        bar.close()
    if shape is None:
        raise ValueError(f"no images to encode in config.data ({tok_config.data.name!r})")
    c = int(tok_config.model.token_channels)
    meta = {"format_version": latents.FORMAT_VERSION, "files": [name], "record_shape": list(shape),
            "latent_shape": [1, int(tok_config.model.num_tokens), c],
            "latent_type": method.latent_type, "count": count, "image_size": int(tok_config.data.image_size),
            "scale_factor": float(tok_config.model.get("scale_factor", 1.0)),
            "latent_std": float(np.sqrt(max(sums[1] / sums[2] - (sums[0] / sums[2]) ** 2, 0.0))),
            "captions": "first caption of each image" if method.uses_text else "none (text-free)",
            "tokenizer": tok_config.model.to_dict()}
    (out / latents.METADATA).write_text(json.dumps(meta, indent=1, default=list))
    return meta


# ----------------------------------------------------------------------------
# The generator: DiT with patch size 1 on the N x d tokens
# ----------------------------------------------------------------------------


def sincos_1d(dim: int, length: int) -> np.ndarray:
    """(length, dim) fixed 1-D sin-cos positions (MAE's get_1d_sincos_pos_embed_from_grid: [sin, cos])."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


class TokenDiT(nnx.Module):
    """DiT on a 1D token sequence: (x (B, 1, N, d), t (B,), y (B,)) -> (B, 1, N, d or 2d).

    models/dit.py's network with patch size 1 on a sequence: a Linear(d -> D) token embedding (DiT's
    patch embedding with p = 1), fixed 1-D sin-cos positions, the same t/y embedders, adaLN-Zero blocks
    and final layer. Inputs keep a singleton height axis so DiT's objectives and samplers, written
    for (B, H, W, C), run unchanged.
    """

    def __init__(self, *, num_tokens, in_channels, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, rngs: nnx.Rngs, dtype=jnp.float32):
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = layers.dense(in_channels, hidden_size, (None, "embed"), rngs=rngs, dtype=dtype)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        self.pos_embed = nnx.Variable(jnp.asarray(sincos_1d(hidden_size, num_tokens))[None])
        self.blocks = nnx.List([dit_lib.DiTBlock(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype)
                                for _ in range(depth)])
        self.final_layer = dit_lib.FinalLayer(hidden_size, 1, self.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x, t, y):
        from trainers.sharding import constrain

        b = x.shape[0]
        h = self.x_embedder(x.reshape(b, -1, self.in_channels).astype(self.x_embedder.dtype))
        h = constrain(h + self.pos_embed[...].astype(h.dtype), ("act_batch", "act_len", "act_embed"))
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c).reshape(b, 1, -1, self.out_channels).astype(jnp.float32)


class TexTokDiT(dit_lib.DiTMethod):
    """The generator on TexTok tokens (config.model.name == "textok_dit"): DiTMethod's objectives
    (``objective`` "ddpm": DiT's Gaussian diffusion; "flow": SiT) and samplers on :class:`TokenDiT`.
    ``config.model.input_size`` is the token count N, ``patch_size`` 1, ``in_channels`` d.

    ``sample`` returns tokens (B, 1, N, d) in generator space; they become images through the paired
    tokenizer (``config.tokenizer``: a TexTok workdir), whose ``decode(..., labels=...)`` reads a caption
    drawn from the label's per-class pool, as the paper's class-conditional protocol.
    """

    def validate_config(self, config) -> None:
        if config.model.patch_size != 1:
            raise ValueError(f"config.model.patch_size={config.model.patch_size}: TexTok's DiT uses patch size 1 "
                             "(one DiT token per 1D token)")
        super().validate_config(config)

    def create_model(self, rngs: nnx.Rngs) -> TokenDiT:
        m = self.config.model
        return TokenDiT(num_tokens=int(m.input_size), in_channels=int(m.in_channels), hidden_size=int(m.hidden_size),
                        depth=int(m.depth), num_heads=int(m.num_heads), mlp_ratio=float(m.mlp_ratio),
                        class_dropout_prob=float(m.class_dropout_prob), num_classes=int(m.num_classes),
                        learn_sigma=bool(m.learn_sigma), rngs=rngs, dtype=jnp.dtype(self.config.compute_dtype))

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        m = self.config.model
        return (batch, 1, int(m.input_size), int(m.in_channels))


# ----------------------------------------------------------------------------
# Scoring and the command line: reconstructions under their captions, samples under pool captions
# ----------------------------------------------------------------------------


def _restore(workdir, mesh):
    """(config, method, model_def, params, rest, step) of a run's newest checkpoint (EMA params where
    its config.sample.use_ema says)."""
    from trainers import checkpoint, decode
    from trainers.method import get_method

    config = checkpoint.read_config(workdir)
    method = get_method(config)
    model_def = ModelDef(method)
    step, params, rest = decode.restore_params(workdir, model_def, mesh, use_ema=bool(config.sample.use_ema))
    return config, method, model_def, params, rest, step


def evaluate_tokenizer(workdir: str, num: int = 500, *, seed: int = 17, mesh=None, domain: bool | None = None) -> dict:
    """Reconstruction error (MSE in [-1, 1], PSNR) and FID of ``num`` reconstructions against the originals
    (MNIST-feature FID on the embedded digits; Inception FID where ``config.eval.inception_weights``)."""
    from eval import harness
    from trainers import data, sharding
    from trainers.sample import images_to_uint8

    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    config, method, model_def, params, rest, step = _restore(workdir, mesh)
    if method.kind != "tokenizer":
        raise ValueError(f"{workdir}: a {config.model.name!r} run; evaluate takes a TexTok tokenizer run")
    with config.unlocked():
        config.data.random_flip = False
    it = data.create_iterator(config, seed=seed, global_batch_size=config.batch_size,
                              source_transform=method.data_source)
    recon_fn = jax.jit(lambda p, r, b: method.swapped_reconstructions(model_def.merge(p, r), b))
    originals, recons = [], {}
    while sum(len(o) for o in originals) < num:
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        for k, v in recon_fn(params, rest, batch).items():
            recons.setdefault(k, []).append(np.asarray(v))
        originals.append(np.asarray(batch["image"]))
    x = np.concatenate(originals)[:num]
    recons = {k: np.clip(np.concatenate(v)[:num], -1, 1) for k, v in recons.items()}
    mse = float(np.mean(np.square(x - recons["own"])))
    # Does the decoder read its inputs? The same reconstruction from another image's tokens (own caption)
    # and, for a captioned run, under another image's caption (own tokens); the mean image is the plateau.
    reads = {"mse_mean_image": float(np.mean(np.square(x - x.mean(axis=0, keepdims=True)))),
             **{f"mse_{k}": float(np.mean(np.square(x - v))) for k, v in recons.items() if k != "own"}}
    scores = harness.evaluate(images_to_uint8(recons["own"]), dataset_images=images_to_uint8(x),
                              inception_weights=config.eval.inception_weights or None,
                              domain=config.data.name == data.EMBEDDED if domain is None else domain)
    return {"num_tokens": int(config.model.num_tokens), "text_inject": str(config.model.text_inject), "step": step,
            "num": num, "mse": mse, "psnr": float(10 * np.log10(4.0 / mse)), **reads, **scores}


def sample_generator(workdir: str, num: int = 500, *, seed: int = 1, mesh=None, reference_seed: int = 17,
                     domain: bool | None = None):
    """``num`` class-conditional samples of a TexTok-DiT run, decoded by its tokenizer with captions drawn
    from each class's pool (seeded): (uint8 images, labels, scores against ``num`` training images)."""
    from eval import harness
    from trainers import data, decode, sharding
    from trainers.sample import grid_labels, images_to_uint8
    from trainers.train import dataset_images

    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    config, method, model_def, params, rest, _ = _restore(workdir, mesh)
    tok_method, tok_def, tok_params, tok_rest = decode.load_tokenizer(config, mesh)

    @jax.jit
    def sample(params, rest, tok_params, tok_rest, rng, labels):
        rng_sample, rng_caption = jax.random.split(rng)
        tokens = method.sample(model_def.merge(params, rest), rng_sample, labels)
        # Generator-space tokens: decode divides by the tokenizer's scale_factor (= config.tokenizer.scale).
        return tok_method.decode(tok_def.merge(tok_params, tok_rest), tokens, labels=labels, rng=rng_caption)

    labels = grid_labels(num, config.data.num_classes)
    batch = int(config.sample_batch_size)
    out = []
    for i in range(0, num, batch):
        chunk = labels[i:i + batch]
        padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
        x = sample(params, rest, tok_params, tok_rest, jax.random.fold_in(jax.random.PRNGKey(seed), i), padded)
        out.append(images_to_uint8(np.asarray(x))[: len(chunk)])
    images = np.concatenate(out)
    reference = dataset_images(config, num, seed=reference_seed)
    scores = harness.evaluate(images, dataset_images=reference, inception_weights=config.eval.inception_weights or None,
                              domain=config.data.name == data.EMBEDDED if domain is None else domain)
    return images, labels, scores


def table(rows: list[dict]) -> str:
    """The text-vs-no-text comparison as a markdown table: one line per token count, the two runs side by side."""
    by = {}
    for r in rows:
        by.setdefault(r["num_tokens"], {})["none" if r["text_inject"] == "none" else "text"] = r
    fid = "mnist_fid" if any("mnist_fid" in r for r in rows) else "fid"
    head = (f"| tokens | steps | MSE text | MSE no text | PSNR text | PSNR no text | {fid} text | {fid} no text "
            "| MSE text, other caption | MSE other tokens text / no text |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    cell = lambda d, k, f: format(d[k], f) if d and k in d else "-"  # noqa: E731
    for n in sorted(by):
        t, b = by[n].get("text"), by[n].get("none")
        steps = "/".join(sorted({str(r["step"]) for r in (t, b) if r}))
        lines.append(f"| {n} | {steps} | {cell(t, 'mse', '.4f')} | {cell(b, 'mse', '.4f')} | {cell(t, 'psnr', '.2f')} | "
                     f"{cell(b, 'psnr', '.2f')} | {cell(t, fid, '.1f')} | {cell(b, fid, '.1f')} | "
                     f"{cell(t, 'mse_other_caption', '.4f')} | {cell(t, 'mse_other_tokens', '.4f')} / "
                     f"{cell(b, 'mse_other_tokens', '.4f')} |")
    return "\n".join(lines)


def main(argv):
    """python -m tokenizers.textok evaluate --workdir=TOKENIZER_RUN[,RUN,...] [--num=500] [--out=FILE.jsonl]
        reconstruction MSE / PSNR and MNIST-feature rFID (Inception FID with config.eval.inception_weights)
        of each run; with several runs also the text-vs-no-text table (one line per token count)
    python -m tokenizers.textok sample --workdir=DIT_RUN --out=FILE.npz [--num=500]
        class-conditional samples of a TexTok-DiT run decoded with per-class pool captions, and their scores

    The token cache for the generator: python -m trainers.cache_latents --tokenizer_workdir=TOKENIZER_RUN --out=DIR."""
    import sys

    from absl import flags

    if len(argv) < 2 or argv[1] not in ("evaluate", "sample"):
        print(main.__doc__)
        return 2
    flags.DEFINE_string("workdir", None, "textok run(s), comma-separated (evaluate), or a textok_dit run (sample)",
                        required=True)
    flags.DEFINE_string("out", "", "evaluate: append each run's scores to this .jsonl; sample: the .npz "
                        "(arr_0 images, arr_1 labels)")
    flags.DEFINE_integer("num", 500, "images to score")
    flags.FLAGS([argv[0]] + argv[2:])
    f = flags.FLAGS
    if argv[1] == "evaluate":
        rows = []
        for workdir in [w for w in f.workdir.split(",") if w]:
            rows.append({"workdir": workdir, **evaluate_tokenizer(workdir, f.num)})
            print(json.dumps(rows[-1]), flush=True)
            if f.out:
                Path(f.out).parent.mkdir(parents=True, exist_ok=True)
                with open(f.out, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
        if len(rows) > 1:
            print(table(rows), flush=True)
    else:
        images, labels, scores = sample_generator(f.workdir, f.num)
        if f.out:
            Path(f.out).parent.mkdir(parents=True, exist_ok=True)
            np.savez(f.out, arr_0=images, arr_1=labels)
        print(json.dumps(scores), flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv))
