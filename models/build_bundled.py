"""Write the torch-free demo assets shipped in ``graphopt/data``.

``python -m models.build_bundled`` produces:

* ``digits_cnn.onnx``  - the zoo ``cnn`` (BatchNormalization kept, dynamic batch)
* ``digits_test.npz``  - ``input`` float32 [540, 1, 8, 8], ``labels`` int64 [540]
* ``digits_calib.npz`` - ``input`` float32 [128, 1, 8, 8], first 128 train images
"""

from __future__ import annotations

import argparse
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from models import datasets
from models.fileio import atomic_write_bytes
from models.zoo import REPO_ROOT, export, info

logger = logging.getLogger(__name__)

BUNDLED_DIR = REPO_ROOT / "graphopt" / "data"
N_CALIB = 128
# Fixed zip timestamps keep rebuilt .npz files byte-identical (no git churn).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Deterministic compressed .npz (np.savez stamps entries with the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def build(out_dir: Path = BUNDLED_DIR, *, force: bool = False) -> dict[str, Path]:
    """Export the CNN (cached in the zoo) and write the three assets to ``out_dir``."""
    split = datasets.digits_split()
    cnn_path = export("cnn", force=force)
    paths = {
        "model": out_dir / "digits_cnn.onnx",
        "test": out_dir / "digits_test.npz",
        "calib": out_dir / "digits_calib.npz",
    }
    atomic_write_bytes(paths["model"], cnn_path.read_bytes())
    test = {"input": datasets.digits_as_images(split.x_test), "labels": split.y_test.astype(np.int64)}
    atomic_write_bytes(paths["test"], npz_bytes(test))
    calib = {"input": datasets.digits_as_images(split.x_train[:N_CALIB])}
    atomic_write_bytes(paths["calib"], npz_bytes(calib))
    logger.info("bundled assets written to %s (cnn test accuracy %.4f)", out_dir, info("cnn")["test_accuracy"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.build_bundled", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--force", action="store_true", help="retrain/re-export the CNN")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for kind, path in build(args.out_dir, force=args.force).items():
        print(f"{kind:6s} {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
