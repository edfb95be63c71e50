"""``python -m vqkernels.demo``: a small convolutional VQ autoencoder on real data, plain VQ against the fixes.

Two data sets that ship with scikit-learn (nothing is downloaded):

- ``digits``: the 1797 8x8 handwritten digits (values / 16), a fixed random 20% held out for test;
- ``patches``: 16x16 RGB patches of scikit-learn's two sample photos (427x640); training patches (stride 8) come
  from the left 512 columns of each photo, test patches (a 16x16 tiling) from the right 128 columns.

Every method trains the same autoencoder (same seed, initial weights, batches, optimizer and step budget; a 4x4
grid of latent vectors per image) and differs only in its quantiser:

- ``plain``: ``VectorQuant`` with the straight-through estimator and nothing else;
- ``vqtorch``: ``VectorQuant`` with the three fixes of Huh et al. (ICML 2023): affine re-parameterisation,
  synchronised update and alternating optimisation, with the values of the vqtorch repository;
- ``cvq-closest``, ``cvq-random``, ``cvq-probrandom``: CVQ-VAE's ``VectorQuantiser`` (Zheng & Vedaldi, ICCV 2023)
  with each anchor kind and CVQ-VAE's defaults.

Reported per (data set, method): codebook usage over the test set (fraction of the K codes used at least once),
test perplexity, test reconstruction MSE and training time; the JSON also holds the training curves.

Examples::

    python -m vqkernels.demo --json build/demo/demo.json --plot build/demo/demo.png   # a few minutes on 2 cores
    python -m vqkernels.demo --datasets digits --methods plain,cvq-closest --steps 300
    python -m vqkernels.demo --quick                                                 # seconds (tests)
"""

from .cli import main, parse_args
from .data import DATASETS, Dataset, load_dataset
from .train import METHODS, Config, RunResult, VQAutoEncoder, evaluate, make_quantiser, run, train_one

__all__ = [
    "DATASETS",
    "METHODS",
    "Config",
    "Dataset",
    "RunResult",
    "VQAutoEncoder",
    "evaluate",
    "load_dataset",
    "main",
    "make_quantiser",
    "parse_args",
    "run",
    "train_one",
]
