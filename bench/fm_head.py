"""Benchmark: head trials on cached foundation-model embeddings vs DALAResNet50 trials.

On the same images (one magnification of a synthetic BreakHis set, patient split) and the
same epochs: trials per minute of ``train_head.train_head_trial`` (a head searched on a
frozen timm backbone's embeddings, ``backbone: timm:<name>``) against ``train.train_trial``
(DALAResNet50, random init), and the one-off cost of the embeddings (the backbone over
every image once, into a fresh cache folder). Backbones are randomly initialised (their
compute is that of the published weights; nothing downloads).

    python bench/fm_head.py [--quick|--tiny] [--device cpu|cuda] [--backbone timm:NAME] [--record]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SIZES = {  # images per magnification (x 24 patients), cached px, epochs, trials of each kind
    "tiny": dict(per_mag=2, px=32, epochs=1, head_trials=2, dala_trials=1),
    "quick": dict(per_mag=3, px=64, epochs=3, head_trials=10, dala_trials=2),
    "full": dict(per_mag=4, px=128, epochs=5, head_trials=30, dala_trials=3),
}
GPU_SIZE = dict(per_mag=60, px=224, epochs=10, head_trials=100, dala_trials=3)
BACKBONES = {  # (backbone, embed_size): tiny embeds at 32 px; others at the model's own size
    "tiny": ("timm:test_resnet.r160_in1k", 32),
    "quick": ("timm:vit_small_patch16_224", 0),
    "full": ("timm:vit_small_patch16_224", 0),
    "gpu": ("timm:vit_large_patch16_224", 0),  # ~UNI's size (ViT-L/16)
}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--backbone", default=None, help="timm:<name> (default by size)")
    args = p.parse_args()
    load0 = c.load_start()

    import torch

    from dala_search.config import TrialConfig
    from dala_search.data.embeddings import embedding_views
    from dala_search.model.foundation import load_backbone
    from dala_search.train import prepare_data, resolve_device, train_trial
    from dala_search.train_head import train_head_trial

    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    size = GPU_SIZE if gpu else SIZES[c.size_of(args)]
    backbone, embed_size = BACKBONES["gpu" if gpu else c.size_of(args)]
    if args.backbone:
        backbone, embed_size = args.backbone, 0
    root = c.demo_data(c.work_dir(args), images_per_mag=size["per_mag"], width=256, height=168)
    base = {
        "pretrained": "none",
        "image_size": size["px"],
        "epochs": size["epochs"],
        "batch_size": 32,
        "device": args.device,
        "precise_bn": 0,
    }
    head_cfg = TrialConfig.from_dict({**base, "backbone": backbone, "embed_size": embed_size})
    dala_cfg = TrialConfig.from_dict(base)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: the embeddings are computed
        data = prepare_data(root, "40X", image_size=size["px"], cache_dir=tmp)
        n = len(data.cache)
        c.log(f"{n} images at {size['px']} px; embedding them with {backbone} on {args.device}")
        device = resolve_device(args.device)
        frozen = load_backbone(head_cfg)
        start = time.perf_counter()
        embedding_views(data.cache, frozen, head_cfg, device, progress=False)
        embed_s = time.perf_counter() - start
        head_s = _timed(size["head_trials"], lambda i: train_head_trial(_lr(head_cfg, i), data))
        dala_s = _timed(size["dala_trials"], lambda i: train_trial(_lr(dala_cfg, i), data))
    head_pm, dala_pm = 60 / head_s, 60 / dala_s
    result = {
        "backbone": backbone,
        "embedding_dim": frozen.num_features,
        "embedding_input_px": frozen.input_size,
        "images": n,
        "image_size": size["px"],
        "epochs": size["epochs"],
        "device": args.device,
        "embed_s": round(embed_s, 3),
        "embed_img_s": round(n / embed_s, 2),
        "head_trials_per_min": round(head_pm, 2),
        "dala_trials_per_min": round(dala_pm, 3),
        "ratio": round(head_pm / dala_pm, 2),
        "head_trials": size["head_trials"],
        "dala_trials": size["dala_trials"],
        "goal": "head trials per minute >= 10x DALAResNet50's at the same images and epochs",
        "meets_goal": head_pm >= 10 * dala_pm,
        "_load_start": load0,
    }
    c.finite_positive(result, ["embed_s", "head_trials_per_min", "dala_trials_per_min", "ratio"])
    summary = (
        f"{n} images at {size['px']} px (40X), {size['epochs']} epoch(s) per trial, "
        f"{args.device}, backbones randomly initialised\n"
        f"one-off embeddings ({backbone}, {frozen.input_size} px, {frozen.num_features}-d): "
        f"{embed_s:.2f} s ({n / embed_s:.1f} img/s)\n"
        f"head trials on the cached embeddings: {head_pm:10.2f} per minute "
        f"(mean of {size['head_trials']})\n"
        f"DALAResNet50 trials:                  {dala_pm:10.3f} per minute "
        f"(mean of {size['dala_trials']})\n"
        f"ratio: {head_pm / dala_pm:.1f}x; break-even after "
        f"{embed_s / max(1e-9, 60 / dala_pm - 60 / head_pm):.2f} DALAResNet50 trial(s)"
    )
    c.finish("fm_head", args, result, summary, device=args.device)


def _lr(config, i: int):  # noqa: ANN001, ANN202
    """Trial ``i``: another lr (as a search's trials differ), the same cost."""
    return config.replace(lr=config.lr * (1.5 ** (i % 5)), seed=i)


def _timed(n: int, run) -> float:  # noqa: ANN001
    """Mean seconds of ``run(i)`` over ``n`` trials."""
    start = time.perf_counter()
    for i in range(n):
        run(i)
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
