"""The LDM AutoencoderKL family: MAR's KL-16 and Stable Diffusion's VAE, with GAN training.

Network as in CompVis/latent-diffusion ``ldm/modules/diffusionmodules/model.py``
(copied by LTH14/mar and OliverRensu/xAR as ``models/vae.py``): a conv encoder
of ResNet blocks with one stride-2 conv per level, a mid block (ResNet,
single-head attention, ResNet), a 1x1 ``quant_conv`` to the moments of a
diagonal Gaussian; the decoder mirrors it with nearest-neighbour upsampling.
Layout: images and feature maps are NHWC here (upstream is NCHW); the
converters transpose.

Order of this file: building blocks, encoder/decoder, the autoencoder and its
posterior, checkpoint converters (MAR ``kl16.ckpt``, SD-VAE LDM ``.ckpt`` and
diffusers ``.safetensors``), the golden-fixture check, and the training method
(LDM's ``LPIPSWithDiscriminator`` objective with two optimizers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import layers
from trainers import sharding  # noqa: F401  (sets flax_always_shard_variable=False before any Param exists)
from trainers.method import Method, ModelDef
from tokenizers import losses

CONV_AXES = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")

# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


def conv(in_ch: int, out_ch: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding=None) -> nnx.Conv:
    """A torch-style Conv2d (explicit padding, bias) with logical axis names."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=stride, padding=pad, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # LDM Normalize(): GroupNorm(32, eps=1e-6, affine); exact two-pass variance for parity.
    return nnx.GroupNorm(
        channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


class ResnetBlock(nnx.Module):
    """norm1-swish-conv1-norm2-swish-conv2 plus a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_ch, groups, rngs)
        self.conv1 = conv(in_ch, out_ch, 3, rngs)
        self.norm2 = group_norm(out_ch, groups, rngs)
        self.conv2 = conv(out_ch, out_ch, 3, rngs)
        self.nin_shortcut = conv(in_ch, out_ch, 1, rngs) if in_ch != out_ch else None

    def __call__(self, x):
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = self.conv2(nnx.swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all h*w positions with 1x1-conv projections."""

    def __init__(self, ch: int, groups: int, rngs: nnx.Rngs):
        self.norm = group_norm(ch, groups, rngs)
        self.q = conv(ch, ch, 1, rngs)
        self.k = conv(ch, ch, 1, rngs)
        self.v = conv(ch, ch, 1, rngs)
        self.proj_out = conv(ch, ch, 1, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, h * w, c)
        k = self.k(y).reshape(b, h * w, c)
        v = self.v(y).reshape(b, h * w, c)
        attn = layers.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5)
        out = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    def __init__(self, ch: int, rngs: nnx.Rngs):
        # Upstream pads one zero row/column on the bottom/right only, then a 3x3 stride-2 conv.
        self.conv = conv(ch, ch, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.conv(x)


class Level(nnx.Module):
    """One resolution of the encoder (``down[i]``) or decoder (``up[i]``)."""

    def __init__(self, in_ch, out_ch, num_blocks, attn: bool, resample, groups, rngs):
        self.block = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, rngs) for j in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_ch, groups, rngs) for _ in range(num_blocks)] if attn else [])
        if resample == "down":
            self.downsample = Downsample(out_ch, rngs)
        elif resample == "up":
            self.upsample = Upsample(out_ch, rngs)

    def __call__(self, x):
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, ch: int, groups: int, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(ch, ch, groups, rngs)
        self.attn_1 = AttnBlock(ch, groups, rngs)
        self.block_2 = ResnetBlock(ch, ch, groups, rngs)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


# ----------------------------------------------------------------------------
# Encoder, decoder
# ----------------------------------------------------------------------------


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> (B, H/2^(L-1), W/2^(L-1), 2*z_channels)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels,
                 z_channels, double_z=True, norm_groups=32, rngs: nnx.Rngs):
        levels = len(ch_mult)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_in = conv(in_channels, ch, 3, rngs)
        # Attention placement depends on the constructor's nominal resolution, not the input size.
        self.down = nnx.List([
            Level(ch * in_mult[i], ch * ch_mult[i], num_res_blocks, (resolution >> i) in attn_resolutions,
                  "down" if i != levels - 1 else None, norm_groups, rngs)
            for i in range(levels)])
        top = ch * ch_mult[-1]
        self.mid = Mid(top, norm_groups, rngs)
        self.norm_out = group_norm(top, norm_groups, rngs)
        self.conv_out = conv(top, 2 * z_channels if double_z else z_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*2^(L-1), w*2^(L-1), out_ch). ``up[0]`` is the finest level, run last."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_ch,
                 z_channels, norm_groups=32, rngs: nnx.Rngs):
        levels = len(ch_mult)
        top = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, top, 3, rngs)
        self.mid = Mid(top, norm_groups, rngs)
        # Built coarse-to-fine (as upstream), stored fine-to-coarse so up[i] matches checkpoint keys.
        up = []
        block_in = top
        for i in reversed(range(levels)):
            up.insert(0, Level(block_in, ch * ch_mult[i], num_res_blocks + 1, (resolution >> i) in attn_resolutions,
                               "up" if i != 0 else None, norm_groups, rngs))
            block_in = ch * ch_mult[i]
        self.up = nnx.List(up)
        self.norm_out = group_norm(block_in, norm_groups, rngs)
        self.conv_out = conv(block_in, out_ch, 3, rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nnx.swish(self.norm_out(h)))


# ----------------------------------------------------------------------------
# The autoencoder and its posterior
# ----------------------------------------------------------------------------


def gaussian_parameters(moments):
    """LDM DiagonalGaussianDistribution: (mean, logvar clamped to [-30, 20], std) from (..., 2C) moments."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return mean, logvar, jnp.exp(0.5 * logvar)


def posterior_sample(moments, eps):
    mean, _, std = gaussian_parameters(moments)
    return mean + std * eps


def posterior_kl(moments):
    """KL(q || N(0, I)) summed over all latent elements, per example: (B,)."""
    mean, logvar, std = gaussian_parameters(moments)
    kl = 0.5 * (mean**2 + std**2 - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


class AutoencoderKL(nnx.Module):
    """encode: images (B, H, W, C) in [-1, 1] -> moments (B, h, w, 2*embed_dim); decode: z -> images."""

    def __init__(self, *, embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 enc_attn_resolutions=(16,), dec_attn_resolutions=(), resolution=256, in_channels=3,
                 out_ch=3, norm_groups=32, use_variational=True, rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.use_variational = use_variational
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.in_channels = in_channels
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=tuple(enc_attn_resolutions), resolution=resolution,
                               in_channels=in_channels, z_channels=embed_dim, norm_groups=norm_groups, rngs=rngs)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=tuple(dec_attn_resolutions), resolution=resolution,
                               out_ch=out_ch, z_channels=embed_dim, norm_groups=norm_groups, rngs=rngs)
        self.quant_conv = conv(2 * embed_dim, (2 if use_variational else 1) * embed_dim, 1, rngs)
        self.post_quant_conv = conv(embed_dim, embed_dim, 1, rngs)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x))
        if not self.use_variational:  # MAR: deterministic AE as a Gaussian with logvar 1 (std = e^0.5, unused)
            moments = jnp.concatenate([moments, jnp.ones_like(moments)], axis=-1)
        return moments

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, eps):
        """Reconstruction through a posterior sample with the given noise: (recon, moments)."""
        moments = self.encode(x)
        return self.decode(posterior_sample(moments, eps)), moments


def model_kwargs(model_config, channels: int | None = None) -> dict[str, Any]:
    """AutoencoderKL constructor arguments from ``config.model``."""
    m = model_config
    in_ch = int(channels if channels is not None else m.get("in_channels", 3))
    return dict(
        embed_dim=int(m.embed_dim), ch=int(m.ch), ch_mult=tuple(m.ch_mult), num_res_blocks=int(m.num_res_blocks),
        enc_attn_resolutions=tuple(m.enc_attn_resolutions), dec_attn_resolutions=tuple(m.dec_attn_resolutions),
        resolution=int(m.resolution), in_channels=in_ch, out_ch=in_ch, norm_groups=int(m.get("norm_groups", 32)),
        use_variational=bool(m.get("use_variational", True)))


def check_images(images, in_channels: int, downsample_factor: int, image_size: int | None = None) -> None:
    """Raise ValueError for images the tokenizer would silently encode wrong (shape, channels, range)."""
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(f"images must be (batch, height, width, channels) NHWC, got shape {shape}")
    _, h, w, c = shape
    if c != in_channels:
        raise ValueError(f"images have {c} channels (shape {shape}); this tokenizer takes {in_channels}"
                         " (is the array NCHW? it must be NHWC)")
    if h % downsample_factor or w % downsample_factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the tokenizer's downsampling factor {downsample_factor}")
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"images are {h}x{w}, expected {image_size}x{image_size}")
    if isinstance(images, jax.core.Tracer):
        return
    arr = np.asarray(images)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be float in [-1, 1], got dtype {arr.dtype} (uint8 images: x / 127.5 - 1)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"images must lie in [-1, 1], got range [{lo:.3f}, {hi:.3f}]")


# ----------------------------------------------------------------------------
# Checkpoint converters
# ----------------------------------------------------------------------------


def _set(tree: dict, path: list, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_ldm_state_dict(state_dict: dict[str, np.ndarray], expected=None) -> dict:
    """Pure params dict from an LDM-layout AutoencoderKL state_dict (MAR kl16, SD-VAE ``.ckpt``).

    Keys name our modules one to one (``encoder.down.0.block.1.conv2.weight``); conv
    kernels go (out, in, kh, kw) -> (kh, kw, in, out), GroupNorm ``weight`` -> ``scale``.
    With ``expected`` (the model's abstract pure params), missing and unexpected keys and
    shape mismatches raise.
    """
    params: dict = {}
    for key, value in state_dict.items():
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        value = np.asarray(value, np.float32)
        leaf = parts[-1]
        if leaf == "weight" and value.ndim == 4:
            parts[-1], value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 1:
            parts[-1] = "scale"
        elif leaf != "bias":
            raise ValueError(f"unexpected parameter {key!r} with shape {value.shape}")
        _set(params, parts, value)
    if expected is not None:
        _check_against(params, expected)
    return params


def _check_against(params, expected) -> None:
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = [f"{k}: {got[k]} vs model {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint does not fit the configured model: missing {missing[:8]} "
                         f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), "
                         f"shape mismatches {wrong[:8]} ({len(wrong)})")


def _diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """Rename one diffusers ``AutoencoderKL`` key to the LDM layout."""
    k = key
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", k)
    k = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", k)
    k = re.sub(r"\.mid_block\.attentions\.0\.", ".mid.attn_1.", k)
    k = re.sub(r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2.", k)
    k = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", k)
    # diffusers runs up_blocks coarse-to-fine; LDM stores up[0] as the finest level.
    k = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{num_levels - 1 - int(m.group(1))}.", k)
    k = re.sub(r"\.up\.(\d+)\.resnets\.(\d+)\.", r".up.\1.block.\2.", k)
    k = re.sub(r"\.up\.(\d+)\.upsamplers\.0\.", r".up.\1.upsample.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"\.attn_1\.group_norm\.", ".attn_1.norm.", k)
    for new, old in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"),
                     ("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn")):
        k = k.replace(f".attn_1.{old}.", f".attn_1.{new}.")
    return k


def ldm_state_dict_from_any(state_dict: dict[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """An SD-VAE state_dict in the LDM layout, from LDM ``.ckpt`` (bare or ``first_stage_model.``-prefixed,
    with or without ``loss.*``) or diffusers' ``diffusion_pytorch_model.safetensors``."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    keep = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(keep)}
    is_diffusers = any(".down_blocks." in k or ".mid_block." in k for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if is_diffusers:
            key = _diffusers_to_ldm_key(key, num_levels)
            if ".attn_1." in key and key.endswith(".weight") and np.ndim(value) == 2:
                value = np.asarray(value)[:, :, None, None]  # diffusers attention Linear == LDM 1x1 conv
        out[key] = value
    return out


def _abstract_params(config):
    method = KLVAEMethod(config)
    return ModelDef(method).abstract_params


def import_kl16(state_dict: dict[str, np.ndarray], config) -> dict:
    """MAR's ``kl16.ckpt`` (``{"model": state_dict}``, LDM layout; training-only ``loss.*`` keys dropped)."""
    sd = {k: v for k, v in state_dict.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    expected = nnx.to_pure_dict(_abstract_params(config))
    return params_from_ldm_state_dict(sd, expected)


def import_sd_vae(state_dict: dict[str, np.ndarray], config) -> dict:
    """Stable Diffusion's VAE from the LDM ``.ckpt`` or diffusers ``.safetensors`` layout."""
    sd = ldm_state_dict_from_any(state_dict, len(config.model.ch_mult))
    expected = nnx.to_pure_dict(_abstract_params(config))
    return params_from_ldm_state_dict(sd, expected)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A flat numpy state_dict from a torch ``.ckpt``/``.pth`` or a ``.safetensors`` file (no torch needed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path} (MAR kl16.ckpt: "
                                "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt; SD-VAE: "
                                "https://huggingface.co/stabilityai/sd-vae-ft-ema)")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    from trainers import torchfile

    return torchfile.load_state_dict(path)


IMPORTERS = {"kl16": import_kl16, "sd_vae": import_sd_vae}


# ----------------------------------------------------------------------------
# Golden fixture (kind "kl16_vae": OliverRensu/xAR models/vae.py)
# ----------------------------------------------------------------------------


def _fixture_model(meta) -> AutoencoderKL:
    enc = meta["constructor"]["Encoder"]
    dec = meta["constructor"]["Decoder"]
    top = meta["constructor"]["AutoencoderKL"]
    if enc.get("dropout", 0.0) or dec.get("dropout", 0.0):
        raise ValueError("fixture uses dropout; the port implements eval mode without dropout")
    return layers.abstract_module(lambda rngs: AutoencoderKL(
        embed_dim=top["embed_dim"], ch=enc["ch"], ch_mult=tuple(top["ch_mult"]), num_res_blocks=enc["num_res_blocks"],
        enc_attn_resolutions=tuple(enc["attn_resolutions"]), dec_attn_resolutions=tuple(dec["attn_resolutions"]),
        resolution=enc["resolution"], in_channels=enc["in_channels"], out_ch=dec["out_ch"],
        use_variational=top.get("use_variational", True), rngs=rngs))


def fixture_check_kl16_vae(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    abstract = _fixture_model(meta)
    expected = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    model = losses.merge_module(abstract, params_from_ldm_state_dict(params, expected))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    nhwc = lambda a: jnp.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
    moments = jax.jit(lambda x: model.encode(x))(nhwc(inputs["x"]))
    mean, logvar, std = gaussian_parameters(moments)
    sample = posterior_sample(moments, nhwc(inputs["eps"]))
    dec = jax.jit(lambda z: model.decode(z))(nhwc(inputs["z"]))
    return {"moments": nchw(moments), "mean": nchw(mean), "logvar": nchw(logvar), "std": nchw(std),
            "sample": nchw(sample), "dec": nchw(dec)}


FIXTURE_CHECKS = {"kl16_vae": fixture_check_kl16_vae}


# ----------------------------------------------------------------------------
# Training: LDM's LPIPSWithDiscriminator objective, generator and discriminator optimizers
# ----------------------------------------------------------------------------




def _discriminator(config, rngs: nnx.Rngs) -> losses.NLayerDiscriminator:
    lc = config.model.loss
    return losses.NLayerDiscriminator(in_channels=int(config.data.channels), ndf=int(lc.disc_ndf),
                                      n_layers=int(lc.disc_layers), rngs=rngs)


class KLVAEMethod(Method):
    """The KL-VAE tokenizer (config.model.name == "kl_vae").

    ``loss`` is the generator objective without the GAN term (for the plain
    one-optimizer loop); ``init_train_state``/``train_step`` train generator and
    PatchGAN discriminator together, as LDM's ``LPIPSWithDiscriminator`` does.
    """

    kind = "tokenizer"
    latent_type = "moments"  # encode() gives Gaussian posterior moments (trainers/decode.py contract)

    def __init__(self, config):
        super().__init__(config)
        self.kwargs = model_kwargs(config.model, config.data.channels)
        self.scale_factor = float(config.model.scale_factor)
        self.downsample_factor = 2 ** (len(self.kwargs["ch_mult"]) - 1)
        self._model_def = None
        self._lpips_params = None

    # -- the network and its interface
    def validate_config(self, config) -> None:
        m, lc = config.model, config.model.loss
        groups = int(m.get("norm_groups", 32))
        widths = {int(m.ch) * int(k) for k in m.ch_mult}
        if any(w % groups for w in widths):
            raise ValueError(f"config.model.ch={m.ch} with ch_mult={tuple(m.ch_mult)}: every width {sorted(widths)} "
                             f"must be divisible by config.model.norm_groups={groups} (GroupNorm)")
        if int(config.data.image_size) % self.downsample_factor:
            raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by the "
                             f"downsampling factor {self.downsample_factor} of ch_mult={tuple(m.ch_mult)}")
        if lc.rec_loss not in losses.RECONSTRUCTION:
            raise ValueError(f"config.model.loss.rec_loss={lc.rec_loss!r}: one of {sorted(losses.RECONSTRUCTION)}")
        if lc.disc_loss not in losses.DISCRIMINATOR_LOSSES:
            raise ValueError(f"config.model.loss.disc_loss={lc.disc_loss!r}: one of {sorted(losses.DISCRIMINATOR_LOSSES)}")
        if lc.gen_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"config.model.loss.gen_loss={lc.gen_loss!r}: one of hinge, non_saturating")
        if lc.perceptual_weight > 0:
            self.lpips_params()  # a missing VGG16 file fails here, before compilation

    def create_model(self, rngs: nnx.Rngs) -> AutoencoderKL:
        return AutoencoderKL(**self.kwargs, rngs=rngs)

    @property
    def model_def(self) -> ModelDef:
        if self._model_def is None:
            self._model_def = ModelDef(self)
        return self._model_def

    def check_images(self, images) -> None:
        check_images(images, self.kwargs["in_channels"], self.downsample_factor)

    def encode(self, model: AutoencoderKL, images) -> jax.Array:
        """images (B, H, W, C) in [-1, 1] -> posterior moments (B, H/f, W/f, 2*embed_dim)."""
        self.check_images(images)
        return model.encode(images)

    def decode(self, model: AutoencoderKL, latents) -> jax.Array:
        """Scaled latents (B, h, w, embed_dim), as generators see them -> images (B, H, W, C)."""
        return model.decode(latents / self.scale_factor)

    def reconstruct(self, model: AutoencoderKL, images) -> jax.Array:
        """Images through the posterior mean: what the loop logs as reconstructions."""
        mean, _, _ = gaussian_parameters(self.encode(model, images))
        return model.decode(mean)

    def lpips_params(self) -> dict:
        """Frozen LPIPS-VGG16 params, loaded once from config.model.loss.vgg_path."""
        if self._lpips_params is None:
            lc = self.config.model.loss
            self._lpips_params = losses.load_lpips_params(lc.vgg_path, lc.get("lpips_lin_path", ""))
        return self._lpips_params

    # -- the objective
    def _noise(self, rng, x):
        f = self.downsample_factor
        return jax.random.normal(rng, (x.shape[0], x.shape[1] // f, x.shape[2] // f, self.kwargs["embed_dim"]), x.dtype)

    def _nll_kl(self, model, x, eps, lpips_params):
        """LDM's weighted NLL (summed over pixels, averaged over the batch) and KL; plus the reconstruction."""
        lc = self.config.model.loss
        recon, moments = model(x, eps)
        rec = losses.RECONSTRUCTION[lc.rec_loss](x, recon)
        metrics = {"rec_loss": jnp.mean(rec)}
        if lc.perceptual_weight > 0:
            p = losses.merge_module(losses.lpips_abstract(), lpips_params)(jax.lax.stop_gradient(x), recon)
            rec = rec + lc.perceptual_weight * p[:, None, None, None]
            metrics["p_loss"] = jnp.mean(p)
        # LDM's logvar is a loss-module parameter left out of the optimizer, i.e. a constant.
        nll = rec / jnp.exp(lc.logvar_init) + lc.logvar_init
        nll_loss = jnp.sum(nll) / x.shape[0]
        kl = jnp.mean(posterior_kl(moments))
        metrics.update(nll_loss=nll_loss, kl_loss=kl)
        return nll_loss, kl, recon, metrics

    def loss(self, model, batch, rng):
        """Generator objective without the GAN term: NLL (L1 [+ LPIPS]) + kl_weight * KL."""
        x = batch["image"]
        eps = self._noise(rng, x)
        lpips_params = self.lpips_params() if self.config.model.loss.perceptual_weight > 0 else None
        nll_loss, kl, _, metrics = self._nll_kl(model, x, eps, lpips_params)
        loss = nll_loss + self.config.model.loss.kl_weight * kl
        return loss, {**metrics, "loss": loss}

    # -- GAN training: a pure train state and step with two optimizers
    def _disc_abstract(self):
        return layers.abstract_module(lambda rngs: _discriminator(self.config, rngs))

    def init_train_state(self, rng: jax.Array) -> dict:
        """The GAN train state, a pytree of pure dicts, optax states and arrays (orbax-saveable).

        Keys: ``step``; generator ``params``, ``ema_params``, ``opt_state``, ``rest`` (as the
        plain loop's state); ``disc`` = {``params``, ``batch_stats``, ``opt_state``};
        ``lecam`` = {``real``, ``fake``} EMAs of the discriminator's logits; ``lpips`` the
        frozen LPIPS-VGG16 params ({} when perceptual_weight == 0).
        """
        from trainers.optim import make_optimizer

        k_gen, k_disc = jax.random.split(rng)
        params, rest = self.model_def.init(k_gen)
        tx, _ = make_optimizer(self.config)
        lpips = self.lpips_params() if self.config.model.loss.perceptual_weight > 0 else {}
        zero = jnp.zeros((), jnp.float32)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params, "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
            "rest": rest,
            "disc": losses.discriminator_state(_discriminator(self.config, nnx.Rngs(k_disc)), tx),
            "lecam": {"real": zero, "fake": zero},
            "lpips": jax.tree.map(jnp.asarray, lpips),
        }

    def train_state_shardings(self, abstract_state, mesh) -> dict:
        """NamedShardings for ``init_train_state``'s pytree: params (and their EMA and optimizer
        moments) by their logical axis names; scalars and step counters replicated."""
        from trainers import sharding as sh
        from trainers.train import opt_state_shardings

        repl = sh.replicated(mesh)
        gen = self.model_def.param_shardings(mesh)
        _, lp, _ = nnx.split(losses.lpips_abstract(), nnx.Param, ...)
        lpips = nnx.to_pure_dict(sh.state_shardings(lp, mesh)) if abstract_state["lpips"] else {}
        return {
            "step": repl, "params": gen, "ema_params": gen,
            "opt_state": opt_state_shardings(abstract_state["opt_state"], gen, repl),
            "rest": self.model_def.rest_shardings(mesh),
            "disc": losses.discriminator_shardings(self._disc_abstract(), abstract_state["disc"]["opt_state"], mesh),
            "lecam": {"real": repl, "fake": repl}, "lpips": lpips,
        }

    def train_step(self, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        """One generator update and one discriminator update on ``batch["image"]`` (B, H, W, C).

        Generator: NLL + kl_weight * KL + d_weight * disc_factor * G-loss, with LDM's adaptive
        d_weight from the gradient norms at the decoder's last conv (one forward, two
        backward passes). Discriminator: disc_factor * (D-loss + lecam_weight * LeCAM) on the
        real images and the reconstructions of this step's forward pass (LDM/Lightning
        recomputes them after the generator update; reusing them saves a forward pass).
        """
        from trainers.optim import make_optimizer

        lc = self.config.model.loss
        tx, schedule = make_optimizer(self.config)
        x = batch["image"]
        step = state["step"]
        eps = self._noise(rng, x)
        disc_abstract = self._disc_abstract()
        disc_factor = losses.adopt_weight(lc.disc_factor, step, lc.disc_start)

        def forward(params):
            model = self.model_def.merge(params, state["rest"])
            nll_loss, kl, recon, metrics = self._nll_kl(model, x, eps, state["lpips"] or None)
            disc = losses.merge_module(disc_abstract, state["disc"]["params"], state["disc"]["batch_stats"])
            g_loss = losses.generator_loss(disc(recon, train=True), lc.gen_loss)
            return (nll_loss + lc.kl_weight * kl, g_loss), (recon, metrics)

        (base_loss, g_loss), vjp, (recon, metrics) = jax.vjp(forward, state["params"], has_aux=True)
        one, zero = jnp.ones_like(base_loss), jnp.zeros_like(g_loss)
        (base_grads,) = vjp((one, zero))
        (g_grads,) = vjp((zero, one))
        if lc.adaptive_weight:
            last = ("decoder", "conv_out", "kernel")
            d_weight = losses.adaptive_weight(_get(base_grads, last), _get(g_grads, last)) * lc.disc_weight
        else:
            d_weight = jnp.asarray(lc.disc_weight, jnp.float32)
        gan_scale = d_weight * disc_factor
        grads = jax.tree.map(lambda a, b: a + gan_scale * b, base_grads, g_grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rate = self.config.ema_rate
        ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state["ema_params"], params)

        recon = jax.lax.stop_gradient(recon)
        lecam = state["lecam"]
        disc_loss_fn = losses.DISCRIMINATOR_LOSSES[lc.disc_loss]

        def d_objective(disc_params):
            disc = losses.merge_module(disc_abstract, disc_params, state["disc"]["batch_stats"])
            logits_real = disc(x, train=True)  # separate calls: BatchNorm sees real and fake batches apart
            logits_fake = disc(recon, train=True)
            d_loss = disc_loss_fn(logits_real, logits_fake)
            reg = losses.lecam_regularization(logits_real, logits_fake, lecam["real"], lecam["fake"])
            total = disc_factor * (d_loss + lc.lecam_weight * reg)
            stats = nnx.to_pure_dict(nnx.split(disc, nnx.Param, ...)[2])
            return total, (stats, logits_real, logits_fake, d_loss, reg)

        (d_total, (stats, logits_real, logits_fake, d_loss, reg)), d_grads = jax.value_and_grad(
            d_objective, has_aux=True)(state["disc"]["params"])
        d_updates, d_opt_state = tx.update(d_grads, state["disc"]["opt_state"], state["disc"]["params"])
        disc_params = optax.apply_updates(state["disc"]["params"], d_updates)
        new_lecam = {"real": losses.lecam_update(lecam["real"], logits_real, lc.lecam_decay),
                     "fake": losses.lecam_update(lecam["fake"], logits_fake, lc.lecam_decay)}

        loss = base_loss + gan_scale * g_loss
        metrics = {**metrics, "loss": loss, "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor,
                   "d_loss": d_loss, "d_total": d_total, "lecam": reg, "logits_real": jnp.mean(logits_real),
                   "logits_fake": jnp.mean(logits_fake), "grad_norm": optax.tree.norm(grads),
                   "d_grad_norm": optax.tree.norm(d_grads), "lr": schedule(step)}
        new_state = {**state, "step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state,
                     "disc": {"params": disc_params, "batch_stats": stats, "opt_state": d_opt_state},
                     "lecam": new_lecam}
        return new_state, metrics

def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree
