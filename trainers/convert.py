"""One command for every model in the zoo: import upstream checkpoints, check golden fixtures.

    python -m trainers.convert check PATH/TO/NAME.npz
    python -m trainers.convert import KIND SRC.pt --out=DIR [--config=configs/x.py:arg --config.a=b]

``check`` reads ``NAME.json`` beside the ``.npz``, looks up its ``kind``,
builds the model from the JSON's recorded configuration, converts
``param/``/``buffer/`` with the same converter ``import`` uses, runs the call on
the ``in/`` arrays and compares every ``out/`` array with
``max|ours - ref| <= 1e-4 * max(1, max|ref|)`` (integer outputs exactly).

A kind lives in the module that defines its network. That module provides
``FIXTURE_CHECKS[kind](meta, params, buffers, inputs) -> {out_name: array}``
and, for checkpoints a user can import, ``IMPORTERS[kind](state_dict, config)
-> params`` (a pure dict for the method's model).
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np

# kind -> module that implements it (imported lazily).
KINDS: dict[str, str] = {
    "dit": "models.dit",
    "sit": "models.dit",
    "dit_diffusion": "models.dit",
    "lit": "models.lit",
    "dydi_lit": "models.lit",
    "meanflow": "models.meanflow", "splitmeanflow_sit": "models.splitmeanflow",
    "xar_net": "models.xar",
    "xar_kvcache_step": "models.xar",
    "kl16_vae": "tokenizers.kl_vae",
    "kl16": "tokenizers.kl_vae",
    "sd_vae": "tokenizers.kl_vae",
    "xar": "models.xar",
    "tokenbridge_quant": "pallas_kernels.dimwise_quant",
    "tokenbridge_backbone": "models.tokenbridge",
    "tokenbridge_head": "models.tokenbridge",
    "tokenbridge": "models.tokenbridge",
    "one_d_piece": "tokenizers.one_d_piece",
    "maskgit_vqgan": "tokenizers.maskgit_vqgan",
    "titok_maskgit": "models.maskgit", "maskgit": "models.maskgit",
    "llamagen_gpt": "models.llamagen",
    "retok_tokenizer": "tokenizers.retok", "retok": "tokenizers.retok", "retok_gpt": "tokenizers.retok",
    "tokenflow_vq": "tokenizers.tokenflow", "tokenflow_pixel": "tokenizers.tokenflow", "tokenflow": "tokenizers.tokenflow",
}

RELATIVE_TOLERANCE = 1e-4


def _module_for(kind: str):
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    return importlib.import_module(KINDS[kind])


def load_fixture(npz_path: str | Path):
    """(meta, params, buffers, inputs, outputs) of a golden fixture."""
    npz_path = Path(npz_path)
    json_path = npz_path.with_suffix(".json")
    if not npz_path.exists():
        raise FileNotFoundError(f"fixture not found: {npz_path}")
    if not json_path.exists():
        raise FileNotFoundError(f"fixture metadata not found: {json_path} (must sit beside {npz_path.name})")
    meta = json.loads(json_path.read_text())
    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "buffer": {}, "in": {}, "out": {}}
    for key, value in _load_npz(npz_path).items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise ValueError(f"{npz_path}: array {key!r} is not under param/, buffer/, in/ or out/")
        groups[group][name] = value
    return meta, groups["param"], groups["buffer"], groups["in"], groups["out"]


def compare(name: str, ours, ref) -> tuple[bool, str]:
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        return False, f"{name}: shape {ours.shape} != reference {ref.shape}"
    if np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_:
        mismatches = int(np.sum(ours.astype(np.int64) != ref.astype(np.int64)))
        return mismatches == 0, f"{name}: {mismatches} of {ref.size} integer entries differ"
    if np.isinf(ref).any():  # e.g. +inf confidences of fixed tokens: infinities must sit at the same places
        if not np.array_equal(np.isinf(ours) & (np.sign(ours) == np.sign(ref)), np.isinf(ref)):
            return False, f"{name}: infinite entries differ from the reference's"
        finite = ~np.isinf(ref)
        ours, ref = ours[finite], ref[finite]
    err = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    bound = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(ref))) if ref.size else 0.0)
    ok = bool(np.isfinite(err) and err <= bound)
    return ok, f"{name}: max|ours-ref| = {err:.3e} (bound {bound:.3e})"


def check(npz_path: str | Path, verbose: bool = True) -> bool:
    meta, params, buffers, inputs, outputs = load_fixture(npz_path)
    kind = meta.get("kind")
    module = _module_for(kind)
    checks = getattr(module, "FIXTURE_CHECKS", {})
    if kind not in checks:
        raise SystemExit(f"{KINDS[kind]} has no fixture check for kind {kind!r}")
    ours = checks[kind](meta, params, buffers, inputs)
    all_ok = True
    for name in sorted(outputs):
        if name not in ours:
            all_ok = False
            if verbose:
                print(f"FAIL {name}: not produced by the port")
            continue
        ok, line = compare(name, ours[name], outputs[name])
        all_ok &= ok
        if verbose:
            print(("ok   " if ok else "FAIL ") + line)
    if verbose:
        print(f"{Path(npz_path).name} (kind {kind}): {'PASS' if all_ok else 'FAIL'}")
    return all_ok


def import_checkpoint(kind: str, src: str, out: str, config) -> Path:
    """Convert an upstream checkpoint into an orbax checkpoint in workdir ``out``."""
    from trainers import checkpoint, torchfile, train

    module = _module_for(kind)
    importers = getattr(module, "IMPORTERS", {})
    if kind not in importers:
        raise SystemExit(f"kind {kind!r} has no checkpoint importer (known: {sorted(importers)})")
    # A module may read its own formats (e.g. safetensors, legacy torch pickles).
    loader = getattr(module, "load_state_dict", torchfile.load_state_dict)
    try:
        state_dict = loader(src)
    except (ValueError, EOFError, pickle.UnpicklingError) as e:
        from trainers.config_validation import RunError, one_line

        msg = one_line(e)
        raise RunError(msg if str(src) in msg else f"{src}: {msg}") from e
    try:
        params = importers[kind](state_dict, config)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        from trainers.config_validation import RunError, one_line

        keys = sorted(state_dict)[:4] if isinstance(state_dict, dict) else []
        raise RunError(f"{src} does not fit kind {kind!r} with this --config ({type(e).__name__}: {one_line(e)}); "
                       f"is it another model's checkpoint? Its {len(state_dict)} tensors start with {keys}") from e
    rest = None
    if isinstance(params, tuple):  # (params, non-trainable state), e.g. LiT's frozen DiT teacher
        params, rest = params
    return checkpoint.write_imported(out, config, train.state_from_params(config, params, rest), source=str(src))


def prepare_workdir(out: str, *, replace: bool) -> None:
    """An import writes only into an empty (or new) workdir; ``replace`` first moves what is there into
    ``OUT/replaced-<time>/`` (kept, never deleted)."""
    import time

    from trainers.config_validation import RunError

    out_path = Path(out)
    if not out_path.exists():
        return
    if not out_path.is_dir():
        raise RunError(f"--out={out} is a file, not a workdir directory")
    entries = [p for p in out_path.iterdir() if p.name != "LOCK"]
    if not entries:
        return
    if not replace:
        raise RunError(f"--out={out} is not empty ({', '.join(sorted(p.name for p in entries)[:5])}); "
                       "importing would overwrite its config and checkpoints. Choose a new --out, or pass "
                       "--replace to move its contents aside into replaced-<time>/ first")
    aside = out_path / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in entries:
        if not p.name.startswith("replaced-"):
            p.rename(aside / p.name)
    print(f"moved the previous contents of {out} to {aside}", flush=True)


def _load_npz(npz_path: Path) -> dict:
    import zipfile

    try:
        with np.load(npz_path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        from trainers.config_validation import RunError

        raise RunError(f"{npz_path} is not a complete .npz ({type(e).__name__}: {e}); it is truncated or "
                         "damaged: copy it again") from None


def main(argv: list[str]) -> int:
    """The CLI: user errors (missing or damaged files, a checkpoint of another model, a non-empty --out)
    are one line and exit 2; --verbose shows their traceback."""
    from trainers.config_validation import USER_ERRORS, cli_error_line, explain_flag_error

    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        return _main(argv)
    except USER_ERRORS as e:
        if verbose:
            raise
        print(cli_error_line(e, argv), file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - flag parsing (ml_collections raises many types)
        from absl import flags

        if verbose or not isinstance(e, (flags.Error, AttributeError)):
            raise
        print(f"error: {explain_flag_error(e, argv)}", file=sys.stderr, flush=True)
        return 2


def _main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        results = [check(p) for p in argv[1:]]
        return 0 if all(results) else 1
    if len(argv) >= 3 and argv[0] == "import":
        from absl import flags
        from ml_collections import config_flags

        kind, src = argv[1], argv[2]
        flags.DEFINE_string("out", None, "workdir to write the converted checkpoint into", required=True)
        flags.DEFINE_bool("replace", False, "move a non-empty --out's contents aside instead of refusing")
        config_flags.DEFINE_config_file("config", None, "config of the model the checkpoint is for")
        flags.FLAGS([sys.argv[0]] + argv[3:])
        config = flags.FLAGS.config
        if config is None:
            raise SystemExit("import needs --config=configs/<model>.py[:variant] describing the checkpoint's model")
        from trainers import config_validation

        config_validation.validate(config, check_data=False)  # the data need not exist to convert
        from trainers import workdir_lock

        with workdir_lock.WorkdirLock(flags.FLAGS.out):  # no trainer may be writing there meanwhile
            prepare_workdir(flags.FLAGS.out, replace=flags.FLAGS.replace)
            path = import_checkpoint(kind, src, flags.FLAGS.out, config)
        print(f"wrote {path}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
