"""pyro_vae: variational autoencoders written as a Pyro model and guide, fitted by SVI."""

from pyro_vae.array_dataset import ArrayDataset
from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.components.bayesian import BayesianMLP
from pyro_vae.components.distributions import DiscretizedLogistic
from pyro_vae.components.encoders import (
    DeltaEncoder,
    DiagonalNormalEncoder,
    FullCovarianceNormalEncoder,
    IAFEncoder,
)
from pyro_vae.components.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    LaplaceLikelihood,
    NormalLikelihood,
)
from pyro_vae.components.networks import MLP, ConvNet, DeconvNet
from pyro_vae.components.priors import (
    DiagonalNormalPrior,
    FlowPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from pyro_vae.data import DATASET_NAMES, DataSplits, DataUnavailableError, binarize, load_dataset
from pyro_vae.explain import explain, explain_cvae, explain_m2
from pyro_vae.infer.estimators import (
    ActiveUnits,
    ELBOTerms,
    KLDecomposition,
    active_units,
    elbo,
    elbo_terms,
    kl_decomposition,
    kl_per_dimension,
    log_likelihood,
    weight_spread,
)
from pyro_vae.infer.fit import fit
from pyro_vae.infer.gaps import InferenceGaps, inference_gaps
from pyro_vae.infer.objective import Objective
from pyro_vae.infer.state import History, TrainingDivergedError, TrainingState
from pyro_vae.models.build import (
    DECODER_NAMES,
    ENCODER_NAMES,
    LIKELIHOOD_NAMES,
    NETWORK_NAMES,
    PRIOR_NAMES,
    build_vae,
)
from pyro_vae.models.cvae import ConditionalBaseline, ConditionalNormalPrior, ConditionalVAE
from pyro_vae.models.cvae_estimators import (
    Completions,
    completions,
    conditional_log_likelihood,
    sample_spread,
)
from pyro_vae.models.labels import (
    UNLABELLED,
    default_alpha,
    hide_labels,
    labelled_subset,
    paper_alpha,
)
from pyro_vae.models.m2 import M2, SupervisedClassifier
from pyro_vae.models.masks import check_mask, merge_by_mask, quadrant_mask, split_by_mask
from pyro_vae.models.vae import VAE, has_closed_form_kl  # the VAE registers the closed-form KLs
from pyro_vae.plots import plot_completions

__version__ = "0.2.0"

__all__ = [
    "ActiveUnits",
    "ArrayDataset",
    "BayesianMLP",
    "BernoulliLikelihood",
    "Completions",
    "ConditionalBaseline",
    "ConditionalNormalPrior",
    "ConditionalVAE",
    "ContinuousBernoulliLikelihood",
    "ConvNet",
    "DATASET_NAMES",
    "DECODER_NAMES",
    "DataSplits",
    "DataUnavailableError",
    "DeconvNet",
    "DeltaEncoder",
    "DiagonalNormalEncoder",
    "DiagonalNormalPrior",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "ELBOTerms",
    "ENCODER_NAMES",
    "FlowPrior",
    "FullCovarianceNormalEncoder",
    "History",
    "IAFEncoder",
    "InferenceGaps",
    "KLDecomposition",
    "LIKELIHOOD_NAMES",
    "LaplaceLikelihood",
    "M2",
    "MLP",
    "MixtureOfGaussiansPrior",
    "NETWORK_NAMES",
    "NormalLikelihood",
    "Objective",
    "PRIOR_NAMES",
    "StandardNormalPrior",
    "SupervisedClassifier",
    "TrainingDivergedError",
    "TrainingState",
    "UNLABELLED",
    "VAE",
    "VampPrior",
    "active_units",
    "binarize",
    "build_vae",
    "check_mask",
    "completions",
    "conditional_log_likelihood",
    "default_alpha",
    "elbo",
    "elbo_terms",
    "explain",
    "explain_cvae",
    "explain_m2",
    "fit",
    "has_closed_form_kl",
    "hide_labels",
    "inference_gaps",
    "kl_decomposition",
    "kl_per_dimension",
    "labelled_subset",
    "load_checkpoint",
    "load_dataset",
    "log_likelihood",
    "merge_by_mask",
    "paper_alpha",
    "plot_completions",
    "quadrant_mask",
    "sample_spread",
    "save_checkpoint",
    "split_by_mask",
    "weight_spread",
]
