"""The package as pip installs it from a wheel (`pip install .`, not the editable install the
README uses): every module and subpackage of the source tree is in it, and py.typed."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_holds_every_module_of_the_package(tmp_path):
    # Built from a copy of what the build reads, so that nothing is written into the checkout;
    # no build isolation and no dependencies: offline, with the setuptools installed here.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "pyro_vae", source / "pyro_vae",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("pyro_vae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "pyro_vae").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(sources) > 40  # the subpackages' modules are there to be looked for
    assert sorted(sources - names) == []
    assert "pyro_vae/py.typed" in names
