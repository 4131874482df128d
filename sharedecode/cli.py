"""The `sharedecode` command: beam search, sampling and shared-prompt batches from the shell.

    sharedecode demo
    sharedecode beam "ROMEO:\\n" --num-beams 4 --max-new-tokens 40
    sharedecode sample "JULIET:\\n" --n 4 --temperature 0.8 --seed 0
    sharedecode batch --system-prompt "..." "user prompt 1" "user prompt 2" --json

Every subcommand shows a live view while decoding when stdout is a terminal, then a table of the
sequences and a panel on the KV cache; `--json` prints only the results, as JSON. Bad arguments
print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

EXIT_USAGE = 2
DTYPES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")

# Strategy parameters: CLI dest -> (flag, help). Their defaults are the Python API's: an option the
# user does not give is not passed, so the CLI and the API cannot drift apart.
SAMPLING_PARAMS = ("n", "best_of", "temperature", "top_k", "top_p", "min_p", "seed")
BEAM_PARAMS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")
COMMON_PARAMS = ("max_new_tokens", "min_new_tokens", "repetition_penalty", "stop", "truncate_prompt")
STRATEGY_PARAMS = {
    "greedy": COMMON_PARAMS,
    "beam": COMMON_PARAMS + BEAM_PARAMS,
    "sample": COMMON_PARAMS + SAMPLING_PARAMS,
}


class UsageError(Exception):
    """A bad argument or input: reported as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage too: keep it to one line
        raise UsageError(f"{self.prog}: error: {message}")


# ------------------------------------------------------------------------- argument types
def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _float(low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    return parse


def _early_stopping(text: str):
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"must be one of true, false, never; got {text!r}")
    return values[text.lower()]


def _bytes(text: str) -> int:
    """'268435456', '256MiB', '256M', '1G', '512k' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 268435456, 256MiB or 1G, got {text!r}")
    value = float(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def _block_size(text: str) -> int:
    value = _int(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two (8, 16, 32, ...), got {value}")
    return value


def unescape(text: str) -> str:
    """Backslash escapes in prompts given on the command line: \\n, \\t and \\\\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# ------------------------------------------------------------------------- the parser
def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and cache")
    group.add_argument("--model", metavar="PATH_OR_ID",
                       help="local path or Hugging Face hub id (default: the embedded tiny Shakespeare "
                            "Llama, offline)")
    group.add_argument("--device", metavar="DEVICE",
                       help="cpu, cuda, cuda:1, ... (default: cpu for the embedded model, cuda when "
                            "available otherwise)")
    group.add_argument("--dtype", choices=DTYPES, help="cast the model and cache (default: the model's own)")
    group.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                       help="paged attention backend (default: auto = triton on CUDA, torch on CPU)")
    group.add_argument("--block-size", type=_block_size, metavar="N", default=16,
                       help="tokens per KV block (default: 16)")
    group.add_argument("--kv-cache-bytes", type=_bytes, metavar="SIZE",
                       help="KV pool size, e.g. 64MiB or 1G (default: 256MiB on CPU, 80%% of free GPU "
                            "memory)")
    group.add_argument("--json", action="store_true",
                       help="print only the results as JSON (GenerationResult.to_dict() per prompt)")


def _prompt_options(parser: argparse.ArgumentParser, what: str = "prompt") -> None:
    parser.add_argument("prompts", nargs="*", metavar=what.upper(),
                        help=f"{what}s; \\n and \\t escapes are expanded")
    parser.add_argument("--file", "-f", metavar="FILE",
                        help=f"read {what}s from a file, one a line (blank lines are skipped, escapes "
                             "expanded)")


def _params(parser: argparse.ArgumentParser, names: tuple[str, ...], title: str) -> None:
    group = parser.add_argument_group(title)
    specs = {
        "max_new_tokens": dict(type=_int(1), help="tokens to generate at most (default: the model's "
                               "generation_config, else 20)"),
        "min_new_tokens": dict(type=_int(0), help="no EOS before this many tokens (default: 0)"),
        "repetition_penalty": dict(type=_float(0, math.inf, low_open=True), help="HF's (default: 1.0)"),
        "stop": dict(action="append", help="stop string (escapes expanded); repeat for several"),
        "truncate_prompt": dict(action="store_true", default=None,
                                help="keep a too-long prompt's last tokens instead of failing"),
        "num_beams": dict(type=_int(1), help="beams (default: 4)"),
        "length_penalty": dict(type=_float(), help="score / length ** length_penalty (default: 1.0)"),
        "early_stopping": dict(type=_early_stopping, metavar="{true,false,never}",
                               help="HF's early_stopping (default: false)"),
        "num_return_sequences": dict(type=_int(1), help="sequences returned, <= num_beams (default: 1)"),
        "n": dict(type=_int(1), help="samples returned per prompt (default: 4)"),
        "best_of": dict(type=_int(1), help="samples drawn; the n most likely are returned (default: n)"),
        "temperature": dict(type=_float(0), help="0 is greedy (default: 1.0)"),
        "top_k": dict(type=_int(0), help="0 is off (default: 0)"),
        "top_p": dict(type=_float(0, 1, low_open=True), help="nucleus, in (0, 1] (default: 1.0)"),
        "min_p": dict(type=_float(0, 1), help="in [0, 1] (default: 0.0)"),
        "seed": dict(type=_int(0), help="request i of a batch uses seed + i (default: random)"),
    }
    for name in names:
        spec = specs[name]
        if "metavar" not in spec and "type" in spec:
            spec["metavar"] = "N" if name in ("max_new_tokens", "min_new_tokens", "num_beams", "n", "best_of",
                                              "top_k", "num_return_sequences", "seed") else "X"
        if "action" not in spec or spec["action"] == "append":
            spec.setdefault("metavar", "TEXT")
        group.add_argument("--" + name.replace("_", "-"), dest=name, **spec)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="sharedecode",
        description="Beam search, parallel sampling and shared-prompt batches on a paged, "
                    "copy-on-write KV cache.",
    )
    from sharedecode import __version__

    parser.add_argument("--version", action="version", version=f"sharedecode {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="beam search, sampling and a shared-prompt batch on the "
                               "embedded model (offline, CPU, a few seconds)")
    demo.add_argument("--max-new-tokens", type=_int(1), default=40, help="per run (default: 40)")
    demo.add_argument("--device", default="cpu", help="(default: cpu)")

    beam = commands.add_parser("beam", help="beam search (HF semantics)")
    _prompt_options(beam)
    _params(beam, COMMON_PARAMS + BEAM_PARAMS, "beam search")
    _model_options(beam)

    sample = commands.add_parser("sample", help="parallel sampling: n samples sharing the prompt's blocks")
    _prompt_options(sample)
    _params(sample, COMMON_PARAMS + SAMPLING_PARAMS, "sampling")
    _model_options(sample)

    greedy = commands.add_parser("greedy", help="greedy decoding")
    _prompt_options(greedy)
    _params(greedy, COMMON_PARAMS, "greedy")
    _model_options(greedy)

    batch = commands.add_parser("batch", help="many user prompts behind one shared system prompt")
    _prompt_options(batch, "user prompt")
    batch.add_argument("--system-prompt", required=True, help="the shared system prompt (escapes expanded)")
    batch.add_argument("--strategy", choices=sorted(STRATEGY_PARAMS), default="greedy",
                       help="decoding strategy for every request (default: greedy)")
    _params(batch, COMMON_PARAMS + BEAM_PARAMS + SAMPLING_PARAMS,
            "strategy parameters (those of --strategy)")
    _model_options(batch)
    return parser


# ------------------------------------------------------------------------- inputs
def read_prompts(args) -> list[str]:
    prompts = [unescape(p) for p in args.prompts]
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read prompt file {args.file!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {args.file!r} is not UTF-8 text") from None
        from_file = [unescape(line) for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"prompt file {args.file!r} has no prompts")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt given: pass prompts as arguments or --file FILE")
    for index, prompt in enumerate(prompts, 1):
        if not prompt:
            raise UsageError(f"prompt {index} is empty")
    return prompts


def strategy_kwargs(args, strategy: str) -> dict:
    allowed = STRATEGY_PARAMS[strategy]
    kwargs = {}
    every = set(COMMON_PARAMS + BEAM_PARAMS + SAMPLING_PARAMS)
    for name in sorted(every):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --strategy {strategy}")
        kwargs[name] = [unescape(s) for s in value] if name == "stop" else value
    return kwargs


# ------------------------------------------------------------------------- the engine
_MODELS: dict = {}  # (name, dtype, device) -> (model, tokenizer): one load per process


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # the hub client's retry warnings would break the one-line error contract
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def check_device(name: str | None):
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    return device


def build_engine(model_name: str | None, *, device=None, dtype=None, backend="auto", block_size=16,
                 kv_cache_bytes=None):
    from sharedecode import Engine
    from sharedecode.embedded import load_embedded_model
    from sharedecode.engine import load_model, resolve_dtype

    quiet_transformers()
    device = check_device(device)
    torch_dtype = resolve_dtype(dtype)
    if model_name is None:
        device = device or "cpu"
    elif device is None:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (model_name, str(torch_dtype), str(device))
    if key not in _MODELS:
        if model_name is None:
            import torch

            _MODELS[key] = load_embedded_model(dtype=torch_dtype or torch.float32, device=device)
        else:
            path = os.path.expanduser(model_name)
            looks_local = model_name.startswith((".", "/", "~")) or os.sep in model_name.strip(os.sep) and \
                model_name.count("/") != 1
            if looks_local and not os.path.isdir(path):
                raise UsageError(f"--model {model_name!r}: no such model directory")
            try:
                _MODELS[key] = load_model(path if os.path.isdir(path) else model_name, torch_dtype, device)
            except (OSError, ValueError, KeyError) as exc:
                raise UsageError(f"cannot load model {model_name!r}: {exc}") from None
    model, tokenizer = _MODELS[key]
    return Engine(model, tokenizer, kv_cache_bytes=kv_cache_bytes, block_size=block_size,
                  backend=backend, device=device)


# ------------------------------------------------------------------------- running
def make_runner(command: str, engine, kwargs: dict, system_prompt: str | None = None):
    """-> (object with .stream(), the input to stream, label)."""
    from sharedecode import BeamSearch, Greedy, ParallelSampling, SharedPromptBatch

    if command == "batch":
        strategy = kwargs.pop("__strategy")
        runner = SharedPromptBatch(engine, system_prompt=system_prompt, strategy=strategy, **kwargs)
        return runner, f"shared-prompt batch ({strategy})"
    cls = {"beam": BeamSearch, "sample": ParallelSampling, "greedy": Greedy}[command]
    label = {"beam": "beam search", "sample": "parallel sampling", "greedy": "greedy"}[command]
    return cls(engine, **kwargs), label


def last_results(runner):
    # Strategy.stream() leaves its results in `last_results` when the iteration ends.
    inner = getattr(runner, "strategy", runner)
    return inner.last_results


def stream_and_show(runner, label: str, prompts: list[str], stream_input, engine, console, *, live: bool,
                    view_kind: str, max_new_tokens: int):
    """Run `runner.stream(stream_input)`, drawing a live view when `live`; -> (results, tracker)."""
    from sharedecode import display

    tracker = display.Tracker(engine)
    decode = display.TokenText(engine.tokenizer)
    width = console.width
    if view_kind == "beam":
        view = display.BeamView(decode, prompts, engine, width)
    elif view_kind == "batch":
        view = display.BatchView(decode, prompts, engine, tracker, max_new_tokens, width)
    else:
        view = display.SampleView(decode, prompts, engine, width, title=label)
    if not live:
        for snapshots in runner.stream(stream_input):
            tracker.update(snapshots)
        return last_results(runner), tracker

    from rich.live import Live

    with Live(console=console, auto_refresh=False, transient=True, redirect_stdout=False,
              redirect_stderr=False, vertical_overflow="crop") as screen:
        for snapshots in runner.stream(stream_input):
            tracker.update(snapshots)
            screen.update(view.render(snapshots, tracker.steps), refresh=True)
    return last_results(runner), tracker


def show_results(console, results, prompts: list[str], label: str, engine, tracker) -> None:
    from sharedecode import display

    for table in display.results_tables(results, prompts, label):
        console.print(table)
    # One stats object per run (all prompts of a run share it).
    console.print(display.kv_panel(results[0].stats, engine, tracker, title=f"KV cache · {label}"))


def dump_json(data) -> str:
    """Indented JSON with lists of numbers (token ids) kept on one line."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    # A literal newline after "[" only occurs in the indentation, never inside a JSON string.
    return re.sub(r"\[\n\s+([-+0-9.eE,\s]*?)\s+\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def results_json(results, prompts: list[str]) -> list[dict]:
    return [{"prompt": prompt, **result.to_dict()} for prompt, result in zip(prompts, results)]


def run_command(args, console) -> int:
    prompts = read_prompts(args)
    system_prompt = unescape(args.system_prompt) if args.command == "batch" else None
    if system_prompt is not None and not system_prompt:
        raise UsageError("--system-prompt is empty")
    strategy = args.strategy if args.command == "batch" else args.command
    kwargs = strategy_kwargs(args, strategy)
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                          block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes)
    if args.command == "batch":
        kwargs["__strategy"] = strategy
    runner, label = make_runner(args.command, engine, kwargs, system_prompt)
    view_kind = "batch" if args.command == "batch" else ("beam" if strategy == "beam" else "sample")
    max_new = getattr(getattr(runner, "strategy", runner), "max_new_tokens", 0)
    live = console.is_terminal and not args.json
    results, tracker = stream_and_show(runner, label, prompts, prompts, engine, console, live=live,
                                       view_kind=view_kind, max_new_tokens=max_new)
    if args.json:
        sys.stdout.write(dump_json(results_json(results, prompts)) + "\n")
        return 0
    show_results(console, results, prompts, label, engine, tracker)
    return 0


# ------------------------------------------------------------------------- the demo
DEMO_BEAM_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
DEMO_SAMPLE_PROMPT = ("JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse "
                      "thy name;\n")
DEMO_SYSTEM_PROMPT = ("A scene from a play by William Shakespeare, in verse. The characters speak in "
                      "iambic pentameter, and the king addresses his lords.\n\nKING HENRY:\n")
DEMO_USER_PROMPTS = ["Now, lords, to France", "My horse, my horse", "What news from England?",
                     "Good morrow, cousin"]


def run_demo(args, console) -> int:
    from rich.rule import Rule

    started = time.perf_counter()
    max_new = args.max_new_tokens
    console.print(Rule("[bold]sharedecode demo[/] · embedded tiny Shakespeare Llama (2.4M parameters) · "
                       "offline"))
    engine = build_engine(None, device=args.device)
    console.print(f"model loaded in {time.perf_counter() - started:.1f} s on {engine.device} "
                  f"({engine.allocator.num_blocks} KV blocks of {engine.block_size} tokens, "
                  f"backend {engine.backend})")
    live = console.is_terminal

    from sharedecode import BeamSearch, ParallelSampling, SharedPromptBatch

    console.print(Rule("1. beam search: 4 beams, forks share their parent's blocks"))
    beam = BeamSearch(engine, num_beams=4, num_return_sequences=4, max_new_tokens=max_new,
                      length_penalty=1.0)
    results, tracker = stream_and_show(beam, "beam search", [DEMO_BEAM_PROMPT], [DEMO_BEAM_PROMPT], engine,
                                       console, live=live, view_kind="beam", max_new_tokens=max_new)
    show_results(console, results, [DEMO_BEAM_PROMPT], "beam search", engine, tracker)

    console.print(Rule("2. parallel sampling: 4 samples forked from one prefilled prompt"))
    sample = ParallelSampling(engine, n=4, temperature=0.8, top_p=0.95, seed=0, max_new_tokens=max_new)
    results, tracker = stream_and_show(sample, "parallel sampling", [DEMO_SAMPLE_PROMPT],
                                       [DEMO_SAMPLE_PROMPT], engine, console, live=live, view_kind="sample",
                                       max_new_tokens=max_new)
    show_results(console, results, [DEMO_SAMPLE_PROMPT], "parallel sampling", engine, tracker)

    console.print(Rule("3. shared-prompt batch: one system prompt, computed once, 4 users"))
    batch = SharedPromptBatch(engine, system_prompt=DEMO_SYSTEM_PROMPT, strategy="greedy",
                              max_new_tokens=max(max_new // 2, 1))
    results, tracker = stream_and_show(batch, "shared-prompt batch (greedy)", DEMO_USER_PROMPTS,
                                       DEMO_USER_PROMPTS, engine, console, live=live, view_kind="batch",
                                       max_new_tokens=max(max_new // 2, 1))
    show_results(console, results, DEMO_USER_PROMPTS, "shared-prompt batch (greedy)", engine, tracker)
    console.print(f"[bold]demo finished in {time.perf_counter() - started:.1f} s[/]")
    return 0


# ------------------------------------------------------------------------- entry point
def one_line(message: str, limit: int = 400) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """The console script. Returns the exit status: 0, 2 for bad arguments or input."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        from rich.console import Console

        console = Console(stderr=False)
        if args.command == "demo":
            return run_demo(args, console)
        return run_command(args, console)
    except UsageError as exc:
        message = str(exc)
        if not message.startswith(parser.prog):
            message = f"{parser.prog}: error: {message}"
        print(one_line(message), file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as exc:  # the library's checks of parameters and prompts
        print(one_line(f"{parser.prog}: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the KV cache being full, a device error: still one line
        from sharedecode.block_allocator import KVCacheFull

        if isinstance(exc, KVCacheFull):
            print(one_line(f"{parser.prog}: error: KV cache full: {exc}"), file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("SHAREDECODE_TRACEBACK"):
            raise
        print(one_line(f"{parser.prog}: error: {type(exc).__name__}: {exc} "
                       "(set SHAREDECODE_TRACEBACK=1 for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
