"""Building blocks of RNAN, with the attribute names of the official code.

Every parameter of the official model lives here under the same dotted name and shape, so that
an official state dict loads with `strict=True`. Two computations differ in form (never in
value) from the official code:

- the non-local block calls `rnan_fast.ops.nonlocal_attention`, which never stores the
  (B, N, N) score matrix;
- the mask branches return the LOGITS of the mask (the 1x1 conv output before the sigmoid), and
  the attention modules combine `x + sigmoid(logits) * trunk` through
  `rnan_fast.ops.gated_residual`. The official `MB_sigmoid` holds no parameters, so it is gone.

Shapes: B batch, C = n_feats channels, H x W the feature map (any size, odd included).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnan_fast import ops
from rnan_fast.reference import check_softmax_over

# The DIV2K training-set mean that the official SR model subtracts (std 1).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
DIV2K_RGB_STD = (1.0, 1.0, 1.0)


def default_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    """A stride-1 convolution that keeps H x W ('same' padding for odd kernels)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def crop_to(t: Tensor, ref: Tensor) -> Tensor:
    """t[..., :H, :W] with (H, W) = ref's spatial size.

    The mask branch halves H x W with a stride-2 conv (ceil(H / 2)) and doubles it back with a
    ConvTranspose2d (2 * ceil(H / 2)): one pixel too many on an odd side, which the official
    code cannot add to its skip. The extra row / column is the last one (the transposed conv's
    output o draws on inputs near o / 2, so both maps start aligned). On even sizes this is the
    whole tensor, and the result is bit-identical to the official one.
    """
    return t[..., : ref.shape[-2], : ref.shape[-1]]


class MeanShift(nn.Conv2d):
    """A fixed-form 1x1 conv on RGB: y_c = (x_c + sign * rgb_range * mean_c) / std_c.

    (B, 3, H, W) -> (B, 3, H, W). As in the official code its weight and bias are ordinary
    parameters (they are in official state dicts and count in the parameter total; the official
    attempt to freeze them sets an attribute that PyTorch ignores, so they stay trainable).
    """

    def __init__(self, rgb_range: float, rgb_mean=DIV2K_RGB_MEAN, rgb_std=DIV2K_RGB_STD, sign: int = -1):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            std = torch.tensor(rgb_std, dtype=self.weight.dtype, device=self.weight.device)
            mean = torch.tensor(rgb_mean, dtype=self.weight.dtype, device=self.weight.device)
            eye = torch.eye(3, dtype=self.weight.dtype, device=self.weight.device)
            self.weight.copy_(eye.view(3, 3, 1, 1) / std.view(3, 1, 1, 1))
            self.bias.copy_(sign * rgb_range * mean / std)


class ResBlock(nn.Module):
    """conv -> ReLU -> conv, plus the input: (B, C, H, W) -> (B, C, H, W).

    Parameters: body.0 and body.2 (body.1 is the ReLU). `res_scale` multiplies the residual
    (the official RNAN builds every block with res_scale=1).
    """

    def __init__(self, n_feat: int, kernel_size: int = 3, bias: bool = True, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feat, n_feat, kernel_size, bias=bias),
            nn.ReLU(inplace=True),
            default_conv(n_feat, n_feat, kernel_size, bias=bias),
        )
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        res = self.body(x)
        if self.res_scale != 1:
            res = res * self.res_scale
        return res + x


class NonLocalBlock2D(nn.Module):
    """Non-local block: z = x + W(attention(theta(x), phi(x), g(x))), (B, C, H, W) -> same.

    theta, phi, g: 1x1 convs C -> C/2 (`inter_channels`), seen as (B, N, C/2), N = H * W;
    attention: `rnan_fast.ops.nonlocal_attention` with `softmax_over` ("query", the official
    softmax over dim=1, or "key"); W: 1x1 conv C/2 -> C, zero-initialised as in the official
    code, so a fresh block is the identity.
    """

    def __init__(self, in_channels: int, inter_channels: int, softmax_over: str = "query"):
        super().__init__()
        check_softmax_over(softmax_over)
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        self.softmax_over = softmax_over
        # Registration order g, W, theta, phi: the official state dict's order.
        self.g = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.W = nn.Conv2d(inter_channels, in_channels, kernel_size=1)
        nn.init.constant_(self.W.weight, 0)
        nn.init.constant_(self.W.bias, 0)
        self.theta = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        # (B, C/2, H, W) -> (B, N, C/2): views, no copies.
        theta = self.theta(x).flatten(2).transpose(1, 2)
        phi = self.phi(x).flatten(2).transpose(1, 2)
        g = self.g(x).flatten(2).transpose(1, 2)
        y = ops.nonlocal_attention(theta, phi, g, softmax_over=self.softmax_over)   # (B, N, C/2)
        y = y.transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return self.W(y) + x

    def extra_repr(self) -> str:
        return f"softmax_over={self.softmax_over!r}"


class TrunkBranch(nn.Module):
    """Two residual blocks: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, n_feat: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(ResBlock(n_feat, kernel_size), ResBlock(n_feat, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MaskBranchDownUp(nn.Module):
    """Mask branch: (B, C, H, W) -> mask LOGITS (B, C, H, W), the sigmoid is left to the caller.

    MB_RB1 (residual block; in the non-local variant a non-local block first) -> MB_Down
    (3x3 conv, stride 2) -> MB_RB2 (2 residual blocks) -> MB_Up (ConvTranspose2d k=6, s=2, p=2,
    cropped to H x W) + the MB_RB1 output -> MB_RB3 (residual block) -> MB_1x1conv.
    """

    def __init__(self, n_feat: int, kernel_size: int = 3, non_local: bool = False, softmax_over: str = "query"):
        super().__init__()
        rb1 = [ResBlock(n_feat, kernel_size)]
        if non_local:
            rb1.insert(0, NonLocalBlock2D(n_feat, n_feat // 2, softmax_over=softmax_over))
        self.MB_RB1 = nn.Sequential(*rb1)
        self.MB_Down = nn.Sequential(nn.Conv2d(n_feat, n_feat, 3, stride=2, padding=1))
        self.MB_RB2 = nn.Sequential(ResBlock(n_feat, kernel_size), ResBlock(n_feat, kernel_size))
        self.MB_Up = nn.Sequential(nn.ConvTranspose2d(n_feat, n_feat, 6, stride=2, padding=2))
        self.MB_RB3 = nn.Sequential(ResBlock(n_feat, kernel_size))
        self.MB_1x1conv = nn.Sequential(nn.Conv2d(n_feat, n_feat, 1, padding=0, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        x_rb1 = self.MB_RB1(x)
        x_up = self.MB_Up(self.MB_RB2(self.MB_Down(x_rb1)))
        x_rb3 = self.MB_RB3(x_rb1 + crop_to(x_up, x_rb1))
        return self.MB_1x1conv(x_rb3)


class NLMaskBranchDownUp(MaskBranchDownUp):
    """The mask branch of a non-local group: MB_RB1 = (NonLocalBlock2D, ResBlock)."""

    def __init__(self, n_feat: int, kernel_size: int = 3, softmax_over: str = "query"):
        super().__init__(n_feat, kernel_size, non_local=True, softmax_over=softmax_over)


class ResAttModuleDownUpPlus(nn.Module):
    """Residual attention block: (B, C, H, W) -> (B, C, H, W).

    r = RA_RB1(x); h = r + sigmoid(RA_MB(r)) * RA_TB(r) (one fused `gated_residual`);
    out = RA_tail(h) (2 residual blocks). non_local=True gives the non-local variant.
    """

    def __init__(self, n_feat: int, kernel_size: int = 3, non_local: bool = False, softmax_over: str = "query"):
        super().__init__()
        self.RA_RB1 = nn.Sequential(ResBlock(n_feat, kernel_size))
        self.RA_TB = nn.Sequential(TrunkBranch(n_feat, kernel_size))
        mask = (NLMaskBranchDownUp(n_feat, kernel_size, softmax_over=softmax_over) if non_local
                else MaskBranchDownUp(n_feat, kernel_size))
        self.RA_MB = nn.Sequential(mask)
        self.RA_tail = nn.Sequential(ResBlock(n_feat, kernel_size), ResBlock(n_feat, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        r = self.RA_RB1(x)
        trunk = self.RA_TB(r)
        mask_logits = self.RA_MB(r)
        h = ops.gated_residual(x=r, mask_logits=mask_logits, trunk=trunk)
        return self.RA_tail(h)


class NLResAttModuleDownUpPlus(ResAttModuleDownUpPlus):
    """Residual attention block whose mask branch starts with a non-local block."""

    def __init__(self, n_feat: int, kernel_size: int = 3, softmax_over: str = "query"):
        super().__init__(n_feat, kernel_size, non_local=True, softmax_over=softmax_over)


class ResGroup(nn.Module):
    """One group: body = (attention block, 3x3 conv), no group skip. (B, C, H, W) -> same."""

    def __init__(self, n_feat: int, kernel_size: int = 3, non_local: bool = False, softmax_over: str = "query"):
        super().__init__()
        block = (NLResAttModuleDownUpPlus(n_feat, kernel_size, softmax_over=softmax_over) if non_local
                 else ResAttModuleDownUpPlus(n_feat, kernel_size))
        self.body = nn.Sequential(block,
                                  default_conv(n_feat, n_feat, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: (B, C, H, W) -> (B, C, s*H, s*W).

    scale 2^k: k stages of (3x3 conv C -> 4C, PixelShuffle(2)); scale 3: (3x3 conv C -> 9C,
    PixelShuffle(3)). Parameters at indices 0, 2, ... as in the official code.
    """

    def __init__(self, scale: int, n_feat: int):
        layers: list[nn.Module] = []
        if scale >= 2 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [default_conv(n_feat, 4 * n_feat, 3), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [default_conv(n_feat, 9 * n_feat, 3), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"Upsampler: scale must be 3 or a power of two >= 2, got {scale!r}")
        super().__init__(*layers)


class MosaicFill(nn.Module):
    """Bilinear demosaicing of a zero-filled GRBG mosaic, as a fixed first step (no parameters,
    nothing in the state dict). x: (B, 3, H, W), the samples at (0,0)=G, (0,1)=R, (1,0)=B,
    (1,1)=G of every 2x2 cell (what rnan_fast.data.mosaic makes; other values are ignored) ->
    (B, 3, H, W): every sample kept, every missing one the weighted mean of its colour's samples
    in the 3x3 neighbourhood (bilinear: 1/2 the side neighbours, 1/4 the corners), renormalised
    where the image border cuts the neighbourhood. Each call's (0, 0) must be a G site of the
    pattern (inference.restore_tensor(period=2) keeps tiles on it). A colour with no sample in
    the whole image (B on a one-row image) stays zero."""

    # the bilinear weights per colour: R and B have samples on a square lattice of stride 2, G on
    # a quincunx; at a sample the centre weight (1) is the only one that meets a sample
    KERNELS = {"rb": ((0.25, 0.5, 0.25), (0.5, 1.0, 0.5), (0.25, 0.5, 0.25)),
               "g": ((0.0, 0.5, 0.0), (0.5, 1.0, 0.5), (0.0, 0.5, 0.0))}

    def __init__(self):
        super().__init__()
        rb, g = (torch.tensor(self.KERNELS[k]) for k in ("rb", "g"))
        self.register_buffer("weight", torch.stack([rb, g, rb])[:, None], persistent=False)   # (3, 1, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        row = torch.arange(h, device=x.device).view(h, 1) % 2
        col = torch.arange(w, device=x.device).view(1, w) % 2
        mask = torch.stack([(row == 0) & (col == 1), row == col, (row == 1) & (col == 0)])[None].to(x.dtype)
        weight = self.weight.to(x.dtype)
        num = nn.functional.conv2d(x * mask, weight, padding=1, groups=3)
        den = nn.functional.conv2d(mask, weight, padding=1, groups=3)
        return num / den.clamp_min(0.25)   # (den >= 0.25 wherever a sample is in reach, else num is 0)
