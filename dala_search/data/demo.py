"""The built-in demo data set: synthetic, generated once, reused by every command.

Used when a command gets no ``--data``, so the README's first command works on a fresh,
offline machine. It is always labelled synthetic (marker file, output, MLflow tags).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Sized for a 2-core CPU: 24 patients x 4 magnifications x 8 images at the real 700x460.
DEMO_IMAGES_PER_MAG = 8


def default_demo_dir() -> Path:
    """$DALA_DEMO_DIR, else ``demo-breakhis`` inside the cache folder."""
    from dala_search.data.cache import default_cache_dir

    env = os.environ.get("DALA_DEMO_DIR")
    return Path(env) if env else default_cache_dir() / "demo-breakhis"


def ensure_demo_data(path: Path | None = None) -> Path:
    """Return the demo folder, generating it first (once, with a notice on stderr)."""
    from dala_search.data.synthetic import generate_demo

    root = (path or default_demo_dir()).expanduser()
    if (root / "DALA_SYNTHETIC.json").is_file():
        return root
    print(
        f"No --data given: generating the SYNTHETIC demo data set in {root} (once; "
        "procedural H&E-like tiles, not patient data).",
        file=sys.stderr,
    )
    return generate_demo(root, images_per_mag=DEMO_IMAGES_PER_MAG, progress=True)
