"""How restore and eval run one image: the user's --tile / --chop / --whole, else CPU auto-tiling
(rnan_fast.inference.auto_tile), with a progress bar inside the image (its tiles, or the model's
stages of a whole image)."""
from __future__ import annotations

import sys

import numpy as np

from rnan_fast.cli.common import PROG, _report, _restore_kwargs

# A bar inside an image appears only once the image has run this long (tqdm's delay), so quick
# images print nothing beyond the per-image bar.
PROGRESS_DELAY_S = 3.0


class ImageRunner:
    """restore_image with the command's options; `run(img, name)` -> uint8 output."""

    def __init__(self, args, net, device, dtype):
        self.args, self.net, self.device, self.dtype = args, net, device, dtype
        self.kwargs = _restore_kwargs(args)
        self.told = False
        # auto-tiling only when nothing was chosen: no --tile, --chop or --whole
        self.auto = args.tile is None and not args.chop and not args.whole

    def options(self, img: np.ndarray, name) -> dict:
        """restore_image keywords for this image (tile chosen here when auto-tiling applies);
        the first auto-tiled image is announced once, with the way to force whole images."""
        from rnan_fast.inference import AUTO_TILE_SECONDS, attention_seconds, auto_tile, cpu_attention_path

        kwargs = dict(self.kwargs)
        if not self.auto:
            return kwargs
        h, w = img.shape[:2]
        tile = auto_tile(self.net, h, w, self.device, self.dtype)
        if tile is None:
            return kwargs
        # the overlap of --tile-overlap, at most half a tile (it may exceed the automatic tile)
        kwargs["tile"], kwargs["overlap"] = tile, min(kwargs["overlap"], tile // 2)
        if not self.told:
            self.told = True
            seconds = attention_seconds(self.net, h, w, self.dtype)
            path = {"extension": "C++ kernel", "reference": "reference"}[cpu_attention_path(self.dtype)]
            _report(f"{PROG}: note: whole-image attention on the CPU grows with (H*W)^2: {name} ({w}x{h}) "
                    f"would need ~{_duration(seconds)} of it ({path} path), so images past "
                    f"~{_duration(AUTO_TILE_SECONDS)} of attention run in overlapping {tile}x{tile} tiles "
                    f"(overlap {kwargs['overlap']}); pass --whole for whole-image inference, or --tile N "
                    f"for other tiles", self.args.quiet)
        return kwargs

    def run(self, img: np.ndarray, name) -> np.ndarray:
        from tqdm import tqdm

        from rnan_fast.inference import restore_image

        kwargs = self.options(img, name)
        bar = None

        def show(done: int, total: int, unit: str) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=getattr(name, "name", str(name)), unit=unit, leave=False,
                           delay=PROGRESS_DELAY_S, disable=self.args.quiet, file=sys.stderr, dynamic_ncols=True)
            bar.update(done - bar.n)

        stages = _stages(self.net) if kwargs["tile"] is None and not kwargs["chop"] else []
        hooks, progress = [], None
        if stages:
            # a whole image is one model call: count the model's stages instead (head, the
            # groups, tail), once per self-ensemble member
            total, done = len(stages) * (8 if kwargs["self_ensemble"] else 1), 0

            def tick(*_):
                nonlocal done
                done += 1
                show(done, total, "stage")
            hooks = [m.register_forward_hook(tick) for m in stages]
        else:
            unit = "tile" if kwargs["tile"] is not None else ("quadrant" if kwargs["chop"] else "pass")

            def progress(done: int, total: int) -> None:
                if total > 1:  # (one pass of a model without stages: nothing to count inside it)
                    show(done, total, unit)
        try:
            return restore_image(self.net, img, device=self.device, dtype=self.dtype, progress=progress, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            if bar is not None:
                bar.close()


def _stages(net) -> list:
    """RNAN's top-level stages in forward order (head, the groups and the body conv, tail);
    [] for another model."""
    try:
        return [net.head, net.body_nl_low, *net.body, net.body_nl_high, net.tail]
    except (AttributeError, TypeError):
        return []


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
