"""torch.hub entry points of rnan_fast (`torch.hub.list` shows them, `torch.hub.help` their docs).

    net = torch.hub.load("OWNER/rnan_fast", "rnan", pretrained="rnan_dn_rgb")      # a shipped model
    net = torch.hub.load("path/to/checkout", "rnan", source="local", weights="w.safetensors")
    net = torch.hub.load("path/to/checkout", "rnan", source="local", n_feats=32, n_resgroups=4)

A checkout fetched by torch.hub is not compiled: the model then runs on the pure-PyTorch
reference ops (a warning says so); `pip install` builds the kernels (README, Install).
"""
from rnan_fast.model import RNAN as _RNAN

dependencies = ["torch", "numpy", "PIL", "safetensors"]


def rnan(pretrained: str | None = None, weights: str | None = None, **config) -> _RNAN:
    """RNAN (Residual Non-local Attention Network) for image restoration.

    Input (B, n_colors, H, W) on the 0..rgb_range scale (0..255 for the shipped models), any H
    and W; output (B, n_colors, scale*H, scale*W).

    pretrained: the name of a model that ships with rnan_fast ("rnan_dn_rgb": blind color
        denoiser, the default of `rnan-fast restore`; "rnan_dn_rgb_s30": color, sigma 30;
        "rnan_dn_gray": blind gray denoiser; MODEL_ZOO.md), its file checked against the SHA-256
        of its model card; in eval mode.
    weights: a checkpoint file instead (.safetensors, an official .pt state dict, or a
        `rnan-fast train` checkpoint), its configuration read off the tensors; in eval mode.
    config: RNAN keywords (n_colors, scale, n_feats, n_resgroups, rgb_range, softmax_over). Alone
        they build an untrained model (defaults: the official 64-feature, 10-group color
        denoiser); beside `pretrained` or `weights` they are what the weights must fit
        (ValueError naming the difference otherwise).
    """
    if pretrained is not None and weights is not None:
        raise ValueError("rnan: give pretrained=NAME or weights=PATH, not both")
    if weights is not None:
        return _RNAN.from_checkpoint(weights, map_location="cpu", **config).eval()
    if pretrained is None:
        return _RNAN(**config)
    net = _RNAN.pretrained(pretrained)
    differ = [f"{k}={v!r} (the model has {net.config.get(k)!r})" for k, v in config.items() if net.config.get(k) != v]
    if differ:
        raise ValueError(f"rnan: pretrained={pretrained!r} does not fit {', '.join(differ)}")
    return net
