"""Where the unlabelled rows pull q(y|x) on image data (issue 22; docs/design.md, "Where M2
still loses"): per epoch of M2 at its defaults, the classes the generative model itself
prefers, against the labels and against q(y|x).

The unlabelled rows' bound is Σ_y q(y|x) ELBO(x, y) + H(q(y|x)): it rewards q(y|x) for putting
its mass on the classes under which the generative model explains x best. So q(y|x) is
pulled toward the *generative classifier* argmax_y ELBO(x, y). Where that classifier agrees
with the labels, the pull helps; where it does not, the pull works against the labelled term.
Per epoch, on the validation rows:

- ``q``: the accuracy of q(y|x);
- ``generative``: the accuracy of argmax_y [log p(x | z = μ(x, y), y) − KL(q(z|x,y) ‖ p(z))],
  an ELBO(x, y) with the mean of z in place of draws (p(y) is uniform, so it drops out);
- ``agree``: how often the two pick the same class;
- ``decoder_use_of_y``: as in m2_diagnosis.py, at z = μ(x, y) of the true y, log p(x | z, y)
  minus the best over the other classes (near 0: the decoder ignores y);
- ``entropy``: the mean entropy of q(y|x), in nats (log 10 = 2.30 is uniform).

``--labelled-weight λ`` multiplies the labelled rows' whole bound by λ (their subsample scale
N_l/B_l becomes λ·N_l/B_l, with α divided by λ so that the classifier's term keeps its
default weight): an experiment, not the paper's objective, asking whether the generative
model's classes follow the labels when the labelled rows weigh more in it. The test accuracy
at the best validation epoch is reported too, for comparison with m2_accuracy.py's rows.

The data and M2 are those of m2_accuracy.py (its ``run_one`` setup: validation rows held out
as scripts/train.py does, ``labelled_subset`` with the seed, the first ``--num-unlabelled``
others; M2 at ``scripts/train.py --model m2``'s defaults).

    OMP_NUM_THREADS=1 python benchmarks/m2_pull.py --dataset mnist \\
        --data-dir ../shared/datasets/mnist --num-labelled 100 --num-unlabelled 10000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch
from m2_accuracy import DEFAULT_BATCH, DEFAULT_HIDDEN, DEFAULT_LATENT, DEFAULT_LR
from m2_diagnosis import decoder_use_of_y
from torch import Tensor

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs.runs import default_val_size, evaluation_sets
from pyro_vae.models.labels import default_alpha, hide_labels, labelled_subset
from pyro_vae.models.m2 import M2


class LabelledWeighted(M2):
    """M2 whose labelled rows' bound is multiplied by ``labelled_weight`` (module docstring)."""

    labelled_weight: float = 1.0  # set on the instance (below)

    def _scales(self, labelled: Tensor, num_data: int | None) -> tuple[float, float]:
        scale_labelled, scale_unlabelled = super()._scales(labelled, num_data)
        return scale_labelled * self.labelled_weight, scale_unlabelled


@torch.no_grad()
def generative_scores(m2: M2, x: Tensor) -> Tensor:
    """ELBO(x, y) for every class with z at q's mean, ``(B, num_labels)``."""
    columns = []
    for k in range(m2.num_labels):
        y = torch.full((len(x),), k, dtype=torch.long)
        posterior = m2.encoder(m2._encoder_input(x, y))
        mu = posterior.mean
        log_lik = m2.likelihood(m2.decoder(m2._decoder_input(mu, y))).log_prob(x)
        prior = torch.distributions.Normal(torch.zeros_like(mu), 1.0)
        base = torch.distributions.Normal(mu, posterior.stddev)
        kl = torch.distributions.kl_divergence(base, prior).sum(-1)
        columns.append(log_lik - kl)
    return torch.stack(columns, -1)


@torch.no_grad()
def measure(m2: M2, x: Tensor, labels: Tensor) -> dict[str, float]:
    q_class = torch.cat([m2.classify(part) for part in x.split(1000)])
    gen_class = torch.cat([generative_scores(m2, part).argmax(-1) for part in x.split(1000)])
    entropy = torch.cat([m2.label_posterior(part).entropy() for part in x.split(1000)])
    return {
        "q": float((q_class == labels).float().mean()),
        "generative": float((gen_class == labels).float().mean()),
        "agree": float((gen_class == q_class).float().mean()),
        "decoder_use_of_y": decoder_use_of_y(m2, x[:2000], labels[:2000]),
        "entropy": float(entropy.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-labelled", type=int, default=100)
    parser.add_argument("--num-unlabelled", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None, help="default: M2.from_data's")
    parser.add_argument("--latent-dim", type=int, default=DEFAULT_LATENT)
    parser.add_argument("--labelled-weight", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = pv.load_dataset(args.dataset, data_dir=args.data_dir)
    val_size = default_val_size(args.dataset, len(data.y_train))
    data = data.hold_out(validation_indices(len(data.y_train), val_size, 0))
    pyro.set_rng_seed(args.seed)
    labelled = labelled_subset(data.y_train, args.num_labelled, seed=args.seed)
    others = torch.ones(len(data.y_train), dtype=torch.bool)
    others[labelled] = False
    unlabelled = others.nonzero().squeeze(1)[: args.num_unlabelled]
    rows = torch.cat([labelled, unlabelled])
    x = data.x_train[rows]
    y = hide_labels(data.y_train[rows], torch.arange(args.num_labelled))
    alpha = default_alpha(len(x), args.num_labelled) if args.alpha is None else args.alpha
    m2 = LabelledWeighted.from_data(
        x,
        y,
        args.latent_dim,
        alpha=alpha / args.labelled_weight,
        hidden_dims=DEFAULT_HIDDEN,
        num_labels=len(data.class_names),
    )
    m2.labelled_weight = args.labelled_weight
    x_test, _, x_val = evaluation_sets(m2, data, args.seed)
    assert x_val is not None and data.y_val is not None
    y_val = data.y_val
    curve = []

    def record(epoch: int, history: pv.History) -> None:
        row = {"epoch": epoch, **measure(m2, x_val, y_val)}
        # Scored every epoch but read only at the epoch kept by validation (below).
        row["test_q"] = m2.accuracy(x_test, data.y_test)
        curve.append(row)
        print(
            f"epoch {epoch:3d}: q {row['q']:.4f}  generative {row['generative']:.4f}  "
            f"agree {row['agree']:.4f}  decoder use of y {row['decoder_use_of_y']:+.2f}  "
            f"entropy {row['entropy']:.3f}",
            flush=True,
        )

    pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=args.epochs,
        batch_size=DEFAULT_BATCH,
        learning_rate=DEFAULT_LR,
        callback=record,
        generator=torch.Generator().manual_seed(args.seed),
        progress=False,
    )
    out = args.out or (
        Path(__file__).parent
        / "results"
        / f"m2-pull-{args.dataset}-l{args.num_labelled}-u{args.num_unlabelled}"
        f"{'' if args.labelled_weight == 1 else f'-lw{args.labelled_weight:g}'}.json"
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["alpha"] = m2.alpha
    kept = max(curve, key=lambda row: (row["q"], -row["epoch"]))
    out.write_text(json.dumps({"settings": settings, "curve": curve, "kept": kept}, indent=1))
    print(
        f"epoch kept by validation: {kept['epoch']}, q {kept['q']:.4f}, test {kept['test_q']:.4f}"
    )
    print(f"results in {out}")


if __name__ == "__main__":
    main()
