"""The package: the build says what to run without torch and pins the torch it builds against,
the extension names the torch it was built for, and every "CONTRACT.md section N" cited in
the code and tests names a section that exists."""
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_without_torch_says_what_to_run():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install torch==" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("version,req", [("2.13.0+cpu", "torch==2.13.*"), ("2.4.1", "torch==2.4.*"),
                                         ("2.6.0a0+git1234", "torch==2.6.*"), ("2.10.0+cu128", "torch==2.10.*")])
def test_setup_pins_the_torch_it_builds_against(version, req):
    helpers = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_helpers")
    assert helpers["torch_requirement"](version) == req


def test_import_names_the_torch_the_extension_was_built_for():
    """A build is tied to one torch release: the metadata pins it and a failed load of the
    extension under another torch says which one to rebuild against."""
    from xbm_kernels import _ops
    pin = _ops.built_for_torch()
    if pin is not None:  # installed (editable or not): the pin is this torch's release
        assert _ops._torch_mismatch(pin) is None
    assert _ops._torch_mismatch("1.0.*") == ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert _ops._torch_mismatch(None) is None


def test_contract_exists_and_every_citation_names_a_section():
    path = os.path.join(ROOT, "xbm_kernels", "CONTRACT.md")
    text = open(path, encoding="utf-8").read()
    sections = set(re.findall(r"^## (\d+)\.", text, flags=re.M))
    assert {"1", "2", "5", "6"} <= sections
    assert re.search(r"^## pytorch-metric-learning drop-in", text, flags=re.M)
    for word in ("ref_valid", "self_index", "pos_eps", "multi_similarity", "triplet", "supcon", "start_iteration",
                 "enqueue_mask", "normalize", "gather_distributed", "set_value_checks"):
        assert word in text, word
    cited = []
    for base in ("xbm_kernels", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if name.endswith((".py", ".md", ".cpp", ".cu", ".h")):
                    src = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    cited += [(name, s) for s in re.findall(r"CONTRACT\.md sections? (\d+)", src)]
    assert cited, "nothing cites CONTRACT.md"
    missing = [(name, s) for name, s in cited if s not in sections]
    assert not missing, missing

