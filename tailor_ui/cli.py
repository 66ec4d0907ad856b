"""Command line: the same operations as the dashboard, for scripts.

Every user error ends as one line on stderr and a non-zero exit; outputs appear only
when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from tailor_ui.errors import UserError

EXIT_USER_ERROR = 2


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 where a "
                   "model is loaded; streamed outputs keep the checkpoint's dtypes)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (accelerate device_map)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.pt checkpoints (pickle can run code: trusted sources only)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code shipped with a checkpoint (trusted sources only)")


def _merge_options(p: argparse.ArgumentParser) -> None:
    """The settings of a merge (`tailor`, and `compare` when it tailors on the fly): one flag
    per declared knob (`tailor_ui.settings.KNOBS`). A flag left out stays out of the
    namespace, so `_settings` sees only what the user gave."""
    from tailor_ui.settings import KNOBS

    for name in KNOBS:
        _knob_flag(p, name)
    from tailor_ui.calibration import CALIBRATION_LIMIT, calibration_batches

    p.add_argument("--calib-limit", type=int, default=CALIBRATION_LIMIT, help="examples used per calibration set")
    p.add_argument("--batch-size", type=int, default=_keyword_defaults(calibration_batches)["batch_size"])
    _anchor_options(p)


def _knob_flag(p: argparse.ArgumentParser, name: str) -> None:
    """One knob's flag, from its declaration: type, default, words and readers in its help."""
    from tailor_ui.settings import default, value_type

    flag = _flag(name)
    value = default(name)
    if value_type(name) is bool:  # a switch that turns the default off (or on)
        p.add_argument(flag, dest=name, action="store_const",
                       const=not value, default=argparse.SUPPRESS,
                       help=("turn off: " if value else "") + _knob_help(name, None))
        return
    if name == "compensation":  # the default depends on --anchor: `_default_compensation`
        value = "anchored with --anchor, else " + str(value)
    p.add_argument(flag, dest=name, type=_knob_parser(name), default=argparse.SUPPRESS,
                   metavar=name.upper(), help=_knob_help(name, value))


def _knob_parser(name: str):
    from tailor_ui.settings import value_type

    kind = value_type(name)
    if kind is str:
        return str

    def number(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None

    return number


def _knob_help(name: str, value: Any, words: bool = True) -> str:
    """A knob's help: what it is, its words, which methods read it and its default."""
    from tailor_ui.settings import KNOBS, choices, readers

    spec = KNOBS[name]
    parts = [spec.help]
    if words and choices(name):
        parts.append(" | ".join(f"{w}: {spec.words[w]}" if w in spec.words else w for w in choices(name)))
    if not spec.common:
        parts.append("read by " + ", ".join(readers(name)))
    if value is not None:
        parts.append(f"default {value}")
    return "; ".join(parts).replace("%", "%%")


def _anchor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--anchor", action="append", type=Path, default=[], metavar="FILE.jsonl",
                   help="original-task calibration JSONL (repeatable): examples of the skills the "
                        "base should keep, for --compensation anchored (not your evaluation sets)")


SET_HELP = ("PATH[:caption|vqa], repeatable: a .jsonl (images beside it), a .zip holding one, a "
            "datasets folder (save_to_disk or data files) or a hub id (owner/name); without :TASK "
            "the first row decides (a question: vqa)")


def _set_options(p: argparse.ArgumentParser, *, roles: tuple[str, ...], required: bool) -> None:
    """Evaluation sets by role (`--original-set`, `--target-set`) and how data set sources
    are read."""
    helps = {"original": "original-task set (a skill the base model had): ",
             "target": "target-task set (what fine-tuning taught): "}
    for role in roles:
        p.add_argument(f"--{role}-set", f"--{role}", dest=role, action="extend", nargs="+",
                       required=required, default=[], metavar="SET", help=helps[role] + SET_HELP)
    _source_options(p)


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test",
                   help="split of datasets sources, optionally sliced: test, test[:500] (default test)")
    p.add_argument("--columns", default="",
                   help="columns of datasets sources: image=COL,question=COL,answers=COL (defaults: "
                        "image; question if there is one, question= for none; answers, a string or a "
                        "list of strings)")


def _in_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in-memory", action="store_true",
                   help="load every model in full instead of streaming tensor by tensor (data-free "
                        "methods, apply) or reading the base module by module and the fine-tuned "
                        "weights lazily (tailor)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def _training_options(p: argparse.ArgumentParser) -> None:
    """One flag per fine-tuning method option that declares a help (`option_help`), its type
    that of its default (none: a path); a flag left out stays out of the namespace."""
    from tailor_ui.training.registry import TRAINING_METHODS, accepted_options

    for name, value in accepted_options().items():
        owners = [(method, cls) for method, cls in TRAINING_METHODS.items()
                  if name in cls.options and name in cls.option_help]
        if owners:
            p.add_argument(_flag(name), dest=name, type=Path if value is None else type(value),
                           default=argparse.SUPPRESS,
                           help=f"{owners[0][1].option_help[name]} ({', '.join(m for m, _ in owners)}"
                                + ("" if value is None else f"; default {value}") + ")")


def _keyword_defaults(fn) -> dict[str, Any]:
    """A library function's keyword defaults, which its flags show and keep."""
    import inspect

    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _axis_flag(p: argparse.ArgumentParser, name: str, default: str | None) -> None:
    """A knob a sweep or a search varies: comma-separated values, described by its declaration."""
    p.add_argument(_flag(name), default=default, metavar=name.upper() + "S",
                   help="comma-separated: " + _knob_help(name, default))


def build_parser() -> argparse.ArgumentParser:
    from tailor_ui.adapter_fit import ADAPTER_RANK
    from tailor_ui.calibration import CALIBRATION_LIMIT
    from tailor_ui.demo.sets import DEMO_SEED
    from tailor_ui.evaluation import search
    from tailor_ui.evaluation.evaluate import evaluate
    from tailor_ui.evaluation.generate import answer_one
    from tailor_ui.evaluation.sweep import SWEEP_GRID, SWEEP_METHODS, format_numbers, sweep
    from tailor_ui.methods import REGISTRY
    from tailor_ui.settings import Settings, default
    from tailor_ui.training.continual import ContinualMethod
    from tailor_ui.training.finetune import finetune
    from tailor_ui.training.registry import TRAINING_METHODS

    parser = _Parser(prog="python -m tailor_ui",
                     description="Model Tailor Studio: undo forgetting in fine-tuned MLLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="what fine-tuning changed, per layer and module")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _model_options(p)

    p = sub.add_parser("tailor", help="build a patch (and optionally the tailored model)")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True, action="append",
                   help="fine-tuned model; repeat for multi-task (one --calib each)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--method", default=Settings.method, help=" | ".join(REGISTRY))
    p.add_argument("--calib", action="append", type=Path, default=[],
                   help="target-task JSONL (one per --finetuned)")
    _merge_options(p)
    p.add_argument("--save-model", action="store_true", help="also write DIR/model/")
    p.add_argument("--no-patch", action="store_true",
                   help="with --save-model: write only the model (and report.json), no patch")
    p.add_argument("--adapter-out", type=Path, default=None, metavar="DIR",
                   help="also write the tailored delta as a PEFT LoRA adapter (a rank --adapter-rank "
                        "SVD fit per changed linear; its error goes in report.json)")
    p.add_argument("--adapter-rank", type=int, default=ADAPTER_RANK, help="rank of --adapter-out's fit")
    p.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                   help="publish the model (with --save-model) or else the patch folder, with its card, "
                        "to this Hub repository (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    _in_memory_option(p)
    _model_options(p)

    p = sub.add_parser("apply", help="rebuild the tailored model from base + patch")
    p.add_argument("--base", required=True)
    p.add_argument("--patch", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    _in_memory_option(p)
    _model_options(p)

    p = sub.add_parser("compare", help="base, fine-tuned and tailored answers side by side")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    tailored = p.add_mutually_exclusive_group()
    tailored.add_argument("--patch", type=Path, default=None, help="the tailored model: base + this patch")
    tailored.add_argument("--calib", type=Path, default=None,
                          help="target-task JSONL: tailor on the fly with Model Tailor (--keep, --alpha, ...)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--image", type=Path, default=None, help="one image")
    prompts.add_argument("--data", type=Path, default=None, help="a JSONL: every row's image and question")
    p.add_argument("--question", default=None, help="with --image (default: caption the image)")
    p.add_argument("--limit", type=int, default=None, help="with --data: only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=_keyword_defaults(answer_one)["max_new_tokens"])
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    _merge_options(p)
    _model_options(p)

    p = sub.add_parser("eval", help="score one model on caption or VQA sets")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="one set: " + SET_HELP)
    p.add_argument("--task", default=None, choices=["caption", "vqa"],
                   help="how --data is scored (default: its :TASK, else its first row)")
    _set_options(p, roles=("original", "target"), required=False)
    p.add_argument("--out", required=True, type=Path,
                   help="results JSON (with --original-set / --target-set: one entry per set)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=_keyword_defaults(evaluate)["batch_size"])
    p.add_argument("--max-new-tokens", type=int, default=_keyword_defaults(evaluate)["max_new_tokens"])
    _model_options(p)

    p = sub.add_parser("sweep", help="forgetting table: base, fine-tuned, every method x setting")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--calib", type=Path, default=None, help="target-task JSONL (for tailor)")
    _set_options(p, roles=("original", "target"), required=True)
    p.add_argument("--methods", default=",".join(SWEEP_METHODS), help=" | ".join(REGISTRY))
    for name in ("keep", "alpha", "lam"):
        _axis_flag(p, name, ",".join(f"{v:g}" for v in SWEEP_GRID[name]))
    _axis_flag(p, "hessians", default("hessians"))
    _axis_flag(p, "compensation", None)
    _anchor_options(p)
    _axis_flag(p, "anchor_weight", f"{default('anchor_weight'):g}")
    _axis_flag(p, "scope", default("scope"))
    p.add_argument("--limit", type=int, default=None, help="examples per evaluation set")
    p.add_argument("--calib-limit", type=int, default=CALIBRATION_LIMIT)
    p.add_argument("--batch-size", type=int, default=_keyword_defaults(sweep)["batch_size"])
    p.add_argument("--out", required=True, type=Path, help="table CSV")
    _model_options(p)

    p = sub.add_parser("find-settings", help="search which patch to use (Model Tailor's settings and the "
                       "data-free baselines): original retention vs target gain on held-out target examples")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--calib", required=True, type=Path,
                   help="target-task JSONL: part calibrates, part (--holdout) scores the target task")
    _set_options(p, roles=("original",), required=True)
    p.add_argument("--methods", default=",".join(search.DEFAULT_METHODS),
                   help="comma-separated: Model Tailor over keep x alpha x the options below, the "
                        "data-free methods over keep (or λ: WiSE-FT, task arithmetic)")
    for name in ("keep", "alpha", "lam"):
        _axis_flag(p, name, format_numbers(search.SEARCH_GRID[name]))
    _axis_flag(p, "compensation", None)
    _anchor_options(p)
    for name in ("order", "budget", "scope"):
        _axis_flag(p, name, default(name))
    defaults = _keyword_defaults(search.find_settings)
    p.add_argument("--holdout", type=float, default=defaults["holdout"],
                   help="share of --calib held out for scoring")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the held-out split")
    p.add_argument("--limit", type=int, default=search.DEFAULT_LIMIT, help="examples per original-task set")
    p.add_argument("--calib-limit", type=int, default=CALIBRATION_LIMIT, help="target-task examples read from --calib")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--out", required=True, type=Path, help="table CSV")
    _in_memory_option(p)
    _model_options(p)

    p = sub.add_parser("finetune", help="fine-tune a model: full, Model-Dowser or LLaCA")
    p.add_argument("--base", required=True)
    p.add_argument("--data", type=Path, help="training JSONL (not with --continual)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--method", default=_keyword_defaults(finetune)["method"], help=" | ".join(TRAINING_METHODS))
    p.add_argument("--layers", default=None,
                   help="decoder layers to train: N / last:N (default: last half), 20-31, 0,2,5-7, all")
    recipe = _keyword_defaults(finetune)
    for name in ("lr", "epochs", "batch_size", "seed"):
        p.add_argument(_flag(name), type=type(recipe[name]), default=recipe[name])
    p.add_argument("--limit", type=int, default=None, help="train on the first N examples")
    for name in ("weight_decay", "warmup_steps"):
        p.add_argument(_flag(name), type=type(recipe[name]), default=recipe[name])
    _training_options(p)
    p.add_argument("--continual", default=None, metavar="TASKS",
                   help="train on the shapes world's tasks one after another instead of --data "
                   f"(e.g. colour,count,spatial; methods {', '.join(ContinualMethod)}): OUT/continual.csv holds "
                   "every task's accuracy after each stage; --limit examples per task (default 1200)")
    _model_options(p)

    p = sub.add_parser("demo", help="the built-in demo pair")
    p.add_argument("action", choices=["build"])
    p.add_argument("--assets", type=Path, default=None,
                   help="the folder to (re)write whole (default: assets/demo/)")
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    return parser


def reference() -> str:
    """docs/cli.md: every command and its options, as Markdown, from `build_parser`
    (`python tools/cli_docs.py` writes it)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    about = {a.dest: a.help for a in commands._choices_actions}
    lines = ["# Command line", "", "Generated from the parser by `python tools/cli_docs.py`; "
             "`python -m tailor_ui COMMAND --help` prints the same.", ""]
    for name, sub in commands.choices.items():
        lines += [f"## {name}", "", f"{about[name]}.", "", "| option | meaning |", "| --- | --- |"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = ", ".join(action.option_strings)
            if not action.option_strings:  # a positional: its words
                words = " | ".join(action.choices or [action.dest])
            elif action.nargs != 0:
                words += " " + (action.metavar or action.dest.upper())
            flags = f"`{words}`" + (" (required)" if action.required and action.option_strings else "")
            text = (action.help or "").replace("%%", "%")
            shown = not any(action.default is d for d in (None, False, argparse.SUPPRESS)) and action.default != []
            if shown and "default" not in text:
                text = f"{text} (default {action.default})".strip()
            lines.append(f"| {_cell(flags)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a Markdown table cell


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = build_parser().parse_args(argv)
    args.command_line = _command_line(sys.argv[1:] if argv is None else argv)
    try:
        if not args.debug:
            _quiet_libraries()
        if getattr(args, "compensation", "") is None:
            args.compensation = _default_compensation(args)
        # sets from zips and data sets are read into this folder, gone when the command ends
        with tempfile.TemporaryDirectory(prefix="tailor-sets-") as scratch:
            args.scratch = Path(scratch)
            return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's fault: still one line unless asked
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)",
                  file=sys.stderr)
        return 1


def _command_line(argv: list[str]) -> str:
    """The command as typed, for model cards: what rebuilds the output (so not the push)."""
    import shlex

    words, skip = [], False
    for word in argv:
        if skip or word == "--private" or word.startswith("--push-to-hub="):
            skip = False
            continue
        skip = word == "--push-to-hub"
        if not skip:
            words.append(word)
    return "python -m tailor_ui " + shlex.join(words)


def _default_compensation(args: argparse.Namespace) -> str:
    """A sweep's or a search's `--compensation` left out: `Settings.default_compensations`,
    with anchored beside the others where --anchor gives it original-task data (a single
    merge's default: `_settings`)."""
    from tailor_ui.settings import Settings

    return ",".join(Settings.default_compensations(bool(args.anchor), search=args.command == "find-settings"))


def _quiet_libraries() -> None:
    """transformers' warnings and its "Loading weights" bar would come before our one error
    line on stderr; like our own bars, its bar shows only on a terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # accelerate says so when it offloads, as an onloaded base always does
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": args.dtype or "float32", "device": args.device, "allow_pickle": args.allow_pickle,
            "trust_remote_code": args.trust_remote_code}


def _stream_sources(args: argparse.Namespace, specs: list[str]) -> list[str] | None:
    """The model folders to stream from, or None where the models must be loaded: asked
    for (--in-memory), a dtype to convert to (--dtype), or not all local safetensors folders."""
    from tailor_ui.pair import check_local_pair, has_safetensors, resolve_source

    if args.in_memory or args.dtype is not None:
        return None
    sources = [resolve_source(spec) for spec in specs]
    if not all(has_safetensors(s) for s in sources):
        return None
    # as loading does: a damaged file or a mismatched pair is refused before any tensor is
    # read, not halfway through the stream
    check_local_pair(sources[0], sources[1:], allow_pickle=args.allow_pickle)
    return sources


def _one_thread_per_op() -> None:
    """Before a streamed merge or apply: its chunks are small (in cache), and waking a second
    thread for each op costs more than the arithmetic, most of all on a busy machine, while
    the reader and writer threads use the other cores. Set here, at the entry point of a
    process that does nothing else, never by the library mid-run."""
    import torch

    torch.set_num_threads(1)


def _stream_device(device: str) -> str:
    import torch

    # streaming computes on one device; "auto" (accelerate's placement) means the GPU if any
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _inspect(args: argparse.Namespace) -> int:
    from tailor_ui.pair import load_pair, summarize

    pair = load_pair(args.base, args.finetuned, **_load_options(args))
    table = summarize(pair.base, pair.finetuned[0])
    if args.json:
        print(table.to_json(orient="records"))
        return 0
    changed = table[table["changed"] > 0]
    print(f"{len(table)} tensors, {int(table['numel'].sum()):,} parameters; "
          f"{len(changed)} tensors changed ({int(changed['changed'].sum()):,} entries)")
    if not changed.empty:
        by_layer = (changed.groupby(["component", "layer", "module"], dropna=False)["delta_norm"]
                    .sum().reset_index())
        print(by_layer.to_string(index=False))
    return 0


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a folder that is not one of our own earlier outputs."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists()
                                              and not (out / "config.json").exists())):
        raise UserError(f"{out} exists and is not an earlier output: choose a new or empty folder")


def _progress_bar():
    from tqdm import tqdm

    bar = tqdm(total=0, file=sys.stderr, leave=False, disable=not sys.stderr.isatty())

    def update(stage: str, done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.set_description(stage[:60])
        bar.refresh()

    return bar, update


def _settings(args: argparse.Namespace, method: str):
    """The merge settings the user gave (`_merge_options`), for `method`; a knob the method
    does not read is refused, not dropped."""
    from tailor_ui.methods import REGISTRY
    from tailor_ui.settings import KNOBS, Settings, method_knobs, method_problem, reads, unread

    if args.batch_size < 1 or args.calib_limit < 1:
        raise UserError("--batch-size and --calib-limit must be positive")
    if method_problem(method):
        raise UserError(method_problem(method))
    given = {name: getattr(args, name) for name in KNOBS if hasattr(args, name)}
    ignored = unread(method, given)
    if ignored:
        own = [_flag(name) for name in method_knobs(method) if not KNOBS[name].common]
        raise UserError(f"{', '.join(map(_flag, ignored))}: not read by {REGISTRY[method].label} "
                        f"(it reads {', '.join(own) or 'none of the merge options'})")
    if reads(method, "compensation") and "compensation" not in given:
        given["compensation"] = Settings.default_compensations(bool(args.anchor))[-1]
    return Settings(method=method, **given)


def _flag(name: str) -> str:
    """A knob's or an option's flag; a switch that turns a default on off is --no-NAME."""
    from tailor_ui.settings import KNOBS, default, value_type

    switch_off = name in KNOBS and value_type(name) is bool and default(name)
    return ("--no-" if switch_off else "--") + name.replace("_", "-")


def _tailor(args: argparse.Namespace) -> int:
    from tailor_ui.data import read_calibration
    from tailor_ui.io import atomic_path
    from tailor_ui.methods import REGISTRY
    from tailor_ui.pair import load_pair
    from tailor_ui.outputs import PATCH_NAME, save_run

    settings = _settings(args, args.method)
    if args.calib and len(args.calib) != len(args.finetuned):
        raise UserError(f"give one --calib per --finetuned ({len(args.finetuned)}), got {len(args.calib)}")
    method = REGISTRY[settings.method]
    if method.needs_calibration and not args.calib:
        raise UserError(f"{method.label} needs target-task calibration data: pass --calib FILE.jsonl")
    if args.no_patch and not args.save_model:
        raise UserError("--no-patch leaves nothing to write: add --save-model")
    _check_out_dir(args.out)
    _check_adapter_out(args)
    token = _hub_token(args)
    examples = [read_calibration(path)[: args.calib_limit] for path in args.calib]
    if args.anchor and not method.needs_calibration:
        raise UserError(f"--anchor is read only by Model Tailor, not by {method.label}")
    anchor_examples = _read_anchor(args, settings.anchored)
    sources = None if method.needs_calibration else _stream_sources(args, [args.base, *args.finetuned])
    if sources is not None:
        report = _tailor_streamed(args, settings, sources)
    else:
        # Model Tailor runs calibration forwards on the base; the fine-tuned weights are read
        # from their checkpoint block by block (lazy) and, for a run that goes layer by layer,
        # the base's from its own, module by module (onloaded); --in-memory loads both
        from tailor_ui.methods.tailor_run import needs_every_score

        pair = load_pair(args.base, args.finetuned, lazy=not args.in_memory,
                         onload=not args.in_memory and not needs_every_score(settings), **_load_options(args))
        onloaded = pair.onloaded
        bar, update = _progress_bar()
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            try:  # an onloaded run writes its patch as it goes, where the folder keeps it
                result = _run_in_memory(pair, settings, examples, anchor_examples, args.batch_size, update,
                                        patch_path=tmp / PATCH_NAME if onloaded else None)
            finally:
                bar.close()
            if args.save_model:  # first: its check counts in the report
                result.report["tensors_checked"] = _save_tailored(pair, result.patch, tmp / "model")
            if onloaded:
                _write_adapter(args, result.patch, result.report, base_folder=pair.loading["from"])
            else:
                _write_adapter(args, result.patch, result.report, pair=pair)
            if onloaded and args.no_patch:
                (tmp / PATCH_NAME).unlink()
            save_run(tmp, None if args.no_patch or onloaded else result.patch, result.report)
            _write_cards(args, tmp, result.report)
        report = result.report
    print(f"{settings.method}: {report['patch_entries']:,} entries in the patch "
          f"({100 * report['linear_fraction']:.2f}% of selected linears, "
          f"{100 * report['model_fraction']:.2f}% of the model) in "
          f"{report['timings_s']['total']:.1f}s -> {args.out}")
    if "adapter" in report:
        fit = report["adapter"]
        print(f"adapter: rank {fit['rank']} fit of {fit['low_rank_tensors']} linears, relative error "
              f"{fit['relative_error']:.4f} ({len(fit['modules_saved_whole'])} modules saved whole) "
              f"-> {args.adapter_out}")
    if token is not None:
        from tailor_ui.hub import push_folder

        folder = args.out / "model" if args.save_model else args.out
        print(f"published {folder} -> {push_folder(folder, args.push_to_hub, token, private=args.private)}")
    return 0


def _save_tailored(pair, patch, folder: Path) -> int | None:
    """The tailored model: an onloaded base's checkpoint streamed with the patch written in,
    tensor by tensor (the checkpoint's dtypes, as every streamed output), else the loaded
    base saved with it."""
    from tailor_ui.outputs import save_tailored
    from tailor_ui.stream import stream_apply_patch

    if not pair.onloaded:
        return save_tailored(pair, patch, folder)
    return stream_apply_patch(pair.loading["from"], patch, folder)["tensors_checked"]


def _hub_token(args: argparse.Namespace) -> str | None:
    """--push-to-hub's token (huggingface_hub's: HF_TOKEN or a saved login), checked with
    the repository id before any model loads; None without --push-to-hub."""
    if args.push_to_hub is None:
        if args.private:
            raise UserError("--private goes with --push-to-hub")
        return None
    from huggingface_hub import get_token

    from tailor_ui.hub import check_repo_id, require_token

    check_repo_id(args.push_to_hub)
    return require_token(get_token(), "set HF_TOKEN or run `hf auth login`")


def _write_cards(args: argparse.Namespace, folder: Path, report: dict) -> None:
    """The model cards of a `tailor` run's outputs: the patch folder, the model, the adapter."""
    from tailor_ui.model_card import Artifact, write_card

    for written, path, artifact in ((not args.no_patch, folder, Artifact.PATCH),
                                    (args.save_model, folder / "model", Artifact.MODEL),
                                    (args.adapter_out is not None, args.adapter_out, Artifact.ADAPTER)):
        if written:
            write_card(path, artifact, report, command=args.command_line)


def _check_adapter_out(args: argparse.Namespace) -> None:
    out = args.adapter_out
    if out is None:
        return
    if args.adapter_rank < 1:
        raise UserError("--adapter-rank must be positive")
    if args.no_patch:
        raise UserError("--adapter-out is fitted from the patch, so it cannot go with --no-patch")
    from tailor_ui.adapter import ADAPTER_CONFIG

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ADAPTER_CONFIG).exists())):
        raise UserError(f"{out} exists and is not an earlier adapter: choose a new or empty folder")


def _write_adapter(args: argparse.Namespace, patch, report: dict, *, pair=None,
                   base_folder: str | None = None) -> None:
    """--adapter-out: the patch as a LoRA adapter on the base; the fit goes in the report."""
    from tailor_ui.adapter_fit import fit_from_checkpoint, fit_from_model

    if args.adapter_out is None:
        return
    if pair is not None:
        report["adapter"] = fit_from_model(patch, pair.base, pair.base_value, args.adapter_rank,
                                           args.adapter_out, base_id=args.base)
    else:
        report["adapter"] = fit_from_checkpoint(patch, base_folder, args.adapter_rank, args.adapter_out,
                                                base_id=args.base)


def _tailor_streamed(args: argparse.Namespace, settings, sources: list[str]) -> dict:
    """A data-free merge streamed from the checkpoints: the same patch (and model) as in
    memory, holding one tensor at a time; the patch goes into its file tensor by tensor."""
    from contextlib import nullcontext

    from tailor_ui.checkpoint import Checkpoint
    from tailor_ui.io import atomic_path
    from tailor_ui.patch import PatchFile, header_room, patch_writer
    from tailor_ui.outputs import save_run
    from tailor_ui.stream import stream_merge

    with Checkpoint(sources[0]) as base:  # the patch's header goes in front of its data
        room = header_room(base.tensors)
    _one_thread_per_op()
    bar, update = _progress_bar()
    try:
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            with nullcontext() if args.no_patch else patch_writer(tmp / "patch.safetensors", room) as patch:
                report = stream_merge(sources[0], sources[1:], settings,
                                      tmp / "model" if args.save_model else None,
                                      _stream_device(args.device), patch=patch, progress=update)
                if patch is not None:  # as the user named them
                    patch.metadata.update(base=args.base, finetuned=args.finetuned)
            if args.adapter_out is not None:  # fitted from the written patch, a tensor at a time
                _write_adapter(args, PatchFile(tmp / "patch.safetensors"), report, base_folder=sources[0])
            save_run(tmp, None, report)
            _write_cards(args, tmp, report)
    finally:
        bar.close()
    return report


def _apply(args: argparse.Namespace) -> int:
    from tailor_ui.io import atomic_path
    from tailor_ui.pair import load_model
    from tailor_ui.patch import PatchFile, apply_patch
    from tailor_ui.outputs import save_model

    from tailor_ui.model_card import Artifact, write_card

    _check_out_dir(args.out)
    patch = PatchFile(args.patch)
    sources = _stream_sources(args, [args.base])
    made = patch.metadata  # how the patch was made, for the card
    report = {"settings": made.get("settings"), "base": args.base, "finetuned": made.get("finetuned", []),
              "patch_entries": patch.num_entries}
    with atomic_path(args.out) as tmp:
        if sources is not None:  # tensor by tensor, in the checkpoint's dtypes, the patch's too
            from tailor_ui.stream import stream_apply_patch

            _one_thread_per_op()
            stream_apply_patch(sources[0], patch, tmp)
        else:
            model, processor = load_model(args.base, **_load_options(args))
            apply_patch(model, patch.load())
            save_model(model, processor, tmp)
        write_card(tmp, Artifact.MODEL, report, command=args.command_line)
    print(f"applied {patch.num_entries:,} entries -> {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tailor_ui.data import read_calibration
    from tailor_ui.pair import load_pair
    from tailor_ui.patch import check_fits, load_patch
    from tailor_ui.evaluation.answers import model_answers

    if args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--max-new-tokens and --limit must be positive")
    settings = _compare_settings(args)
    rows = _compare_rows(args)  # every input is read before any model loads
    patch = load_patch(args.patch) if args.patch is not None else None
    calib = read_calibration(args.calib)[: args.calib_limit] if settings is not None else None
    anchor = _read_anchor(args, settings.anchored) if settings is not None else []
    pair = load_pair(args.base, args.finetuned, **_load_options(args))
    if patch is not None:
        check_fits({n: tuple(p.shape) for n, p in pair.base.named_parameters()}, patch)
    bar, update = _progress_bar()
    try:
        if settings is not None:
            patch = _run_in_memory(pair, settings, [calib], anchor, args.batch_size, update).patch
        merges = [("Tailored", patch)] if patch is not None else []
        answers = model_answers(pair, merges, [(row["image_data"], row["question"]) for row in rows],
                                args.max_new_tokens, update)
    finally:
        bar.close()
    _print_comparison(rows, answers, args.json)
    return 0


def _compare_settings(args: argparse.Namespace):
    """`compare --calib`'s Model Tailor settings; without --calib the merge options have
    nothing to set, so they are refused."""
    from tailor_ui.settings import KNOBS, Settings

    if args.calib is not None:
        return _settings(args, Settings.method)
    given = [_flag(name) for name in KNOBS if hasattr(args, name)] + (["--anchor"] if args.anchor else [])
    if given:
        raise UserError(f"{', '.join(given)}: merge options go with --calib (which tailors on the fly)")
    return None


def _read_anchor(args: argparse.Namespace, anchored: bool) -> list:
    """`--anchor`'s examples (each file's first --calib-limit); refused when anchored
    compensation is asked for without them, or they are given for nothing."""
    from tailor_ui.data import read_calibration

    if anchored and not args.anchor:
        raise UserError("--compensation anchored needs original-task calibration data: pass "
                        "--anchor FILE.jsonl")
    if args.anchor and not anchored:
        raise UserError("--anchor is read only by --compensation anchored")
    return [ex for path in args.anchor for ex in read_calibration(path)[: args.calib_limit]]


def _run_in_memory(pair, settings, examples: list[list], anchor: list, batch_size: int, progress,
                   patch_path: Path | None = None):
    """A merge of the loaded pair (`tailor`, and `compare --calib`): `examples` holds each
    fine-tuned model's calibration examples (none for a data-free method), `anchor` the
    original-task examples of anchored compensation; `patch_path`: the patch is written
    there as it is made."""
    from tailor_ui.calibration import calibration_batches
    from tailor_ui.engine import run_method

    calibration = [calibration_batches(pair.processor, ex, batch_size) for ex in examples]
    return run_method(pair, settings, calibration or None,
                      anchor=calibration_batches(pair.processor, anchor, batch_size), progress=progress,
                      keep_scores=False, patch_path=patch_path)  # one shot: no slider re-thresholds its scores


def _compare_rows(args: argparse.Namespace) -> list[dict]:
    """What to ask: image (as shown), question, reference answers and the loaded image."""
    from tailor_ui.data import load_image, read_examples

    if args.image is not None:
        if args.limit is not None:
            raise UserError("--limit goes with --data")
        if not args.image.is_file():
            raise UserError(f"image not found: {args.image}")
        return [{"image": str(args.image), "question": (args.question or "").strip(), "references": [],
                 "image_data": load_image(args.image)}]
    if args.question is not None:
        raise UserError("--question goes with --image (a --data file holds its questions)")
    folder = args.data.resolve().parent
    return [{"image": str(ex.image.relative_to(folder)), "question": ex.question,
             "references": list(ex.answers), "image_data": load_image(ex.image)}
            for ex in read_examples(args.data)[: args.limit]]


def _print_comparison(rows: list[dict], answers: list[list[tuple[str, str]]], as_json: bool) -> None:
    """A table, or one JSON object a line; columns base, finetuned[, tailored]."""
    import json

    import pandas as pd

    keys = ["base", "finetuned", "tailored"]
    records = [{"image": row["image"], "question": row["question"], "references": row["references"],
                **{key: answer for key, (_, answer) in zip(keys, models)}}
               for row, models in zip(rows, answers)]
    if as_json:
        print("".join(json.dumps(record) + "\n" for record in records), end="")
        return
    table = pd.DataFrame(records)
    if not any(row["references"] for row in rows):
        table = table.drop(columns="references")
    else:
        table["references"] = table["references"].map(lambda refs: " | ".join(dict.fromkeys(refs)))
    with pd.option_context("display.max_colwidth", None, "display.width", None):
        print(table.to_string(index=False, justify="left"))


def _eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from tailor_ui.evaluation.evaluate import evaluate, save_result
    from tailor_ui.io import atomic_path
    from tailor_ui.pair import load_model

    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size, --max-new-tokens and --limit must be positive")
    if (args.data is not None) == bool(args.original or args.target):
        raise UserError("give --data, or --original-set / --target-set (not both)")
    if args.data is not None:
        sets = _read_sets(args, {"original": [args.data]}, task=args.task)
    else:
        sets = _read_sets(args, {"original": args.original, "target": args.target})
    model, processor = load_model(args.model, **_load_options(args))
    results = {}
    for spec in sets:
        examples = list(spec.examples[: args.limit])
        results[spec.name] = result = evaluate(
            model, processor, examples, spec.task, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, progress=sys.stderr.isatty())
        extras = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"{spec.name} ({spec.task}) on {result.n} examples: {extras} ({result.seconds:.1f}s)")
    if args.data is not None:
        save_result(result, args.out)
    else:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({s.name: {"role": s.role, **asdict(results[s.name])} for s in sets},
                                      indent=2), encoding="utf-8")
    print(f"-> {args.out}")
    return 0


def _read_sets(args: argparse.Namespace, by_role: dict[str, list[str]], task: str | None = None) -> list:
    """Every set named on the command line (`EvalSpec`s, originals first), read and checked
    before any model loads; names must differ (the sweep's columns are named by them).
    `task`, where given, overrides the sets' own PATH:TASK."""
    from tailor_ui.evaluation.sets import parse_set_spec, read_set

    sets = []
    for role, specs in by_role.items():
        for spec in specs:
            source, named = parse_set_spec(spec)
            # no cap on the size here: the machine is the user's own (the dashboard caps it)
            sets.append(read_set(source, args.scratch / f"set-{len(sets)}", role=role, task=task or named,
                                 split=args.split, columns=args.columns, max_examples=None))
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"two sets are named {repeated[0]!r} (a set is named by its file or folder): "
                        "rename one")
    return sets


def _sweep(args: argparse.Namespace) -> int:
    from tailor_ui.calibration import calibration_batches
    from tailor_ui.data import read_calibration
    from tailor_ui.evaluation.sweep import LAMBDA_RANGE, parse_numbers, sweep, sweep_grid
    from tailor_ui.io import atomic_path
    from tailor_ui.methods import REGISTRY
    from tailor_ui.pair import load_pair

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = sweep_grid(methods, {"keep": parse_numbers(args.keep, "--keep"),
                                "alpha": parse_numbers(args.alpha, "--alpha"),
                                "lam": parse_numbers(args.lam, "--lam", *LAMBDA_RANGE)},
                      calibrated={"hessians": _words(args.hessians), "compensation": _words(args.compensation),
                                  "scope": _words(args.scope), **_anchor_weights(args)})
    calibrated = [m for m in methods if REGISTRY[m].needs_calibration]
    if calibrated and args.calib is None:
        raise UserError(f"the {calibrated[0]} method needs target-task calibration data: "
                        "pass --calib FILE.jsonl")
    sets = _read_sets(args, {"original": args.original, "target": args.target})
    original = [s.cut(args.limit) for s in sets if s.role == "original"]
    target = [s.cut(args.limit) for s in sets if s.role == "target"]
    calib = read_calibration(args.calib)[: args.calib_limit] if args.calib else None
    anchor = _read_anchor(args, "anchored" in _words(args.compensation))
    pair = load_pair(args.base, args.finetuned, **_load_options(args))
    calibration = [calibration_batches(pair.processor, calib)] if calib else None
    bar, update = _progress_bar()
    try:
        table = sweep(pair, grid, original, target, calibration, batch_size=args.batch_size,
                      anchor=calibration_batches(pair.processor, anchor), progress=update)
    finally:
        bar.close()
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    columns = ["method", "setting", "original", "target", "original_retention", "target_retention",
               "target_gain", "h_score"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _anchor_weights(args: argparse.Namespace) -> dict[str, list[float]]:
    """The sweep's μ axis: only where anchored compensation is swept (it reads no other)."""
    from tailor_ui.evaluation.sweep import parse_numbers

    if "anchored" not in _words(args.compensation):
        return {}
    return {"anchor_weight": parse_numbers(args.anchor_weight, "--anchor-weight", 0.0, 1000.0)}


def _find_settings(args: argparse.Namespace) -> int:
    from tailor_ui.data import read_calibration
    from tailor_ui.evaluation.search import candidate_grid, find_settings, split_examples
    from tailor_ui.evaluation.sweep import LAMBDA_RANGE, parse_numbers
    from tailor_ui.io import atomic_path
    from tailor_ui.pair import load_pair

    if args.batch_size < 1 or args.calib_limit < 1 or args.limit < 1:
        raise UserError("--batch-size, --calib-limit and --limit must be positive")
    options = {name: _words(getattr(args, name)) for name in ("compensation", "order", "budget", "scope")}
    grid = {"keeps": parse_numbers(args.keep, "--keep"), "alphas": parse_numbers(args.alpha, "--alpha"),
            "lams": parse_numbers(args.lam, "--lam", *LAMBDA_RANGE), "methods": _words(args.methods)}
    # cut by find_settings, which says so
    original = [s.cut() for s in _read_sets(args, {"original": args.original})]
    calibration = read_calibration(args.calib)[: args.calib_limit]
    anchor = _read_anchor(args, "anchored" in _words(args.compensation))
    candidate_grid(grid["keeps"], grid["alphas"], options, grid["methods"], grid["lams"])  # refused now
    split_examples(calibration, args.holdout, args.seed)
    # the base is the working copy; a fine-tuned safetensors folder is read lazily
    pair = load_pair(args.base, args.finetuned, lazy=not args.in_memory, **_load_options(args))
    bar, update = _progress_bar()
    try:
        result = find_settings(pair, calibration, original, options=options, holdout=args.holdout,
                               seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                               anchor=anchor, progress=update, **grid)
    finally:
        bar.close()
    with atomic_path(args.out) as tmp:
        result.table.to_csv(tmp, index=False)
    columns = ["kind", "setting", "original_retention", "target_gain", "h", "front", "patch_fraction"]
    print(result.table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("scored on: " + "; ".join(f"{name}: {what}" for name, what in result.used.items()))
    best = result.best_row
    print(f"best (h {best['h']:.3f}: original retention {best['original_retention']:.3f}, target gain "
          f"{best['target_gain']:.3f}):\n  {tailor_command(result.best, args)}")
    return 0


def tailor_command(settings, args: argparse.Namespace) -> str:
    """The `tailor` command line that builds the model with these settings (a data-free
    method's without calibration data)."""
    from tailor_ui import model_card
    from tailor_ui.methods import REGISTRY

    calib = [str(args.calib)] if REGISTRY[settings.method].needs_calibration else []
    return model_card.tailor_command(settings, args.base, [args.finetuned], calib=calib,
                                     anchor=[str(a) for a in args.anchor])


def _training_given(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the user gave; another method's are refused, not dropped."""
    from tailor_ui.training.registry import METHODS, TRAINING_METHODS, accepted_options, unread_options

    if args.method not in METHODS:
        raise UserError(f"unknown fine-tuning method {args.method!r} (choose from {', '.join(METHODS)})")
    given = {name: getattr(args, name) for name in accepted_options() if hasattr(args, name)}
    ignored = unread_options(args.method, given)
    if ignored:
        cls = TRAINING_METHODS[args.method]
        own = [_flag(n) for n in cls.options if n in cls.option_help]
        raise UserError(f"{', '.join(map(_flag, ignored))}: not read by {cls.label} "
                        f"(it reads {', '.join(own) or 'none of the method options'})")
    return given


def _finetune(args: argparse.Namespace) -> int:
    from tailor_ui.training.finetune import finetune_cli, parse_layers

    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be positive")
    _check_out_dir(args.out)
    options = _training_given(args)
    if args.continual is not None:
        return _finetune_continual(args, options)
    if args.data is None:
        raise UserError("give --data (a training JSONL) or --continual TASKS")
    bar, update = _progress_bar()
    try:
        report = finetune_cli(
            args.base, args.data, args.out, args.method, layers=parse_layers(args.layers),
            limit=args.limit, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
            seed=args.seed, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            progress=update, **options, **_load_options(args))
    finally:
        bar.close()
    losses = report.losses
    print(f"{args.method}: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"in {report.seconds:.1f}s -> {args.out}" if losses else f"{args.method}: no steps")
    return 0


def _finetune_continual(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """The continual twin of the Fine-tune tab: shapes-world tasks one after another."""
    from tailor_ui.demo.tasks import shapes_sequence
    from tailor_ui.io import atomic_path
    from tailor_ui.pair import load_model
    from tailor_ui.training.continual import ContinualMethod, run_continual, summary
    from tailor_ui.training.finetune import parse_layers

    method = ContinualMethod.of(args.method)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    model, processor = load_model(args.base, **_load_options(args))
    tasks = shapes_sequence(args.out / "eval", [t.strip() for t in args.continual.split(",")],
                            n_train=args.limit or 1200, seed=args.seed)
    bar, update = _progress_bar()
    try:
        table = run_continual(model, processor, tasks, method,
                              layers=parse_layers(args.layers), lr=args.lr, epochs=args.epochs,
                              batch_size=args.batch_size, seed=args.seed,
                              weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                              progress=update, **options)
    finally:
        bar.close()
    with atomic_path(args.out / "continual.csv") as tmp:  # complete or absent
        table.to_csv(tmp, index=False, float_format="%.4f")
    print(table.drop(columns=["method"]).to_string(index=False, float_format="%.3f"))
    result = summary(table)
    print(f"{args.method}: average accuracy {result['average']:.3f}, forgetting "
          f"{result['forgetting']:.3f} -> {args.out / 'continual.csv'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tailor_ui.demo.build import build_demo
    from tailor_ui.demo.sets import DEMO_DIR

    build_demo(args.assets or DEMO_DIR, seed=args.seed)
    return 0


COMMANDS = {"inspect": _inspect, "tailor": _tailor, "apply": _apply, "compare": _compare, "eval": _eval,
            "sweep": _sweep, "find-settings": _find_settings, "finetune": _finetune, "demo": _demo}
