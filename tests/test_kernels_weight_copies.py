"""Persistent bf16 copies of the fused blocks' weights (tinyllama.kernels.weight_copies): kept current by the
Triton AdamW, re-cast whenever a weight changes any other way, and the same training as casting each forward.

The CPU tests need no Triton; the optimizer tests run the kernel on CUDA or under Triton's interpreter (a
subprocess with TRITON_INTERPRET=1, as tests/test_kernels_adamw.py does).
"""

import copy
import importlib.util
import os

import pytest
import torch
from conftest import run_pytest_interpreted

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.kernels import KernelConfig, apply_fast_path
from tinyllama.kernels.weight_copies import ComputeWeights, attach_compute_weights, detach_compute_weights
from tinyllama.model import Llama
from tinyllama.train.optim import OptimConfig, build_optimizer, clip_or_step_on_device

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNS = HAS_TRITON and (torch.cuda.is_available() or INTERPRETED)
needs_triton = pytest.mark.skipif(not RUNS, reason="needs Triton on CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
BF16 = torch.bfloat16


def _weights(*shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]


def test_a_copy_is_the_stack_cast_and_is_cast_again_after_any_change():
    q, k, o = _weights((6, 4), (2, 4), (4, 6))
    cw = ComputeWeights([(q, k), (o,)], BF16)
    assert cw.casts == 2 and cw.nbytes() == (6 + 2) * 4 * 2 + 4 * 6 * 2
    stacked = cw.get((q, k))
    assert stacked.dtype == BF16 and torch.equal(stacked, torch.cat([q, k]).to(BF16))
    assert cw.get((k, q)) is None and cw.target(q).data_ptr() == stacked.data_ptr()
    assert cw.target(k).data_ptr() == stacked[6:].data_ptr()
    assert cw.get((q, k)) is stacked and cw.casts == 2  # nothing changed: no cast
    with torch.no_grad():
        k.mul_(3)  # an in-place change through torch (version counter)
    assert torch.equal(cw.get((q, k)), torch.cat([q, k]).to(BF16)) and cw.casts == 3
    sd = {"w": o.detach() * 0 + 1}
    with torch.no_grad():
        o.copy_(sd["w"])  # what load_state_dict does
    assert cw.refresh() == 1 and torch.equal(cw.get((o,)), torch.ones(4, 6, dtype=BF16, device=DEVICE))
    q.data = torch.zeros_like(q)  # a new tensor under the parameter: another address
    assert torch.equal(cw.get((q, k))[:6], torch.zeros(6, 4, dtype=BF16, device=DEVICE))
    # marked current, a change the version counter cannot see stays unseen until a forced refresh
    with torch.no_grad():
        o.data.fill_(2)  # .data has its own version counter
    assert cw.refresh() == 0 and cw.refresh(force=True) == 2
    assert torch.equal(cw.get((o,)), torch.full((4, 6), 2.0, dtype=BF16, device=DEVICE))


def _tiny_fused(seed=0):
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        m = Llama(ModelConfig.from_name("tinyllama-tiny"))
    apply_fast_path(m, KernelConfig(fused_blocks=True, fused_cross_entropy=False))
    return m


def test_fused_blocks_read_the_copies_same_loss_and_gradients():
    # The copies hold exactly what the blocks would cast: loss and every gradient are bit for bit the same.
    ids = torch.randint(0, 32000, (2, 17), device=DEVICE)

    def run(copies: bool):
        m = _tiny_fused()
        if copies:
            cw = ComputeWeights([g for b in m.layers for g in b.projection_groups()], BF16)
            for b in m.layers:
                b.compute_weights = cw
        with torch.autocast(DEVICE, dtype=BF16):
            loss = m(ids, ids.roll(-1, 1))[1]
        loss.backward()
        return [loss.detach()] + [p.grad for p in m.parameters()]

    got, ref = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_copies_in_another_dtype_than_the_pass_are_not_used():
    m = _tiny_fused()
    cw = ComputeWeights([g for b in m.layers for g in b.projection_groups()], torch.float16)
    for b in m.layers:
        b.compute_weights = cw
    ids = torch.randint(0, 32000, (1, 9), device=DEVICE)
    with torch.autocast(DEVICE, dtype=BF16):
        with_fp16_copies = m(ids, ids)[1]
    detach_compute_weights(m)
    with torch.autocast(DEVICE, dtype=BF16):
        plain = m(ids, ids)[1]
    assert torch.equal(with_fp16_copies, plain)


def test_attach_only_where_they_apply():
    m = _tiny_fused()
    plain_adamw = build_optimizer(m, OptimConfig(fused=False))
    assert attach_compute_weights(m, plain_adamw, BF16) is None
    if not HAS_TRITON:
        return
    opt = build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton"))
    assert attach_compute_weights(m, opt, torch.float32) is None  # fp32 training: nothing to cast
    cw = attach_compute_weights(m, opt, BF16)
    assert opt.copies is cw and all(b.compute_weights is cw for b in m.layers)
    n = sum(p.numel() for b in m.layers for g in b.projection_groups() for p in g)
    assert cw.nbytes() == 2 * n
    detach_compute_weights(m, opt)
    assert opt.copies is None and all(b.compute_weights is None for b in m.layers)
    # through the config, as the trainer builds it
    opt = build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton", compute_copies=True), BF16)
    assert isinstance(opt.copies, ComputeWeights)
    assert getattr(build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton", compute_copies=True)),
                   "copies", None) is None  # no compute dtype given: none
    # the default (compute_copies unset) follows the kernel; false casts each forward
    assert isinstance(build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton"), BF16).copies, ComputeWeights)
    assert build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton", compute_copies=False), BF16).copies is None
    assert getattr(build_optimizer(m, OptimConfig(fused=True), BF16), "copies", None) is None  # torch's AdamW
    bf16_model = copy.deepcopy(m).to(BF16)  # weights already bf16 (nothing to cast)
    assert attach_compute_weights(bf16_model, build_optimizer(bf16_model, OptimConfig(
        fused=True, fused_kernel="triton")), BF16) is None


def test_config_refuses_copies_without_the_triton_kernel():
    with pytest.raises(TinyLlamaError, match="field 'compute_copies' needs the fused Triton AdamW"):
        OptimConfig(compute_copies=True).validate()
    with pytest.raises(TinyLlamaError, match="compute_copies"):
        OptimConfig(compute_copies=True, fused_kernel="triton", fused=False).validate()
    OptimConfig(compute_copies=True, fused_kernel="triton").validate()
    OptimConfig().validate()  # unset: on only where the Triton AdamW runs
    assert [OptimConfig(**kw).wants_copies() for kw in (
        {}, {"fused_kernel": "triton"}, {"fused_kernel": "triton", "fused": False},
        {"fused_kernel": "triton", "compute_copies": False}, {"fused_kernel": "triton", "compute_copies": True},
    )] == [False, True, False, False, True]
    from tinyllama.train.config import load_run_config

    cfg = load_run_config("demo", ["--optim.compute_copies", "true", "--optim.fused_kernel", "triton"])
    assert cfg.optim.compute_copies is True
    cfg.validate()
    with pytest.raises(TinyLlamaError, match="compute_copies"):
        load_run_config("demo", ["--optim.compute_copies", "true"]).validate()


def test_bench_train_refuses_copies_without_the_triton_kernel(capsys):
    from tinyllama.cli import main

    assert main(["bench", "train", "--compute-copies", "--variants", "ours", "--device", "cpu"]) != 0
    assert "--compute-copies needs --adamw-kernel triton" in capsys.readouterr().err
    assert main(["bench", "train", "--compute-copies", "on", "--variants", "ours", "--device", "cpu"]) != 0
    assert "--compute-copies needs --adamw-kernel triton" in capsys.readouterr().err


def test_bench_train_copies_follow_the_adamw_kernel(tmp_path):
    # auto (the default) means copies with --adamw-kernel triton, as optim.compute_copies unset does; off casts.
    import json

    from tinyllama.cli import main

    base = ["bench", "train", "--config", "tinyllama-tiny", "--variants", "ours", "--device", "cpu", "--steps", "1",
            "--warmup", "0", "--micro-batch", "1", "--seq-len", "16"]
    for extra, want in (([], False), (["--adamw-kernel", "triton"], True),
                        (["--adamw-kernel", "triton", "--compute-copies", "off"], False)):
        out = tmp_path / f"{len(extra)}.json"
        assert main(base + extra + ["--json", str(out)]) == 0
        assert json.loads(out.read_text())["compute_copies"] is want, extra


@needs_triton
def test_the_optimizer_writes_the_copies_as_torch_casts_them():
    # The update is the same with and without copies; each copy is then the new weight cast to bf16 (ties to
    # even, infinities, NaN, subnormals included), written by the kernel (no cast after the step), and left
    # alone on a non-finite step.
    from tinyllama.kernels.adamw import TritonAdamW

    shapes = [(37, 64), (5, 64), (300, 16), (33,)]
    plain_p, copied_p = _weights(*shapes), _weights(*shapes)
    edge = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, float("inf"), float("-inf"),
                         float("nan"), 1e-40, -1e-40, 0.0, -0.0])
    for ps in (plain_p, copied_p):
        with torch.no_grad():
            ps[1].view(-1)[: len(edge)] = edge.to(DEVICE)
    kw = dict(lr=1e-2, weight_decay=0.1, chunk_size=256, block_size=64)
    plain, copied = TritonAdamW(plain_p, **kw), TritonAdamW(copied_p, **kw)
    cw = copied.copies = ComputeWeights([copied_p[:2], copied_p[2:3]], BF16)  # the 1-d one has none

    def same_bits(a, b):
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])

    for step in range(4):
        grads = [torch.randn_like(p) for p in plain_p]
        grads[1].view(-1)[: len(edge)] = 0.0  # no update from the gradient (and at lr 0, step 0, no decay)
        skip = step == 2
        for opt, ps in ((plain, plain_p), (copied, copied_p)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.param_groups[0]["lr"] = 0.0 if step == 0 else 1e-2
            opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=DEVICE), torch.tensor(float(skip), device=DEVICE)
            before = [t.clone() for t in cw._buffers.values()]
            opt.step()
            del opt.grad_scale, opt.found_inf
        assert copied.kernel_params == sum(p.numel() for p in copied_p)
        assert all(same_bits(p, q) for p, q in zip(plain_p, copied_p))
        if skip:
            assert all(same_bits(a, b) for a, b in zip(before, cw._buffers.values()))
        casts = cw.casts
        assert same_bits(cw.get(copied_p[:2]), torch.cat([copied_p[0], copied_p[1]]).to(BF16))
        assert torch.equal(cw.get(copied_p[2:3]), copied_p[2].to(BF16))
        assert cw.casts == casts == 2  # the kernel wrote them: never cast after the first time


@needs_triton
def test_a_weight_the_kernel_does_not_take_gets_its_copy_from_the_optimizer():
    # amsgrad runs torch's fused step, which writes the weight but not its copy and bumps no version counter
    # (checked below): the optimizer casts the copy right after that step, so it is current without a get.
    from tinyllama.kernels.adamw import TritonAdamW

    (w,) = _weights((8, 16))
    opt = TritonAdamW([w], lr=1e-2, amsgrad=True)
    cw = opt.copies = ComputeWeights([(w,)], BF16)
    w.grad = torch.randn_like(w)
    version, before = w._version, w.detach().clone()
    opt.step()
    assert opt.kernel_params == 0 and not torch.equal(w, before)
    assert w._version == version  # why the optimizer must write the copy itself
    assert torch.equal(cw.target(w), w.to(BF16))
    assert torch.equal(cw.get((w,)), w.to(BF16)) and cw.casts == 1


@needs_triton
def test_training_with_copies_is_training_without_them(tmp_path):
    # The trainer's step (bf16 autocast, clip factor and non-finite check inside fused AdamW) on a tiny model
    # with the fused blocks: two steps, a resume from the checkpoint written after the first (the trainer's
    # CheckpointManager: DCP load of weights and moments), two more. The same losses and weights bit for bit as
    # casting each forward, and the copies cast only at the start and after the load.
    from tinyllama.train.checkpoint import CheckpointManager
    from tinyllama.train.distributed import DistInfo

    ids = torch.randint(0, 32000, (2, 17), device=DEVICE)

    def train(copies: bool):
        ckpt = CheckpointManager(tmp_path / f"copies{copies}", DistInfo(), use_async=False)
        m = _tiny_fused()
        opt = build_optimizer(m, OptimConfig(fused=True, fused_kernel="triton", compute_copies=copies,
                                             warmup_steps=0, lr=1e-3, grad_clip=0.5), BF16)
        cw = opt.copies if copies else None
        assert (cw is not None) == copies
        losses = []
        for step in range(4):
            if step == 2:  # as a resume does: weights and moments loaded in place
                ckpt.load(ckpt.latest(), m, opt, load_rng=False)
            with torch.autocast(DEVICE, dtype=BF16):
                loss = m(ids, ids.roll(-1, 1))[1]
            loss.backward()
            assert clip_or_step_on_device(opt, m, 0.5, loss.detach())[1]
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if step == 0:
                ckpt.save(1, m, opt, {"trainer": {}}, {"step": 1}, block=True)
        groups = 4 * len(m.layers)
        if copies:
            assert cw.casts == 2 * groups, cw.casts
        return losses, [p.detach() for p in m.parameters()]

    (l1, p1), (l0, p0) = train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(l1, l0)), (l1, l0)
    assert all(torch.equal(a, b) for a, b in zip(p1, p0))


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or INTERPRETED, reason="needs Triton without CUDA")
def test_weight_copies_interpreted_on_cpu():
    assert run_pytest_interpreted(__file__, timeout=600) >= 8


def test_pretrain_says_when_copies_do_not_apply(tmp_path, capsys):
    # On the CPU the AdamW is not fused and the blocks are the plain ones: the run goes on, and says so in one line.
    from test_train import tiny_run

    from tinyllama.train.config import run_config_from_dict
    from tinyllama.train.trainer import pretrain

    d = tiny_run(tmp_path / "run", max_steps=2)
    d["optim"].update(fused_kernel="triton", compute_copies=True)
    assert pretrain(run_config_from_dict(d))["weight_copies"] is False
    assert "note: optim.compute_copies is off for this run" in capsys.readouterr().err
    d = tiny_run(tmp_path / "run2", max_steps=2)
    d["optim"].update(fused_kernel="triton")  # compute_copies unset: no note where they do not apply
    assert pretrain(run_config_from_dict(d))["weight_copies"] is False
    assert "compute_copies" not in capsys.readouterr().err
