"""The ``crosstower`` command.

Input errors (:class:`~crosstower.errors.CrosstowerError`) end with one line on stderr and exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from crosstower.errors import CrosstowerError
from crosstower.tables import text_table

POINTWISE_COLUMNS = ("auc", "gauc", "logloss")  # protocol P4 (pre-ranking)


RUN_EPILOG = """\
A config is YAML with the sections dataset, split, model, train, evaluate (and distill);
`crosstower config` lists the models, data sets and sections, `crosstower config NAME` the keys
of one with their defaults and meaning. Examples:
  crosstower run                                   the synthetic default suite
  crosstower run configs/ml100k-dssm-p1.yaml       one config (data sets from ../shared/data)
  crosstower run configs/ml100k-dssm-p1.yaml --set train.lr=0.01 --set model.output_dim=32
"""


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand: every subparser shares it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an input error instead of one line")
    parser = argparse.ArgumentParser(prog="crosstower", parents=[common],
                                     description="Candidate retrieval beyond the two-tower model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common], **kwargs)

    run = command("run", "train, evaluate and serve a config; write its run folder (metrics.json, model, index)",
                  epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", type=Path, help="YAML config; none: the embedded synthetic default suite")
    _data_dir(run)
    run.add_argument("--out", type=Path, help="output folder (default runs/NAME)")
    _overrides(run)
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    config = command("config", "list the models, data sets and config sections, or the keys of one")
    config.add_argument("name", nargs="?", help="a section (train, split, ...), a model name or distill.METHOD")

    data = command("data", "prepare, download or describe data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = data_commands.add_parser("prepare", help="load a config's data set, split it and save the split",
                                       parents=[common])
    prepare.add_argument("config", type=Path, help="YAML config naming the data set and the split")
    _data_dir(prepare)
    prepare.add_argument("--out", type=Path, required=True, help="folder for split.npz and stats.json")
    _overrides(prepare)
    download = data_commands.add_parser("download", help="fetch an official MovieLens archive", parents=[common])
    download.add_argument("name", help="ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest or ml-latest-small")
    download.add_argument("--data-dir", type=Path, default=Path("data"), help="where to put it (default data/)")
    stats = data_commands.add_parser("stats", help="print a data set's size and how each field was encoded",
                                     parents=[common])
    stats.add_argument("config", type=Path, help="YAML config naming the data set")
    _data_dir(stats)
    _overrides(stats)
    synth = data_commands.add_parser("synthetic", help="stream a synthetic data set to disk", parents=[common])
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    _overrides(synth, "a generator option, e.g. --set num_items=1000000 (repeatable)")

    recommend = command("recommend", "print the top items of a user, or of a history, from a finished run")
    _run_dir(recommend)
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the run's data set (the user's known items are the history)")
    who.add_argument("--history", help="comma-separated item ids, oldest first: a user the run has never seen")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--include-seen", action="store_true", help="do not remove the items of the history")
    recommend.add_argument("--json", action="store_true", help="print the answer as JSON")
    _data_dir(recommend)

    serve = command("serve", "serve a finished run over HTTP (POST /recommend, GET /health, /info, /docs)")
    _run_dir(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--threads", type=int, help="torch threads that score (default: the run's train.threads)")
    serve.add_argument("--eager", action="store_true",
                       help="encode queries in PyTorch instead of the compiled ONNX graph (slower per request)")
    _data_dir(serve)

    export = command("export", "write a run's user tower (ONNX), item vectors and faiss index for serving "
                               "without crosstower")
    _run_dir(export, "a folder written by `crosstower run` (an inner-product model)")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    export.add_argument("--out", type=Path, help="output folder (default RUN_DIR-onnx beside the run)")
    _data_dir(export)

    compare = command("compare", "write a report comparing finished runs (markdown table, PNG plots)")
    compare.add_argument("run_dirs", nargs="+", type=Path,
                         help="folders written by `crosstower run`, or earlier reports (their runs come along)")
    compare.add_argument("--out", type=Path, default=Path("report"), help="report folder (default report/)")
    compare.add_argument("--seeds", action="store_true", help="one row per config: mean ± std over its seeds")
    _data_dir(compare)

    evaluate = command("evaluate", "recompute the metrics of a finished run from its saved model and split")
    _run_dir(evaluate)
    _data_dir(evaluate)
    return parser


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="folder holding the data sets (default ../shared/data)")


def _run_dir(parser: argparse.ArgumentParser, help: str = "a folder written by `crosstower run`") -> None:
    parser.add_argument("run_dir", type=Path, help=help)


def _overrides(parser: argparse.ArgumentParser, help: str = "override a config key, e.g. --set train.lr=0.01 "
                                                            "(repeatable)") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except CrosstowerError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue from the last epoch" if args.command == "run" else ""
        print(f"interrupted: no results written{hint}", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "config":
        from crosstower import config_help

        print(config_help.describe(args.name) if args.name else config_help.overview())
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "recommend":
        return _recommend(args)
    if args.command == "compare":
        from crosstower.compare import REPORT, write_report

        out = write_report(args.run_dirs, args.out, args.seeds, args.data_dir)
        print((out / REPORT).read_text())
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "serve":
        from crosstower.serve import serve

        try:
            serve(args.run_dir, args.host, args.port, args.data_dir, args.threads, args.eager)
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C
            pass
        return 0
    return _data(args)


def _run(args: argparse.Namespace) -> int:
    from crosstower.config import load_config, parse_config
    from crosstower.defaults import DEFAULT_OUT, default_suite
    from crosstower.run import run_experiment
    from crosstower.train.distributed import start_ranks, stop_ranks

    if args.config is not None:
        config = load_config(args.config, args.overrides)
        runs = [(args.out or Path("runs") / config.run_name, config)]
    else:
        runs = [(out, parse_config(raw, f"default {raw['name']}", args.overrides))
                for out, raw in default_suite(args.out or DEFAULT_OUT)]
    ranks = start_ranks(runs[0][1].train.device)  # several processes under torchrun
    if not ranks.main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
    rows = []
    try:
        for out, config in runs:
            results = run_experiment(config, out, args.data_dir, resume=args.resume, ranks=ranks)
            if results is not None:
                rows.append(results)
                print(f"wrote {out / 'metrics.json'}", file=sys.stderr)
    finally:
        stop_ranks()
    if ranks.main:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """Test metrics, one row per run: for P1-P3 runs Recall at every cut-off the runs measured
    (``evaluate.ks``) and NDCG and precision at the largest, for P4 runs AUC, GAUC and log loss
    (only the column groups some run has)."""
    columns = []
    ranked = [r for r in rows if r["protocol"] != "p4"]
    if ranked:
        ks = sorted({int(key.split("@")[1]) for r in ranked for key in r["metrics"]["test"] if key.startswith("recall@")})
        columns += [f"recall@{k}" for k in ks] + [f"ndcg@{ks[-1]}", f"precision@{ks[-1]}"]
    if len(ranked) < len(rows):
        columns += POINTWISE_COLUMNS
    header = ["model", "dataset", "protocol", *columns, "train s", "test eval s"]
    lines = []
    for r in rows:
        test = r["metrics"]["test"]
        lines.append([
            model_label(r), r["dataset"], r["protocol"],
            *(f"{test[c]:.4f}" if c in test else "-" for c in columns),
            f"{r['timing']['train_seconds']:.1f}", f"{r['timing']['test_eval_seconds']:.2f}",
        ])
    return text_table(header, lines)


def model_label(results: dict) -> str:
    """The model's name, and for a distilled student its method and teacher ("youtubednn, kd from
    mvke"), so a student's row is not read as its undistilled model's."""
    distill = results.get("config", {}).get("distill")
    if not distill:
        return results["model"]
    teacher = distill.get("teacher") or {}
    source = teacher.get("run") or teacher.get("config")
    return f"{results['model']}, {distill['method']}" + (f" from {Path(source).stem}" if source else "")


def _evaluate(args: argparse.Namespace) -> int:
    from crosstower.run import reevaluate
    from crosstower.run_dir import RunFolder

    saved = RunFolder(args.run_dir).read_metrics()
    metrics = reevaluate(args.run_dir, args.data_dir)
    print(json.dumps({"run": str(args.run_dir), "metrics": metrics, "saved": saved["metrics"]}, indent=2))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from crosstower.recommend import format_recommendation, load_run

    retriever = load_run(args.run_dir, args.data_dir)
    if args.user is not None:
        answer = retriever.recommend(users=[args.user], k=args.k, exclude_seen=not args.include_seen)[0]
    else:
        history = [item.strip() for item in args.history.split(",") if item.strip()]
        answer = retriever.recommend(histories=[history], k=args.k, exclude_seen=not args.include_seen)[0]
    if args.json:
        print(json.dumps({**answer.as_dict(), "served_by": retriever.served_by}, indent=2))
        return 0
    info = retriever.describe()
    who = f"user {answer.user}" if answer.user is not None else f"a history of {len(history)} items"
    print(f"{info['model']} on {info['dataset']} ({info['protocol']}), served by {info['served_by']}: "
          f"top {len(answer.items)} for {who}")
    print(format_recommendation(retriever, answer))
    return 0


def _export(args: argparse.Namespace) -> int:
    from crosstower.export import export_run
    from crosstower.recommend import load_run

    out = args.out or args.run_dir.with_name(f"{args.run_dir.name}-{args.format}")
    print(f"wrote {export_run(load_run(args.run_dir, args.data_dir), out, args.format)}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from crosstower.config import load_config
    from crosstower.data.run_data import load_data, load_dataset_of
    from crosstower.files import replace_dir
    from crosstower.run_dir import SPLIT, RunFolder

    if args.data_command == "download":
        from crosstower.data.download import download

        path = download(args.name, args.data_dir)
        print(f"downloaded {args.name} to {path}")
        return 0
    if args.data_command == "synthetic":
        from crosstower.config import apply_overrides
        from crosstower.data.synthetic import parse_options, write

        options = apply_overrides({}, args.overrides)
        print(f"wrote {write(parse_options(options), args.out)}")
        return 0
    config = load_config(args.config, args.overrides)
    if args.data_command == "stats":
        print(json.dumps(load_dataset_of(config, args.data_dir).stats(), indent=2))
        return 0
    folder = RunFolder(args.out)
    folder.check_replaceable()
    dataset, split = load_data(config, args.data_dir)
    summary = {**dataset.stats(), "protocol": split.protocol, "train_rows": len(split.train),
               "val_users": len(split.val), "test_users": len(split.test)}
    if split.labelled is not None:  # P4: labelled rows per part and their share of positives
        summary["labelled_rows"] = {part: len(rows) for part, rows in split.labelled.items()}
        summary["positive_share"] = {part: float(rows["label"].mean()) for part, rows in split.labelled.items()}
    partial = folder.partial
    partial.mkdir(parents=True, exist_ok=True)
    split.save(partial / SPLIT)
    (partial / "stats.json").write_text(json.dumps(summary, indent=2))
    replace_dir(partial, args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
