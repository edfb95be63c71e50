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
- ``ema``: ``VectorQuant`` whose codebook is the EMA of its clusters (VQ-VAE, van den Oord et al. 2017, app. A.1,
  decay 0.99), straight-through otherwise;
- ``rotation``: ``VectorQuant`` with the rotation-trick estimator (Fifty et al. 2024) instead of straight-through;
- ``vq-pytorch``: ``VectorQuantize`` with vector-quantize-pytorch's defaults (EMA with decay 0.8, rotation trick,
  commitment weight 1);
- ``cvq-closest``, ``cvq-random``, ``cvq-probrandom``: CVQ-VAE's ``VectorQuantiser`` (Zheng & Vedaldi, ICCV 2023)
  with each anchor kind and CVQ-VAE's defaults.

Every run is repeated for ``--seeds`` seeds (default 3; the seed moves the initial weights and the batch order).
Reported per (data set, method), as mean ± standard deviation over the seeds: codebook usage over the test set
(fraction of the K codes used at least once), test perplexity, test reconstruction MSE and training time; the JSON
holds every run (with its training curves) and the summary.

Examples::

    python -m vqkernels.demo --json build/demo/demo.json --plot build/demo/demo.png   # < 10 minutes on 2 cores
    python -m vqkernels.demo --datasets digits --methods plain,ema --steps 300 --seeds 5
    python -m vqkernels.demo --quick --seeds 1                                       # seconds (tests)
"""

from .cli import main, parse_args
from .data import DATASETS, Dataset, load_dataset
from .train import METHODS, Config, RunResult, VQAutoEncoder, evaluate, make_quantiser, run, summarise, train_one

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
    "summarise",
    "train_one",
]
