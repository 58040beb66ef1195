"""The gaps of M2's q(z | x, y) and the CVAE's q(z | x, c) (pyro_vae/explain_gaps.py): each is
shown to the estimator as a model of the rows [x, y] or [x, c], and the ELBO it measures there
is the model's own, checked against the package's conditional estimators and a hand-written
ELBO. The reports carry the section."""

import math
import re

import pyro
import torch
from test_explain import sections
from test_explain_models import digits, trained_cvae, trained_m2  # noqa: F401 (fixtures)

import pyro_vae as pv
from pyro_vae.explain_gaps import CVAEView, M2View
from pyro_vae.infer.gaps import InferenceGaps, inference_gaps
from pyro_vae.models.cvae_estimators import conditional_elbo_terms, conditional_log_likelihood

DRAWS = 200  # one-draw ELBOs averaged for the reference


def assert_equal_within_se(difference: torch.Tensor, what: str) -> None:
    mean, se = InferenceGaps.average(difference)
    assert abs(mean) <= 4 * se, f"{what}: {mean:.3g} with SE {se:.3g}"


def test_the_cvae_view_measures_the_cvae_s_own_elbo_and_log_p_x_given_c(trained_cvae):  # noqa: F811
    cvae, x, c = trained_cvae
    pyro.set_rng_seed(0)
    gaps = inference_gaps(CVAEView(cvae), torch.cat([x, c], -1))
    with torch.no_grad():
        posterior = cvae.encoder(torch.cat([x, c], -1))
    torch.testing.assert_close(gaps.loc, posterior.mean)
    torch.testing.assert_close(gaps.scale, posterior.stddev)
    reference = torch.stack([conditional_elbo_terms(cvae, x, c).elbo for _ in range(DRAWS)])
    assert_equal_within_se(gaps.encoder_elbo - reference.mean(0), "encoder ELBO")
    # q* proposes at least as well as the encoder for log p(x | c).
    from_encoder = conditional_log_likelihood(cvae, x, c, num_particles=1000)
    mean, se = gaps.average(gaps.log_likelihood - from_encoder)
    assert mean > -4 * se
    mean, se = gaps.average(gaps.amortization_gap)
    assert mean > -4 * se
    assert bool(torch.isfinite(gaps.approximation_gap).all())


def test_the_m2_view_measures_log_p_x_given_y_at_the_site_of_the_labelled_rows(trained_m2):  # noqa: F811
    m2, x, _ = trained_m2
    y = m2.classify(x)
    view = M2View(m2)
    pyro.set_rng_seed(0)
    gaps = inference_gaps(view, view.rows(x, y))
    # The ELBO of log p(x | y), by hand: no log p(y), no classification term.
    with torch.no_grad():
        q = m2.encoder(m2._encoder_input(x, y))
        z = q.sample((DRAWS,))
        params = m2.decoder(m2._decoder_input(z.reshape(-1, z.shape[-1]), y.repeat(DRAWS)))
        log_likelihood = m2.likelihood(params).log_prob(x.repeat(DRAWS, 1)).reshape(DRAWS, -1)
        prior = m2.prior()
        by_hand = (log_likelihood + prior.log_prob(z) - q.log_prob(z)).mean(0)
    assert_equal_within_se(gaps.encoder_elbo - by_hand, "encoder ELBO")
    mean, se = gaps.average(gaps.amortization_gap)
    assert mean > -4 * se


def test_the_m2_and_cvae_reports_end_with_the_gaps(trained_m2, trained_cvae, digits, tmp_path):  # noqa: F811
    m2, x, labels = trained_m2
    report = pv.explain(m2, x, labels, digits.image_shape, digits.class_names, tmp_path / "m2")
    section = sections(report.read_text())["5"]
    assert "most probable y" in section and "log p(x | y)" in section
    assert f"q* is diagonal (as the encoder, a {type(m2.encoder).__name__})" in section
    assert re.search(r"amortization gap\*\* .* = \*\*\d+\.\d{3} ± \d+\.\d{3}\*\*", section)
    assert (tmp_path / "m2" / "inference_gaps.png").read_bytes()[:4] == b"\x89PNG"
    cvae, x, c = trained_cvae
    report = pv.explain(cvae, x, torch.zeros(0), (8, 8), (), tmp_path / "cvae", 50, condition=c)
    section = sections(report.read_text())["4"]
    assert "q(z | x, c)" in section and "log p(x | c)" in section
    assert f"(as the encoder, a {type(cvae.encoder).__name__})" in section
    numbers = re.findall(r"\*\*(-?\d+\.\d{3}) ± (\d+\.\d{3})\*\*", section)
    assert len(numbers) == 2 and all(math.isfinite(float(v)) for pair in numbers for v in pair)
