"""`python -m asyncpolicy` — run a training job, print the config reference, run benchmarks.

Exit codes: 0 the run finished; 1 the run failed (the message names the actor and cause);
2 bad input (the message names the key or file); 130 / 143 stopped by SIGINT / SIGTERM
(after a graceful stop and a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
import msgspec
import structlog

from asyncpolicy.config import describe_fields, load_config
from asyncpolicy.errors import ConfigError, RunFailed

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors are bad input too: exit 2, one line
        self.exit(EXIT_BAD_INPUT, f"asyncpolicy: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m asyncpolicy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="train (defaults: the embedded tiny model on the CPU)",
        description="Train a policy. Overrides are dotted key=value words, e.g. async_training.max_queue_size=500. "
        "`python -m asyncpolicy config` lists every key.",
    )
    run.add_argument("--config", metavar="FILE", help="YAML or TOML config file")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    cfg = sub.add_parser("config", help="print every config key with its default and meaning")
    cfg.add_argument("--config", metavar="FILE", help="show the values resolved from this file")
    cfg.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("bench", help="run benchmark suites and write benchmark_results_<time>/ (bench --help)", add_help=False)
    return p


def _print_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    values = msgspec.to_builtins(cfg)
    for key, default, desc in describe_fields():
        value: Any = values
        for part in key.split("."):
            value = value[part]
        print(f"{key} = {value!r}    # {desc} (default {default})")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from asyncpolicy.logging import configure_logging
    from asyncpolicy.runner import run_cli
    from asyncpolicy.supervisor import prepare_output_dir

    cfg = load_config(args.config, args.overrides)
    out = prepare_output_dir(cfg)
    if not cfg.output_dir:  # pin the generated name so every part of the run agrees on it
        cfg = msgspec.structs.replace(cfg, output_dir=str(out))
    configure_logging(cfg.log_level, out / "events.jsonl")
    outcome = anyio.run(run_cli, cfg)
    result = outcome.result
    assert result is not None
    structlog.get_logger("asyncpolicy").info("run_complete", **msgspec.to_builtins(result))
    print(
        f"finished {result.steps} steps in {result.elapsed_s:.1f}s: made {result.made} samples = trained {result.trained}"
        f" + dropped stale {result.dropped_stale} + queued {result.queued} ({result.in_flight} in flight);"
        f" outputs in {result.output_dir}",
        file=sys.stderr,
    )
    return outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suites parse their own options (`bench --quick` included)
        from asyncpolicy.bench.cli import bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            return _print_config(args)
        return _run(args)
    except ConfigError as e:
        print(f"asyncpolicy: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as e:
        print(f"asyncpolicy: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("asyncpolicy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
