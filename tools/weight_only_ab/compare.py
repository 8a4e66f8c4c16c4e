"""Relative L2 difference between the outputs two weight_only_ab binaries wrote (TAG_CASE.bin files).

    python3 compare.py BASE_TAG NEW_TAG

Cases whose name says fp16 hold float16, the others bfloat16."""
import glob
import sys

import numpy as np


def values(path: str, fp16: bool) -> np.ndarray:
    raw = np.fromfile(path, np.uint16)
    if fp16:
        return raw.view(np.float16).astype(np.float64)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def main(base: str, new: str) -> None:
    for path in sorted(glob.glob(f"{base}_*.bin")):
        case = path[len(base) + 1:]
        a, b = values(path, "fp16" in case), values(f"{new}_{case}", "fp16" in case)
        nonfinite = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
        print(f"{case:40s} rel L2 {np.linalg.norm(a - b) / np.linalg.norm(a):.2e} nonfinite {nonfinite}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
