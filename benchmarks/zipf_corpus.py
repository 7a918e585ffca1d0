"""A synthetic Zipf corpus for `dist-w2v prepare` benchmarks, written fast and in bounded memory.

Word ``w{k}`` has rank k and probability proportional to 1 / (k + 1) ** s; sentence lengths
are geometric around --mean-sentence-length. Everything is vectorised in numpy and written in
blocks of --block-tokens, so 1B tokens take minutes and memory does not grow with --tokens::

    python benchmarks/zipf_corpus.py --tokens 50e6 --vocab 2e6 --out /tmp/zipf50m.txt

At --tokens 1e9 --vocab 2e6 (s = 1) more than a million words reach count 10. Do not commit
the output.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

WIDTH = 12  # bytes per word slot: "w" + up to 10 digits + separator


def word_table(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each word's bytes padded to WIDTH - 1 (one slot left for the separator), and lengths."""
    names = np.char.add("w", np.arange(vocab).astype(str)).astype(f"S{WIDTH - 1}")
    table = np.zeros((vocab, WIDTH), dtype=np.uint8)
    table[:, : WIDTH - 1] = np.frombuffer(names.tobytes(), dtype=np.uint8).reshape(vocab, -1)
    return table, np.char.str_len(names).astype(np.int64)


def block_bytes(ids: np.ndarray, sentence_end: np.ndarray, table: np.ndarray,
                lengths: np.ndarray) -> bytes:
    """The text of one block: words separated by spaces, a newline after each sentence end."""
    rows = table[ids]  # (n, WIDTH)
    n = ids.shape[0]
    word_len = lengths[ids]
    rows[np.arange(n), word_len] = np.where(sentence_end, ord("\n"), ord(" "))
    keep = np.arange(WIDTH)[None, :] <= word_len[:, None]
    return rows[keep].tobytes()


def generate(tokens: int, vocab: int, mean_len: float, seed: int, out: str, exponent: float,
             block_tokens: int) -> None:
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    cdf /= cdf[-1]
    table, lengths = word_table(vocab)
    start = time.perf_counter()
    written = 0
    with open(out, "wb") as handle:
        while written < tokens:
            n = min(block_tokens, tokens - written)
            ids = np.searchsorted(cdf, rng.random(n), side="right").clip(max=vocab - 1)
            # Each token ends its sentence with probability 1 / mean_len: geometric lengths.
            ends = rng.random(n) < 1.0 / mean_len
            written += n
            if written == tokens:
                ends[-1] = True
            handle.write(block_bytes(ids, ends, table, lengths))
            rate = written / (time.perf_counter() - start)
            print(f"\r{written:,} tokens, {rate / 1e6:.1f}M tokens/s", end="", file=sys.stderr)
    print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, required=True, help="tokens to write, e.g. 1e9")
    p.add_argument("--vocab", type=float, default=2e6, help="distinct words (default 2e6)")
    p.add_argument("--mean-sentence-length", type=float, default=20.0)
    p.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent s (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-tokens", type=int, default=4_000_000)
    p.add_argument("--out", required=True, help="text file to write")
    args = p.parse_args(argv)
    if args.mean_sentence_length < 1:
        p.error("--mean-sentence-length must be >= 1")
    generate(int(args.tokens), int(args.vocab), args.mean_sentence_length, args.seed, args.out,
             args.exponent, args.block_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
