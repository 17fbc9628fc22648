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



@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("main_rc,triton_rc", [(1, 0), (0, 2), (5, 0), (1, 3)])
def test_run_sh_runs_both_processes_and_exits_with_the_worse_status(tmp_path, gpu, main_rc, triton_rc):
    """tests/run.sh with a stand-in python: both pytest processes run whatever the first one
    returns, the Triton one first on a GPU, with TRITON_INTERPRET=1 without one, and the script
    exits with the worse status (5, nothing selected, counts as success)."""
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit {0 if gpu else 1}; fi
m=""; prev=""
for a in "$@"; do [ "$prev" = "-m" ] && m="$a"; prev="$a"; done
echo "$m|${{TRITON_INTERPRET:-}}" >> {calls}
case "$m" in triton*) exit {triton_rc} ;; *) exit {main_rc} ;; esac
""")
    stub.chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tests", "run.sh"), "-k", "x"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(stub)), timeout=60)
    lines = calls.read_text().splitlines()
    assert sorted(lines) == sorted([f"not triton and (not slow)|", f"triton and (not slow)|{'' if gpu else '1'}"])
    if gpu:
        assert lines[0].startswith("triton")
    worse = max(0 if main_rc == 5 else main_rc, 0 if triton_rc == 5 else triton_rc)
    assert proc.returncode == worse, proc.stdout + proc.stderr
