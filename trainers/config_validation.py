"""Config checks that run before anything is compiled; each error names the field.

Unknown keys and wrong types in ``--config.a.b=value`` overrides are refused by
ml_collections while the flags are parsed (the field is named there); the
checks below cover values and their consistency with the machine.
"""

from __future__ import annotations

import jax

from trainers import optim, sharding
from trainers.errors import ConfigError, RunError  # noqa: F401 (defined in a leaf module: no import cycles)


def _require(cond: bool, message: str):
    if not cond:
        raise ConfigError(message)


def validate(config, *, num_devices: int | None = None, num_processes: int | None = None,
             check_data: bool = True) -> None:
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes

    for field in ("model", "data", "mesh", "optim", "sample", "eval"):
        _require(field in config, f"config.{field} is missing (start configs from configs.common.base())")
    from trainers.method import METHODS, get_method

    _require(config.model.name in METHODS,
             f"config.model.name={config.model.name!r} is not a registered method; known: {sorted(METHODS)}")

    # ---- mesh and batch
    try:
        mesh_shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data_parallel = mesh_shape[0] * mesh_shape[1]
    _require(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
    _require(config.batch_size % data_parallel == 0,
             f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
             f"{data_parallel} (config.mesh.data x config.mesh.fsdp = {mesh_shape[0]} x {mesh_shape[1]})")
    _require(config.batch_size % num_processes == 0,
             f"config.batch_size={config.batch_size} is not divisible by the {num_processes} processes")

    # ---- steps and bookkeeping
    for field in ("num_steps", "log_every", "checkpoint_every"):
        _require(int(config[field]) > 0, f"config.{field}={config[field]} must be positive")
    for field in ("keep_last", "keep_every", "sample_every", "num_grid_samples"):
        _require(int(config[field]) >= 0, f"config.{field}={config[field]} must be >= 0")

    # ---- optimizer
    o = config.optim
    _require(o.schedule in optim.SCHEDULES, f"config.optim.schedule={o.schedule!r}: must be one of {optim.SCHEDULES}")
    _require(o.lr > 0, f"config.optim.lr={o.lr} must be positive")
    _require(0 <= o.min_lr <= o.lr, f"config.optim.min_lr={o.min_lr} must be in [0, config.optim.lr={o.lr}]")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"config.optim.b1={o.b1}, b2={o.b2} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.grad_clip >= 0, f"config.optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    _require(0 <= o.warmup_steps <= config.num_steps,
             f"config.optim.warmup_steps={o.warmup_steps} must be in [0, config.num_steps={config.num_steps}]")
    if o.schedule == "warmup_constant_cosine":
        _require(o.warmup_steps + o.constant_steps <= config.num_steps,
                 f"config.optim.warmup_steps + config.optim.constant_steps = {o.warmup_steps + o.constant_steps} "
                 f"exceeds config.num_steps={config.num_steps}")
    _require(0 <= config.ema_rate < 1, f"config.ema_rate={config.ema_rate} must be in [0, 1)")
    _require(config.compute_dtype in ("float32", "bfloat16"),
             f"config.compute_dtype={config.compute_dtype!r}: must be 'float32' or 'bfloat16'")

    # ---- data and method
    if check_data:
        from trainers import data

        _as_config_error(data.validate, config)
        from trainers import decode  # the paired tokenizer's weights (missing file: named with its source)

        _as_config_error(decode.validate, config)
    _as_config_error(get_method(config).validate_config, config)


def _as_config_error(check, config) -> None:
    """Run a module's own config check; its ValueErrors become ConfigErrors (same message)."""
    try:
        check(config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def set_override(config, dotted_key: str, value: str) -> None:
    """``config.a.b = value`` with the type of the existing field; unknown keys are refused."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for i, p in enumerate(parents):
        if p not in node:
            raise ConfigError(f"config.{'.'.join(parents[:i + 1])} does not exist")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"config.{dotted_key} does not exist")
    old = node[leaf]
    try:
        if isinstance(old, bool):
            new = {"true": True, "false": False}[value.lower()]
        elif isinstance(old, (int, float, str)):
            new = type(old)(value)
        else:
            raise ConfigError(f"config.{dotted_key} cannot be set from the command line")
    except (ValueError, KeyError):
        raise ConfigError(f"config.{dotted_key}={value!r}: expected {type(old).__name__}") from None
    node[leaf] = new


def check_npz(path: str, field: str) -> None:
    """``path`` is a readable, complete .npz (its zip directory reads); else a ConfigError naming both."""
    import os
    import zipfile

    if not os.path.isfile(path):
        raise ConfigError(f"{field}={path!r}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{field}={path!r} is not a complete .npz ({type(e).__name__}: {e}); "
                          "the file is truncated or of another format: write it again") from None


def check_run_files(config) -> None:
    """Every file a training run reads after step 1, checked before it (existence, readability, archive
    headers; nothing is loaded): the Inception weights and the reference statistics of the evaluation."""
    e = config.get("eval")
    if e is None or not int(e.get("num_samples", 0)):
        return
    if e.get("inception_weights"):
        from eval import inception

        try:
            inception.check_weights_file(e.inception_weights)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config.eval.inception_weights={e.inception_weights!r}: {err}") from None
    if e.get("ref"):
        check_npz(e.ref, "config.eval.ref")


# ============================================================================ command-line errors
# Every CLI of the zoo (trainers.main, trainers.sample, trainers.convert) reports a user error as one
# line naming the field or the file and what to do, without a traceback; --verbose keeps tracebacks.


def one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _argv_value(argv, name: str) -> str | None:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def explain_flag_error(e: BaseException, argv) -> str:
    """A flag-parsing failure (ml_collections config_flags, absl) as one line naming the flag."""
    text = str(e)
    config_arg = _argv_value(argv, "config")
    if isinstance(e, OSError) or "earlier failure to load" in text or "Failed loading config file" in text:
        if config_arg is not None:
            import re

            cause = re.findall(r"\[Errno \d+\] ([^:]+)", text)
            return (f"--config={config_arg}: cannot load the config file ({cause[-1] if cause else one_line(e)}); "
                    "give a file under configs/, e.g. --config=configs/dit_s.py:demo")
    if isinstance(e, AttributeError) or isinstance(e.__context__, KeyError):
        key = text.strip("\"'")
        for a in argv:
            name = a.split("=", 1)[0]
            parts = name[2:].split(".")
            if name.startswith("--config.") and key in parts[1:]:
                parent = ".".join(parts[:parts.index(key, 1)])
                return f"{name}: {parent} has no field {key!r}; check the spelling against {config_arg or 'the config'}"
        return f"unknown config field {key!r}; check the spelling of the --config.* flags"
    if "Error whilst parsing config file" in text:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"--config={config_arg}: {last}"
    return one_line(e)


USER_ERRORS = (ConfigError, RunError, OSError)


def cli_error_line(e: BaseException, argv) -> str:
    """The one line a CLI prints for a user error."""
    if "earlier failure to load" in str(e):  # ml_collections defers a config file's load error to first use
        return f"error: {explain_flag_error(e, argv)}"
    prefix = "config error" if isinstance(e, ConfigError) else "error"
    kind = "" if isinstance(e, (ConfigError, RunError)) else f"{type(e).__name__}: "
    return f"{prefix}: {kind}{one_line(e)}"


def run_cli(main) -> None:
    """``absl.app.run(main)`` with one-line user errors (exit 2), a failed checkpoint save exiting at once
    (exit 4; orbax's stuck background threads would otherwise hold the exit for 300 s), --verbose."""
    import os
    import sys

    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "show the traceback of user errors (config, files, workdir)")

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - every parse failure is the user's input
            if "--verbose" in argv:
                raise
            print(f"error: {explain_flag_error(e, argv)}", file=sys.stderr, flush=True)
            sys.exit(2)

    def wrapped(argv):
        from trainers.checkpoint import SaveError

        try:
            return main(argv)
        except SaveError as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            if flags.FLAGS.verbose:
                import traceback

                traceback.print_exc()
            sys.stdout.flush()
            os._exit(4)
        except USER_ERRORS as e:
            if flags.FLAGS.verbose:
                raise
            print(cli_error_line(e, sys.argv), file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(wrapped, flags_parser=parse)
