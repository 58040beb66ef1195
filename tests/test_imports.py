"""``import pyro_vae`` changes nothing outside itself: it loads no plotting or dataset library,
and drawing a figure neither chooses nor changes the user's matplotlib backend.

Each check runs in a fresh interpreter: what a module import does happens once per process,
and matplotlib's backend is process-wide state that other tests' figures could have set."""

import json
import os
import subprocess
import sys

# Loaded only where they are used: the figures, the digits dataset, MNIST's download.
HEAVY = ("matplotlib", "sklearn", "torchvision")

# Draws a figure the way explain and the scripts do; prints what matplotlib then says, as JSON.
DRAW = """
pv.plots.plot_loss_curves(
    [dict(epoch=e, train_loss=1.0, train_elbo=-1.0, val_elbo=-1.0, val_reconstruction=-1.0,
          val_kl=0.1) for e in (1, 2)],
    PATH,
)
print(json.dumps({
    "written": open(PATH, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n",
    "pyplot_loaded": "matplotlib.pyplot" in sys.modules,
    "backend": matplotlib.get_backend() if CHOSEN else None,
}))
"""


def run(code: str) -> list[dict]:
    """Run ``code`` on a machine without a display or a backend choice; its JSON lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("MPLBACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_import_loads_no_plotting_or_dataset_library_and_drawing_chooses_no_backend(tmp_path):
    code = f"""
import json, sys
import pyro_vae as pv
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
assert callable(pv.explain)
import matplotlib
PATH, CHOSEN = {str(tmp_path / "loss.png")!r}, False
{DRAW}"""
    heavy, drawn = run(code)
    assert heavy == []
    assert drawn["written"]
    # Resolving matplotlib's automatic backend imports pyplot: no pyplot, no choice made.
    assert not drawn["pyplot_loaded"]


def test_a_backend_the_user_chose_is_kept_and_figures_are_still_written(tmp_path):
    code = f"""
import json, sys
import matplotlib
matplotlib.use("svg")
import pyro_vae as pv
PATH, CHOSEN = {str(tmp_path / "loss.png")!r}, True
{DRAW}
# An interactive backend on a machine without a display: still the user's choice, and the
# figure still written (its canvas comes from the file's format, not from the backend).
matplotlib.use("tkagg")
PATH = {str(tmp_path / "again.png")!r}
{DRAW}"""
    svg, tkagg = run(code)
    assert svg["backend"].lower() == "svg" and svg["written"]
    assert tkagg["backend"].lower() == "tkagg" and tkagg["written"]
