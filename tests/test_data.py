"""Example semantics on PTB, as DESIGN.md states them (d2l 14.3): subsampling, windows,
negatives and the padded layout, built from a prepared corpus the way the trainer builds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_chunk_examples

from dist_w2v.config import DataConfig
from dist_w2v.data import compiled_rows
from dist_w2v.data.examples import ExampleBuilder
from dist_w2v.data.stream import ChunkSource, whole_corpus
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ptb_data(prepared_ptb):
    cfg = DataConfig()
    builder = ExampleBuilder(prepared_ptb.vocab, cfg, CPU)
    return cfg, prepared_ptb, builder, ChunkSource(prepared_ptb, builder, 0, True)


def test_epoch_sizes_match_design(ptb_data):
    cfg, corpus, builder, _ = ptb_data
    ex = one_chunk_examples(corpus, builder)
    assert 330_000 < len(ex) < 356_000  # about 343k centers
    assert 1_450_000 < ex.num_pairs < 1_550_000  # about 1.5M center-context pairs
    assert ex.width == 2 * cfg.max_window * (1 + cfg.num_negatives) == 60


def test_count_is_the_number_of_examples_built(ptb_data):
    _, corpus, builder, source = ptb_data
    chunk = whole_corpus(corpus)
    assert source.count(chunk, 4) == len(source.build(chunk, 4)[0])


def test_contexts_lie_in_window_inside_sentence(ptb_data):
    cfg, corpus, builder, source = ptb_data
    chunk = whole_corpus(corpus)
    g = source.generator(chunk, 3)
    tokens, sentence_ids = builder.subsample(*source.tokens(chunk), g)
    centers, contexts, num_contexts = builder.windows(tokens, sentence_ids, g)
    tokens, sentence_ids = tokens.numpy(), sentence_ids.numpy()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(tokens), size=3000, replace=False):
        n = int(num_contexts[i])
        got = contexts[i, :n].tolist()
        assert all(c == 0 for c in contexts[i, n:].tolist())
        same = np.flatnonzero(sentence_ids == sentence_ids[i])
        # Some radius r in 1..max_window must reproduce exactly these contexts, in order.
        windows = []
        for r in range(1, cfg.max_window + 1):
            positions = [j for j in same if abs(j - i) <= r and j != i]
            windows.append(tokens[positions].tolist())
        assert got in windows, (i, got)
        assert centers[i] == tokens[i]


@pytest.mark.parametrize("rows", ["compiled", "tensor"])
def test_no_negative_equals_a_context_and_layout(ptb_data, rows):
    cfg, corpus, _, _ = ptb_data
    builder = ExampleBuilder(corpus.vocab, cfg, CPU, rows)
    ex = one_chunk_examples(corpus, builder, seed=1)
    k = cfg.num_negatives
    n = ex.num_contexts
    slots = torch.arange(ex.width)
    cn = ex.contexts_negatives.long()
    is_ctx = slots < n[:, None]
    is_neg = (slots >= n[:, None]) & (slots < n[:, None] * (1 + k))
    assert (cn[is_ctx] > 0).all() and (cn[is_neg] > 0).all()  # never <unk>
    assert (cn[~(is_ctx | is_neg)] == 0).all()  # padding
    contexts = torch.where(is_ctx, cn, -1)
    clash = torch.zeros_like(is_neg)
    for j in range(2 * cfg.max_window):
        clash |= cn == contexts[:, j : j + 1]
    assert not (clash & is_neg).any()
    mask, label = ex.batch(torch.arange(4)).mask_and_label()
    for row in range(4):
        m = int(n[row])
        assert mask[row].tolist() == [1.0] * (m * (1 + k)) + [0.0] * (ex.width - m * (1 + k))
        assert label[row].tolist() == [1.0] * m + [0.0] * (ex.width - m)


def test_compiled_contexts_lie_in_window_inside_sentence(ptb_data):
    """The compiled builder's rows: the centers are the subsampled tokens in corpus order, and
    each row's contexts are a window of radius 1..max_window inside the center's sentence."""
    cfg, corpus, builder, source = ptb_data
    tokens, sentence_ids = (t.numpy() for t in source.tokens(whole_corpus(corpus)))
    seed, keep = 12345, builder.keep_probability.numpy()
    kept, kept_sentences, _ = compiled_rows._subsample(tokens, sentence_ids, keep,
                                                       np.uint64(seed))
    centers, layout, num_contexts, drawn = compiled_rows.build_examples(
        tokens, sentence_ids, keep, cfg.max_window, cfg.num_negatives,
        builder.alias_probability.numpy(), builder.alias.numpy(), seed)
    assert drawn and np.array_equal(centers, kept)
    assert compiled_rows.count_examples(tokens, sentence_ids, keep, seed) == len(kept)
    radii = []
    for i in np.random.default_rng(0).choice(len(kept), size=3000, replace=False):
        same = np.flatnonzero(kept_sentences == kept_sentences[i])
        got = layout[i, :num_contexts[i]].tolist()
        windows = [kept[[j for j in same if abs(j - i) <= r and j != i]].tolist()
                   for r in range(1, cfg.max_window + 1)]
        assert got in windows, (i, got)
        radii.append(windows.index(got))
    assert len(set(radii)) > 1  # the radius is drawn, not fixed


def test_compiled_and_tensor_builders_draw_from_the_same_distributions(ptb_data):
    """Five PTB epochs from each builder: the same number of centers and pairs, and the same
    frequency of every common word as a center (subsampling) and as a negative (noise draws
    with rejection), within sampling noise. The tensor builder's own tests pin these
    distributions to d2l's formulas."""
    cfg, corpus, _, _ = ptb_data
    size = len(corpus.vocab)
    totals = {}
    for rows in ("compiled", "tensor"):
        builder = ExampleBuilder(corpus.vocab, cfg, CPU, rows)
        centers, negatives, pairs = np.zeros(size), np.zeros(size), 0
        for epoch in range(5):
            ex = one_chunk_examples(corpus, builder, seed=7, epoch=epoch)
            n = ex.num_contexts[:, None]
            slots = torch.arange(ex.width)
            noise = ex.contexts_negatives[(slots >= n) & (slots < n * (1 + cfg.num_negatives))]
            centers += np.bincount(ex.centers.numpy(), minlength=size)
            negatives += np.bincount(noise.numpy(), minlength=size)
            pairs += ex.num_pairs
        totals[rows] = centers, negatives, pairs
    (c1, n1, p1), (c2, n2, p2) = totals["compiled"], totals["tensor"]
    assert abs(p1 - p2) < 0.005 * p2 and abs(c1.sum() - c2.sum()) < 0.005 * c2.sum()
    for a, b in ((c1, c2), (n1, n2)):
        top = np.argsort(-b)[:100]
        assert (np.abs(a[top] - b[top]) < 6 * np.sqrt(a[top] + b[top])).all()


def test_rejection_redraws_only_the_clashing_negatives():
    """A two-word vocabulary beside a context: every draw of that word must be redrawn, and
    the result is the other word, in every negative slot."""
    vocab = Vocab(["<unk>", "a", "b"], np.array([0, 100, 100]))
    builder = ExampleBuilder(vocab, DataConfig(max_window=1, num_negatives=3), CPU)
    contexts = torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)
    negatives = builder.draw_negatives(contexts, torch.tensor([1, 1]), torch.Generator())
    assert negatives.tolist() == [2, 2, 2, 1, 1, 1]


def test_negatives_follow_unigram_to_the_three_quarters(ptb_data):
    _, corpus, builder, _ = ptb_data
    vocab = corpus.vocab
    draws = builder.draw_noise(2_000_000, torch.Generator().manual_seed(5))
    expected = vocab.counts.astype(np.float64) ** 0.75
    expected[0] = 0
    expected /= expected.sum()
    observed = np.bincount(draws.numpy(), minlength=len(vocab)) / len(draws)
    assert observed[0] == 0
    top = np.argsort(-expected)[:50]
    sigma = np.sqrt(expected[top] * (1 - expected[top]) / len(draws))
    assert (np.abs(observed[top] - expected[top]) < 5 * sigma).all()


def test_subsampling_keep_rate_matches_formula(ptb_data):
    cfg, corpus, builder, source = ptb_data
    vocab = corpus.vocab
    frequency = vocab.counts / vocab.counts[1:].sum()
    tokens, _ = source.tokens(whole_corpus(corpus))
    kept = np.zeros(len(vocab))
    rounds = 5
    for epoch in range(rounds):
        draw = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(epoch),
                          dtype=torch.float64)
        keep = (draw < builder.keep_probability[tokens.long()]).numpy()
        kept += np.bincount(tokens.numpy()[keep], minlength=len(vocab))
    for word in ["the", "of", "stock", "chip", "japan"]:
        i = vocab[word]
        p = min(1.0, np.sqrt(cfg.subsample_t / frequency[i]))
        trials = vocab.counts[i] * rounds
        rate = kept[i] / trials
        assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / trials) + 1e-9, word
    # The total after subsampling is about 344k tokens, as DESIGN.md measured.
    assert 335_000 < kept.sum() / rounds < 352_000


def test_chunks_are_a_function_of_seed_epoch_and_chunk(ptb_data):
    _, corpus, builder, _ = ptb_data
    a = one_chunk_examples(corpus, builder, seed=0, epoch=2)
    b = one_chunk_examples(corpus, builder, seed=0, epoch=2)
    c = one_chunk_examples(corpus, builder, seed=0, epoch=3)
    d = one_chunk_examples(corpus, builder, seed=1, epoch=2)
    assert torch.equal(a.contexts_negatives, b.contexts_negatives)
    assert torch.equal(a.centers, b.centers)
    assert len(a) != len(c) or not torch.equal(a.contexts_negatives, c.contexts_negatives)
    assert len(a) != len(d) or not torch.equal(a.contexts_negatives, d.contexts_negatives)


def test_offline_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    from dist_w2v.data import sources

    with pytest.raises(UserError, match="put ptb.train.txt"):
        sources.download_ptb(tmp_path / "cache", url="http://127.0.0.1:9/ptb.zip")


def _zip_ptb(ptb, path, tamper=False):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
            data = (ptb / name).read_bytes()
            archive.writestr(f"ptb/{name}", data + (b"x" if tamper else b""))


def test_download_unpacks_and_verifies_sha1(tmp_path, ptb):
    from dist_w2v.data import sources

    _zip_ptb(ptb, tmp_path / "ptb.zip")
    sources.download_ptb(tmp_path / "cache", url=(tmp_path / "ptb.zip").as_uri())
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        assert (tmp_path / "cache" / name).read_bytes() == (ptb / name).read_bytes()


def test_download_rejects_a_file_with_the_wrong_sha1(tmp_path, ptb):
    from dist_w2v.data import sources

    _zip_ptb(ptb, tmp_path / "ptb.zip", tamper=True)
    with pytest.raises(UserError, match="SHA-1"):
        sources.download_ptb(tmp_path / "cache", url=(tmp_path / "ptb.zip").as_uri())
    assert not (tmp_path / "cache" / "ptb.train.txt").exists()
