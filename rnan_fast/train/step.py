"""Training steps for RNAN that run at the GPU's speed: one CUDA graph per step.

    import rnan_fast
    from rnan_fast.train import make_optimizer, make_train_step

    net = rnan_fast.RNAN(n_colors=3, scale=1, n_feats=64, n_resgroups=10).cuda()
    opt = make_optimizer(net)                      # Adam(lr 1e-4, betas (0.9, 0.999), eps 1e-8), fused on CUDA
    step = make_train_step(net, opt, loss="mse", precision="bf16")
    for lr_batch, hr_batch in loader:              # (16, 3, 48, 48) each for denoising
        loss = step(lr_batch, hr_batch)            # 0-dim tensor on the model's device; no host sync

What one step does: zero the gradients, forward (under bf16 autocast when precision="bf16"; the
weights, gradients and optimizer state stay fp32), loss in fp32 ("mse" = mean squared error, the
official loss for denoising-type tasks; "l1" = mean absolute error, the official loss for SR),
backward, optimizer.step(). On CUDA the whole of that is captured once into a CUDA graph and
replayed for every later batch ("cuda_graph"), which removes the CPU launch overhead that bounds
the eager step of a model with RNAN's hundreds of small kernels. On any other device the step
runs eagerly; that path is what the CPU tests check, and it is the definition the graph must match.

The CUDA-graph path, in order (on the first call):
  1. static input buffers of the first batch's shapes are allocated (channels_last if asked);
  2. the model, the loss and the optimizer are warmed up for a few iterations on a side stream
     (lazy initialisation, cuDNN and Triton autotuning, optimizer state allocation: none of that
     may happen during capture), and the parameters and optimizer state are then put back to
     what they were, so the warm-up does not count as training;
  3. forward + loss + backward + optimizer.step() are captured into one torch.cuda.CUDAGraph;
  4. every call copies the batch into the static buffers and replays the graph.
The optimizer's param groups get `capturable=True` and a 0-dim CUDA tensor learning rate (so an LR
scheduler's in-place update reaches the replayed graph). Later batches must have the first batch's
shapes (use drop_last=True in the DataLoader); a different shape raises ValueError.

The official recipe (for reference): 48x48 input patches (SR: 96/144/192 HR patches at x2/x3/x4),
batch 16, Adam lr 1e-4 (betas 0.9, 0.999, eps 1e-8) halved every 200 epochs of 1000 iterations,
MSE for denoising, L1 for SR, images on the 0..rgb_range (255) scale.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["LOSSES", "PRECISIONS", "TrainStep", "make_optimizer", "make_train_step", "train"]

LOSSES = ("mse", "l1")
PRECISIONS = ("fp32", "bf16")
WARMUP_ITERS = 3  # side-stream iterations before capture (the PyTorch CUDA-graph recipe uses 3)

_LOSS_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": nn.functional.mse_loss,
    "l1": nn.functional.l1_loss,
}


def make_optimizer(model: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with the official RNAN settings over the model's trainable parameters.

    fused: None picks the fused CUDA implementation when the parameters are on CUDA (one kernel
    for the whole update) and the default implementation elsewhere. The result can be passed to
    make_train_step, which makes it capturable when it captures a CUDA graph.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    if fused is None:
        fused = params[0].is_cuda
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            fused=fused or None)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"make_train_step: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_flag(name: str, value, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"make_train_step: {name} must be {allowed}, got {value!r}")


class TrainStep:
    """One training step as a callable: step(lr_batch, hr_batch) -> loss.

    lr_batch: (B, C, H, W) degraded input on the 0..rgb_range scale (any device and float dtype:
        it is copied to the model's device and parameter dtype).
    hr_batch: (B, C, H * scale, W * scale) target, same scale.
    Returns the loss of this batch (before the update) as a 0-dim tensor (float32; float64 for a
    float64 model) on the model's device, detached; reading it (`.item()`, printing) waits for the GPU, so do that rarely.

    Attributes: model, optimizer, loss, precision, channels_last, device, uses_cuda_graph
    (True on the CUDA-graph path), captured (True once the graph exists).
    Build it after loading any checkpoint into the model and optimizer: the graph holds the
    addresses of the parameters, gradients and optimizer state that exist at capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: str | Callable = "mse",
                 precision: str = "fp32", channels_last: bool = True, cuda_graph: bool | None = None,
                 compile: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"make_train_step: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_train_step: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if callable(loss) and not isinstance(loss, str):
            loss_fn, loss_name = loss, getattr(loss, "__name__", type(loss).__name__)
        else:
            _check_choice("loss", loss, LOSSES)
            loss_fn, loss_name = _LOSS_FNS[loss], loss
        _check_choice("precision", precision, PRECISIONS)
        _check_flag("channels_last", channels_last)
        _check_flag("cuda_graph", cuda_graph, allow_none=True)
        _check_flag("compile", compile)

        params = list(model.parameters())
        if not params:
            raise ValueError("make_train_step: the model has no parameters")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"make_train_step: the model's parameters are on several devices {sorted(map(str, devices))}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"make_train_step: the model's parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        device, dtype = params[0].device, params[0].dtype
        if precision == "bf16" and dtype != torch.float32:
            raise TypeError(f"make_train_step: precision='bf16' autocasts a model with float32 weights "
                            f"(kept as the master copy); this model's parameters are {dtype}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"make_train_step: keep the weights in float32 (or float64 for tests) and use "
                            f"precision='bf16' for low precision; this model's parameters are {dtype}")
        model_params = {id(p) for p in params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in model_params:
                    raise ValueError("make_train_step: the optimizer holds a tensor that is not a parameter "
                                     f"of the model (shape {tuple(p.shape)})")
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"make_train_step: cuda_graph=True needs the model on a CUDA device; it is on {device} "
                             "(move it with model.cuda(), or pass cuda_graph=False for the eager step)")

        self.model, self.optimizer = model, optimizer
        self.loss, self.precision, self.channels_last = loss_name, precision, channels_last
        self.device, self.dtype = device, dtype
        self.uses_cuda_graph = bool(cuda_graph)
        self._loss_fn = loss_fn
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps the same Parameters
        model.train()
        self._forward = torch.compile(model, dynamic=False) if compile else model
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[Tensor, Tensor, Tensor] | None = None  # lr buffer, hr buffer, loss
        if self.uses_cuda_graph:
            for group in optimizer.param_groups:
                if group.get("differentiable"):
                    raise ValueError("make_train_step: a differentiable optimizer cannot be captured in a CUDA graph")
                group["capturable"] = True
                lr = group["lr"]  # (a loaded state dict may bring a tensor lr on the CPU)
                if not (isinstance(lr, Tensor) and lr.device == device):
                    group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
                for p in group["params"]:  # state from earlier non-capturable steps: counters onto the GPU
                    state = optimizer.state.get(p, {})
                    if isinstance(state.get("step"), Tensor) and state["step"].device != device:
                        state["step"] = state["step"].to(device)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def _autocast(self):
        if self.precision == "bf16":
            # No cast cache: every weight is used once per forward, and a cache that outlives
            # the context is what breaks autocast under CUDA-graph capture.
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    @staticmethod
    def _check_batch(name: str, t: Tensor) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"train step: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"train step: {name} must be a floating (B, C, H, W) tensor, got "
                             f"shape {tuple(t.shape)} and dtype {t.dtype}")

    def _prepare(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype, memory_format=self._memory_format, non_blocking=True)

    def _loss(self, lr_batch: Tensor, hr_batch: Tensor) -> Tensor:
        """Forward and loss (no backward): the loss is computed in float32 or float64, never bf16."""
        with self._autocast():
            out = self._forward(lr_batch)
        if out.shape != hr_batch.shape:
            raise ValueError(f"train step: the model maps lr_batch {tuple(lr_batch.shape)} to "
                             f"{tuple(out.shape)}, which differs from hr_batch {tuple(hr_batch.shape)}")
        return self._loss_fn(out.to(hr_batch.dtype), hr_batch)

    def _eager_step(self, lr_batch: Tensor, hr_batch: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(lr_batch, hr_batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _capture(self, lr_batch: Tensor, hr_batch: Tensor) -> None:
        static_lr = torch.empty_like(lr_batch, memory_format=self._memory_format).copy_(lr_batch)
        static_hr = torch.empty_like(hr_batch, memory_format=self._memory_format).copy_(hr_batch)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {id(p): {k: v.clone() if isinstance(v, Tensor) else v
                               for k, v in self.optimizer.state[p].items()}
                       for p in params if p in self.optimizer.state}
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self._eager_step(static_lr, static_hr)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Undo the warm-up in place (the graph must see the same tensors): parameters back, state
        # that existed back, state the warm-up created zeroed (a fresh Adam/AdamW start: zero moments, step 0).
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for p in params:
                before = saved_state.get(id(p), {})
                for k, v in self.optimizer.state[p].items():
                    if isinstance(v, Tensor):
                        v.copy_(before[k]) if k in before else v.zero_()
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the static grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = self._loss(static_lr, static_hr)
            static_loss.backward()
            self.optimizer.step()
        self._graph, self._static = graph, (static_lr, static_hr, static_loss.detach())

    def __call__(self, lr_batch: Tensor, hr_batch: Tensor) -> Tensor:
        self._check_batch("lr_batch", lr_batch)
        self._check_batch("hr_batch", hr_batch)
        if lr_batch.shape[0] != hr_batch.shape[0]:
            raise ValueError(f"train step: lr_batch {tuple(lr_batch.shape)} and hr_batch "
                             f"{tuple(hr_batch.shape)} have different batch sizes")
        if not self.model.training:  # checked on the top module only: train() walks every submodule
            self.model.train()
        if not self.uses_cuda_graph:
            return self._eager_step(self._prepare(lr_batch), self._prepare(hr_batch))
        # The model's GPU, whatever device is current: the capture's side stream, its memory pool
        # and the kernels' launches all follow the current device (model on cuda:1, cuda:0 current).
        with torch.cuda.device(self.device):
            if self._graph is None:
                self._capture(self._prepare(lr_batch), self._prepare(hr_batch))
            else:
                static_lr, static_hr, _ = self._static
                if lr_batch.shape != static_lr.shape or hr_batch.shape != static_hr.shape:
                    raise ValueError(f"train step: the CUDA graph was captured for lr {tuple(static_lr.shape)} / hr "
                                     f"{tuple(static_hr.shape)}, got lr {tuple(lr_batch.shape)} / hr "
                                     f"{tuple(hr_batch.shape)}; keep batches one shape (DataLoader drop_last=True) "
                                     "or use cuda_graph=False")
                # copy_ converts device, dtype and layout on the way into the static buffers
                static_lr.copy_(lr_batch, non_blocking=True)
                static_hr.copy_(hr_batch, non_blocking=True)
            self._graph.replay()
            # A copy: the static loss buffer is overwritten by the next replay.
            return self._static[2].clone()


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: str | Callable = "mse",
                    precision: str = "fp32", channels_last: bool = True, cuda_graph: bool | None = None,
                    compile: bool = False) -> TrainStep:
    """Build a training step for `model` and `optimizer`: step(lr_batch, hr_batch) -> loss tensor.

    loss: "mse" (denoising-type tasks, official) or "l1" (SR, official), mean over all elements;
        or a callable (output, target) -> 0-dim tensor.
    precision: "fp32", or "bf16" = bf16 autocast of the forward with float32 weights, gradients
        and optimizer state (the loss is computed in float32).
    channels_last: convert the model's weights and every batch to channels_last (NHWC), the
        layout cuDNN's fastest convolutions use on tensor-core GPUs.
    cuda_graph: None = on exactly when the model is on CUDA; True on another device raises.
    compile: wrap the model's forward in torch.compile (default mode: Inductor fuses the
        elementwise glue; the CUDA graph, if any, is still captured here around the whole step).
    The model is put in train mode (again at a step that finds it in eval mode); see TrainStep for
    the call signature.
    """
    return TrainStep(model, optimizer, loss=loss, precision=precision, channels_last=channels_last,
                     cuda_graph=cuda_graph, compile=compile)


def train(step: TrainStep, batches: Iterable[tuple[Tensor, Tensor]], num_steps: int | None = None,
          log_every: int = 0, log: Callable[[str], None] = print) -> Tensor:
    """Run `step` over (lr_batch, hr_batch) pairs; returns the per-step losses, a (steps,) float32 CPU tensor.

    num_steps: stop after this many steps (None: when `batches` ends); an iterable that ends
        first is restarted, so a DataLoader may hold fewer batches than num_steps.
    log_every: every this many steps, call log("step N: loss L") (this waits for the device;
        0 = never). Otherwise the loop never synchronises until the end.
    """
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 0):
        raise ValueError(f"train: num_steps must be a non-negative int or None, got {num_steps!r}")
    if not isinstance(log_every, int) or log_every < 0:
        raise ValueError(f"train: log_every must be a non-negative int, got {log_every!r}")
    losses: list[Tensor] = []
    while num_steps is None or len(losses) < num_steps:
        started = len(losses)
        for lr_batch, hr_batch in batches:
            losses.append(step(lr_batch, hr_batch))
            if log_every and len(losses) % log_every == 0:
                log(f"step {len(losses)}: loss {losses[-1].item():.6g}")
            if num_steps is not None and len(losses) >= num_steps:
                break
        if num_steps is None or len(losses) == started:
            break  # a single pass, or an empty iterable
    if not losses:
        return torch.empty(0)
    return torch.stack(losses).float().cpu()
