"""The ``raydistill`` command.

Subcommands, one per stage or recipe: demo, capture (alias precompute), select, train, sweep, evaluate
(alias eval), inspect, verify. Problems a user can cause (bad config, missing files, mismatched shards)
print one ``error:`` line and exit 2; ``verify`` exits 1 when it finds damage. ``--verbose`` brings back
the library logs (Ray workers, DeepSpeed, model-loading bars) that are hidden by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from raydistill import __version__
from raydistill.errors import ConfigError, RaydistillError, first_line
from raydistill.runtime.verbosity import set_verbosity


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see jobs/ for examples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set k=32 --set corpus.max_documents=100 (repeatable)")
    _add_address(p)


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', 'host:6379', 'ray://host:10001'); default: "
                        "$RAY_ADDRESS, else a local single-node Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"raydistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more, and show the libraries' own output (Ray workers, DeepSpeed, model loading)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher -> capture -> students -> eval on the embedded corpus")
    p.add_argument("--workdir", default="raydistill-demo", help="where everything is written (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set steps=100")
    _add_address(p)

    _add_config_args(sub.add_parser("capture", aliases=["precompute"],
                                    help="run the teacher once; write sparse-target shards"))
    _add_config_args(sub.add_parser("select", help="MiniPLM difference sampling: score documents by reference minus "
                                    "teacher loss per token; write the refined corpus and a report"))
    _add_config_args(sub.add_parser("train", help="train one student from a shard set, or with CE on a text corpus "
                                    "(DeepSpeed + Ray Train)"))
    _add_config_args(sub.add_parser("sweep", help="train a ladder of student sizes from one shard set, with CE-only "
                                    "and online-KD baselines; evaluate; write results.csv/.md and plots"))

    p = sub.add_parser("evaluate", aliases=["eval"], help="held-out loss and perplexity of an HF model directory")
    p.add_argument("model", help="HF model directory or hub id")
    p.add_argument("--source", default="default", help="corpus source (default: the embedded corpus)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--max-length", type=int, default=256)

    p = sub.add_parser("inspect", help="summary of a shard set")
    p.add_argument("path", help="shard set directory or URL")
    p = sub.add_parser("verify", help="check every shard against the manifest and its checksum")
    p.add_argument("path", help="shard set directory or URL")
    return parser


RAY_COMMANDS = ("demo", "capture", "select", "train", "sweep")
ALIASES = {"precompute": "capture", "eval": "evaluate"}  # the names before the stages had packages


def run(args: argparse.Namespace) -> int:
    from raydistill import config as C
    from raydistill.io.storage import redact_url, redact_values
    from raydistill.runtime.cluster import checked_address

    args.command = ALIASES.get(args.command, args.command)
    if args.command in RAY_COMMANDS:
        checked_address(args.address)  # a wrong --address / RAY_ADDRESS fails before any heavy work
    if args.command == "demo":
        from raydistill.recipes.demo import run_demo

        cfg = C.build_config(C.DemoConfig, {"workdir": args.workdir}, "for demo", args.overrides)
        run_demo(cfg, address=args.address)
    elif args.command == "capture":
        from raydistill.stages.capture.run import run_capture

        cfg = C.load_config(C.CaptureConfig, args.config, args.overrides)
        manifest = run_capture(cfg, address=args.address)
        print(json.dumps({"output": redact_url(cfg.output), "corpus": manifest.plan.corpus, "units": manifest.plan.num_units,
                          "tokens": manifest.total_tokens, "bytes": manifest.total_bytes}))
    elif args.command == "select":
        from raydistill.stages.select.run import run_select

        report = run_select(C.load_config(C.SelectConfig, args.config, args.overrides), address=args.address)
        print(json.dumps({k: redact_values(report[k]) for k in ("refined", "documents", "kept_documents", "kept_fraction",
                                                 "tokens", "kept_tokens", "score_mean")}))
    elif args.command == "train":
        from raydistill.stages.train.run import run_training

        print(json.dumps(run_training(C.load_config(C.TrainConfig, args.config, args.overrides),
                                      address=args.address)))
    elif args.command == "sweep":
        from raydistill.recipes.sweep import run_sweep

        result = run_sweep(C.load_config(C.SweepConfig, args.config, args.overrides), address=args.address)
        print(json.dumps(result["headline"]))
    elif args.command == "evaluate":
        from raydistill.stages.evaluate.run import run_eval

        corpus = C.build_config(C.CorpusConfig, {"source": args.source, "split": args.split,
                                                 "text_field": args.text_field}, "for --source/--split")
        cfg = C.build_config(C.EvalConfig, {"model": args.model, "corpus": corpus.model_dump(),
                                            "max_documents": args.max_documents,
                                            "max_length": args.max_length}, "for eval")
        print(json.dumps(run_eval(cfg)))
    elif args.command == "inspect":
        from raydistill.contracts.shards.verify import inspect_shard_set

        print(json.dumps(inspect_shard_set(args.path), indent=1, default=str))
    elif args.command == "verify":
        from raydistill.contracts.shards.verify import verify_shard_set
        from raydistill.io import storage

        if not storage.exists(args.path):  # nothing to audit: a wrong path, not a damaged set (exit 1)
            raise ConfigError(f"shard set '{args.path}' does not exist; pass the output of `raydistill capture`")
        problems = verify_shard_set(args.path)
        for p in problems:
            print(f"FAIL {p.path}: {p.message}")
        if problems:
            print(f"verify: {len(problems)} problem(s) in {args.path}; delete each shard named (with its done/ "
                  "record) and re-run the same capture: it redoes exactly the units it cannot trust", file=sys.stderr)
            return 1
        print(f"verify: OK ({args.path})")
    return 0


def _redacted(record: logging.LogRecord) -> bool:
    """A log filter: the record's message with the credentials of any URL in it replaced by ``***``."""
    from raydistill.io.storage import redact_text

    message = record.getMessage()
    clean = redact_text(message)
    if clean != message:
        record.msg, record.args = clean, None
    return True


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_verbosity(args.verbose)  # before any library is imported: their output stays hidden unless asked for
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redacted)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = run(args)
    except RaydistillError as err:
        from raydistill.io.storage import redact_text

        print(f"error: {redact_text(str(err))}", file=sys.stderr)  # no credentials of URLs it quotes
        code = 2
    except BrokenPipeError:  # e.g. `raydistill inspect ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        code = 0
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    except OSError as err:  # the machine, not the input: a full disk, a failed write, a lost mount
        from raydistill.io.storage import redact_text

        print(f"error: {redact_text(first_line(err))} (writes are atomic: nothing partial is kept); fix the cause "
              "and run the same command again to resume", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
