"""The training step replayed from a CUDA graph (tinyllama.train.graph): refused with one line where it cannot
run (CPU tests), and on a GPU the same steps as the eager loop: new batches, new learning rates, skipped
non-finite steps, checkpoints and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import final_weights, tiny_run

from tinyllama.cli import main
from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.model import Llama
from tinyllama.train.config import run_config_from_dict
from tinyllama.train.graph import GraphedStep
from tinyllama.train.optim import OptimConfig, build_optimizer, set_lr
from tinyllama.train.trainer import pretrain

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_is_refused_on_the_cpu_with_one_line(tmp_path):
    with pytest.raises(TinyLlamaError, match=r"^train.cuda_graph needs the model on a CUDA GPU$"):
        pretrain(run_config_from_dict(tiny_run(tmp_path, max_steps=2, cuda_graph=True)))


def test_bench_cuda_graph_on_the_cpu_reports_why_in_its_row(capsys):
    rc = main(["bench", "train", "--config", "tinyllama-tiny", "--micro-batch", "1", "--seq-len", "16", "--steps", "1",
               "--warmup", "1", "--variants", "ours", "--device", "cpu", "--cuda-graph"])
    assert rc == 1
    assert "--cuda-graph needs the model on a CUDA GPU" in capsys.readouterr().out


def test_graphed_step_needs_an_eager_step_first():
    # captured, the first step's creation of AdamW's moments would zero them on every replay
    with pytest.raises(ValueError, match="eager_steps"):
        GraphedStep(lambda b: (b,), None, eager_steps=0)


# ---- on a GPU ------------------------------------------------------------------------------------

LRS = [1e-3, 4e-3, 0.0, 2e-3, 3e-3, 1e-3, 5e-3]  # lr 0: the weights must not move (decay is lr·wd too)


def _pair(attention_backend: str, adamw: str = "torch"):
    from tinyllama.kernels import KernelConfig, apply_fast_path

    torch.manual_seed(0)
    with torch.device("cuda"):
        a = Llama(ModelConfig.from_name("tinyllama-tiny", vocab_size=512))
    apply_fast_path(a, KernelConfig(attention_backend=attention_backend))
    b = copy.deepcopy(a)
    cfg = OptimConfig(warmup_steps=0, grad_clip=0.5, fused_kernel=adamw)
    return (a, build_optimizer(a, cfg)), (b, build_optimizer(b, cfg))


def _states(model, opt):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()})


def _assert_same(a, b, tol):
    for k in a[0]:
        torch.testing.assert_close(a[0][k], b[0][k], rtol=tol, atol=tol, msg=f"weight {k}")
    for i in a[1]:
        for k in a[1][i]:
            torch.testing.assert_close(a[1][i][k], b[1][i][k], rtol=tol, atol=tol, msg=f"state {i}.{k}")


@needs_cuda
@pytest.mark.parametrize("backend,adamw", [("math", "torch"), ("auto", "torch"), ("fa4", "torch"), ("math", "triton")])
def test_graphed_step_equals_eager_steps_cuda(backend, adamw):
    """bench's step (the trainer's clip + fused AdamW) eager and graphed, on changing batches and lrs, with a
    non-finite step in the middle that both must skip (weights, moments and step counts unchanged)."""
    from tinyllama.bench.train import _ours_loss, make_train_step
    from tinyllama.kernels.attention import fa4_problem

    if backend == "fa4" and fa4_problem(True):
        pytest.skip(f"fa4 {fa4_problem(True)}")
    (ma, oa), (mb, ob) = _pair(backend, adamw)
    eager = make_train_step(ma, oa, _ours_loss, torch.device("cuda"), grad_clip=0.5, trainer_step=True)
    graphed = make_train_step(mb, ob, _ours_loss, torch.device("cuda"), grad_clip=0.5, trainer_step=True,
                              cuda_graph=True)
    gen = torch.Generator().manual_seed(1)
    tol = 1e-5 if backend == "math" else 2e-3  # math: the same kernels both ways; flash/fa4: backward atomics
    prev_loss = None
    for i, lr in enumerate(LRS):
        batch = torch.randint(0, 512, (2, 33), generator=gen)
        for opt in (oa, ob):
            set_lr(opt, lr)
        before = _states(mb, ob)
        poison = i == 4  # an inf in a weight the graph reads in place: loss and norm non-finite, step skipped
        if poison:
            for m in (ma, mb):
                m.layers[0].input_layernorm.weight.data[0] = float("inf")
        la, lb = eager(batch), graphed(batch)
        if poison:
            assert not torch.isfinite(la) and not torch.isfinite(lb)
            for m in (ma, mb):
                m.layers[0].input_layernorm.weight.data[0] = before[0]["layers.0.input_layernorm.weight"][0]
            _assert_same(before, _states(mb, ob), 0)
            continue
        torch.testing.assert_close(la, lb, rtol=tol, atol=tol, msg=f"loss of step {i}")
        assert prev_loss is None or float(lb) != prev_loss, "the graph replayed the old batch"
        prev_loss = float(lb)
        moved = [not torch.equal(before[0][k], v) for k, v in mb.state_dict().items()]
        assert not any(moved) if lr == 0.0 else any(moved), f"step {i}, lr {lr}: the graph used another lr"
    _assert_same(_states(ma, oa), _states(mb, ob), 1e-4 if backend == "math" else 2e-2)
    assert all(float(s["step"]) == len(LRS) - 1 for s in ob.state.values())  # the poisoned step skipped
    if adamw == "triton":
        assert ob.kernel_params == sum(p.numel() for p in mb.parameters())  # all through the kernel, in the graph


@needs_cuda
def test_pretrain_with_cuda_graph_matches_eager_and_resumes_cuda(tmp_path):
    """The loop's graphed step: same losses and weights as the eager loop, checkpoints mid-run, and a resumed
    run (two eager steps, then a new capture) that continues like the straight one."""
    def run(out, steps, **kw):
        d = tiny_run(out, device="cuda", dtype="bfloat16", fast_kernels=True, kernels={"attention_backend": "math"},
                     max_steps=steps, global_batch=2, **kw)
        d["optim"]["max_steps"] = 12
        return d

    eager = pretrain(run_config_from_dict(run(tmp_path / "eager", 12)))
    graphed = pretrain(run_config_from_dict(run(tmp_path / "graph", 12, cuda_graph=True, save_every=4)))
    assert graphed["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-4)
    assert graphed["losses"][-1] < graphed["losses"][0]
    first = pretrain(run_config_from_dict(run(tmp_path / "resumed", 6, cuda_graph=True)))
    second = pretrain(run_config_from_dict(run(tmp_path / "resumed", 12, cuda_graph=True)), resume=True)
    assert first["losses"] + second["losses"] == pytest.approx(graphed["losses"], rel=1e-4, abs=1e-4)
    wa, wb = final_weights(tmp_path / "graph"), final_weights(tmp_path / "resumed")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_graph_refuses_gradient_accumulation_cuda(tmp_path):
    with pytest.raises(TinyLlamaError, match="needs one micro-batch per optimizer step.*accumulates 2"):
        pretrain(run_config_from_dict(tiny_run(tmp_path, device="cuda", max_steps=2, cuda_graph=True)))


@needs_cuda
def test_graphed_step_with_weight_copies_equals_casting_cuda():
    """The graphed step reading the bf16 weight copies the Triton AdamW writes (optim.compute_copies) against the
    graphed step casting each replay: the same losses and weights bit for bit, also after weights loaded between
    replays (re-cast before the next replay, as no forward runs in Python then)."""
    from tinyllama.bench.train import _ours_loss, make_train_step
    from tinyllama.kernels.weight_copies import attach_compute_weights

    (ma, oa), (mb, ob) = _pair("math", "triton")
    copies = attach_compute_weights(mb, ob, torch.bfloat16)
    assert copies is not None and copies.casts == 4 * len(mb.layers)
    steps = [make_train_step(m, o, _ours_loss, torch.device("cuda"), grad_clip=0.5, trainer_step=True,
                             cuda_graph=True) for m, o in ((ma, oa), (mb, ob))]
    gen = torch.Generator().manual_seed(1)
    snapshot = None
    for i in range(7):
        batch = torch.randint(0, 512, (2, 33), generator=gen)
        if i == 3:
            snapshot = copy.deepcopy(ma.state_dict())
        if i == 5:  # replays 3 and 4 happened; both models go back to the weights before replay 3
            for m in (ma, mb):
                m.load_state_dict(snapshot)
        la, lb = (step(batch) for step in steps)
        assert torch.equal(la, lb), (i, float(la), float(lb))
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
    assert copies.casts == 2 * 4 * len(mb.layers)  # at the start and after the load, never by a replay


@needs_cuda
def test_pretrain_with_weight_copies_matches_casting_cuda(tmp_path, capsys):
    """`tinyllama pretrain` with optim.compute_copies (graphed, Triton AdamW): the losses of the run that casts,
    and a resumed run that continues like the straight one."""
    def run(out, steps, copies, **kw):
        d = tiny_run(out, device="cuda", dtype="bfloat16", fast_kernels=True, kernels={"attention_backend": "math"},
                     max_steps=steps, global_batch=2, cuda_graph=True, **kw)
        d["optim"].update(max_steps=12, fused_kernel="triton", compute_copies=copies)
        return d

    cast = pretrain(run_config_from_dict(run(tmp_path / "cast", 12, False)))
    copied = pretrain(run_config_from_dict(run(tmp_path / "copies", 12, True)))
    assert copied["losses"] == cast["losses"]
    first = pretrain(run_config_from_dict(run(tmp_path / "resumed", 6, True, save_every=3)))
    second = pretrain(run_config_from_dict(run(tmp_path / "resumed", 12, None)), resume=True)  # the default
    assert first["losses"] + second["losses"] == pytest.approx(copied["losses"], rel=1e-4, abs=1e-4)
    assert [r["weight_copies"] for r in (cast, copied, first, second)] == [False, True, True, True]
    out = capsys.readouterr()
    assert "compute_copies is off" not in out.out + out.err
    assert "bf16 weight copies written by AdamW" in out.out + out.err
