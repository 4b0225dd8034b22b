"""What `launch.py` does: read the command line and the config, check every input, then run.

    python launch.py --config configs/train.py[:preset] [--config.section.field=value ...]
        [--workdir W] [--accept_config_change]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

`--config path[:preset]` names a config file defining `get_config(preset)`; each
`--config.a.b=v` (or `--config.a.b v`) then sets one existing field, its text read as the
field's type (int, float, bool, str, tuple; a dict literal for a section), as
ml_collections' config flags do. The config is locked: a field it does not have is an error
that names the close matches. `--config.model.name=X` switches the model: the model section
becomes X's defaults (the previous model's fields go) before the other `--config.model.*`
overrides apply, wherever they stand on the command line.

Every error in the user's input (the config file, an override, a field's value, the data,
the workdir, a changed config on relaunch, unreadable checkpoints) is printed as one line
`error: ...` naming the problem and the fix, with exit status 2 (SCALING_DEBUG=1 raises it
instead, with its traceback). The config, the data sources and the workdir are all checked
before anything is written: a run that fails them leaves its workdir as it was.

The first launch into a workdir records its config (WORKDIR/config.json). A relaunch
whose config differs in any field but the ones in RUNTIME_FIELDS prints the differing fields
and stops, because resuming would no longer reproduce one uninterrupted run; with
`--accept_config_change` it goes on and records the new config.
"""
from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from typing import Any, NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import tuple_parser

from scaling import _env, parallel, rundir

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config>[_<preset>]).")
flags.DEFINE_bool("accept_config_change", False,
                  "Relaunch a workdir with a config that differs from the one it was started with.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
app.define_help_flags()

# Fields that change how a launch executes, not what it computes (batches are a function of
# (seed, step), whatever the loader, the number of decode threads or processes, or grid workers).
# Where the state lives (mesh.*, sharding.*) changes rounding only, as the device count does,
# and a checkpoint restores onto any mesh: a relaunch may move a run to other devices. The eval
# batch changes no result; the memory settings only matter through the microbatch split they
# choose (train.grad_accum_steps), which is compared.
RUNTIME_FIELDS = ("grid.worker", "grid.num_workers", "grid.poll_s", "grid.heartbeat_s",
                  "grid.stale_after_s", "data.workers", "data.loader", "train.progress_bar",
                  "train.eval_batch_size", "train.auto_accumulate", "train.device_memory_gb",
                  "mesh.data", "mesh.fsdp", "sharding.rules", "sharding.fsdp_min_size")
_MAX_SHOWN = 8  # differing fields listed in a config-change error


def fail(error: BaseException | str) -> NoReturn:
    """Prints `error: <message>` on one line and exits with status 2 (SCALING_DEBUG=1:
    raises the exception instead)."""
    if os.environ.get("SCALING_DEBUG") == "1" and isinstance(error, BaseException):
        raise error
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- command line
def split_config_args(args: list[str]) -> tuple[str | None, list[tuple[str, str | None]], list[str]]:
    """Separates `--config X` and the `--config.a.b=v` overrides from the other flags.

    Returns (config argument or None, [(path, text)] in command-line order, other args). An
    override without `=` takes the next argument as its text unless that is a `--` flag;
    otherwise its text is None (a bare boolean, `--config.data.flip`). `--noconfig.a.b`
    gives 'false'.
    """
    config, overrides, rest = None, [], []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.lstrip("-").partition("=")
        dashed = arg.startswith("-")
        if dashed and name == "config":
            if not eq:
                if i + 1 == len(args):
                    raise ValueError("--config needs a value: --config configs/train.py[:preset].")
                value, i = args[i + 1], i + 1
            config = value
        elif dashed and name.startswith(("config.", "noconfig.")):
            path = name.split(".", 1)[1]
            if name.startswith("no"):
                value = "false"
            elif not eq:
                value = None
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
            overrides.append((path, value))
        else:
            rest.append(arg)
        i += 1
    return config, overrides, rest


def parse_flags(argv: list[str]) -> tuple[str, list[tuple[str, str | None]]]:
    """Parses launch.py's command line (argv[0] is the program): absl parses the plain flags
    (--workdir, ...; FLAGS), and the config argument and overrides are returned."""
    config, overrides, rest = split_config_args(list(argv[1:]))
    FLAGS.unparse_flags()
    try:
        extra = FLAGS([argv[0] if argv else "launch.py", *rest])
    except flags.Error as e:
        raise ValueError(f"{e}; see python launch.py --help.") from None
    if len(extra) > 1:
        raise ValueError(f"unexpected argument {extra[1]!r}; launch.py takes only flags "
                         "(--config FILE[:preset], --config.a.b=v, --workdir W, ...).")
    if not config:
        raise ValueError("--config is required: e.g. python launch.py --config configs/train.py "
                         "--workdir runs/train.")
    return config, overrides


def default_workdir(config_arg: str) -> str:
    path, _, preset = config_arg.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{stem}_{preset}" if preset else stem)


# --------------------------------------------------------------------------- config file
def _config_files_near(path: str) -> list[str]:
    """Config files (defining get_config) beside `path` and in ./configs."""
    found = set()
    for folder in {os.path.dirname(path) or ".", "configs"}:
        if os.path.isdir(folder):
            for f in os.listdir(folder):
                full = os.path.normpath(os.path.join(folder, f))
                if f.endswith(".py") and os.path.isfile(full):
                    with open(full, errors="replace") as fh:
                        if "def get_config" in fh.read():
                            found.add(full)
    return sorted(found)


def _load_module(path: str, where: str):
    name = "launch_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{where}: syntax error at line {e.lineno}: {e.msg}; fix the file.") from e
    except Exception as e:  # the config's own code (an import, a typo): name it, no traceback
        raise ValueError(f"{where}: loading the file raised {type(e).__name__}: {e}; "
                         "fix the file.") from e
    return module


def load_config_file(config_arg: str) -> ml_collections.ConfigDict:
    """`get_config(preset)` of the file in `config_arg` ('path[:preset]'), locked."""
    path, colon, preset = config_arg.partition(":")
    where = f"--config {config_arg}"
    if not os.path.isfile(path):
        files = _config_files_near(path)
        close = difflib.get_close_matches(path, files, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"config files: {', '.join(files)}." if files else "give a config file's path.")
        raise FileNotFoundError(f"{where}: no such file {path!r}; {hint}")
    module = _load_module(path, where)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"{where}: {path} defines no get_config(arg); it is not a config file.")
    presets = getattr(module, "PRESETS", None)
    if colon and presets is not None and preset not in presets:
        close = difflib.get_close_matches(preset, presets, n=1)
        hint = f"did you mean :{close[0]}? " if close else ""
        raise ValueError(f"{where}: unknown preset {preset!r}; {hint}the presets of {path} are "
                         f"{', '.join(':' + p for p in presets)}.")
    try:
        config = get_config(preset) if colon else get_config()
    except Exception as e:  # a preset it refuses, or a bug in the file
        raise ValueError(f"{where}: get_config raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{where}: get_config returned {type(config).__name__}, not an "
                         "ml_collections.ConfigDict.")
    return config.lock()


# --------------------------------------------------------------------------- overrides
def _leaf_paths(config: Any, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, path + ".") if isinstance(value, ml_collections.ConfigDict) else [path]
    return paths


def _unknown_field(config: Any, path: str, section: Any, parent: str, key: str) -> ValueError:
    close = [f"{parent}{k}" for k in difflib.get_close_matches(key, list(section.keys()), n=3, cutoff=0.6)]
    close += [p for p in _leaf_paths(config) if p.rsplit(".", 1)[-1] == key and p not in close]
    where = f"section {parent[:-1]!r}" if parent else "the config"
    if close:
        hint = f"did you mean {', '.join('--config.' + p for p in close[:4])}?"
    else:
        hint = f"its fields are: {', '.join(section.keys())}."
    return ValueError(f"--config.{path}: {where} has no field {key!r}; {hint}")


def _parse(path: str, text: str | None, current: Any, kind: type) -> Any:
    """The override text of field `path` read as its type `kind`, as ml_collections' config
    flags read it."""
    flag = f"--config.{path}"
    shown = str(current).lower() if isinstance(current, bool) else repr(current)
    example = f"e.g. {flag}={shown}" if current is not None else ""
    if text is None:
        if kind is bool:
            return True
        raise ValueError(f"{flag} needs a value: {flag}=VALUE{f' ({example})' if example else ''}.")
    try:
        if kind is bool:
            return flags.BooleanParser().parse(text)
        if kind is int:
            return flags.IntegerParser().parse(text)
        if kind is float:
            return flags.FloatParser().parse(text)
        if kind is str:
            return text
        if kind is tuple:
            return tuple_parser.TupleParser().parse(text)
        if issubclass(kind, ml_collections.ConfigDict):
            value = _literal(text)
            if not isinstance(value, dict):
                raise ValueError("not a dict")
            return ml_collections.ConfigDict(value)
    except ValueError:
        names = {bool: "true or false", int: "an integer", float: "a number",
                 tuple: "a tuple such as '(1, 2)'"}
        if kind in names:
            raise ValueError(f"{flag}={text!r}: {path} takes {names[kind]}"
                             f"{f'; {example}' if example else ''}.") from None
        raise ValueError(f"{flag}={text!r}: {path} is a section; set its fields "
                         f"({flag}.FIELD=VALUE) or give a dict literal.") from None
    return _literal(text)  # a field that is None by default takes any Python literal


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def set_field(config: Any, path: str, text: str | None) -> None:
    """Sets the existing field `path` ('a.b.c') of the locked `config` from override text."""
    keys = path.split(".")
    if not all(keys):
        raise ValueError(f"--config.{path}: not a field path; write --config.section.field=VALUE.")
    section, parent = config, ""
    for key in keys[:-1]:
        if key not in section:
            raise _unknown_field(config, path, section, parent, key)
        section, parent = section[key], f"{parent}{key}."
        if not isinstance(section, ml_collections.ConfigDict):
            raise ValueError(f"--config.{path}: {parent[:-1]} is a value, not a section; "
                             f"set it with --config.{parent[:-1]}=VALUE.")
    key = keys[-1]
    if key not in section:
        raise _unknown_field(config, path, section, parent, key)
    current = section[key]
    value = _parse(path, text, current, section.get_type(key))
    try:
        section[key] = value
    except TypeError as e:
        raise ValueError(f"--config.{path}={text!r}: {e}") from None
    if isinstance(value, ml_collections.ConfigDict):
        value.lock()


def switch_model(config: Any, name: str, image_size_set: bool) -> None:
    """`--config.model.name=X`: the model section becomes X's defaults (the registry's
    `default_model_config`) and, unless the user set `data.image_size`, the input resolution
    becomes X's. A no-op when the config already trains X."""
    from scaling.models import default_model_config
    from scaling.train import resolve_image_size

    if config.model.get("name") == name:
        return
    try:
        config.model = default_model_config(name).lock()
    except ValueError as e:
        raise ValueError(f"--config.{e}") from None
    if isinstance(config.get("data"), ml_collections.ConfigDict) and "image_size" in config.data:
        resolve_image_size(config, image_size_set)


def apply_overrides(config: Any, overrides: list[tuple[str, str | None]]) -> None:
    """Applies `--config.*` overrides to the locked `config`: `model.name` first (a model
    switch), then the others in command-line order; the last of repeated paths wins."""
    ordered = dict(overrides)
    if "model.name" in ordered and isinstance(config.get("model"), ml_collections.ConfigDict):
        name = ordered.pop("model.name")
        if not name:
            raise ValueError("--config.model.name needs a model name, e.g. --config.model.name=resnet18.")
        switch_model(config, name, image_size_set="data.image_size" in ordered)
    for path, text in ordered.items():
        set_field(config, path, text)


def load_config(config_arg: str, overrides: list[tuple[str, str | None]] = ()) -> ml_collections.ConfigDict:
    """The locked config of `--config config_arg` with the command line's overrides applied."""
    config = load_config_file(config_arg)
    apply_overrides(config, list(overrides))
    return config


# --------------------------------------------------------------------------- workdir
def check_workdir(workdir: str) -> None:
    """The workdir is a directory, or can be created as one."""
    if os.path.exists(workdir):
        if not os.path.isdir(workdir):
            raise ValueError(f"--workdir {workdir} is a file, not a directory; give a new or "
                             "existing run directory.")
        if not os.access(workdir, os.W_OK):
            raise ValueError(f"--workdir {workdir} is not writable; give a directory you can write.")
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--workdir {workdir} cannot be created: {parent} is "
                         f"{'a file' if not os.path.isdir(parent) else 'not writable'}.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(saved: dict, config: dict) -> list[str]:
    """'path: old -> new' for every field (but RUNTIME_FIELDS) that differs between two
    configs given as JSON dicts."""
    old, new = _flatten(saved), _flatten(config)
    absent = "(absent)"
    return [f"{p}: {json.dumps(old[p]) if p in old else absent} -> "
            f"{json.dumps(new[p]) if p in new else absent}"
            for p in sorted(set(old) | set(new))
            if p not in RUNTIME_FIELDS and old.get(p, absent) != new.get(p, absent)]


def check_relaunch(config: Any, workdir: str, accept_change: bool) -> bool:
    """Compares `config` with the one `workdir` was started with. Returns whether `config`
    is to be recorded: a workdir without a record (a new one, or one started before records
    existed), or an accepted change. Raises ValueError listing the differing fields when they
    differ and `accept_change` is False."""
    saved = rundir.read_json(os.path.join(workdir, rundir.CONFIG))
    if saved is None:
        return True
    changes = config_changes(saved, json.loads(config.to_json_best_effort()))
    if not changes:
        return False
    shown = "; ".join(changes[:_MAX_SHOWN])
    more = f"; and {len(changes) - _MAX_SHOWN} more" if len(changes) > _MAX_SHOWN else ""
    if not accept_change:
        if config.get("experiment") == "eval":  # an evaluation has nothing to resume
            raise ValueError(
                f"--workdir {workdir} holds the evaluation of another config ({shown}{more}). "
                "Use a new --workdir, or pass --accept_config_change to replace its eval.json.")
        raise ValueError(
            f"--workdir {workdir} was started with another config ({shown}{more}); resuming "
            "with this one would not reproduce one uninterrupted run. Relaunch with the "
            "recorded config, use a new --workdir, or pass --accept_config_change.")
    log.warning("--accept_config_change: continuing %s with a changed config: %s%s",
                workdir, shown, more)
    return True


# --------------------------------------------------------------------------- launch
def _configure_logging() -> None:
    # Our progress lines at INFO; libraries (Orbax, TF) only at WARNING and above.
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("scaling", "experiments"):
        logging.getLogger(name).setLevel(logging.INFO)


def launch(config: Any, workdir: str, *, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           accept_config_change: bool = False) -> dict:
    """Checks `config` (fields, data sources, model), the workdir and the recorded config,
    then runs the experiment. Nothing is written into `workdir` before every check passed."""
    import jax

    import experiments
    from scaling.train import Diverged

    try:
        parallel.initialize_distributed(coordinator_address, num_processes, process_id)
    except Exception as e:  # a wrong address or count: say so, no traceback
        fail(f"multi-host start failed ({type(e).__name__}: {e}); check --coordinator_address, "
             "--num_processes and --process_id.")
    _env.enable_compilation_cache()
    try:
        check_workdir(workdir)
        exp = experiments.get(config.get("experiment", "train"))
        exp.validate(config, jax.device_count())
        record = check_relaunch(config, workdir, accept_config_change)
    except (ValueError, OSError) as e:
        fail(e)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        if record:
            rundir.write_config(workdir, config)
    log.info("%s on %d device(s) x %d process(es) -> %s", config.get("experiment", "train"),
             jax.device_count(), jax.process_count(), workdir)
    try:
        result = exp.run(config, workdir)
    except (ValueError, FileNotFoundError, Diverged) as e:
        fail(e)
    if jax.process_index() == 0:
        print({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    return result


def main(argv: list[str]) -> dict:
    """launch.py with command line `argv` (argv[0]: the program name)."""
    try:
        config_arg, overrides = parse_flags(argv)
        config = load_config(config_arg, overrides)
    except (ValueError, OSError) as e:
        fail(e)
    _configure_logging()
    return launch(config, FLAGS.workdir or default_workdir(config_arg),
                  coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                  process_id=FLAGS.process_id, accept_config_change=FLAGS.accept_config_change)
