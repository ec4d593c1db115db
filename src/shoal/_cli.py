"""The ``shoal`` command.

``shoal map MODULE:FUNCTION [FILE]``
    Apply FUNCTION to every line of FILE (or standard input) in parallel and
    write the results to standard output, in input order (``--unordered``: as
    they finish).  Lines are read lazily and at most a bounded window of them
    is in flight, so a file of any length streams through in flat memory::

        main thread: read line ─► pool.submit ─► window (deque of futures)
                     ◄─ result of the oldest (or any finished) future
                     ─► stdout;  errors ─► stderr "line N: Type: message"

    An item that raises, times out (``--timeout``) or kills its worker is
    reported on stderr with its line number (the first ten; later ones are
    counted, and a summary at the end gives the count per error type with
    its first lines); the others are unaffected and the exit status is 1 at
    the end.  ``--max-errors N`` stops at the N-th failed item.  A file name
    given as the module (``mytasks.py:fn``) is refused with the module name
    to use (``mytasks:fn``).  ``--on-error blank|error`` writes a
    placeholder in the failed item's place, so output line N belongs to input
    line N.  A reader that leaves early (``| head``) stops the run; the exit
    status still says whether an item had failed by then.  A module, function
    or file that cannot be found is a one-line error and exit status 2.

``shoal bench [--quick] [-k WORD] [--json FILE] [--plot FILE] [--load FILE]``
    Run the benchmark suite: shoal against the standard library (and loky,
    mpire, joblib when installed) in one run, with ratios, each shoal row
    marked met or MISSED against its target.  ``--json`` saves the results,
    ``--plot`` draws the ratios (matplotlib), ``--load`` prints and plots
    saved results instead of measuring.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
from collections import deque
from typing import Any

#: Results are flushed to stdout at least this often while input is read.
FLUSH_SECONDS = 0.2

EXIT_ITEM_FAILED = 1
EXIT_USAGE = 2


def _die(message: str) -> None:
    print(f"shoal: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _load_function(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        hint = ""
        if spec.endswith(".py"):
            hint = f" (for a function in {spec}: {_module_of_file(spec)}:FUNCTION)"
        _die(f"expected MODULE:FUNCTION (for example mypkg.tasks:resize), got {spec!r}{hint}")
    if module_name.endswith(".py") or "/" in module_name:
        # A file name where the module's name belongs: `shoal map mytasks.py:fn`.
        _die(
            f"{module_name!r} is a file name; MODULE:FUNCTION takes the module's name: "
            f"{_module_of_file(module_name)}:{attr} (a file mytasks.py is the module mytasks, "
            "pkg/tasks.py the module pkg.tasks, imported from the current directory or PYTHONPATH)"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    _check_owner(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            _die(f"no module named {module_name!r} (is it on PYTHONPATH or in the current directory?)")
        _die(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any import-time failure is a usage error here
        _die(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            _die(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        _die(f"{spec} is a {type(fn).__name__}, not a function")
    return fn


def _module_of_file(path: str) -> str:
    """The module name a user means by the file *path* (``./pkg/tasks.py``
    is ``pkg.tasks``), relative to the current directory when it is inside."""
    path = path.removesuffix(".py")
    if os.path.isabs(path):
        relative = os.path.relpath(path)
        path = relative if not relative.startswith("..") else os.path.basename(path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return ".".join(parts) or "MODULE"


def _check_owner(module_name: str) -> None:
    """Refuse a module of the current directory that another user owns: the
    current directory is searched first (as with ``python -m``), so in a
    directory others can write to (``/tmp``) they could plant the module
    and have it run as you (see docs/security.md)."""
    cwd = os.path.realpath(os.getcwd())
    me = os.geteuid()
    parts = module_name.split(".")
    for i in range(len(parts)):
        try:
            spec = importlib.util.find_spec(".".join(parts[: i + 1]))
        except (ImportError, ValueError):
            return  # reported by the import itself
        origin = getattr(spec, "origin", None)
        if not origin or not os.path.isfile(origin):
            continue
        if os.path.commonpath([cwd, os.path.realpath(origin)]) == cwd:
            owner = os.stat(origin).st_uid
            if owner not in (me, 0):
                _die(
                    f"refusing to import {origin}: it belongs to uid {owner}, not to you (uid {me}). "
                    "The current directory is searched first, so another user who can write here could "
                    "have put it there: run shoal map from a directory only you can write to"
                )


def _open_input(path: str | None) -> Any:
    if path is None or path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        _die(f"cannot read {path}: {exc.strerror or exc}")


def _format_error(exc: BaseException) -> str:
    if isinstance(exc, _InvalidJSON):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Failures:
    """The items that failed: the first SHOWN_ERRORS are reported one per
    line as they happen, the rest only counted, and ``summary()`` gives the
    count per kind of error (the exception type) with its first message
    and the first few line numbers.  So 2,000 items failing the same way
    print a dozen lines, not 2,000."""

    SHOWN_ERRORS = 10
    LINES_LISTED = 5

    def __init__(self) -> None:
        self.count = 0
        #: kind -> [count, first message, first line numbers]
        self.kinds: dict[str, list] = {}

    def add(self, lineno: int, kind: str, message: str) -> bool:
        """Count a failure; whether to report it on its own line."""
        self.count += 1
        entry = self.kinds.setdefault(kind, [0, message.removeprefix(f"{kind}: "), []])
        entry[0] += 1
        if len(entry[2]) < self.LINES_LISTED:
            entry[2].append(lineno)
        return self.count <= self.SHOWN_ERRORS

    def summary(self) -> list[str]:
        def where(n: int, lines: list[int]) -> str:
            listed = ", ".join(map(str, lines))
            more = f" and {n - len(lines)} more" if n > len(lines) else ""
            return f"line{'s' if n > 1 else ''} {listed}{more}"

        head = f"shoal: {self.count} item(s) failed"
        if self.count <= 1:
            return [head]
        kinds = sorted(self.kinds.items(), key=lambda kv: -kv[1][0])
        if len(kinds) == 1:
            ((kind, (n, message, lines)),) = kinds
            return [f"{head}, all with {kind} ({where(n, lines)}): {message}"]
        return [f"{head}:", *(f"  {n} {kind} ({where(n, lines)}): {msg}" for kind, (n, msg, lines) in kinds)]


class _TooManyErrors(Exception):
    """--max-errors was reached: stop reading and writing."""

    def __init__(self, lineno: int) -> None:
        super().__init__(lineno)
        self.lineno = lineno


def cmd_map(args: argparse.Namespace) -> int:
    import shoal

    fn = _load_function(args.function)
    source = _open_input(args.file)
    if args.jobs is not None and args.jobs < 1:
        _die("-j/--jobs must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        _die("--timeout must be a positive number of seconds")
    if args.max_errors is not None and args.max_errors < 1:
        _die("--max-errors must be at least 1")
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(unit="item", dynamic_ncols=True, file=sys.stderr)

    def report(lineno: int, message: str) -> None:
        text = f"line {lineno}: {message}"
        if bar is not None:
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    out = sys.stdout
    encode = json.dumps if args.json else str
    placeholder = _placeholder(args.on_error, args.json)
    failures = _Failures()
    stopped_at: int | None = None
    window: deque[tuple[int, concurrent.futures.Future]] = deque()
    limit = max(64, 256 * (args.jobs or os.cpu_count() or 1))
    flushed_at = time.monotonic()

    def fail(lineno: int, message: str, kind: str) -> None:
        if failures.add(lineno, kind, message):
            report(lineno, message)
            if failures.count == failures.SHOWN_ERRORS:
                note = "shoal: further failed items are counted, not shown; the summary at the end lists them"
                if placeholder is not None and args.on_error == "error":
                    note += " (--on-error error still writes each one's error in its place)"
                if bar is not None:
                    bar.write(note, file=sys.stderr)
                else:
                    print(note, file=sys.stderr, flush=True)
        if placeholder is not None:
            out.write(placeholder(message) + "\n")
        if args.max_errors is not None and failures.count >= args.max_errors:
            raise _TooManyErrors(lineno)

    def emit(lineno: int, future: concurrent.futures.Future) -> None:
        try:
            value = future.result()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            kind = "invalid JSON" if isinstance(exc, _InvalidJSON) else type(exc).__name__
            fail(lineno, _format_error(exc), kind)
        else:
            if value is _BLANK:
                out.write("\n")
                return
            try:
                text = encode(value)
            except Exception as exc:  # noqa: BLE001 - a result's own __str__ may raise anything
                kind = f"{type(exc).__name__} writing the result"
                if args.json and isinstance(exc, (TypeError, ValueError)):
                    fail(lineno, f"result is not JSON-serializable: {exc}", kind)
                else:
                    fail(lineno, f"result cannot be written: {_format_error(exc)}", kind)
            else:
                out.write(text + "\n")
        if bar is not None:
            bar.update(1)

    def settled(value: Any = None, error: BaseException | None = None) -> concurrent.futures.Future:
        """A finished future, so a line that never reached the pool keeps its
        place in the window (and in the output)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
        return future

    try:
        with shoal.Pool(args.jobs, task_timeout=args.timeout) as pool:
            try:
                for lineno, line in enumerate(source, 1):
                    line = line.rstrip("\n")
                    future = None
                    if args.json:
                        if not line.strip():
                            if placeholder is None:
                                continue
                            future = settled(_BLANK)  # mirrored, to keep lines aligned
                        else:
                            try:
                                item = json.loads(line)
                            except json.JSONDecodeError as exc:
                                future = settled(error=_InvalidJSON(exc))
                    else:
                        item = line
                    if future is None:
                        try:
                            future = pool.submit(fn, item)
                        except TypeError as exc:  # unpicklable item
                            future = settled(error=exc)
                    window.append((lineno, future))
                    while len(window) >= limit:
                        _drain(window, emit, args.unordered)
                    # Stream: write what is ready now, and flush now and
                    # then, so a slow input (tail -f) shows results early.
                    _emit_ready(window, emit, args.unordered)
                    now = time.monotonic()
                    if now - flushed_at > FLUSH_SECONDS:
                        out.flush()
                        flushed_at = now
            except BrokenPipeError:
                raise  # our output, not the input: handled below
            except OSError as exc:
                _die(f"cannot read the input: {exc}")
            except UnicodeDecodeError as exc:
                _die(f"the input is not UTF-8 text: {exc}")
            while window:
                _drain(window, emit, args.unordered)
    except _TooManyErrors as stop:
        # Leaving the with block terminated the pool: the items still
        # running were stopped, and no more input was read.
        stopped_at = stop.lineno
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`shoal map ... | head`): stop, but still say
        # whether an item had failed by then.
        _reader_left()
    finally:
        if bar is not None:
            bar.close()
        if source is not sys.stdin:
            source.close()
        try:
            out.flush()
        except BrokenPipeError:
            _reader_left()
    if failures.count:
        lines = failures.summary()
        if stopped_at is not None:
            lines.append(
                f"shoal: stopped after {failures.count} failed item(s) (--max-errors {args.max_errors}), "
                f"at line {stopped_at}: no more input was read, and the items still running were stopped"
            )
        try:
            print("\n".join(lines), file=sys.stderr)
        except BrokenPipeError:  # stderr went to the reader that left (2>&1 | head)
            _reader_left(sys.stderr)
        return EXIT_ITEM_FAILED
    return 0


#: The result written for a blank --json input line kept for alignment.
_BLANK = object()


class _InvalidJSON(ValueError):
    def __str__(self) -> str:
        return f"invalid JSON: {self.args[0]}"


def _placeholder(on_error: str, as_json: bool) -> Any:
    """What ``--on-error`` writes in place of a failed item's result
    (a function of the error text), or None to write nothing."""
    if on_error == "skip":
        return None
    if on_error == "blank":
        return lambda message: "null" if as_json else ""
    if as_json:
        return lambda message: json.dumps({"error": message})
    return lambda message: message


def _reader_left(stream: Any = None) -> None:
    """Point stdout (or *stream*) at /dev/null, so the interpreter's last
    flush does not fail again on the pipe nobody reads."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, (stream or sys.stdout).fileno())
    os.close(devnull)


def _emit_ready(window: deque, emit: Any, unordered: bool) -> None:
    """Emit the results that are ready without waiting (in order unless
    *unordered*)."""
    if not unordered:
        while window and window[0][1].done():
            lineno, future = window.popleft()
            emit(lineno, future)
    elif any(f.done() for _, f in window):
        keep: deque[tuple[int, concurrent.futures.Future]] = deque()
        for lineno, future in window:
            if future.done():
                emit(lineno, future)
            else:
                keep.append((lineno, future))
        window.clear()
        window.extend(keep)


def _drain(window: deque, emit: Any, unordered: bool) -> None:
    """Wait for a result (the oldest, or with *unordered* any), then emit
    every one that is ready."""
    waiting = [window[0][1]] if not unordered else [f for _, f in window]
    concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
    _emit_ready(window, emit, unordered)


def cmd_bench(args: argparse.Namespace) -> int:
    import multiprocessing

    from shoal import __version__, benchmarks

    if args.plot:
        _need_matplotlib()
        _check_plot_format(args.plot)
    # Say so now, not after minutes of measuring.
    for path in (args.json, args.plot):
        if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            _die(f"cannot write {path}: no such directory")
    if not args.load and args.select and not benchmarks.load_scenarios(args.select):
        names = [sc.name for sc in benchmarks.load_scenarios()]
        _die(f"no scenario name contains {args.select!r}; the scenarios are: {'; '.join(names)}")
    # With --json -, stdout carries the JSON and the table goes to stderr.
    table = sys.stderr if args.json == "-" else sys.stdout
    if args.load:
        saved = _read_results(args.load)
        # Drawn whole before printing: a record of the wrong shape is a usage
        # error, not a traceback after half a table.
        text = io.StringIO()
        try:
            print(f"shoal bench: results saved from {benchmarks.describe(saved)}", file=text)
            benchmarks.print_header(text)
            for record in saved["scenarios"]:
                benchmarks.print_record(record, text)
            benchmarks.print_summary(saved["scenarios"], text)
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            _die(
                f"{args.load} is not a results file written by `shoal bench --json` "
                f"(a scenario record is malformed: {type(exc).__name__}: {exc})"
            )
        table.write(text.getvalue())
    else:
        saved = {
            "shoal": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "start_method": multiprocessing.get_start_method(),
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(f"shoal bench: {benchmarks.describe(saved)}", file=table)
        saved["scenarios"] = benchmarks.run(args.select, quick=args.quick, out=table)
    if args.json:
        dumped = json.dumps(saved, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(dumped)
        else:
            _write(args.json, dumped)
    if args.plot:
        _plot(saved, args.plot)
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        _die(f"cannot write {path}: {exc.strerror or exc}")


def _read_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except OSError as exc:
        _die(f"cannot read {path}: {exc.strerror or exc}")
    except ValueError as exc:
        _die(f"{path} is not JSON: {exc}")
    if not isinstance(saved, dict) or not isinstance(saved.get("scenarios"), list):
        _die(f"{path} is not a results file written by `shoal bench --json`")
    return saved


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _die("--plot needs matplotlib, which is not installed: pip install matplotlib")


def _check_plot_format(path: str) -> None:
    """A file type matplotlib cannot draw is a usage error now, not after
    minutes of measuring (no extension: PNG, as _plot draws it)."""
    from matplotlib.backend_bases import FigureCanvasBase

    name = os.path.basename(path)
    fmt = name.rsplit(".", 1)[-1].lower() if "." in name else "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        _die(
            f"cannot write {path}: matplotlib cannot draw .{fmt} files; use one of "
            f"{', '.join('.' + f for f in sorted(supported))}"
        )


def _plot(saved: dict, path: str) -> None:
    from shoal.benchmarks import draw_ratios

    try:
        draw_ratios(saved, path)
    except (OSError, ValueError) as exc:
        _die(f"cannot write {path}: {exc}")


MAP_DESCRIPTION = """\
Apply a function to every line of FILE (or standard input) in parallel and
write one result per line to standard output, in input order.

MODULE:FUNCTION names the function: MODULE is imported from the current
directory or PYTHONPATH (a file mytasks.py is the module mytasks, a file
pkg/tasks.py the module pkg.tasks) and FUNCTION is a name in it (dots reach
further: mytasks:Resizer.run).  The function takes one argument, the line
without its newline (with --json: the decoded JSON value), and its return
value is written with str() (with --json: as JSON).
"""

MAP_EPILOG = """\
example:
  $ cat mytasks.py
  def square(line):
      return int(line) ** 2
  $ seq 4 | shoal map mytasks:square -j 2
  1
  4
  9
  16

An item that raises, times out or kills its worker is reported on stderr as
"line N: Type: message" (the first ten; then a count per error type at the
end); the other items are unaffected. --max-errors N stops at the N-th.  Exit status: 0 when
every item succeeded, 1 when any item failed (also when the reader left early,
as with | head), 2 for a usage error, 130 on Ctrl-C.
"""


def build_parser() -> argparse.ArgumentParser:
    from shoal import __version__

    parser = argparse.ArgumentParser(prog="shoal", description="Process parallelism that never hangs.")
    parser.add_argument(
        "--version", action="version", version=f"shoal {__version__} (Python {platform.python_version()})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_map = sub.add_parser(
        "map",
        help="apply MODULE:FUNCTION to each line of FILE in parallel",
        description=MAP_DESCRIPTION,
        epilog=MAP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_map.add_argument(
        "function", metavar="MODULE:FUNCTION", help="the function to apply, e.g. mytasks:square"
    )
    p_map.add_argument("file", metavar="FILE", nargs="?", help="input file (default: standard input)")
    p_map.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p_map.add_argument("--json", action="store_true", help="items and results are JSON, one per line")
    p_map.add_argument("--unordered", action="store_true", help="write results as they finish")
    p_map.add_argument("--timeout", type=float, default=None, help="seconds each item may take")
    p_map.add_argument(
        "--max-errors",
        type=int,
        default=None,
        metavar="N",
        help="stop after N items failed: read no more input and stop the items still running "
        "(default: go on to the end)",
    )
    p_map.add_argument(
        "--on-error",
        choices=("skip", "blank", "error"),
        default="skip",
        help="what to write in place of a failed item's result: nothing (skip, the default), "
        "an empty line (blank; null with --json) or the error text (error; "
        '{"error": "..."} with --json); blank and error keep output line N aligned '
        "with input line N",
    )
    p_map.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    p_map.add_argument("--no-progress", dest="progress", action="store_false")
    p_map.set_defaults(handler=cmd_map)

    p_bench = sub.add_parser(
        "bench",
        help="run the benchmark suite against the standard library",
        description="Measure shoal and the standard library (and loky, mpire, joblib when installed) "
        "in the same run and print each figure with its ratio to the standard library's. "
        "Each shoal row is marked met or MISSED against its target.",
    )
    p_bench.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    p_bench.add_argument(
        "-k", dest="select", metavar="WORD", default=None, help="only scenarios whose name contains WORD"
    )
    p_bench.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="also write the results as JSON to FILE ('-': to stdout, the table to stderr)",
    )
    p_bench.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="draw the ratios to FILE (.png, .svg, .pdf); needs matplotlib: pip install matplotlib",
    )
    p_bench.add_argument(
        "--load",
        metavar="FILE",
        default=None,
        help="print (and --plot) results saved with --json instead of measuring",
    )
    p_bench.set_defaults(handler=cmd_bench)
    return parser


def _ignore_further_interrupts() -> None:
    """Once interrupted, the command is leaving: a second Ctrl-C (a user
    pressing it again) must not turn the clean exit 130 into a traceback
    from the clean-up."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # `shoal bench` (map handles its own)
        _ignore_further_interrupts()
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `shoal bench | head`: the reader left; that is not an error.
        _reader_left()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
