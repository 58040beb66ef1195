"""pyro_vae: variational autoencoders written as a Pyro model and guide, fitted by SVI."""

from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.data import DATASETS, DataSplits, DataUnavailableError, binarize, load_dataset
from pyro_vae.encoders import DiagonalNormalEncoder
from pyro_vae.evaluate import ElboTerms, elbo, elbo_terms, log_likelihood
from pyro_vae.likelihoods import BernoulliLikelihood, NormalLikelihood
from pyro_vae.model import VAE
from pyro_vae.networks import MLP
from pyro_vae.priors import StandardNormalPrior
from pyro_vae.train import History, TrainingDivergedError, fit

__version__ = "0.1.0"

__all__ = [
    "BernoulliLikelihood",
    "DATASETS",
    "DataSplits",
    "DataUnavailableError",
    "DiagonalNormalEncoder",
    "ElboTerms",
    "History",
    "MLP",
    "NormalLikelihood",
    "StandardNormalPrior",
    "TrainingDivergedError",
    "VAE",
    "binarize",
    "elbo",
    "elbo_terms",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "log_likelihood",
    "save_checkpoint",
]
