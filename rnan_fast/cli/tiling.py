"""How restore, eval and demo run one image: the user's --tile / --chop / --whole, else CPU
auto-tiling (rnan_fast.inference.auto_tile, in the model's own tiles), with a progress bar inside
the image (its tiles, or the model's stages of a whole image)."""
from __future__ import annotations

import sys

import numpy as np

from rnan_fast.cli.common import PROG, RunOptions, UserError, _report

# A bar inside an image appears only once the image has run this long (tqdm's delay), so quick
# images print nothing beyond the per-image bar.
PROGRESS_DELAY_S = 3.0


class ImageRunner:
    """restore_image / restore_array with the command's RunOptions: `run(img, name)` -> uint8
    output, `run(img, name, quantize=False)` -> float32 (for 16-bit photos). card: the shipped
    model's card (its CPU tiles, its task), None for a checkpoint; task: the eval protocol's task
    when it differs from the card's (None: the card's). Task "demosaic" keeps every model call
    on the mosaic's 2x2 pattern. UserError: --pixel-shuffle with a model that changes the size
    or reads a mosaic."""

    def __init__(self, opts: RunOptions, net, card: dict | None = None, task: str | None = None):
        from rnan_fast.inference import check_pixel_shuffle, cpu_tiling, model_scale, task_period, tile_batch_for

        self.opts, self.net = opts, net
        task = task or (card or {}).get("task")
        self.tiling = cpu_tiling(card)
        overlap = opts.overlap
        if overlap is None:   # the model's own, at most half of a --tile
            overlap = self.tiling[1] if opts.tile is None else min(self.tiling[1], opts.tile // 2)
        self.kwargs = dict(tile=opts.tile, overlap=overlap, chop=opts.chop, self_ensemble=opts.self_ensemble,
                           period=task_period(task), tile_batch=tile_batch_for(opts.device),
                           pixel_shuffle=opts.pixel_shuffle)
        try:
            check_pixel_shuffle(opts.pixel_shuffle, model_scale(net), self.kwargs["period"])
        except ValueError as e:
            raise UserError(f"--pixel-shuffle {opts.pixel_shuffle}: {e}") from None
        self.told = False
        # auto-tiling only when nothing was chosen: no --tile, --chop or --whole
        self.auto = opts.tile is None and not opts.chop and not opts.whole

    def options(self, img: np.ndarray, name) -> dict:
        """restore_image keywords for this image (tile chosen here when auto-tiling applies);
        the first auto-tiled image is announced once, with the way to force whole images."""
        from rnan_fast.inference import auto_tile

        kwargs = dict(self.kwargs)
        if not self.auto:
            return kwargs
        h, w = img.shape[:2]
        tiling = (self.tiling[0], self.kwargs["overlap"])
        chosen = auto_tile(self.net, h, w, self.opts.device, tiling, self.opts.pixel_shuffle)
        if chosen is None:
            return kwargs
        kwargs["tile"], kwargs["overlap"] = chosen
        if not self.told:
            self.told = True
            _report(f"{PROG}: note: on the CPU, images larger than {chosen[0]}x{chosen[0]} run in overlapping tiles "
                    f"of that size (overlap {chosen[1]}; the first: {name}, {w}x{h}): attention over a whole image "
                    f"grows with (H*W)^2, and the model was trained on small patches; --whole for whole images, "
                    f"--tile N for other tiles", self.opts.quiet)
        return kwargs

    def run(self, img: np.ndarray, name, quantize: bool = True) -> np.ndarray:
        """The restored image: uint8, or (quantize=False) float32 on 0..255, unrounded."""
        import torch
        from tqdm import tqdm

        from rnan_fast.inference import restore_array, restore_image

        kwargs = self.options(img, name)
        bar = None

        def show(done: int, total: int, unit: str) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=getattr(name, "name", str(name)), unit=unit, leave=False,
                           delay=PROGRESS_DELAY_S, disable=self.opts.quiet, file=sys.stderr, dynamic_ncols=True)
            elif bar.total != total:  # an out-of-memory retry in smaller tiles counts anew
                bar.reset(total=total)
            bar.update(done - bar.n)

        stages = _stages(self.net) if kwargs["tile"] is None and not kwargs["chop"] else []
        hooks = []
        if stages:
            # a whole image is one model call: count the model's stages instead (head, the
            # groups, tail), once per self-ensemble member
            total, done = len(stages) * (8 if kwargs["self_ensemble"] else 1), 0

            def tick(*_):
                nonlocal done
                done += 1
                show(done, total, "stage")
            hooks = [m.register_forward_hook(tick) for m in stages]
        unit = "tile" if kwargs["tile"] is not None else ("quadrant" if kwargs["chop"] else "pass")

        def progress(done: int, total: int) -> None:
            # (one pass of a model without stages: nothing to count inside it; a whole image
            # counts its stages through the hooks, until an out-of-memory retry tiles it)
            if total > 1 and not hooks:
                show(done, total, unit)

        def retry(tile: int) -> None:
            """CUDA out of memory: restore_tensor reruns the image in tiles (said once per image)."""
            nonlocal bar, unit
            for h in hooks:
                h.remove()
            hooks.clear()
            if bar is not None:
                bar.close()
                bar = None
            unit = "tile"
            tried = "whole" if kwargs["tile"] is None else f"in {kwargs['tile']}x{kwargs['tile']} tiles"
            _report(f"{PROG}: note: {name} ({img.shape[1]}x{img.shape[0]}) ran out of GPU memory {tried}: retrying "
                    f"in {tile}x{tile} tiles, halved until they fit (--tile N chooses the tiles)", self.opts.quiet)

        oom_retry = retry if torch.device(self.opts.device).type == "cuda" else None
        try:
            restore = restore_image if quantize else restore_array
            return restore(self.net, img, device=self.opts.device, dtype=self.opts.dtype, progress=progress,
                           oom_retry=oom_retry, **kwargs)
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
