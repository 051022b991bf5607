"""``rnan-fast models``: the shipped models with their measured PSNR; and the --weights / --model
choice that restore, eval and demo share (a checkpoint file, or a shipped model by name)."""
from __future__ import annotations

import argparse

from rnan_fast.cli.common import EXIT_OK, PROG, UserError, _load_model, _report


def add_model_args(p: argparse.ArgumentParser, default_model: bool) -> None:
    """--weights W.pt | --model NAME; default_model: without either, the default color denoiser."""
    from rnan_fast.weights import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="W", help="RNAN checkpoint file: .pt (an official state dict or a "
                   "rnan-fast train checkpoint) or .safetensors")
    default = f" (default: {DEFAULT_MODEL})" if default_model else ""
    g.add_argument("--model", metavar="NAME", help=f"a model shipped with rnan_fast{default}; "
                   f"`{PROG} models` lists them")


def describe_noise(card: dict) -> str:
    """The degradation a card's model is for: "gaussian sigma 10-50", "JPEG quality 10", "MATLAB
    bicubic x2", "camera + gaussian 5-30" (the photo denoiser: camera-like noise and a share of
    Gaussian draws), or the type alone for the tasks without a level (e.g. "GRBG mosaic")."""
    noise = card["noise"]
    kind = noise.get("type", "gaussian")
    if kind == "camera":
        lo, hi = noise.get("sigma_range", (None, None))
        return "camera" if lo is None else f"camera + gaussian {lo:g}-{hi:g}"
    if "sigma" in noise:
        return f"{kind} sigma {noise['sigma']:g}"
    if "sigma_range" in noise:
        lo, hi = noise["sigma_range"]
        return f"{kind} sigma {lo:g}-{hi:g}"
    if "quality" in noise:
        return f"{kind} quality {noise['quality']}"
    if "scale" in noise:
        return f"{kind} x{noise['scale']}"
    return kind


def note_sigma(card: dict | None, sigma: float, quiet: bool = False) -> None:
    """A note on stderr when shipped model `card` runs at a noise level it was not trained for:
    another sigma than a fixed-sigma model's, or one outside a blind model's range (its PSNR there
    is not what its card measured)."""
    from rnan_fast.weights import sigma_range

    if card is None or not card["task"].startswith("denoise"):
        return
    lo, hi = sigma_range(card)
    if not lo <= sigma <= hi:
        _report(f"{PROG}: note: model {card['name']} was trained for {describe_noise(card)}, not sigma {sigma:g}; "
                f"`{PROG} models` lists the shipped models", quiet)


def load_net(args, opts, default_model: bool = True):
    """The model the command asked for, in eval mode on the RunOptions' device and precision:
    --weights (a checkpoint file), --model NAME, else (default_model) the default color
    denoiser. Returns (net, card or None). A shipped model is announced on stderr."""
    from rnan_fast import weights

    if args.weights is not None and args.model is not None:
        raise UserError("give --weights W.pt or --model NAME, not both")
    if args.weights is not None:
        return _load_model(args.weights, opts), None
    name = args.model
    if name is None:
        if not default_model:
            raise UserError("no model given: pass --weights W.pt or --model NAME")
        name = weights.DEFAULT_MODEL
        if not (weights.folder() / f"{name}.json").is_file():
            raise UserError(f"no --weights or --model given, and the default model {name!r} does not ship "
                            f"in {weights.folder()} yet; pass --weights W.pt (`{PROG} models` lists what ships)")
    try:
        net, card = weights.load_with_card(name, opts.device)
    except ValueError as e:  # WeightsError, or CheckpointError from a file that does not load
        raise UserError(str(e)) from None
    _report(f"{PROG}: note: model {name}: {card['task']}, {describe_noise(card)}, {net.describe()}",
            getattr(args, "quiet", False))
    from rnan_fast.inference import place_model

    return place_model(net, opts.device, opts.dtype), card


def model_task(name: str) -> str:
    """The eval task of shipped model `name`, from its card (a UserError when there is none)."""
    from rnan_fast import weights

    try:
        return weights.card(name)["task"]
    except weights.WeightsError as e:
        raise UserError(str(e)) from None


# A card row's score of the model's own input, where it has one: a JPEG model's JPEG, an SR
# model's bicubic upscaling.
INPUT_COLUMNS = (("jpeg_psnr", "JPEG"), ("bicubic_psnr", "bicubic"))


def _measured(card: dict) -> str:
    """The card's real-noise and sigma-30 rows (else its first two plain rows), e.g. "CBSD68 s30
    30.12 (BM3D 29.85)", "PolyU_dev real 38.20 (BM3D 37.90) (NLM 37.71)", "McMaster 38.10 (Menon
    34.24)", "LIVE1 29.20 (JPEG 27.77)" or "Set5 36.50 (bicubic 33.66)"; a row measured with
    --self-ensemble says so ("Kodak24 s30 x8 31.04")."""
    from rnan_fast.baselines import BASELINES

    rows = card.get("measured") or []
    if not rows:
        return "not measured"
    # real-noise rows (eval --pairs) first, then the sigma-30 ones
    chosen = ([r for r in rows if r.get("pairs")] + [r for r in rows if r.get("sigma") == 30]
              or [r for r in rows if not r.get("self_ensemble")][:2])
    parts = []
    for r in chosen:
        beside = "".join(f" ({b.column} {r[name + '_psnr']:.2f})" for name, b in BASELINES.items()
                         if r.get(name + "_psnr") is not None)
        beside += "".join(f" ({label} {r[key]:.2f})" for key, label in INPUT_COLUMNS if r.get(key) is not None)
        sigma = f" s{r['sigma']:g}" if r.get("sigma") is not None else (" real" if r.get("pairs") else "")
        x8 = " x8" if r.get("self_ensemble") else ""
        parts.append(f"{r['set']}{sigma}{x8} {r['psnr']:.2f}{beside}")
    return ", ".join(parts)


def cmd_models(args) -> int:
    from rnan_fast import weights

    try:
        cards = weights.available()
    except weights.WeightsError as e:
        raise UserError(str(e)) from None
    if not cards:
        print(f"# no model ships in {weights.folder()} yet")
        return EXIT_OK
    print(f"# models in {weights.folder()} (* = the default of restore and demo); PSNR in dB")
    width = max(len(n) for n in cards) + 2
    print(f"{'name':<{width}}  {'task':<12}  {'noise':<20}  {'size':>8}  measured PSNR")
    for name, c in cards.items():
        mark = "*" if name == weights.DEFAULT_MODEL else " "
        size = f"{c['size'] / 2**20:.1f} MiB"
        print(f"{mark}{name:<{width - 1}}  {c['task']:<12}  {describe_noise(c):<20}  {size:>8}  {_measured(c)}")
    return EXIT_OK


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list the shipped models with their measured PSNR",
                       description="The models that ship with rnan_fast (rnan_fast/weights, or "
                                   "$RNAN_FAST_WEIGHTS_DIR), from their model cards; MODEL_ZOO.md has the full tables.")
    m.set_defaults(func=cmd_models)
