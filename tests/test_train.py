"""rnan_fast.train: the training step (eager on the CPU, CUDA graph on a GPU) and its helpers.

CPU tests use a tiny RNAN (n_feats 8, two non-local groups) on 16x16 patches, mostly in float64,
where a step equals a hand-written forward / loss / backward / Adam update to ~1e-12.
The CUDA-graph tests run only where CUDA is available.
"""
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rnan_fast
from rnan_fast.train import make_optimizer, make_train_step, train

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graph path: needs a CUDA device")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_rnan(scale=1, dtype=torch.float64, seed=0, n_resgroups=2):
    """A tiny RNAN whose non-local output convs W are random (the official zero init would
    make the attention invisible to the loss and its inputs' gradients zero)."""
    torch.manual_seed(seed)
    net = rnan_fast.RNAN(n_colors=3, scale=scale, n_feats=8, n_resgroups=n_resgroups)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".W." in name:
                p.normal_(0, 0.05)
    return net.to(dtype)


def denoise_batch(batch=2, size=16, dtype=torch.float64, seed=1, device="cpu"):
    """(noisy, clean) on the 0..255 scale: (batch, 3, size, size) each."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64) * 255
    noisy = clean + 25 * torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    return noisy.to(device=device, dtype=dtype), clean.to(device=device, dtype=dtype)


def hand_adam_steps(net, lr_batch, hr_batch, steps, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, loss="mse"):
    """The step written out: forward, loss, autograd.grad, then Adam's update by its formula."""
    params = [p for p in net.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    losses = []
    for t in range(1, steps + 1):
        out = net(lr_batch)
        value = ((out - hr_batch) ** 2).mean() if loss == "mse" else (out - hr_batch).abs().mean()
        grads = torch.autograd.grad(value, params)
        losses.append(value.detach())
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v):
                m_.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v_.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                m_hat = m_ / (1 - betas[0] ** t)
                v_hat = v_ / (1 - betas[1] ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return losses


def max_rel_diff(a: nn.Module, b: nn.Module, adam: bool = False) -> float:
    """Largest parameter difference, relative to each parameter's largest entry.

    adam=True leaves out theta.bias: with the softmax over queries its gradient is exactly zero
    in exact arithmetic (theta_i + b shifts column j's scores by the constant b . phi_j), so
    Adam turns rounding noise of ~1e-17 into updates of up to lr that no two orders of
    summation share.
    """
    worst = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if adam and name.endswith("theta.bias"):
            continue
        scale = q.detach().abs().max().clamp_min(1e-6)
        worst = max(worst, float((p.detach() - q.detach()).abs().max() / scale))
    return worst


# --------------------------------------------------------------------------- CPU: eager step

@pytest.mark.parametrize("channels_last", [False, True])
def test_step_equals_hand_written_adam_float64(channels_last):
    net = tiny_rnan()
    ref = copy.deepcopy(net)
    lr_batch, hr_batch = denoise_batch()
    step = make_train_step(net, make_optimizer(net), loss="mse", channels_last=channels_last)
    assert not step.uses_cuda_graph
    got = [step(lr_batch, hr_batch) for _ in range(2)]  # two steps: Adam's bias correction at t = 1, 2
    want = hand_adam_steps(ref, lr_batch, hr_batch, steps=2)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.dim() == 0 and not g.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
    assert max_rel_diff(net, ref, adam=True) < 1e-10
    assert max_rel_diff(net, tiny_rnan()) > 1e-6  # and the parameters did move


def test_loss_decreases_on_a_fixed_batch_fp32():
    net = tiny_rnan(dtype=torch.float32)
    lr_batch, hr_batch = denoise_batch(dtype=torch.float32)
    step = make_train_step(net, make_optimizer(net, lr=1e-3), loss="mse")  # channels_last by default
    losses = [float(step(lr_batch, hr_batch)) for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_super_resolution_shapes_and_l1_loss():
    net = tiny_rnan(scale=2)
    ref = copy.deepcopy(net)
    g = torch.Generator().manual_seed(3)
    lr_batch = torch.rand(2, 3, 10, 12, generator=g, dtype=torch.float64) * 255
    hr_batch = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64) * 255
    step = make_train_step(net, make_optimizer(net), loss="l1", channels_last=False)
    got = [step(lr_batch, hr_batch) for _ in range(2)]
    want = hand_adam_steps(ref, lr_batch, hr_batch, steps=2, loss="l1")
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-12, atol=0)
    assert max_rel_diff(net, ref, adam=True) < 1e-10
    with pytest.raises(ValueError, match=r"maps lr_batch \(2, 3, 10, 12\) to \(2, 3, 20, 24\).*hr_batch \(2, 3, 10, 12\)"):
        step(lr_batch, lr_batch)


def test_bf16_autocast_keeps_float32_master_weights():
    net = tiny_rnan(dtype=torch.float32)
    fp32 = copy.deepcopy(net)
    lr_batch, hr_batch = denoise_batch(dtype=torch.float32)
    step = make_train_step(net, make_optimizer(net), precision="bf16")
    step32 = make_train_step(fp32, make_optimizer(fp32), precision="fp32")
    loss, loss32 = step(lr_batch, hr_batch), step32(lr_batch, hr_batch)
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert all(v.dtype == torch.float32 for s in step.optimizer.state.values() for k, v in s.items() if k != "step")
    torch.testing.assert_close(loss, loss32, rtol=0.02, atol=0)  # bf16 has 8 mantissa bits


def test_bf16_gradients_follow_fp32_gradients(monkeypatch, official_ops):
    """bf16 autocast gradients against the fp32 ones, parameter by parameter: within 2x the error
    of the official computation (N x N softmax, eager gate) in the same bf16 autocast, plus a
    floor. Sharp softmaxes (theta, phi scaled by 8) make the attention gradients ill-conditioned:
    the official computation is off by orders of magnitude there, ours must stay finite."""
    net = tiny_rnan(dtype=torch.float32)
    with torch.no_grad():  # large non-local scores, as after some training: a sharp softmax
        for name, p in net.named_parameters():
            if name.endswith(("theta.weight", "phi.weight")):
                p.mul_(8)
    lr_batch, hr_batch = denoise_batch(dtype=torch.float32)

    def grads(precision):
        model = copy.deepcopy(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        make_train_step(model, opt, precision=precision, channels_last=False)(lr_batch, hr_batch)
        return [p.grad for p in model.parameters()]

    g32, ours = grads("fp32"), grads("bf16")
    with monkeypatch.context() as m:
        official_ops(m)
        official = grads("bf16")
    for (name, _), a, b, c in zip(net.named_parameters(), g32, ours, official):
        assert torch.isfinite(b).all(), name
        err, err_official = ((t - a).norm() / a.norm().clamp_min(1e-12) for t in (b, c))
        assert err <= 2 * err_official + 0.05, f"{name}: bf16 gradient error {err:.3g}, official {err_official:.3g}"


def test_inputs_are_moved_to_the_model_dtype():
    net = tiny_rnan()
    ref = copy.deepcopy(net)
    lr_batch, hr_batch = denoise_batch()
    step = make_train_step(net, make_optimizer(net), channels_last=False)
    step(lr_batch.float(), hr_batch.float())  # float32 batches into a float64 model
    hand_adam_steps(ref, lr_batch.float().double(), hr_batch.float().double(), steps=1)
    assert max_rel_diff(net, ref, adam=True) < 1e-10


def test_custom_loss_callable_and_other_optimizers():
    net = tiny_rnan()
    ref = copy.deepcopy(net)
    lr_batch, hr_batch = denoise_batch()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    step = make_train_step(net, opt, loss=lambda out, target: (out - target).pow(2).sum(), channels_last=False)
    step(lr_batch, hr_batch)
    value = (ref(lr_batch) - hr_batch).pow(2).sum()
    value.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.sub_(1e-6 * p.grad)
    assert max_rel_diff(net, ref) < 1e-10


# --------------------------------------------------------------------------- arguments

def test_rejects_bad_arguments():
    net = tiny_rnan()
    opt = make_optimizer(net)
    with pytest.raises(ValueError, match="loss must be one of 'mse', 'l1', got 'l2'"):
        make_train_step(net, opt, loss="l2")
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        make_train_step(net, opt, precision="fp16")
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        make_train_step(net, opt, channels_last="yes")
    with pytest.raises(TypeError, match="compile must be True or False"):
        make_train_step(net, opt, compile=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        make_train_step(lambda x: x, opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        make_train_step(net, {"lr": 1e-4})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        make_train_step(net, torch.optim.Adam([nn.Parameter(torch.zeros(3, dtype=torch.float64))]))
    with pytest.raises(TypeError, match="precision='bf16'.*float32 weights.*torch.float64"):
        make_train_step(net, opt, precision="bf16")
    half = tiny_rnan(dtype=torch.float16)
    with pytest.raises(TypeError, match="keep the weights in float32"):
        make_train_step(half, make_optimizer(half))
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device; it is on cpu"):
            make_train_step(net, opt, cuda_graph=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(nn.ReLU())


def test_rejects_bad_batches():
    net = tiny_rnan()
    step = make_train_step(net, make_optimizer(net), channels_last=False)
    lr_batch, hr_batch = denoise_batch()
    with pytest.raises(TypeError, match="lr_batch must be a torch.Tensor, got list"):
        step([1.0], hr_batch)
    with pytest.raises(ValueError, match=r"hr_batch must be a floating \(B, C, H, W\) tensor.*\(3, 16, 16\)"):
        step(lr_batch, hr_batch[0])
    with pytest.raises(ValueError, match="different batch sizes"):
        step(lr_batch, hr_batch[:1])
    with pytest.raises(ValueError, match=r"input must be \(B, 3, H, W\)"):
        step(lr_batch[:, :1], hr_batch[:, :1])


def test_make_optimizer_uses_the_official_settings():
    net = tiny_rnan()
    opt = make_optimizer(net)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 0.0)
    assert not group["fused"]  # CPU parameters: the default implementation
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- train()

def test_train_loop_restarts_the_iterable_and_logs():
    net = tiny_rnan()
    batches = [denoise_batch(seed=s) for s in (1, 2)]
    logged = []
    step = make_train_step(net, make_optimizer(net, lr=1e-3), channels_last=False)
    losses = train(step, batches, num_steps=3, log_every=2, log=logged.append)
    assert losses.shape == (3,) and losses.dtype == torch.float32 and losses.device.type == "cpu"
    assert [line.split(":")[0] for line in logged] == ["step 2"]
    assert float(logged[0].split("loss ")[1]) == pytest.approx(float(losses[1]), rel=1e-5)
    one_pass = train(step, iter(batches))  # num_steps=None: one pass over the iterable
    assert one_pass.shape == (2,)
    assert train(step, iter([]), num_steps=3).shape == (0,)  # an empty iterator ends the loop
    with pytest.raises(ValueError, match="num_steps must be a non-negative int"):
        train(step, batches, num_steps=-1)


# --------------------------------------------------------------------------- GPU: CUDA graph

@contextlib.contextmanager
def tf32_off():
    """TF32 off for cuBLAS and cuDNN inside, the caller's settings back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def no_tf32():
    """fp32 graph-vs-eager comparisons need true fp32 matmuls and convolutions."""
    with tf32_off():
        yield


def test_tf32_off_restores_the_settings():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for before in ((True, True), (True, False), (False, True)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
            with tf32_off():
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_graph_path_runs_under_the_models_device_guard(monkeypatch):
    """Capture and replay happen inside torch.cuda.device(model's device), so a model on cuda:1
    trains while cuda:0 is current. Shown on the CPU: the CUDA pieces are stand-ins that record
    which device guard is active when they run."""
    net = tiny_rnan(dtype=torch.float32)
    step = make_train_step(net, make_optimizer(net), channels_last=False)
    active, seen = [], []

    class Guard:  # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    class Graph:
        def replay(self):
            seen.append(("replay", list(active)))

    def capture(lr_batch, hr_batch):
        seen.append(("capture", list(active)))
        step._graph, step._static = Graph(), (lr_batch.clone(), hr_batch.clone(), torch.zeros(()))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(step, "_capture", capture)
    monkeypatch.setattr(step, "_prepare", lambda t: t)
    step.uses_cuda_graph, step.device = True, torch.device("cuda", 1)
    batch = denoise_batch(dtype=torch.float32)
    for _ in range(3):
        step(*batch)
    gpu1 = [torch.device("cuda", 1)]
    assert seen == [("capture", gpu1), ("replay", gpu1), ("replay", gpu1), ("replay", gpu1)]
    assert active == []


def _gpu_pair(precision="fp32", seed=0):
    net = tiny_rnan(dtype=torch.float32, seed=seed, n_resgroups=3).cuda()
    twin = copy.deepcopy(net)
    graphed = make_train_step(net, make_optimizer(net, lr=1e-3), precision=precision)
    eager = make_train_step(twin, make_optimizer(twin, lr=1e-3), precision=precision, cuda_graph=False)
    return net, twin, graphed, eager


@needs_cuda
def test_cuda_graph_replay_equals_eager_steps(no_tf32):
    net, twin, graphed, eager = _gpu_pair()
    assert graphed.uses_cuda_graph and not eager.uses_cuda_graph
    batches = [denoise_batch(batch=4, size=24, dtype=torch.float32, seed=s, device="cuda") for s in range(5)]
    start = copy.deepcopy(net)
    first = graphed(*batches[0])
    assert graphed.captured
    # the warm-up before capture must not count as training: one call = one step
    eager_first = eager(*batches[0])
    torch.testing.assert_close(first, eager_first, rtol=1e-5, atol=0)
    assert max_rel_diff(net, twin, adam=True) < 1e-4 and max_rel_diff(net, start) > 0
    for b in batches[1:]:
        torch.testing.assert_close(graphed(*b), eager(*b), rtol=1e-4, atol=0)
    assert max_rel_diff(net, twin, adam=True) < 1e-3


@needs_cuda
def test_cuda_graph_bf16_trains_and_refuses_other_shapes(no_tf32):
    net, _, graphed, _ = _gpu_pair(precision="bf16")
    lr_batch, hr_batch = denoise_batch(batch=4, size=24, dtype=torch.float32, device="cuda")
    losses = torch.stack([graphed(lr_batch, hr_batch) for _ in range(8)]).tolist()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(ValueError, match="CUDA graph was captured for lr"):
        graphed(lr_batch[:2], hr_batch[:2])


@needs_cuda
def test_cuda_graph_sees_learning_rate_changes(no_tf32):
    net, twin, graphed, eager = _gpu_pair()
    scheds = [torch.optim.lr_scheduler.StepLR(s.optimizer, step_size=2, gamma=0.5) for s in (graphed, eager)]
    for seed in range(6):
        b = denoise_batch(batch=2, size=24, dtype=torch.float32, seed=seed, device="cuda")
        graphed(*b), eager(*b)
        for s in scheds:
            s.step()
    assert float(graphed.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3 / 8)
    assert max_rel_diff(net, twin, adam=True) < 1e-3


@needs_cuda
def test_graphed_step_never_synchronises_the_host(no_tf32):
    _, _, graphed, _ = _gpu_pair(precision="bf16")
    batches = [denoise_batch(batch=2, size=24, dtype=torch.float32, seed=s, device="cuda") for s in range(3)]
    graphed(*batches[0])  # capture (warm-up may synchronise: autotuning, allocation)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [graphed(*b) for b in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in losses)


# The production order, in a fresh process: autotuning on (conftest turns it off for this session,
# and the kernels read it at import), n_feats 32 (head dim 16) so the Triton attention is what
# the non-local blocks run; tuning happens in the warm-up, then the graph captures the tuned
# kernels. The spies count Python-level kernel calls: replays make none.
_PRODUCTION_ORDER = r"""
import copy, json, torch, rnan_fast
from rnan_fast.kernels import nonlocal_attention as K
from rnan_fast.train import make_optimizer, make_train_step

calls = {"forward": 0, "backward": 0}
for name in calls:
    def spy(*a, _name=name, _original=getattr(K, name), **k):
        calls[_name] += 1
        return _original(*a, **k)
    setattr(K, name, spy)
rnan_fast.set_backend("fast")  # raises rather than falling back when a kernel cannot run
torch.manual_seed(0)
net = rnan_fast.RNAN(n_colors=3, scale=1, n_feats=32, n_resgroups=3)
with torch.no_grad():
    for n, p in net.named_parameters():
        if ".W." in n:
            p.normal_(0, 0.05)
net = net.cuda()
twin = copy.deepcopy(net)
graphed = make_train_step(net, make_optimizer(net, lr=1e-4))
eager = make_train_step(twin, make_optimizer(twin, lr=1e-4), cuda_graph=False)
g = torch.Generator().manual_seed(1)
batches = []
for _ in range(4):
    clean = torch.rand(4, 3, 48, 48, generator=g) * 255
    batches.append(((clean + 25 * torch.randn(clean.shape, generator=g)).cuda(), clean.cuda()))
graphed_losses = [float(graphed(*batches[0]))]
at_capture = dict(calls)
graphed_losses += [float(graphed(*b)) for b in batches[1:]]
after_replays = dict(calls)
eager_losses = [float(eager(*b)) for b in batches]
worst = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-6))
            for (n, p), q in zip(net.named_parameters(), twin.parameters()) if not n.endswith("theta.bias"))
print(json.dumps({"captured": graphed.captured, "at_capture": at_capture, "after_replays": after_replays,
                  "graphed": graphed_losses, "eager": eager_losses, "worst": worst}))
"""


@needs_cuda
def test_production_order_autotune_then_capture_with_triton_attention():
    env = dict(os.environ, RNAN_FAST_AUTOTUNE="1", RNAN_FAST_AUTOTUNE_MAX="2",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PRODUCTION_ORDER], env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["captured"]
    # warm-up (3 eager steps) and capture (1) ran the Triton kernels of both non-local blocks ...
    assert r["at_capture"]["forward"] >= 2 * 4 and r["at_capture"]["backward"] >= 2 * 4, r
    # ... and the replays ran them from the graph, with no Python-level launch
    assert r["after_replays"] == r["at_capture"], r
    assert all(math.isfinite(v) for v in r["graphed"]), r
    torch.testing.assert_close(torch.tensor(r["graphed"]), torch.tensor(r["eager"]), rtol=1e-3, atol=0)
    assert r["worst"] < 1e-2, r
