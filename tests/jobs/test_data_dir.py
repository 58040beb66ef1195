"""A --data-dir that holds the IDX files twice (in <Class>/raw/, where torchvision puts them,
and in itself; or a file both plain and gzipped) says which were read, in one line
(issue 23)."""

import subprocess
import sys
import warnings

import pytest
from test_data import write_idx

import pyro_vae as pv
from pyro_vae.jobs import cli


def test_a_data_dir_with_the_files_twice_says_which_were_read(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, 12, 5, gzipped=False)
    write_idx(tmp_path, 7, 5, gzipped=True)
    with pytest.warns(UserWarning) as said:
        data = pv.load_dataset("mnist", data_dir=tmp_path)
    assert len(data.x_train) == 12  # raw/ first, as before
    assert len(said) == 1
    message = str(said[0].message)
    assert f"read the IDX files in {raw}" in message and f"not read: {tmp_path}" in message
    assert "\n" not in message


def test_a_file_both_plain_and_gzipped_says_the_plain_one_was_read(tmp_path):
    write_idx(tmp_path, 12, 5, gzipped=False)
    write_idx(tmp_path, 7, 5, gzipped=True)
    with pytest.warns(UserWarning, match=r"\(the plain files, not their \.gz\); not read: "):
        assert len(pv.load_dataset("mnist", data_dir=tmp_path).x_train) == 12


def test_a_data_dir_with_the_files_once_says_nothing(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", 12, 5, gzipped=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pv.load_dataset("mnist", data_dir=tmp_path)


def test_the_scripts_show_a_warning_in_one_line():
    code = (
        "import warnings; from pyro_vae.jobs import cli; cli.one_line_warnings('train.py'); "
        "warnings.warn('mnist: read the IDX files in D')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stderr == "train.py: warning: mnist: read the IDX files in D\n"
    assert callable(cli.one_line_warnings)
