"""Benchmark 2: a trial's training throughput vs a bare ResNet50 on in-memory tensors.

Trial: ``train_trial`` (one epoch per repetition; its ``train_images_per_s`` covers the
training loop: cache rows, device augmentation, DALAResNet50 forward/backward, AdamW).
Bare: torchvision's ``resnet50`` (2 classes) stepping AdamW on one fixed in-memory batch
of the same shape, batch size and memory layout (channels_last), on the same device, as
many steps as the trial's epoch.
Also measured: the same DALAResNet50 on the fixed batch, which splits the gap into the
data path's share and the model's (attention and head). Measured alternately. And the
precise-BatchNorm pass that precedes each validation, as a share of a training epoch's time.
Goal: ratio >= 0.9 on the CPU, >= 0.8 on a GPU. ``--compile`` measures eager and
``torch.compile`` (the trial's ``compile: true``) side by side in the same run: the trial
and the bare model, each eager and compiled, interleaved, so the compiled/eager gains come
from one machine; the goal's ratio is compiled trial / compiled bare model, and the one-off
compile time is the compiled trial's first epoch. It records its own block
(``trial-compile``, or ``trial-gpu-compile`` on a GPU).

    python bench/trial.py [--quick] [--device cpu|cuda] [--compile] [--record]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SIZES = {  # synthetic images per magnification (x 24 patients), px, batch, reps
    "tiny": dict(per_mag=2, px=32, batch=8, reps=1),
    "quick": dict(per_mag=3, px=64, batch=16, reps=2),
    "full": dict(per_mag=3, px=128, batch=16, reps=3),  # 224 px: ~1 img/s on a shared CPU
}
GPU_SIZE = dict(per_mag=60, px=224, batch=64, reps=7)  # 1,440 images at 40X, as BreakHis;
# 7 reps: an epoch is ~0.3 s on an H100/H200, and single epochs there vary by +-15%


def _count_syncs(config, data):  # noqa: ANN001, ANN202
    """Synchronising CUDA calls inside ``train_one_epoch`` (torch's sync debug mode), and
    the trial's result (this is the process's first trial: one-off costs land in it).

    Expected: the one ``.item()`` reading the epoch's loss at the end, plus one-off copies
    (the augmentation's constants, cached per device; compilation under --compile);
    anything per batch would stall the GPU behind the Python loop.
    """
    import warnings

    import torch

    from dala_search import train

    counts: dict[str, int] = {}
    original = train.train_one_epoch

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return original(*a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            for w in caught:
                key = f"{Path(w.filename).name}:{w.lineno}"  # where the sync was asked for
                counts[key] = counts.get(key, 0) + 1

    train.train_one_epoch = counted
    try:
        result = train.train_trial(config, data)
    finally:
        train.train_one_epoch = original
    c.log(f"synchronising calls in one training epoch: {counts}")
    return counts, result


def fixed_batch_img_s(
    model,  # noqa: ANN001
    *,
    device,  # noqa: ANN001
    batch_size: int,
    px: int,
    steps: int,
    lr: float,
    amp: bool,
    compiled: bool = False,
) -> float:
    """Training images/s of ``model`` stepping AdamW on one fixed in-memory batch, ``steps``
    timed steps after one untimed one (cuDNN/cuBLAS set-up, allocator growth); channels_last
    as the trial's input, bf16 autocast when ``amp`` (as a CUDA trial)."""
    import torch

    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if compiled:
        model = torch.compile(model)
    x = torch.randn(batch_size, 3, px, px, device=device)
    # the layout the trial's model gets: channels_last on both (on a CUDA trial the
    # training loop converts to it; on a CPU the augmentation writes NHWC memory)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=device)
    start = 0.0
    for step in range(steps + 1):
        if step == 1:  # step 0 is the untimed warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def _compile_figures(runs: dict[str, list[float]], eager_first: list[float]) -> dict:
    """Compiled vs eager, both measured in this run (``trial``/``bare_resnet50`` compiled)."""
    te, be = c.median(runs["trial_eager"]), c.median(runs["bare_resnet50_eager"])
    return {
        "trial_eager_img_s": round(te, 2),
        "bare_eager_img_s": round(be, 2),
        "eager_ratio": round(te / be, 3),
        "compile_gain_trial": round(c.median(runs["trial"]) / te, 3),
        "compile_gain_bare": round(c.median(runs["bare_resnet50"]) / be, 3),
        "eager_first_epoch_s": [round(v, 2) for v in eager_first],
    }


def _compile_summary(r: dict) -> str:
    """The --compile lines: compiled vs eager in this run, and the one-off compile."""
    first = r["first_epoch_s"]
    return (
        f"\neager, same run: trial {r['trial_eager_img_s']:.2f} img/s, bare resnet50 "
        f"{r['bare_eager_img_s']:.2f} img/s (ratio {r['eager_ratio']:.3f})\n"
        f"compiled/eager: trial {r['compile_gain_trial']:.3f}x, bare resnet50 "
        f"{r['compile_gain_bare']:.3f}x (steady-state epochs)\n"
        f"the process's first compiled trial spent {first[0]:.1f} s in its first epoch "
        "(compile included)"
        + (f", later compiled trials {max(first[1:]):.1f} s at most" if first[1:] else "")
        + f"; eager first epochs {max(r['eager_first_epoch_s']):.1f} s at most"
    )


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument(
        "--compile", action="store_true", help="trial, bare and fixed-batch models compiled"
    )
    args = p.parse_args()
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]
    if args.device.startswith("cuda") and not args.tiny:
        size = GPU_SIZE

    import torch
    import torchvision

    from dala_search.config import TrialConfig
    from dala_search.model.dalaresnet import build_dalaresnet
    from dala_search.train import prepare_data, train_trial

    device = torch.device(args.device)
    base = c.work_dir(args)
    # Small sources: decoding is not what this benchmark measures (bench/pipeline does).
    root = c.demo_data(base, images_per_mag=size["per_mag"], width=256, height=168)
    config = TrialConfig(
        pretrained="none",
        image_size=size["px"],
        batch_size=size["batch"],
        epochs=1,
        device=str(device),
        num_threads=args.threads if device.type == "cpu" else 0,
        compile=args.compile,
    )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=base) as cache_dir:
        data = prepare_data(root, "40X", image_size=size["px"], cache_dir=cache_dir)
        n_train = len(data.split.train)
        steps = sum(
            1 for lo in range(0, n_train, config.batch_size) if n_train - lo >= 2
        )  # the batches train_one_epoch runs
        c.log(f"{n_train} training images at {size['px']} px, {steps} batches per epoch")

        # Steady state on both sides: the trial's second epoch, the bare loop after one
        # untimed step (first steps pay cuDNN/cuBLAS set-up and allocator growth).
        first_epoch_s: list[float] = []  # the compile (and cuDNN set-up) lands here

        bn_share: list[float] = []  # the precise-BatchNorm pass over the training epoch

        eager_first_epoch_s: list[float] = []  # --compile: the eager trials' first epochs

        def trial(compiled: bool = args.compile) -> float:
            result = train_trial(config.replace(epochs=2, compile=compiled), data)
            first = n_train / result.history[0]["train_images_per_s"]
            (first_epoch_s if compiled == args.compile else eager_first_epoch_s).append(first)
            second = result.history[1]
            if compiled == args.compile:
                bn_share.append(second["precise_bn_s"] * second["train_images_per_s"] / n_train)
            return second["train_images_per_s"]

        def fixed_batch(model: torch.nn.Module, compiled: bool = args.compile) -> float:
            return fixed_batch_img_s(
                model,
                device=device,
                batch_size=config.batch_size,
                px=size["px"],
                steps=steps,
                lr=config.lr,
                amp=device.type == "cuda" and config.amp,
                compiled=compiled,
            )

        def bare(compiled: bool = args.compile) -> float:
            torch.manual_seed(0)
            return fixed_batch(torchvision.models.resnet50(num_classes=2), compiled)

        def dala_fixed() -> float:
            torch.manual_seed(0)
            return fixed_batch(build_dalaresnet(config))

        syncs = None
        if device.type == "cuda":  # the first trial in this process: it pays the compile
            syncs, first = _count_syncs(config, data)
            first_epoch_s.append(n_train / first.history[0]["train_images_per_s"])
        sides = {"trial": trial, "bare_resnet50": bare, "dala_fixed_batch": dala_fixed}
        if args.compile:  # eager beside compiled, same run; the fixed DALA model left out
            sides = {
                "trial": trial,
                "trial_eager": lambda: trial(compiled=False),
                "bare_resnet50": bare,
                "bare_resnet50_eager": lambda: bare(compiled=False),
            }
        runs = c.interleave(sides, size["reps"])

    t, b = c.median(runs["trial"]), c.median(runs["bare_resnet50"])
    d = c.median(runs["dala_fixed_batch"]) if "dala_fixed_batch" in runs else None
    goal = 0.8 if device.type == "cuda" else 0.9
    result = {
        "trial_img_s": round(t, 2),
        "bare_img_s": round(b, 2),
        "ratio": round(t / b, 3),
        "dala_fixed_batch_img_s": None if d is None else round(d, 2),
        "data_path_ratio": None if d is None else round(t / d, 3),
        "image_size": size["px"],
        "batch_size": config.batch_size,
        "train_images": n_train,
        "device": str(device),
        "reps": size["reps"],
        "cuda_syncs_in_train_epoch": syncs,
        "compile": args.compile,
        "first_epoch_s": [round(v, 2) for v in first_epoch_s],
        **(_compile_figures(runs, eager_first_epoch_s) if args.compile else {}),
        "precise_bn_share": round(c.median(bn_share), 3),
        "runs_img_s": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
        "goal": f"ratio >= {goal}",
        "meets_goal": t / b >= goal,
        "_load_start": load0,
    }
    c.finite_positive(result, ["trial_img_s", "bare_img_s", "ratio"])
    summary = (
        f"{n_train} training images at {size['px']} px, batch {config.batch_size}, "
        f"{device}, median of {size['reps']} interleaved epochs\n"
        f"trial (train_trial, cache + device augmentation, DALAResNet50): {t:8.2f} img/s\n"
        f"bare torchvision resnet50 on one in-memory batch:               {b:8.2f} img/s\n"
        f"ratio trial/bare: {t / b:.3f} (goal >= {goal})\n"
    )
    if d is not None:
        summary += (
            f"DALAResNet50 on one in-memory batch: {d:.2f} img/s -> the data path keeps "
            f"{t / d:.3f} of the model's own speed\n"
        )
    summary += (
        f"precise BatchNorm before validation ({config.precise_bn} images at most, forward "
        f"only): {c.median(bn_share):.3f} of a training epoch's time (not in the ratio)"
    )
    if syncs is not None:
        summary += f"\nhost-device synchronisations in one training epoch: {syncs}"
    if args.compile:
        summary += _compile_summary(result)
    block = None
    if args.compile:
        block = "trial-gpu-compile" if device.type == "cuda" else "trial-compile"
    c.finish("trial", args, result, summary, device=str(device), block=block)


if __name__ == "__main__":
    main()
