"""`clipbatch run|validate|demo ...`: the command line over the pipeline."""

from __future__ import annotations

import argparse
import sys

from clipbatch.config import SpecError, parse_override
from clipbatch.secrets import redact


def _overrides(items: list[str] | None) -> dict:
    return dict(parse_override(item) for item in items or [])


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a spec key, e.g. --set output.path=out/ --set compute.actors=4")


def cmd_validate(args) -> int:
    from clipbatch.pipeline import build

    job = build(args.spec, _overrides(args.set))
    print(job.describe())
    print("spec is valid; nothing was run")
    return 0


def cmd_run(args) -> int:
    from clipbatch.pipeline import build

    job = build(args.spec, _overrides(args.set))
    print(job.describe(), flush=True)
    summary = job.run()
    print_summary(summary)
    return 0 if summary.complete else 1


def print_summary(summary) -> None:
    if summary.skipped:
        return
    state = "complete" if summary.complete else "INCOMPLETE (rerun to finish)"
    print(f"\nclipbatch: {state}: {summary.rows:,} rows ({summary.new_rows:,} new), {summary.errors:,} errors, "
          f"{summary.images_per_s:.1f} img/s on {summary.device}, {summary.seconds:.1f} s in all\n"
          f"results: {summary.output}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a job spec")
    _add_spec_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a spec and list its inputs without running anything")
    _add_spec_args(p)
    p.set_defaults(func=cmd_validate)
    from clipbatch.demo.command import add_demo_parser
    add_demo_parser(sub)
    from clipbatch.evaluate import add_eval_parser
    add_eval_parser(sub)
    from clipbatch.report import add_report_parser
    add_report_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"clipbatch: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipbatch: interrupted; rerun the same command to finish the missing work", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
