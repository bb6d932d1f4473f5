"""The `ngsd` command: generate, reflect, train-expert, train-nest, eval (entry point `ngsd=ngsd.cli:main`).

Light at import: this module and every subcommand's `cli` module import neither torch nor
transformers, so `ngsd --help` and argument errors answer at once; each command imports the heavy
modules in its run function, after its arguments are parsed and checked.

Every subcommand gets `--no-progress` and `--debug`. Progress bars go to stderr and only appear
when stderr is a terminal. A user error (a bad path, a value out of range, an unknown name) ends
with one line, `ngsd <command>: error: <what and how to fix it>`, and exit status 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .loading import MODEL_DTYPES, NO_PROGRESS_ENV, show_progress

# Modules that add a subcommand through `register_cli(subparsers)`; each must be light at import.
SUBCOMMAND_MODULES = (
    "ngsd.decoding.cli", "ngsd.risk.cli", "ngsd.risk.probe_cli", "ngsd.experts.training.cli", "ngsd.nest.cli",
    "ngsd.eval.cli",
)
USAGE_EXIT = 2


class UsageError(ValueError):
    """A command-line argument is wrong; the message names it and says how to fix it."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (unless None or an off switch); a description or epilog written on
    several lines (examples) keeps its line breaks, a one-line one is wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


class CommandParser(argparse.ArgumentParser):
    """No prefix matching of long options (`--max-new-token` is an error); errors are one line, status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """`--no-progress` and `--debug`, which every subcommand has (those it defines itself are kept)."""
    if "--no-progress" not in parser._option_string_actions:
        parser.add_argument("--no-progress", action="store_true",
                            help="no progress bars (they are shown only when stderr is a terminal anyway)")
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads for a command that runs a model in this process (checked with `check_threads`)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs 1 thread "
                        "is much faster)")


def add_dtype_option(parser: argparse.ArgumentParser, default: str | None = "float32",
                     help: str = "weight dtype of the model") -> None:
    """--dtype for a command that loads a model (one of `MODEL_DTYPES`)."""
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=default, help=help)


def wants_progress(args: argparse.Namespace) -> bool:
    """Progress bars for this run: not with --no-progress, and only when stderr is a terminal."""
    return not getattr(args, "no_progress", False) and show_progress()


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="ngsd",
        description="Neuron-guided safe decoding for Hugging Face models: a safety expert mixed into the "
        "base model's next-token distribution whenever a LIF neuron sees the two diverge.",
        epilog="Run 'ngsd COMMAND --help' for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    for sub in subparsers.choices.values():
        add_common_options(sub)
        sub.set_defaults(prog=sub.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        subparser = _subparser(parser, args.command)
        subparser.error(f"unrecognized arguments: {' '.join(extras)}{_suggestion(subparser, extras)}")
    return run_command(args.func, args, args.prog)


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, prog: str) -> int:
    """Run a parsed command; user errors become one line on stderr and exit status 2 (unless --debug).

    --no-progress also reaches bars deep in the library that are left on automatic, through
    $NGSD_NO_PROGRESS for the command's duration.
    """
    previous = os.environ.get(NO_PROGRESS_ENV)
    if getattr(args, "no_progress", False):
        os.environ[NO_PROGRESS_ENV] = "1"
    try:
        return int(func(args) or 0)
    except USER_ERRORS as error:
        if getattr(args, "debug", False) or not is_user_error(error):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is None:
            os.environ.pop(NO_PROGRESS_ENV, None)
        else:
            os.environ[NO_PROGRESS_ENV] = previous


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes), with a hint for foreign errors."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if not isinstance(error, UsageError) and len(lines) > 1:
        message += " (--debug shows the rest)"
    return message


# Errors that mean "the input was wrong", not "ngsd is broken": a missing or unreadable file or
# folder (OSError, incl. a hub id that cannot be fetched), a value out of range, an unknown name,
# a missing optional package (see `is_user_error`).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, ModuleNotFoundError)


def is_user_error(error: BaseException) -> bool:
    """A missing third-party package is the user's to install; a missing ngsd module is a bug."""
    if isinstance(error, ModuleNotFoundError):
        return bool(error.name) and not error.name.split(".")[0] == "ngsd"
    return isinstance(error, USER_ERRORS)


# ---------------------------------------------------------------------------------------------
# Checks shared by the subcommands (light: no torch), run before any model is loaded
# ---------------------------------------------------------------------------------------------


def check_range(flag: str, value: float | None, low: float, high: float = math.inf, what: str = "") -> None:
    """UsageError unless low <= value <= high (None passes: the option was not given)."""
    if value is None:
        return
    if not math.isfinite(value) or not low <= value <= high:
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise UsageError(f"{flag} must be {bound}{what}, got {value:g}")


MAX_THREADS = 1024  # torch takes an int32; far past any machine's cores


def check_threads(value: int | None) -> None:
    """--threads: 1..MAX_THREADS (None: torch's choice)."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise UsageError(f"--threads must be >= 1 and at most {MAX_THREADS} (torch CPU threads), got {value}")


def check_prompt_texts(prompts: Sequence[str]) -> None:
    """PROMPT arguments: at least one, none blank (numbered from 1, as a user counts them)."""
    if not prompts:
        raise UsageError("give at least one PROMPT, or --prompts-file FILE (one request per line)")
    from .decoding.prompt_text import check_prompt_text

    for i, prompt in enumerate(prompts, start=1):
        try:
            check_prompt_text(prompt, f"PROMPT {i}")
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None


def check_model(value: str | None, flag: str = "--model") -> None:
    """--model: the offline default, an existing checkpoint folder or a hub id (nothing is loaded)."""
    from .loading import check_model_path

    try:
        check_model_path(value)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag}: {error}") from error


def check_probe(value: str) -> None:
    """--probe: a risk-probe folder written by `ngsd train-probe` (nothing is loaded)."""
    from .risk.probe import PROBE_FILE, WEIGHTS_FILE, is_probe_folder

    if not is_probe_folder(Path(value).expanduser()):
        raise UsageError(f"--probe: {value!r} is not a risk-probe folder (needs {PROBE_FILE} and {WEIGHTS_FILE}); "
                         "pass a folder written by `ngsd train-probe --out DIR`, or leave --probe out for the "
                         "shipped one")


def check_expert(value: str) -> None:
    """--expert: 'shipped', a peft adapter folder, a model folder, or a hub id (nothing is loaded)."""
    fix = "pass a peft LoRA adapter folder, a model folder with the base's vocabulary, 'shipped' or 'nest'"
    from .experts.shipped import check_keyword_not_shadowing

    try:
        check_keyword_not_shadowing(value, "--expert")
    except ValueError as error:
        raise UsageError(str(error)) from error
    if value == "nest":
        from .nest.shipped import is_nest_delta, shipped_nest_path

        if not is_nest_delta(shipped_nest_path()):
            raise UsageError(f"--expert nest: the shipped NeST delta is missing at {shipped_nest_path()}; "
                             f"train it with `ngsd train-nest` or {fix}")
        return
    if value == "shipped":
        from .experts.shipped import shipped_expert_path

        path = shipped_expert_path()
        if not (path / "adapter_model.safetensors").is_file():
            raise UsageError(f"--expert shipped: the shipped expert is missing at {path}; reinstall ngsd or {fix}")
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("adapter_config.json", "config.json", "nest_delta.safetensors")):
            raise UsageError(f"--expert: {value!r} has no adapter_config.json, config.json or nest_delta.safetensors; {fix}")
        if not any((path / name).is_file() for name in ("adapter_config.json", "nest_delta.safetensors")):
            check_model(value, "--expert")  # a model folder: with its tokenizer
        return
    if path.exists():
        raise UsageError(f"--expert: {value!r} is a file, not a folder; {fix}")
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise UsageError(f"--expert: expert path {value!r} does not exist; {fix}")
    from .loading import check_model_path, is_default_model

    if is_default_model(value):
        raise UsageError(f"--expert: {value!r} names the default base model itself, which would guard nothing; {fix}")
    try:  # a missing path or a typo (of 'shipped' too) is refused here, not sent to the hub
        check_model_path(value, known=("shipped", "nest"))
    except (OSError, ValueError) as error:
        raise UsageError(f"--expert: {error}" + ("" if "did you mean" in str(error) else f"; {fix}")) from None


def check_data_dir(data_dir: str | None) -> None:
    """The data folder a training command reads must exist before the model loads."""
    from .data import DataNotFoundError, resolve_data_dir

    try:
        resolve_data_dir(data_dir)
    except DataNotFoundError as error:
        raise UsageError(f"--data-dir: {error}" if data_dir is not None else str(error)) from error


def check_output_folder(flag: str, value: str | None, what: str = "", *, model: str | None = None,
                        model_flag: str = "--model") -> None:
    """An output folder option: UsageError when the path exists and is not a folder, cannot be created, or is
    the folder of the model the run reads (`model`: None is the default model; None `value` passes)."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {value!r} is a file; pass a folder{what}")
    model_folder = _local_model_folder(model)
    if model_folder is not None and path.resolve() == model_folder:
        # an adapter written beside config.json is applied by every later load of that folder; folded weights
        # replace the base's own
        raise UsageError(f"{flag}: {value!r} is the folder of the model this run reads ({model_flag}); writing there "
                         f"would change the base model every later load of it gets; pass another folder{what}")
    _check_creatable(flag, path)


def _local_model_folder(model: str | None) -> Path | None:
    from .loading import default_cache_dir, is_default_model

    if model is None or is_default_model(model):
        return default_cache_dir().resolve()
    folder = Path(model).expanduser()
    return folder.resolve() if folder.is_dir() else None


def _check_creatable(flag: str, path: Path) -> None:
    """The first existing folder on the way to `path` is a writable folder, so the run's output can be written
    (found before the model loads, not after the answers are computed)."""
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag}: cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write {str(path)!r}: no write permission in {str(ancestor)!r}")


def check_plot_file(value: str | None) -> None:
    """--plot: a .png file name, and matplotlib installed."""
    if value is None:
        return
    if Path(value).suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG: give a file name ending in .png, got {value!r}")
    if Path(value).expanduser().is_dir():
        raise UsageError(f"--plot: {value!r} is a folder; give a file name ending in .png")
    _check_creatable("--plot", Path(value).expanduser())
    from .textplot import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as error:
        raise UsageError(f"--plot: {error}") from error


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _suggestion(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    known = [s for action in parser._actions for s in action.option_strings]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=")[0], known, n=1)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
