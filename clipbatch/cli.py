"""`clipbatch run|validate|demo|submit|status|logs|eval|report|relabel|search`: the command line.

Every parser is here; each command calls one library function. A command imports
its module when it runs, so that `clipbatch --help` and a bad spec do not wait for
torch, Ray and matplotlib to import.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clipbatch.errors import UserError, redact, unexpected
from clipbatch.spec import parse_override, parse_storage_options


def _overrides(items: list[str] | None) -> dict:
    return dict(parse_override(item) for item in items or [])


def cmd_validate(args) -> int:
    from clipbatch.pipeline.job import build

    print(build(args.spec, _overrides(args.set)).describe())
    print("spec is valid; nothing was run")
    return 0


def cmd_run(args) -> int:
    from clipbatch.pipeline.job import build

    job = build(args.spec, _overrides(args.set))
    print(job.describe(), flush=True)
    summary = job.run(stats=args.stats)
    if not summary.skipped:
        state = "complete" if summary.complete else "INCOMPLETE (rerun to finish)"
        print(f"\nclipbatch: {state}: {summary.rows:,} rows ({summary.new_rows:,} new), {summary.errors:,} errors, "
              f"{summary.images_per_s:.1f} img/s on {summary.device}, {summary.seconds:.1f} s in all\n"
              f"results: {summary.output}", flush=True)
    return 0 if summary.complete else 1


def cmd_demo(args) -> int:
    from clipbatch.commands.demo import MIN_ACCURACY, print_report, run_demo

    metrics = run_demo(args.out, args.n, args.seed)
    print_report(metrics)
    return 0 if metrics["accuracy"] >= MIN_ACCURACY else 1


def cmd_relabel(args) -> int:
    from clipbatch.commands.relabel import Relabel

    job = Relabel(args.output, args.out, classes=args.classes, classes_file=args.classes_file,
                  templates=args.templates, min_score=args.min_score, unknown=args.unknown, top_k=args.top_k,
                  storage_options=parse_storage_options(args.storage_option))
    print(job.describe(), flush=True)
    summary = job.run()
    if not summary.skipped:
        print(f"\nclipbatch: complete: {summary.rows:,} rows ({summary.errors:,} errors) relabeled at "
              f"{summary.rows_per_s:,.0f} rows/s, {summary.seconds:.1f} s in all\nresults: {summary.output}",
              flush=True)
    return 0


def cmd_search(args) -> int:
    from clipbatch.commands.search import run_search

    if (args.query is None) == (args.image is None):
        raise UserError("give a text query or --image PATH (one of them)")
    if args.k < 1:
        raise UserError("-k must be at least 1")
    print(run_search(args.output, args.query, args.image, args.k, args.where, args.json, args.html,
                     parse_storage_options(args.storage_option)))
    return 0


def cmd_eval(args) -> int:
    from clipbatch.commands.evaluate import evaluate, print_metrics

    print_metrics(evaluate(args.spec, _overrides(args.set), args.truth, args.truth_column, args.calibrate,
                           args.templates or []))
    return 0


def cmd_report(args) -> int:
    from clipbatch.commands.report import build_report

    print(f"clipbatch report: {build_report(args.output, parse_storage_options(args.storage_option))}", flush=True)
    return 0


def cmd_submit(args) -> int:
    from clipbatch.commands.submit import submit

    return submit(args.spec, _overrides(args.set), args.address, not args.no_wait, args.working_dir)


def cmd_status(args) -> int:
    from clipbatch.commands.submit import client_for_job, report

    return report(client_for_job(args.address, args.id), args.id)


def cmd_logs(args) -> int:
    from clipbatch.commands.submit import client_for_job, follow, print_logs

    client = client_for_job(args.address, args.id)
    return follow(client, args.id) if args.follow else print_logs(client, args.id)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a spec key, e.g. --set output.path=out/ --set compute.actors=4")


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the output and the images, e.g. endpoint_url=http://host:8333 "
                   "(repeatable; credentials come from the environment)")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the Ray dashboard, e.g. http://HEAD:8265 "
                                     "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")


def _job_parsers(sub) -> None:
    p = sub.add_parser("run", help="run a job spec")
    _spec_args(p)
    p.add_argument("--stats", action="store_true", help="print Ray Data's per-stage statistics at the end")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a spec and list its inputs without running anything")
    _spec_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("demo", help="label a generated 36-class image set with the bundled model",
                       description="Label a generated, labeled image set with the bundled model, through the "
                       "normal pipeline, and score it against the folder names.")
    p.add_argument("--out", type=Path, default=Path("./clipbatch-demo"),
                   help="folder for the pictures, job.yaml and output (default ./clipbatch-demo)")
    p.add_argument("--n", type=int, default=360, help="number of pictures in all (default 360 = 10 per class)")
    p.add_argument("--seed", type=int, default=2024, help="picture seed (default 2024, never used in training)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="score a job's output against ground truth (runs the job if needed)",
                       description="A job's output against ground truth: metrics.json, plots, calibration, "
                       "template sets.")
    _spec_args(p)
    p.add_argument("--truth", metavar="FILE", help="CSV or Parquet with columns id,label (default: the first "
                   "folder of each id is its class)")
    p.add_argument("--truth-column", metavar="COLUMN", help="an output column holding the true class "
                   "(a parquet input column carried with input.keep)")
    p.add_argument("--calibrate", action="store_true", help="fit one temperature (NLL) and report ECE before/after")
    p.add_argument("--templates", action="append", metavar="SET", help="compare template sets from the stored "
                   "embeddings: a built-in name, a templates file, or FILE#SET; repeat for each")
    p.set_defaults(func=cmd_eval)


def _output_parsers(sub) -> None:
    p = sub.add_parser("relabel", help="new classes, templates or threshold over an output's stored embeddings",
                       description="Recompute labels and scores of a finished output from its stored embeddings, "
                       "with new classes, templates or threshold, into a new output; no image is read again.")
    p.add_argument("output", help="a complete clipbatch output (local path or URL)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--class", dest="classes", action="append", metavar="NAME", help="a class (repeatable)")
    source.add_argument("--classes-file", help="one class per line (local path or URL)")
    p.add_argument("--template", dest="templates", action="append", metavar="T",
                   help="a template with {} (repeatable), or one built-in set name; default: the output's own")
    p.add_argument("--min-score", type=float, help="below this score the label is null (scores stay complete)")
    p.add_argument("--unknown", metavar="NAME", help="the label below --min-score instead of null")
    p.add_argument("--top-k", type=int, help="length of top_labels/top_scores; default: the output's")
    p.add_argument("--out", required=True, help="where the new output goes (a new path)")
    _storage_args(p)
    p.set_defaults(func=cmd_relabel)
    p = sub.add_parser("search", help="top-k rows of an output by cosine to a text or an image",
                       description="Exact top-k rows of an output by cosine similarity between a query "
                       "and the stored embeddings; no image is read again (except thumbnails for --html).")
    p.add_argument("output", help="a clipbatch output (local path or URL)")
    p.add_argument("query", nargs="?", help="text, encoded as written (no template)")
    p.add_argument("--image", help="an image (path or URL) to search by instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--where", help="SQL filter on the output's columns, e.g. \"label = 'dog' AND score > 0.5\"")
    p.add_argument("--json", action="store_true", help='print [{"id", "source", "score", "label"}, ...]')
    p.add_argument("--html", metavar="FILE", help="also write a gallery page of the results' thumbnails")
    _storage_args(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("report", help="write OUTPUT/_report/index.html: charts and galleries of a job's output",
                       description="One self-contained HTML page about what a job labeled.")
    p.add_argument("output", help="a job's output.path (local or any fsspec URL)")
    _storage_args(p)
    p.set_defaults(func=cmd_report)


def _cluster_parsers(sub) -> None:
    p = sub.add_parser("submit", help="run a job spec on a Ray cluster (Ray Jobs API)")
    _spec_args(p)
    _address_arg(p)
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--working-dir", metavar="DIR",
                   help="ship DIR with the job; local paths in the spec under DIR are read from the copy")
    p.set_defaults(func=cmd_submit)
    for name, func, text in (("status", cmd_status, "state of a submitted job"),
                             ("logs", cmd_logs, "logs of a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id", help="submission id printed by `clipbatch submit`")
        _address_arg(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    """Every command ends in one line of clipbatch's: an error never ends in a traceback unless --debug
    (anywhere on the command line) asks for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = argparse.ArgumentParser(prog="clipbatch", description=__doc__.split("\n\n")[0],
                                     epilog="--debug (anywhere): show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    _job_parsers(sub)
    _output_parsers(sub)
    _cluster_parsers(sub)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except UserError as exc:
        _no_reports_after_the_error()
        print(f"clipbatch: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipbatch: interrupted; rerun the same command to finish the missing work", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        _no_reports_after_the_error()
        print(f"clipbatch: error: {unexpected(exc)} (what was written is kept and a rerun resumes; "
              "--debug shows the traceback)", file=sys.stderr)
        return 1


def _no_reports_after_the_error() -> None:
    """The failed tasks a stopped job leaves behind have the error just reported as their cause: without
    this Ray prints each one's traceback ("Unhandled error") when the process exits, after clipbatch's line."""
    os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"


if __name__ == "__main__":
    sys.exit(main())
