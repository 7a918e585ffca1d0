"""The Triton kernel (train.kernel=triton) against the padded reference, the static kernel and
the trainer.

On a GPU these tests run the compiled kernels on CUDA tensors. Without one, the first test
below runs this same file again in a child pytest with ``TRITON_INTERPRET=1`` (Triton reads it
when first imported, so it cannot be switched on in this process), where Triton's interpreter
executes the kernels on CPU tensors, program by program: the same kernel source, slow, and
exact enough to hold to the reference's tolerances.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, prepare, ptb_batch

from dist_w2v.config import load_config
from dist_w2v.errors import UserError
from dist_w2v.model.fast_path import fast_skip_gram_loss
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.parallel.env import DistEnv
from dist_w2v.train.loop import Trainer

triton = pytest.importorskip("triton", reason="the triton package is not installed")

CUDA = torch.cuda.is_available()
INTERPRETED = bool(triton.knobs.runtime.interpret)
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
runs_here = pytest.mark.skipif(
    not (CUDA or INTERPRETED),
    reason="no GPU: run interpreted by test_the_interpreter_runs_this_file_on_cpu")


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run directly here")
def test_the_interpreter_runs_this_file_on_cpu(ptb):
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIST_W2V_DATA": str(ptb)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-x", __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " skipped" in done.stdout, report


def steps(ptb_epoch, size: int, kernel: str, seed: int = 0):
    """(per-example loss, [center grad, context grad]) of sum(weights * loss) for the padded
    reference on CPU and for ``kernel`` on DEVICE, from the same tables and batch."""
    batch = ptb_batch(ptb_epoch, size, seed)
    weights = torch.rand(size, generator=torch.Generator().manual_seed(1)) / size
    padded = SkipGram(ptb_epoch[1], 100, "padded")
    padded.reset_parameters(torch.Generator().manual_seed(seed))
    fast = copy.deepcopy(padded).to(DEVICE)
    reference = padded(batch.centers, batch.contexts_negatives, batch.num_contexts,
                       batch.num_negatives)
    (reference * weights).sum().backward()
    out = fast_skip_gram_loss(fast.center.weight, fast.context.weight,
                              batch.centers.to(DEVICE), batch.contexts_negatives.to(DEVICE),
                              batch.num_contexts.to(DEVICE), batch.num_negatives, kernel)
    (out * weights.to(DEVICE)).sum().backward()
    return [(loss.detach().cpu(), [model.center.weight.grad, model.context.weight.grad])
            for loss, model in ((reference, padded), (out, fast))]


@runs_here
@pytest.mark.parametrize("size", [64, 1024])
def test_triton_equals_the_padded_reference_on_ptb_batches(ptb_epoch, size):
    (ref_loss, ref_grads), (loss, grads) = steps(ptb_epoch, size, "triton")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.is_sparse
        torch.testing.assert_close(grad.to_dense().cpu(), ref.to_dense(), rtol=1e-4, atol=1e-7)


@runs_here
def test_triton_gradients_list_the_static_kernels_rows(ptb_epoch):
    """Same fixed-length row lists as the static kernel, so the exchange, the row optimizers
    and the CUDA graph take either kernel's gradients."""
    (_, triton_grads), (_, static_grads) = (steps(ptb_epoch, 256, k)[1] for k in
                                           ("triton", "static"))
    for a, b in zip(triton_grads, static_grads, strict=True):
        assert torch.equal(a._indices(), b._indices())
        torch.testing.assert_close(a._values(), b._values(), rtol=1e-5, atol=1e-8)


@runs_here
def test_repeated_words_and_padding_examples(ptb_epoch):
    """A center whose contexts and negatives repeat, and examples with no context (how the
    trainer pads a short batch): repeats add up, padding scores 0 and moves nothing."""
    vocab_size = ptb_epoch[1]
    centers = torch.tensor([5, 5, 7, 9])
    num_contexts = torch.tensor([2, 1, 0, 3])
    width = 3 * 6
    contexts_negatives = torch.zeros(4, width, dtype=torch.int64)
    contexts_negatives[0, :12] = torch.tensor([8, 8, 3, 3, 3, 8, 11, 11, 8, 3, 3, 3])
    contexts_negatives[1, :6] = torch.tensor([8, 5, 5, 5, 5, 5])
    contexts_negatives[3, :18] = torch.arange(10, 28)
    model = SkipGram(vocab_size, 100, "padded")
    model.reset_parameters(torch.Generator().manual_seed(3))
    fast = copy.deepcopy(model).to(DEVICE)
    real = num_contexts > 0  # the reference divides a padding example's loss by 0 pairs
    ref = model(centers[real], contexts_negatives[real], num_contexts[real], 5)
    out = fast_skip_gram_loss(fast.center.weight, fast.context.weight, centers.to(DEVICE),
                              contexts_negatives.to(DEVICE), num_contexts.to(DEVICE), 5,
                              "triton")
    torch.testing.assert_close(out.detach().cpu()[real], ref.detach(), rtol=0, atol=1e-6)
    assert out[2].item() == 0.0
    ref.sum().backward()
    out.sum().backward()
    for a, b in zip(fast.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad.to_dense().cpu(), b.grad.to_dense(), rtol=1e-4,
                                   atol=1e-7)
    assert not fast.center.weight.grad.to_dense()[7].any()


def triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}[value.dtype]
    return "i32"


def ptxas_report(ptx: str) -> tuple[int, int]:
    """Registers per thread and spilled bytes (stores + loads) that ptxas, the one Triton ships
    and builds its cubins with, reports for an sm_90 build of ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(source), "-o",
                              str(source.with_suffix(".cubin"))],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return registers, int(stores) + int(loads)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter compiles nothing")
@pytest.mark.parametrize("dim", [100, 300])
def test_the_kernels_compile_for_an_h100_with_vector_loads_and_no_spills(ptb_epoch, dim):
    """Triton's compiler to sm_90 machine code, no GPU needed: catches what the interpreter
    lets through (types, constexprs), and keeps what makes the kernel fast: 16-byte row loads,
    relaxed vector atomics, no registers spilled to local memory, and at most 128 registers a
    thread, so that 4 programs of 4 warps fit on one SM (a (32, 512) tile at D=300 took 255)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dist_w2v.model import triton_kernel

    batch = ptb_batch(ptb_epoch, 64)
    width = batch.contexts_negatives.shape[1]
    table, rows = torch.zeros(ptb_epoch[1], dim), torch.zeros(64 * width, dtype=torch.int64)
    grad, loss = torch.zeros(64), torch.zeros(64)
    arguments = {
        "_forward": [table, table, batch.centers, batch.contexts_negatives, batch.num_contexts,
                     table, loss, width, 5],
        "_backward": [table, table, batch.centers, batch.contexts_negatives, batch.num_contexts,
                      table, grad, batch.centers, rows, table, table, width, 5],
    }
    constexprs = triton_kernel.launch_shape(width, dim, on_cpu=False)
    for name, values in arguments.items():
        kernel = getattr(triton_kernel, name)
        names = kernel.arg_names
        signature = {n: triton_type(v) for n, v in zip(names, values, strict=False)}
        signature.update({n: "constexpr" for n in constexprs})
        aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(values)
                   if isinstance(v, torch.Tensor)}  # torch allocates 16-byte aligned
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, aligned),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=triton_kernel.launch_options())
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4" in ptx and ".local" not in ptx, name
        registers, spilled = ptxas_report(ptx)
        assert spilled == 0 and registers <= 128, (name, registers, spilled)
        if name == "_backward":
            # Triton 3.9 emits red (no result), 3.6 (the CUDA torch 2.11 wheels') atom with
            # its result unused: both vector adds of 4 floats, relaxed.
            assert re.search(r"\b(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", ptx)
            assert "acq_rel" not in ptx


@pytest.mark.skipif(CUDA or INTERPRETED, reason="triton runs here")
def test_training_refuses_triton_on_cpu_without_the_interpreter(ptb, tmp_path):
    cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=500", "train.threads=1",
                             "train.kernel=triton"])
    with pytest.raises(UserError, match=r"^train.kernel=triton runs on CUDA tables, and "
                       r"training is on cpu; use train.kernel=auto \(or TRITON_INTERPRET=1"):
        Trainer(cfg, DistEnv(), tmp_path / "run", prepare(cfg.data, tmp_path / "cache"))


@runs_here
def test_a_ptb_slice_trains_the_same_with_the_triton_and_static_kernels(ptb, tmp_path):
    """Two epochs through the real trainer, short tail batches padded to the fixed shape: the
    tables agree up to float rounding (the kernels add the same terms in other orders)."""
    tables = {}
    for kernel in ("triton", "static"):
        cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=300", "model.dim=16",
                                 "train.epochs=2", "train.batch_size=256", "train.threads=1",
                                 "train.optimizer=rowwise_adagrad", "train.lr=0.2",
                                 "eval.every_epochs=0", f"train.kernel={kernel}",
                                 f"train.device={DEVICE.type}"])
        trainer = Trainer(cfg, DistEnv(device=DEVICE), tmp_path / kernel,
                          prepare(cfg.data, tmp_path / "cache"))
        assert trainer.fixed_shapes
        trainer.fit()
        tables[kernel] = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    assert tables["triton"].keys() == tables["static"].keys()
    for name, table in tables["static"].items():
        torch.testing.assert_close(tables["triton"][name], table, rtol=0, atol=1e-5, msg=name)
