"""Running the scripts in this process, as the CLI tests do: faster than a subprocess each, and
the scripts' own ``run(argv)`` is what a shell calls too."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/ is not a package: load a script as a module of its own name."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(script: ModuleType, *argv: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of ``script.run(argv)`` (argparse's refusals exit)."""
    try:
        code = script.run(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
