"""`clipbatch run|validate|demo|relabel|search ...`: the command line over the pipeline and its outputs."""

from __future__ import annotations

import argparse
import gc
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
    from clipbatch.ray_session import build_while_ray_starts

    job = build_while_ray_starts(args.spec, _overrides(args.set))
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


def add_relabel_parser(sub) -> None:
    p = sub.add_parser("relabel", help="new classes, templates or threshold over an output's stored embeddings",
                       description="Recompute labels and scores of a finished output from its stored embeddings, with new "
                       "classes, templates or threshold, into a new output; no image is read again.")
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
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the outputs, e.g. endpoint_url=http://host:8333 (repeatable)")
    p.set_defaults(func=cmd_relabel)


def cmd_relabel(args) -> int:
    from clipbatch.relabel import Relabel
    from clipbatch.stored import parse_storage_options

    job = Relabel(args.output, args.out, classes=args.classes, classes_file=args.classes_file,
                  templates=args.templates, min_score=args.min_score, unknown=args.unknown, top_k=args.top_k,
                  storage_options=parse_storage_options(args.storage_option))
    print(f"clipbatch: relabeling {job.stored.url} with {len(job.classes)} classes x {len(job.templates)} "
          f"templates (model {job.stored.metadata['model']}) into {job.out.url}", flush=True)
    summary = job.run()
    if not summary.skipped:
        print(f"\nclipbatch: complete: {summary.rows:,} rows ({summary.errors:,} errors) relabeled at "
              f"{summary.rows_per_s:,.0f} rows/s, {summary.seconds:.1f} s in all\nresults: {summary.output}",
              flush=True)
    return 0


def add_search_parser(sub) -> None:
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
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the output and the images, e.g. endpoint_url=... (repeatable)")
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from clipbatch.search import as_json, format_results, image_query, search, text_query, write_html
    from clipbatch.stored import StoredOutput, parse_storage_options

    if (args.query is None) == (args.image is None):
        raise SpecError("give a text query or --image PATH (one of them)")
    if args.k < 1:
        raise SpecError("-k must be at least 1")
    storage_options = parse_storage_options(args.storage_option)
    stored = StoredOutput(args.output, storage_options)
    stored.require_embeddings("search")
    member = stored.members[0]  # an ensemble is searched in its first model's embeddings
    loaded = stored.load_model(member, device="cpu")
    query = text_query(loaded, args.query) if args.image is None else \
        image_query(loaded, args.image, member["preprocess_cfg"], storage_options)
    del loaded  # the model is not needed for the scan
    results = search(stored, query, args.k, args.where, column=member["embedding_column"])
    print(as_json(results) if args.json else format_results(results))
    if args.html:
        write_html(args.html, f"clipbatch search: {args.query or args.image}", results, stored, storage_options)
        if not args.json:
            print(f"gallery: {args.html}")
    return 0


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
    add_relabel_parser(sub)
    add_search_parser(sub)
    from clipbatch.evaluate import add_eval_parser
    add_eval_parser(sub)
    from clipbatch.submit import add_submit_parsers
    add_submit_parsers(sub)
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


def command_line() -> int:
    """The `clipbatch` command: main(), then a quick exit. The interpreter's last garbage collection
    walks every object that torch, open_clip and Ray made (2.1 s of a job's exit, measured here), and
    the process ends right after it anyway, so those objects are frozen out of that collection."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command_line())
