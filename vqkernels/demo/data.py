"""The demo's two data sets, both shipped with scikit-learn, as ``[N, C, H, W]`` float tensors in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DATASETS = ("digits", "patches")
PATCH, TEST_COLS = 16, 128  # patch side; the right TEST_COLS columns of each photo are the test region


@dataclass
class Dataset:
    """``train [N, C, H, W]`` and ``test [M, C, H, W]`` in [0, 1]. ``show`` indexes the test images drawn in the
    figure, laid out as ``show_grid = (rows, cols, gap)``."""

    name: str
    train: Tensor
    test: Tensor
    downsample: int  # stride-2 convolutions of the autoencoder: both data sets get a 4x4 latent grid
    show: Tensor
    show_grid: tuple[int, int, int]
    description: str


def load_digits_data(split_seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits / 16, ``[1797, 1, 8, 8]``; a random fifth (fixed by ``split_seed``) is the test set."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test = x.shape[0] // 5
    return Dataset(
        "digits",
        x[perm[n_test:]],
        x[perm[:n_test]],
        1,
        torch.arange(12),
        (1, 12, 1),
        f"sklearn digits 8x8 / 16: {x.shape[0] - n_test} train / {n_test} test (random split, seed {split_seed})",
    )


def load_patch_data() -> Dataset:
    """16x16 RGB patches / 255 of sklearn's two sample photos (427x640): train ``[6552, 3, 16, 16]`` with stride 8
    from the left 512 columns, test ``[416, 3, 16, 16]`` tiling the right 128 columns (row-major, photo by photo),
    so no test pixel is seen in training."""
    from sklearn.datasets import load_sample_images

    train, test = [], []
    for img in load_sample_images().images:
        t = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255.0  # [3, 427, 640]
        left, right = t[:, :, :-TEST_COLS], t[:, :, -TEST_COLS:]
        # unfold twice: [3, rows, cols, P, P] -> [rows * cols, 3, P, P]
        train.append(
            left.unfold(1, PATCH, PATCH // 2)
            .unfold(2, PATCH, PATCH // 2)
            .permute(1, 2, 0, 3, 4)
            .reshape(-1, 3, PATCH, PATCH)
        )
        test.append(
            right.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH, PATCH)
        )
    cols = TEST_COLS // PATCH
    show = torch.arange(12 * cols, 16 * cols)  # four tile rows across the test strip of the first photo
    train_x, test_x = torch.cat(train), torch.cat(test)
    return Dataset(
        "patches",
        train_x,
        test_x,
        2,
        show,
        (4, cols, 0),
        f"sklearn sample images, {PATCH}x{PATCH} RGB patches / 255: {train_x.shape[0]} train (stride "
        f"{PATCH // 2}, left {640 - TEST_COLS} columns) / {test_x.shape[0]} test (right {TEST_COLS} "
        f"columns)",
    )


def load_dataset(name: str, split_seed: int = 0) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")
    return load_digits_data(split_seed) if name == "digits" else load_patch_data()
