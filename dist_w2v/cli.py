"""The ``dist-w2v`` command: train, similar (and the rank-0 tools built on a finished run)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from dist_w2v.errors import RankError, UserError
from dist_w2v.outputs.console import detach_stdout, print_out

if TYPE_CHECKING:
    from dist_w2v.data.vocab import Vocab


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train skip-gram (plain, or under torchrun / srun)")
    p.add_argument("--config", type=path_text, required=True,
                   help="YAML config, e.g. configs/ptb.yaml")
    p.add_argument("--run-dir", type=path_text,
                   help="where outputs and checkpoints go (default runs/CONFIG_NAME)")
    p.add_argument("--resume", type=path_text,
                   help="'auto' (newest valid checkpoint in the run dir) or a file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run's outputs in --run-dir (otherwise refused)")
    p.add_argument("--check", action="store_true",
                   help="only check the config, the run dir and the data, then exit (0 = ok)")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="with --check: check as for a run of N processes (the launch scripts "
                        "pass theirs; a run's own comes from its launcher)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=1")
    p.set_defaults(func=cmd_train)


def path_text(value: str) -> str:
    """A path argument; an empty one (an unset shell variable) would silently mean the current
    folder, or for --run-dir the default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return value


def _add_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=path_text, help="a finished run directory")
    source.add_argument("--checkpoint", type=path_text,
                        help="a checkpoint file instead of a run directory")


def _add_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar", help="nearest words by cosine from the center table")
    _add_source(p)
    p.add_argument("words", nargs="+", metavar="WORD")
    p.add_argument("-k", type=int, default=3, help="neighbours per word (default 3)")
    p.set_defaults(func=cmd_similar)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from dist_w2v.config import EvalConfig

    p = sub.add_parser("eval", help="WordSim353, SimLex-999 and Google analogies (needs gensim)")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--probes", help="comma-separated words whose neighbours are shown "
                   f"(default: those of {','.join(EvalConfig().probes)} in the vocabulary)")
    p.add_argument("-k", type=int, default=3, help="neighbours per probe word (default 3)")
    p.set_defaults(func=cmd_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from dist_w2v.outputs.export import FORMATS

    p = sub.add_parser("export", help="word vectors for gensim and other tools (<unk> left out)")
    _add_source(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=path_text, required=True,
                   help="file to write (npy also writes OUT.vocab.txt)")
    p.set_defaults(func=cmd_export)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from dist_w2v.bench import add_bench_arguments

    p = sub.add_parser("bench", help="our trainer against gensim Word2Vec: speed, memory, quality")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from dist_w2v.data.prepared import PrepareSettings

    defaults = PrepareSettings()
    p = sub.add_parser(
        "prepare", help="count, encode and write a text corpus for training (data.prepared)",
        description="Whitespace-tokenized text, one sentence per line (files, folders of "
                    "files, .gz/.bz2/.xz), into a prepared corpus folder that "
                    "data.prepared=DIR trains on.")
    p.add_argument("inputs", type=path_text, nargs="+", metavar="INPUT",
                   help="text file or folder of them")
    p.add_argument("--out", type=path_text, required=True,
                   help="folder to write (vocab.txt, tokens.bin, ...)")
    p.add_argument("--min-count", type=int, default=defaults.min_count,
                   help="drop words seen fewer times (default %(default)s)")
    p.add_argument("--max-vocab", type=int, default=defaults.max_vocab,
                   help="keep only the N most frequent words, <unk> aside (0 = all; default)")
    p.add_argument("--max-sentence-length", type=int, default=defaults.max_sentence_length,
                   help="cut longer lines into pieces of this many tokens (default %(default)s)")
    p.add_argument("--max-sentences", type=int, default=defaults.max_sentences,
                   help="read only the first N lines (0 = all; default); for smoke runs")
    p.add_argument("--workers", type=int, default=0,
                   help="threads (default: the cores this process may use)")
    p.add_argument("--force", action="store_true",
                   help="prepare again even if up to date, or into a folder of other files")
    p.set_defaults(func=cmd_prepare)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one error line naming the fix, like
    every other user mistake, instead of a usage dump (``--help`` still gives the usage).

    Said by every process: asking for the launch rank (say_error) would import torch, seconds
    for one line; launch/train.sh and slurm/train.sbatch parse the arguments once, in
    ``train --check``, before any ranks start."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("dist-w2v").strip()
        print(f"dist-w2v: error: {command + ': ' if command else ''}{message}; see "
              f"`{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def say_error(exc: UserError) -> None:
    line = f"dist-w2v: error: {exc}"
    if isinstance(exc, RankError):
        print(line, file=sys.stderr)
    else:
        say_once(line)


def say_once(line: str) -> None:
    """A line on stderr; under torchrun every rank meets the same error (or Ctrl-C), so rank 0
    alone says it."""
    from dist_w2v.parallel.env import launch_rank

    if launch_rank(os.environ) == 0:
        print(line, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dist-w2v", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_prepare(sub)
    _add_similar(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_bench(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from dist_w2v.train.run import check_run, run_train

    if args.check:
        return check_run(args.config, args.overrides, args.run_dir, args.resume, args.overwrite,
                         os.environ, args.world_size)
    if args.world_size != 1:
        raise UserError("--world-size goes with --check; a run's world size comes from its "
                        "launcher (torchrun --nproc_per_node, srun)")
    return run_train(args.config, args.overrides, args.run_dir, args.resume, os.environ,
                     overwrite=args.overwrite)


def cmd_prepare(args: argparse.Namespace) -> int:
    from dist_w2v.data.prepare import prepare
    from dist_w2v.data.prepared import PrepareSettings

    if args.workers < 0:
        raise UserError("--workers must be >= 0 (0 = the usable cores)")
    settings = PrepareSettings(args.min_count, args.max_vocab, args.max_sentence_length,
                               args.max_sentences)
    # SIGTERM (kill, timeout, scancel) would end the process where it stands, leaving its spill
    # folder (about 4 bytes per token) and the folders it made; as an exit, prepare's cleanup
    # runs first, and the exit status is still a SIGTERM's.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    prepare(args.inputs, args.out, settings, args.workers, force=args.force)
    return 0


def report_unknown_words(words: list[str], vocab: Vocab) -> list[str]:
    """An error line on stderr for each word the vocabulary lacks; returns those words."""
    unknown = [word for word in words if vocab[word] == 0]
    for word in unknown:
        hint = f"; try {word.lower()!r}" if vocab[word.lower()] != 0 else ""
        print(f"dist-w2v: error: unknown word {word!r}: not in the vocabulary "
              f"({len(vocab)} words){hint}", file=sys.stderr)
    return unknown


def cmd_similar(args: argparse.Namespace) -> int:
    from dist_w2v.outputs.artifacts import load_embeddings
    from dist_w2v.outputs.evaluate import UnitTable, probe_neighbours

    if args.k < 1:
        raise UserError("-k must be >= 1")
    emb = load_embeddings(args.run_dir, args.checkpoint)
    answers = probe_neighbours(UnitTable(emb.center), emb.vocab, args.words, args.k)
    unknown = report_unknown_words(args.words, emb.vocab)
    for word in args.words:
        if word in unknown:
            continue
        if len(args.words) > 1:
            print_out(f"{word}:")
        for neighbour, cos in answers[word]:
            print_out(f"cosine sim={cos: .3f}: {neighbour}")
    return 2 if unknown else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dist_w2v.config import EvalConfig
    from dist_w2v.outputs import strict_json
    from dist_w2v.outputs.artifacts import load_embeddings
    from dist_w2v.outputs.evaluate import evaluation_report, format_report, load_benchmarks

    if args.k < 1:
        raise UserError("-k must be >= 1")
    benchmarks = load_benchmarks()
    emb = load_embeddings(args.run_dir, args.checkpoint)
    if args.probes is None:  # PTB words: another corpus may lack some, which are skipped
        probes, unknown = EvalConfig().probes, []
    else:  # "stock, chip" means stock and chip: no word of a vocabulary holds a space
        probes = [w.strip() for w in args.probes.split(",") if w.strip()]
        unknown = report_unknown_words(probes, emb.vocab)
    report = evaluation_report(emb.center, emb.vocab, benchmarks, probes, args.k)
    report = {"source": args.run_dir or args.checkpoint, **report}
    print_out(strict_json.dumps(report) if args.json else format_report(report))
    return 2 if unknown else 0


def cmd_export(args: argparse.Namespace) -> int:
    from dist_w2v.outputs.artifacts import load_embeddings
    from dist_w2v.outputs.export import export_embeddings

    emb = load_embeddings(args.run_dir, args.checkpoint)
    sources = [Path(p) for p in (args.run_dir, args.checkpoint) if p]
    for path in export_embeddings(emb, args.format, Path(args.out), sources):
        print_out(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dist_w2v.bench import run_bench

    return run_bench(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but ``key=value`` overrides may also follow options (``--resume auto``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "train"]
    if stray:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(
            f"unrecognized arguments: {' '.join(stray)}{setting_hint(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def setting_hint(stray: list[str]) -> str:
    """`` (settings are key=value: train.epochs=VALUE)`` when a stray --option names a setting."""
    from dist_w2v.config import keys_named

    keys = [key for a in stray if a.startswith("--")
            for key in keys_named(a[2:].split("=")[0].replace("-", "_"))]
    return f" (settings are key=value: {', '.join(f'{k}=VALUE' for k in keys)})" if keys else ""


def say_interrupted(command: str) -> int:
    # Only train has checkpoints to speak of.
    kept = ("; the checkpoints saved so far are kept (SIGTERM stops with one more)"
            if command == "train" else "")
    say_once(f"dist-w2v: interrupted{kept}")
    return 130


def exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA) or its
    CPU allocator's RuntimeError; torch is not imported here for the check."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(exc))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def memory_hint(command: str) -> str:
    if command == "train":
        return ("; the tables and a batch's examples must fit: lower model.dim, "
                "train.batch_size, data.max_window or data.num_negatives")
    return "; free memory, or give a smaller input"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        say_error(exc)
        return 2
    except KeyboardInterrupt:
        return say_interrupted(args.command)
    except SystemError as exc:
        # A Ctrl-C that lands inside a numba-compiled function comes out as "SystemError: ...
        # returned a result with an exception set", the KeyboardInterrupt as its context.
        if not any(isinstance(e, KeyboardInterrupt) for e in exception_chain(exc)):
            raise
        return say_interrupted(args.command)
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        say_error(UserError(f"out of memory ({first_line(exc)}){memory_hint(args.command)}"))
        return 2
    except BrokenPipeError:
        # `dist-w2v eval | head`: the reader left early, which is no error of ours.
        detach_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
