"""TokenFlow tokenizer configs (configs/tokenflow_{clipb,vitamin,siglip}.py), upstream ByteFlow-AI/TokenFlow
``tokenflow/scripts/train_vq*.sh`` and ``vq_train.py`` defaults (notes: shared/methods/tokenflow_code.md).

Variants (comma-separated ``arg``): "" (the paper's recipe: joint training), "decoder" (the
decoder-only fine-tune, --finetune_decoder, from the joint stage's workdir ``config.model.init_from``),
"enhanced" (the 256-channel, 4-res-block pixel decoder, --enhanced_decoder; with "decoder" it trains
from scratch on the frozen rest of ``init_from``), "demo" (the embedded digits on a laptop CPU, with
the frozen student initialisation as teacher), "released" (import/evaluation of
``tokenflow_clipb_32k_enhanced.pt`` / ``tokenflow_siglip_32k.pt``: no teacher needed), "256" (clipb only:
upstream's ``--infer_interpolate``, the 224-px tokenizer used at 256 px as the t2i model and the
reconstruction evaluation do: the 14 x 14 position tables of the CLIP student and of ``decoder_vqkd`` kept as
trained and resized bicubically, DINO's scale factor (16 + 0.1) / 14, to 16 x 16 in every forward; the scale
list gains the never-trained 16, 817 tokens):

    python -m trainers.main --config=configs/tokenflow_clipb.py --workdir=J \
        --config.model.teacher_path=ViT-B-16.pt --config.data.dir=...
    python -m trainers.main --config=configs/tokenflow_clipb.py:decoder,enhanced --workdir=E \
        --config.model.init_from=J --config.model.teacher_path=ViT-B-16.pt

    python -m trainers.convert import tokenflow tokenflow_clipb_32k_enhanced.pt \
        --config=configs/tokenflow_clipb.py:enhanced,released --out=DIR
    python -m trainers.convert import tokenflow tokenflow_siglip_32k.pt \
        --config=configs/tokenflow_siglip.py:released --out=DIR
    python -m trainers.convert import tokenflow tokenflow_clipb_32k_enhanced.pt \
        --config=configs/tokenflow_clipb.py:enhanced,released,256 --out=DIR256   # the t2i tokenizer

    python -m trainers.main --config=configs/tokenflow_clipb.py:demo --workdir=TOK
    python -m trainers.main --config=configs/tokenflow_clipb.py:demo,decoder --workdir=TOK2 \
        --config.model.init_from=TOK
"""

from __future__ import annotations

import ml_collections

from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167
# teacher -> (image size, semantic width, depth, heads, patch, scales, teacher feature dim, architecture
# extras) as vq_model.py (SigLIP: the 27-layer tower, of which TokenFlow uses hidden_states[-2]).
TEACHERS = {
    "clipb_224": (224, 768, 12, 12, 16, (1, 2, 4, 6, 8, 10, 12, 14), 512, {}),
    "vitamin_xlarge_256": (256, 1152, 32, 16, 16, (1, 2, 4, 6, 8, 10, 12, 14, 16), 1152,
                           dict(stem_width=192, stage_widths=(192, 384), stage_depths=(2, 4))),
    "siglip_384": (384, 1152, 27, 16, 14, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27), 1152,
                   dict(mlp_dim=4304)),
}
# the teachers' published checkpoints (config.model.teacher_path)
TEACHER_FILES = {"clipb_224": "OpenAI ViT-B-16.pt (clip.load('ViT-B/16'))",
                 "vitamin_xlarge_256": "jienengchen/ViTamin-XL-256px model.safetensors (timm)",
                 "siglip_384": "google/siglip-so400m-patch14-384 model.safetensors"}


def get_config(teacher: str, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    unknown = set(variants) - {"demo", "decoder", "enhanced", "released", "256"}
    if unknown:
        raise ValueError(f"TokenFlow config variants: demo, decoder, enhanced, released, 256; got {arg!r}")
    if "256" in variants and (teacher != "clipb_224" or "demo" in variants):
        raise ValueError(f"TokenFlow config variant '256' (--infer_interpolate) is clipb's, without demo; got "
                         f"{teacher}:{arg}")
    size, width, depth, heads, patch, scales, teacher_dim, extra = TEACHERS[teacher]
    c = common.base()
    m = c.model
    m.name = "tokenflow"
    m.teacher = teacher  # the frozen teacher (and student init); "student_init" in the demo
    m.teacher_path = ""  # the teacher's checkpoint (TEACHER_FILES); needed when semantic_weight > 0
    m.semantic = ml_collections.ConfigDict(dict(width=width, depth=depth, heads=heads, **extra))
    m.patch_size = patch
    m.teacher_dim = teacher_dim  # CLIP: patch tokens @ visual.proj (512); ViTamin/SigLIP: 1152
    # Pixel branch: LlamaGen VQ-16.
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels = 128, (1, 1, 2, 2, 4), 2, 256
    m.enhanced_decoder = "enhanced" in variants
    m.enhanced_ch, m.enhanced_num_res_blocks = 256, 4
    m.codebook_size = 32768  # released checkpoints (ModelArgs default 16384, CLI 8192)
    m.semantic_code_dim, m.pixel_code_dim = 32, 8
    m.commitment_cost = 0.25
    m.entropy_loss_ratio = 0.0
    m.distance_weight = 1.0  # w_dis: hard-coded 1.0 upstream (a config field here)
    m.scales = scales
    m.scale_drop_prob = 0.1  # one non-first scale dropped in training
    m.vqkd = ml_collections.ConfigDict(dict(width=width, depth=3, heads=12))
    # the grid of the position tables (0: data.image_size // patch_size); "256" keeps clipb's trained 14
    m.position_grid = 0
    m.stage = "decoder" if "decoder" in variants else "joint"
    m.decoder_finetune_start = -1  # joint stage: step from which only the decoder trains (-1 = never)
    m.init_from = ""  # a previous stage's workdir (upstream --vq-ckpt): the decoder stages start from the joint one
    m.loss = ml_collections.ConfigDict(dict(
        l2_weight=1.0, perceptual_weight=1.0, vgg_path="", lpips_lin_path="", semantic_weight=1.0,
        disc_weight=0.5, disc_start=20_000, disc_ndf=64, disc_layers=3))
    c.data.name = "imagenet2012"
    c.data.image_size = size
    c.data.channels = 3
    c.data.num_classes = 1000
    c.batch_size = 32  # train_vq.sh's --global-batch-size default (the paper does not state its batch)
    c.num_steps = 100 * IMAGENET_TRAIN_IMAGES // c.batch_size  # 100 epochs
    o = c.optim
    o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip = 1e-4, 0.9, 0.95, 0.0, 1.0  # Adam, no schedule
    o.schedule = "constant"
    c.ema_rate = 0.9999
    c.checkpoint_every = 5000
    if "256" in variants:
        m.position_grid = size // patch
        c.data.image_size = 256
        m.scales = scales + (256 // patch,)
    if "released" in variants:
        m.loss.semantic_weight = 0.0
        m.loss.perceptual_weight = 0.0
    if "demo" in variants:
        common.embedded_demo_data(c, image_size=32)
        m.teacher = "student_init"
        m.semantic = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4))
        m.teacher_dim = 64
        m.patch_size = 8
        m.ch, m.ch_mult, m.num_res_blocks, m.z_channels = 32, (1, 1, 2, 2), 1, 32
        m.enhanced_ch, m.enhanced_num_res_blocks = 64, 2
        m.codebook_size = 512
        m.scales = (1, 2, 3, 4)
        m.vqkd = ml_collections.ConfigDict(dict(width=64, depth=1, heads=4))
        m.loss.perceptual_weight = 0.0  # LPIPS-VGG16 needs RGB; the digits are grey
        m.loss.disc_start, m.loss.disc_ndf, m.loss.disc_layers = 200, 16, 2
        c.batch_size, c.num_steps = 32, 400
        o.lr = 1e-3
        c.ema_rate = 0.99
        c.checkpoint_every = c.num_steps
        c.num_grid_samples = 16
        c.eval.num_samples = 500  # reconstructions scored: MNIST-feature rFID (eval/domain.py)
    if "decoder" in variants:
        # upstream resumes the joint run's step counter (no --finetune in the scripts): the GAN is on
        m.loss.disc_start = 0
    return c
