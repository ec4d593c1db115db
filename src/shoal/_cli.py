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
    reported on stderr with its line number; the others are unaffected and the
    exit status is 1 at the end.  A module, function or file that cannot be
    found is a one-line error and exit status 2.

``shoal bench [--quick] [-k WORD]``
    Run the benchmark suite: shoal against the standard library (and loky,
    mpire, joblib when installed) in one run, with ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import platform
import sys
import time
from collections import deque

#: Results are flushed to stdout at least this often while input is read.
FLUSH_SECONDS = 0.2

EXIT_ITEM_FAILED = 1
EXIT_USAGE = 2


def _die(message: str) -> None:
    print(f"shoal: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _load_function(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        _die(f"expected MODULE:FUNCTION (for example mypkg.tasks:resize), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
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


def _open_input(path: str | None):
    if path is None or path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        _die(f"cannot read {path}: {exc.strerror or exc}")


def _format_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def cmd_map(args: argparse.Namespace) -> int:
    import shoal

    fn = _load_function(args.function)
    source = _open_input(args.file)
    if args.jobs is not None and args.jobs < 1:
        _die("-j/--jobs must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        _die("--timeout must be a positive number of seconds")
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
    failures = 0
    window: deque[tuple[int, concurrent.futures.Future]] = deque()
    limit = max(64, 256 * (args.jobs or os.cpu_count() or 1))
    flushed_at = time.monotonic()

    def emit(lineno: int, future: concurrent.futures.Future) -> None:
        nonlocal failures
        try:
            value = future.result()
        except BaseException as exc:  # noqa: BLE001 - every item error is reported, not raised
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures += 1
            report(lineno, _format_error(exc))
        else:
            try:
                out.write(encode(value) + "\n")
            except (TypeError, ValueError) as exc:
                failures += 1
                report(lineno, f"result is not JSON-serializable: {exc}")
        if bar is not None:
            bar.update(1)

    try:
        with shoal.Pool(args.jobs, task_timeout=args.timeout) as pool:
            try:
                for lineno, line in enumerate(source, 1):
                    line = line.rstrip("\n")
                    if args.json:
                        if not line.strip():
                            continue
                        try:
                            item = json.loads(line)
                        except json.JSONDecodeError as exc:
                            failures += 1
                            report(lineno, f"invalid JSON: {exc}")
                            continue
                    else:
                        item = line
                    try:
                        window.append((lineno, pool.submit(fn, item)))
                    except TypeError as exc:  # unpicklable item
                        failures += 1
                        report(lineno, _format_error(exc))
                        continue
                    while len(window) >= limit:
                        _drain(window, emit, args.unordered)
                    # Stream: write what is ready now, and flush now and
                    # then, so a slow input (tail -f) shows results early.
                    _emit_ready(window, emit, args.unordered)
                    now = time.monotonic()
                    if now - flushed_at > FLUSH_SECONDS:
                        out.flush()
                        flushed_at = now
            except OSError as exc:
                _die(f"cannot read the input: {exc}")
            except UnicodeDecodeError as exc:
                _die(f"the input is not UTF-8 text: {exc}")
            while window:
                _drain(window, emit, args.unordered)
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
        if source is not sys.stdin:
            source.close()
        try:
            out.flush()
        except BrokenPipeError:
            pass
    if failures:
        print(f"shoal: {failures} item(s) failed", file=sys.stderr)
        return EXIT_ITEM_FAILED
    return 0


def _emit_ready(window: deque, emit, unordered: bool) -> None:
    """Emit the results that are ready without waiting (in order unless
    *unordered*)."""
    if not unordered:
        while window and window[0][1].done():
            lineno, future = window.popleft()
            emit(lineno, future)
    elif any(f.done() for _, f in window):
        keep = deque()
        for lineno, future in window:
            if future.done():
                emit(lineno, future)
            else:
                keep.append((lineno, future))
        window.clear()
        window.extend(keep)


def _drain(window: deque, emit, unordered: bool) -> None:
    """Wait for a result (the oldest, or with *unordered* any), then emit
    every one that is ready."""
    waiting = [window[0][1]] if not unordered else [f for _, f in window]
    concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
    _emit_ready(window, emit, unordered)


def cmd_bench(args: argparse.Namespace) -> int:
    import multiprocessing

    from shoal.benchmarks._framework import run

    print(
        f"shoal bench: Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, start method {multiprocessing.get_start_method()}, "
        f"{'quick' if args.quick else 'full'} run"
    )
    run(args.select, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Process parallelism that never hangs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_map = sub.add_parser("map", help="apply MODULE:FUNCTION to each line of FILE in parallel")
    p_map.add_argument("function", metavar="MODULE:FUNCTION")
    p_map.add_argument("file", metavar="FILE", nargs="?", help="input file (default: standard input)")
    p_map.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p_map.add_argument("--json", action="store_true", help="items and results are JSON, one per line")
    p_map.add_argument("--unordered", action="store_true", help="write results as they finish")
    p_map.add_argument("--timeout", type=float, default=None, help="seconds each item may take")
    p_map.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    p_map.add_argument("--no-progress", dest="progress", action="store_false")
    p_map.set_defaults(handler=cmd_map)

    p_bench = sub.add_parser("bench", help="run the benchmark suite against the standard library")
    p_bench.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    p_bench.add_argument("-k", dest="select", default=None, help="only scenarios whose name contains WORD")
    p_bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:
        # `shoal map ... | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
