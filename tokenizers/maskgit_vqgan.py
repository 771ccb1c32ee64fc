"""The MaskGIT VQGAN (f16, 1024 codes): TiTok's and One-D-Piece's proxy-code teacher and pixel decoder.

Network as in the PyTorch re-implementation shipped with bytedance/1d-tokenizer and
turingmotors/One-D-Piece (``modeling/modules/maskgit_vqgan.py``): a conv encoder of
ResNet blocks with average-pool downsampling and no attention, a plain VQ (1024 x
256, no l2-norm), and a decoder with nearest x2 upsampling followed by a 3x3 conv.
All convolutions are TF-"SAME" padded (``Conv2dSame``); GroupNorm(32, eps 1e-6).
Images are in [0, 1] (MaskGIT's convention), NHWC here (upstream NCHW).

Upstream quirk kept on purpose (the released weights depend on it): in a ResNet
block whose channels change, the residual is ``nin_shortcut`` of the block's
*output*; the block input is dropped.

Order: blocks, encoder/decoder, the VQGAN, the converter for
``maskgit-vqgan-imagenet-f16-256.bin``, the golden-fixture check, and a small
training method (L2 + VQ losses) used to train a teacher on data where no
pretrained one exists (the embedded-digits demo).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module, require_file, torch_to_params
from tokenizers import quantizers
from tokenizers.kl_vae import group_norm
from trainers.method import Method, ModelDef

CHECKPOINT_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
CHECKPOINT_URL = "https://huggingface.co/fun-research/TiTok/resolve/main/maskgit-vqgan-imagenet-f16-256.bin"


def conv_same(in_ch: int, out_ch: int, kernel: int, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Conv:
    """``Conv2dSame``: TF SAME padding (extra pixel bottom/right), which Flax's "SAME" matches."""
    return layers.conv(in_ch, out_ch, kernel, padding="SAME", use_bias=use_bias, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_ch, 32, rngs)
        self.conv1 = conv_same(in_ch, out_ch, 3, rngs, use_bias=False)
        self.norm2 = group_norm(out_ch, 32, rngs)
        self.conv2 = conv_same(out_ch, out_ch, 3, rngs, use_bias=False)
        # Upstream: Conv2dSame(out, out, 1) applied to the block OUTPUT when channels change.
        self.nin_shortcut = conv_same(out_ch, out_ch, 1, rngs, use_bias=False) if in_ch != out_ch else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        residual = self.nin_shortcut(h) if self.nin_shortcut is not None else x
        return h + residual


class DownsamplingBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, downsample: bool, rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, rngs) for j in range(num_res_blocks)])
        self.downsample = downsample

    def __call__(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample:
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return x


class UpsamplingBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, upsample: bool, rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, rngs) for j in range(num_res_blocks)])
        self.upsample_conv = conv_same(out_ch, out_ch, 3, rngs) if upsample else None

    def __call__(self, x):
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(scale 2, nearest)
            x = self.upsample_conv(x)
        return x


class Encoder(nnx.Module):
    """(B, H, W, C) in [0, 1] -> (B, H/2^(L-1), W/2^(L-1), z_channels)."""

    def __init__(self, *, hidden_channels: int, channel_mult, num_res_blocks: int, z_channels: int,
                 num_channels: int = 3, rngs: nnx.Rngs):
        levels = len(channel_mult)
        in_mult = (1,) + tuple(channel_mult)
        self.conv_in = conv_same(num_channels, hidden_channels, 3, rngs, use_bias=False)
        self.down = nnx.List([
            DownsamplingBlock(hidden_channels * in_mult[i], hidden_channels * channel_mult[i], num_res_blocks,
                              i != levels - 1, rngs) for i in range(levels)])
        mid = hidden_channels * channel_mult[-1]
        self.mid = nnx.List([ResnetBlock(mid, mid, rngs) for _ in range(num_res_blocks)])
        self.norm_out = group_norm(mid, 32, rngs)
        self.conv_out = conv_same(mid, z_channels, 1, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*2^(L-1), w*2^(L-1), C), not clamped. ``up[0]`` is the finest
    level and runs last (upstream stores the levels in order and runs ``reversed(self.up)``)."""

    def __init__(self, *, hidden_channels: int, channel_mult, num_res_blocks: int, z_channels: int,
                 num_channels: int = 3, rngs: nnx.Rngs):
        levels = len(channel_mult)
        top = hidden_channels * channel_mult[-1]
        self.conv_in = conv_same(z_channels, top, 3, rngs)
        self.mid = nnx.List([ResnetBlock(top, top, rngs) for _ in range(num_res_blocks)])
        up = []
        for i in range(levels):
            block_in = hidden_channels * (channel_mult[-1] if i == levels - 1 else channel_mult[i + 1])
            up.append(UpsamplingBlock(block_in, hidden_channels * channel_mult[i], num_res_blocks, i != 0, rngs))
        self.up = nnx.List(up)
        out = hidden_channels * channel_mult[0]
        self.norm_out = group_norm(out, 32, rngs)
        self.conv_out = conv_same(out, num_channels, 3, rngs)

    def __call__(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in reversed(self.up):
            h = block(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------
# The VQGAN
# ----------------------------------------------------------------------------


class MaskGITVQGAN(nnx.Module):
    """encoder -> ``quantize`` (num_embeddings x z_channels, plain VQ) -> decoder.

    Upstream's ``PretrainedTokenizer``: ``encode(images in [0, 1]) -> (B, h*w)`` proxy indices
    (row-major); ``decode_codes(indices) -> images`` clamped to [0, 1]; ``decode_soft(logits)``
    is TiTok stage 2's pixel path: softmax over the codes times the codebook, then the decoder
    (not clamped).
    """

    def __init__(self, *, hidden_channels: int = 128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, num_embeddings: int = 1024, num_channels: int = 3,
                 commitment_cost: float = 0.25, rngs: nnx.Rngs):
        kw = dict(hidden_channels=hidden_channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                  z_channels=z_channels, num_channels=num_channels, rngs=rngs)
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        self.quantize = quantizers.VectorQuantizer(num_embeddings, z_channels, commitment_cost=commitment_cost,
                                                   use_l2_norm=False, rngs=rngs)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

    def encode(self, images):
        """(B, H, W, C) in [0, 1] -> (B, h*w) int32 proxy codes, row-major."""
        hidden = self.encoder(images)
        return self.quantize.nearest(hidden).reshape(hidden.shape[0], -1)

    def codes_to_latents(self, indices):
        """(B, h*w) -> (B, h, w, z_channels) codebook entries (square grid, as upstream)."""
        b, n = indices.shape
        g = int(round(np.sqrt(n)))
        return self.quantize.lookup(indices).reshape(b, g, g, -1)

    def decode_codes(self, indices):
        return jnp.clip(self.decoder(self.codes_to_latents(indices)), 0.0, 1.0)

    def soft_latents(self, logits):
        """(B, h, w, K) logits -> (B, h, w, z_channels): softmax(logits) @ codebook (TiTok stage 2)."""
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhwk,kd->bhwd", probs, self.quantize.embedding[...], precision=jax.lax.Precision.HIGHEST)

    def decode_soft(self, logits):
        return self.decoder(self.soft_latents(logits))

    def __call__(self, images):
        """Training path: (reconstruction, info) with MaskGIT's VQ loss (encoder term weight 1,
        codebook term weight ``commitment_cost``) and straight-through gradients."""
        hidden = self.encoder(images)
        z_q, info = self.quantize(hidden)
        parts = quantizers.vq_losses(hidden, self.quantize.lookup(info["indices"]), 1.0)
        info["quantizer_loss"] = parts["commitment_loss"] + self.quantize.commitment_cost * parts["codebook_loss"]
        return self.decoder(z_q), info


def vqgan_kwargs(cfg) -> dict:
    """MaskGITVQGAN constructor arguments from a ConfigDict/dict with upstream's field names."""
    return dict(hidden_channels=int(cfg["hidden_channels"]), channel_mult=tuple(int(m) for m in cfg["channel_mult"]),
                num_res_blocks=int(cfg["num_res_blocks"]), z_channels=int(cfg["z_channels"]),
                num_embeddings=int(cfg["num_embeddings"]), num_channels=int(cfg.get("num_channels", 3)))


def validate_vqgan_config(cfg, field: str) -> None:
    widths = {int(cfg["hidden_channels"]) * int(m) for m in cfg["channel_mult"]}
    bad = sorted(w for w in widths if w % 32)
    if bad:
        raise ValueError(f"{field}: hidden_channels={cfg['hidden_channels']} x channel_mult={tuple(cfg['channel_mult'])}"
                         f" gives widths {bad} that GroupNorm(32) cannot split (multiples of 32 needed)")


# ----------------------------------------------------------------------------
# Converter (maskgit-vqgan-imagenet-f16-256.bin, and TiTok's pixel_* copies)
# ----------------------------------------------------------------------------


def abstract_params(kwargs) -> dict:
    model = layers.abstract_module(lambda rngs: MaskGITVQGAN(**kwargs, rngs=rngs))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])


def params_from_torch(state_dict: dict[str, np.ndarray], kwargs, *, prefix: str = "") -> dict:
    """Pure params of :class:`MaskGITVQGAN` from upstream keys (``encoder.*``, ``decoder.*``,
    ``quantize.embedding.weight``), optionally under ``prefix``."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return torch_to_params(sd, abstract_params(kwargs), what="MaskGIT-VQGAN checkpoint")


def load_vqgan_params(path, kwargs, config_field: str) -> dict:
    """Params from ``maskgit-vqgan-imagenet-f16-256.bin`` or a zoo workdir of the ``maskgit_vqgan``
    method (a directory: its newest checkpoint's EMA params)."""
    path = require_file(path, what=f"MaskGIT-VQGAN weights {CHECKPOINT_FILE}", config_field=config_field,
                        published=f"{CHECKPOINT_URL} (or a workdir trained with configs/maskgit_vqgan.py)")
    if Path(path).is_dir():
        return workdir_params(path)
    from trainers import torchfile

    return params_from_torch(torchfile.load_state_dict(path), kwargs)


def load_vqgan_torch(path, config_field: str) -> dict:
    """The upstream state_dict (numpy) of ``maskgit-vqgan-imagenet-f16-256.bin``."""
    from trainers import torchfile

    path = require_file(path, what=f"MaskGIT-VQGAN weights {CHECKPOINT_FILE}", config_field=config_field,
                        published=CHECKPOINT_URL)
    return torchfile.load_state_dict(path)


def workdir_params(workdir) -> dict:
    """EMA params (numpy) of the newest checkpoint of a ``maskgit_vqgan`` training run."""
    from trainers import checkpoint, decode, sharding
    from trainers.method import get_method

    config = checkpoint.read_config(workdir)
    if config.model.name != "maskgit_vqgan":
        raise ValueError(f"{workdir} holds a {config.model.name!r} run, not a maskgit_vqgan teacher")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, params, _ = decode.restore_params(workdir, ModelDef(get_method(config)), mesh)
    return jax.tree.map(np.asarray, params)


def import_maskgit_vqgan(state_dict, config) -> dict:
    return params_from_torch(state_dict, vqgan_kwargs(config.model.vqgan))


IMPORTERS = {"maskgit_vqgan": import_maskgit_vqgan}


# ----------------------------------------------------------------------------
# Golden fixture (kind "maskgit_vqgan")
# ----------------------------------------------------------------------------


def merge(kwargs, params) -> MaskGITVQGAN:
    return merge_module(layers.abstract_module(lambda rngs: MaskGITVQGAN(**kwargs, rngs=rngs)), params)


def fixture_check(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    conf, quant = meta["constructor"]["conf"], meta["constructor"]["quant"]
    if conf.get("dropout", 0.0):
        raise ValueError("the maskgit_vqgan fixture uses dropout; the port implements eval mode")
    kwargs = vqgan_kwargs({**conf, "z_channels": quant["embedding_dim"], "num_embeddings": quant["num_embeddings"]})
    if len(conf["channel_mult"]) != conf["num_resolutions"]:
        raise ValueError("fixture: num_resolutions must equal len(channel_mult)")
    model = merge(kwargs, params_from_torch(params, kwargs))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    x = jnp.asarray(inputs["pixel_values"]).transpose(0, 2, 3, 1)
    hidden = jax.jit(lambda x: model.encoder(x))(x)
    indices = model.quantize.nearest(hidden)
    z_q = model.quantize.lookup(indices)
    parts = quantizers.vq_losses(hidden, z_q, 1.0)
    loss = parts["commitment_loss"] + quant["commitment_cost"] * parts["codebook_loss"]
    codes = indices.reshape(indices.shape[0], -1)
    logits = jnp.asarray(inputs["logits"]).transpose(0, 2, 3, 1)
    soft = model.soft_latents(logits)
    return {"encoder_hidden": nchw(hidden), "quantized_states": nchw(z_q), "proxy_indices": np.asarray(codes),
            "quantizer_loss": np.asarray(loss),
            "decoded_from_codes": nchw(jax.jit(model.decode_codes)(codes)),
            "soft_quantized_states": nchw(soft),
            "decoded_from_logits": nchw(jax.jit(model.decoder)(soft))}


FIXTURE_CHECKS = {"maskgit_vqgan": fixture_check}


# ----------------------------------------------------------------------------
# Training a teacher (config.model.name == "maskgit_vqgan"): L2 on [0, 1] images + VQ loss
# ----------------------------------------------------------------------------


class MaskGITVQGANMethod(Method):
    """Trains the MaskGIT VQGAN with L2 reconstruction + ``vq_weight`` x its VQ loss.

    Upstream ships only the pretrained ImageNet weights (trained in JAX by MaskGIT with a GAN and
    perceptual losses, code not public); this objective exists so that One-D-Piece's stage 1 has a
    teacher on data without one (the embedded digits). Batches hold images in [-1, 1].
    """

    kind = "tokenizer"

    def __init__(self, config):
        super().__init__(config)
        self.kwargs = {**vqgan_kwargs(config.model.vqgan), "num_channels": int(config.data.channels)}

    def validate_config(self, config) -> None:
        validate_vqgan_config(config.model.vqgan, "config.model.vqgan")
        f = 2 ** (len(config.model.vqgan.channel_mult) - 1)
        if int(config.data.image_size) % f:
            raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by the VQGAN's "
                             f"downsampling factor {f}")

    def create_model(self, rngs: nnx.Rngs) -> MaskGITVQGAN:
        return MaskGITVQGAN(**self.kwargs, rngs=rngs)

    def loss(self, model, batch, rng):
        x = (batch["image"] + 1.0) / 2.0
        recon, info = model(x)
        rec = jnp.mean(jnp.square(recon - x))
        loss = rec + float(self.config.model.vq_weight) * info["quantizer_loss"]
        usage = quantizers.code_usage(info["indices"], model.quantize.codebook_size)
        return loss, {"loss": loss, "rec_loss": rec, "quantizer_loss": info["quantizer_loss"],
                      "code_usage": usage["usage"], "code_perplexity": usage["perplexity"]}

    def encode(self, model, images):
        return model.encode((images + 1.0) / 2.0)

    def decode(self, model, codes):
        return model.decode_codes(codes) * 2.0 - 1.0

    def reconstruct(self, model, images):
        return self.decode(model, self.encode(model, images))


def default_demo_vqgan() -> dict:
    """A small teacher for 32x32 digits: f8 (4x4 = 16 proxy codes), 32..64 channels."""
    return dict(hidden_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32, num_embeddings=1024)


