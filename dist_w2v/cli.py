"""The ``dist-w2v`` command: train, similar (and the rank-0 tools built on a finished run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dist_w2v.errors import UserError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train skip-gram (plain, or under torchrun / srun)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/ptb.yaml")
    p.add_argument("--run-dir", help="where outputs and checkpoints go (default runs/CONFIG_NAME)")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in the run dir) or a file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=1")
    p.set_defaults(func=cmd_train)


def _add_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar", help="nearest words by cosine from the center table")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a finished run directory")
    source.add_argument("--checkpoint", help="a checkpoint file instead of a run directory")
    p.add_argument("words", nargs="+", metavar="WORD")
    p.add_argument("-k", type=int, default=3, help="neighbours per word (default 3)")
    p.set_defaults(func=cmd_similar)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-w2v", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_similar(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from dist_w2v.runner import run_train

    return run_train(args.config, args.overrides, args.run_dir, args.resume, os.environ)


def cmd_similar(args: argparse.Namespace) -> int:
    from dist_w2v.artifacts import load_embeddings
    from dist_w2v.evaluate import nearest, normalize_rows

    if args.k < 1:
        raise UserError("-k must be >= 1")
    emb = load_embeddings(args.run_dir, args.checkpoint)
    unit = normalize_rows(emb.center)
    unknown = []
    for word in args.words:
        if emb.vocab[word] == 0:
            unknown.append(word)
            print(f"dist-w2v: error: unknown word {word!r}: not in the vocabulary "
                  f"({len(emb.vocab)} words)", file=sys.stderr)
            continue
        if len(args.words) > 1:
            print(f"{word}:")
        for neighbour, cos in nearest(emb.center, emb.vocab, word, args.k, unit):
            print(f"cosine sim={cos: .3f}: {neighbour}")
    return 2 if unknown else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"dist-w2v: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dist-w2v: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
