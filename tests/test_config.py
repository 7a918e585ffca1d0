import re
from pathlib import Path

import pytest
import yaml

from dist_w2v.config import config_from_dict, load_config
from dist_w2v.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_ptb_config_holds_the_seed_hyperparameters():
    cfg = load_config(REPO / "configs" / "ptb.yaml")
    assert cfg.train.batch_size == 512
    assert cfg.data.max_window == 5 and cfg.data.num_negatives == 5
    assert cfg.model.dim == 100
    assert cfg.train.lr == 0.002 and cfg.train.epochs == 5
    assert cfg.data.min_count == 10


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(REPO / "configs" / "ptb.yaml",
                      ["train.epochs=1", "train.lr=0.01", "data.resample_each_epoch=false",
                       "eval.probes=chip,stock", "data.dir=/x", "data.subsample_t=1e-3"])
    assert cfg.train.epochs == 1 and cfg.train.lr == 0.01
    assert cfg.data.resample_each_epoch is False
    assert cfg.eval.probes == ["chip", "stock"]
    assert cfg.data.dir == "/x"
    assert cfg.data.subsample_t == 0.001


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown key 'train.nope'; train accepts epochs"),
        ("nope.lr=1", "unknown key 'nope.lr'"),
        ("train.lr=-0.1", "train.lr must be > 0"),
        ("data.max_window=0", "data.max_window must be in [1, 10,000] (got 0)"),
        ("train.epochs=two", "train.epochs must be an integer"),
        ("train.optimizer=adamw", "train.optimizer must be one of adam, sparse_adam, sgd"),
        ("dist.grad_exchange=magic", "must be one of auto, allreduce, allgather, dense"),
        ("train.lr", "must look like section.field=value"),
        # Past these the layout's size overflowed (OverflowError, numba TypingError, "negative
        # dimensions") or the timeout wrapped (a rank gave up at once) with --check passing.
        ("train.batch_size=100000000000000000000000", "train.batch_size must be in [1, "),
        ("data.max_window=9223372036854775807", "data.max_window must be in [1, 10,000]"),
        ("data.num_negatives=100000000000000000000000", "data.num_negatives must be in [1, "),
        ("model.dim=9223372036854775807", "model.dim must be in [1, 1,000,000,000]"),
        ("dist.timeout_s=1e10", "dist.timeout_s must be in (0, 604,800] seconds"),
    ],
)
def test_bad_overrides_name_the_key_and_the_choices(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("key", ["min_count", "max_vocab", "max_sentence_length",
                                 "max_sentences"])
def test_a_prepare_setting_given_with_data_prepared_is_refused_not_ignored(key):
    """These decide a prepared corpus; with data.prepared they would do nothing, yet
    config.yaml would record them as the run's."""
    with pytest.raises(UserError, match=f"data.{key} does nothing with data.prepared"):
        load_config(REPO / "configs" / "ptb.yaml", ["data.prepared=/x", f"data.{key}=3"])
    # The file's own min_count (for PTB) is no request of the user's; PTB may take the key.
    assert load_config(REPO / "configs" / "ptb.yaml", ["data.prepared=/x"]).data.min_count == 10
    assert getattr(load_config(REPO / "configs" / "ptb.yaml", [f"data.{key}=3"]).data, key) == 3


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(UserError, match="unknown key 'train.epoch'"):
        load_config(path)


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line 2, column 1 "):
        load_config(bad)


@pytest.mark.parametrize("text, where", [
    ("train:\n  lr: 1.0\ntrain:\n  epochs: 2\n", "line 3, column 1 ('train' is given twice)"),
    ("train:\n  lr: 1.0\n  lr: 2.0\n", "line 3, column 3 ('lr' is given twice)"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, text, where):
    """Plain YAML keeps the last of two keys: a second train: section would drop the first."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == f"config file {path} is not valid YAML at {where}; fix it there"


def test_merge_keys_still_merge_and_may_be_overridden(tmp_path):
    """Only a key written twice is refused: one a merge brings in may be overridden."""
    path = tmp_path / "merged.yaml"
    path.write_text("train:\n  <<: {epochs: 2, lr: 0.5}\n  lr: 0.25\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr) == (2, 0.25)
    path.write_text("? [1, 2]\n: a\n")  # a key that is a list: still one line, no traceback
    with pytest.raises(UserError, match="not valid YAML at line 1, column 3"):
        load_config(path)


@pytest.mark.parametrize("override", ["train.seed=-1", "train.seed=4294967296",
                                      "train.data_seed=99999999999999999999"])
def test_seeds_outside_32_bits_are_refused(override):
    """Seeds enter the random streams as 32-bit keys; a larger one would repeat a smaller one
    (and torch's generators reject seeds above 64 bits with a traceback)."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"config: {key} must be in \[0, 2\*\*32\)"):
        load_config(None, [override])
    assert load_config(None, [f"{key}={2**32 - 1}"])


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "abc"])
def test_a_float_setting_must_be_a_finite_number(tmp_path, value):
    """inf passed every "> 0" check (train.lr=inf trained to NaN) and nan failed with a message
    about the range, not the value."""
    with pytest.raises(UserError, match=re.escape(
            f"config: train.lr must be a finite number (got {value!r})")):
        load_config(None, [f"train.lr={value}"])
    path = tmp_path / "c.yaml"
    path.write_text("dist:\n  timeout_s: .inf\n")  # YAML's own infinity, from a config file
    with pytest.raises(UserError, match=r"config: dist.timeout_s must be a finite number"):
        load_config(path)
    assert load_config(None, ["dist.timeout_s=2.5"]).dist.timeout_s == 2.5


@pytest.mark.parametrize("written", ["2024_01", "12:30", "0x10", "x #y", "a: b", "off", "123"])
def test_a_text_setting_on_the_command_line_is_taken_as_written(written):
    """Read as YAML, these folder names became 202401, 750, 16 and "x"; "a: b" and "off" (a
    mapping, false) were refused as bad values, so `log.wandb=off`, the README's own, failed."""
    assert load_config(None, [f"data.prepared={written}"]).data.prepared == written
    assert load_config(None, [f"log.entity={written}"]).log.entity == written


def test_the_command_line_still_unsets_and_types_the_other_settings():
    assert load_config(None, ["log.wandb=off"]).log.wandb == "off"
    assert load_config(None, ["data.prepared=null"]).data.prepared is None
    assert load_config(None, ["train.data_seed=~"]).train.data_seed is None
    cfg = load_config(None, ["train.lr=1e-3", "train.epochs=0x10", "eval.probes=[a, b]",
                             "log.tags=x,y", "train.cuda_graph=true"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.eval.probes, cfg.log.tags,
            cfg.train.cuda_graph) == (0.001, 16, ["a", "b"], ["x", "y"], True)


def test_an_unquoted_off_in_a_config_file_is_pointed_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("log:\n  wandb: off\n")
    with pytest.raises(UserError, match='log.wandb must be a string .*quote the value, e.g. "off"'):
        load_config(path)
    path.write_text("log:\n  wandb: 'off'\n")
    assert load_config(path).log.wandb == "off"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "ptb.yaml", ["train.seed=7"])
    cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
