"""A new user's first hour (issue 23): the install waits for a busy apt lock and stops with
the real cause; every command of the README, of train_xbm.py's docstring and of its --help
runs as written (with few steps); `python -m xbm_kernels.check` passes here and fails on a
wrong kernel.

Commands are collected from the documents themselves, so a new one is run (or must be
listed in NOT_RUN with the reason). They run in a scratch directory whose python/ holds
links to the app's files, so their outputs (checkpoints, step logs, study results) never
touch the repository. The glyph commands need the CJK fonts and take a minute each on a
2-core CPU: they are marked slow (`bash tests/run.sh -m slow`)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "python")
sys.path.insert(0, APP)

FEW_STEPS = "2"


# --------------------------------------------------------------------------- the commands


def _join_continuations(text):
    return re.sub(r"\\\n\s*", " ", text)


def readme_commands():
    """Shell commands of the README: every line of its ```bash blocks, and inline code that
    starts with `python ` or `bash ` (joined across line breaks); comments dropped."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in _join_continuations(block).splitlines():
            line = line.split(" #")[0].strip()
            if line:
                out += [c.strip() for c in line.split("&&")]
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split())
        if span.startswith(("python ", "bash ")):
            out.append(span)
    return list(dict.fromkeys(out))


def app_commands():
    """The commands of train_xbm.py's docstring, which is also its --help epilog."""
    import train_xbm
    text = _join_continuations(train_xbm.__doc__)
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip().startswith(("python ", "torchrun "))]


# Commands that are not run here, and why.
NOT_RUN = {
    "bash tests/run.sh": "the test suite itself (what CI runs)",
    "bash tests/run.sh -m slow": "the test suite itself (what CI runs)",
    "pip install torch==2.13.0 numpy ninja pybind11": "installs torch; install.sh's first step (test_install_again)",
    "pip install --no-build-isolation -e .": "a full rebuild; install.sh runs it when the sources change",
    "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"8.0;9.0a\" MAX_JOBS=8 pip install --no-build-isolation -e .":
        "needs nvcc (tests/test_cuda_compile.py compiles the CUDA sources when it is there)",
    "python bench/bench.py --device cpu": "the full CPU sweep (an hour); tests/test_bench_smoke.py runs its --smoke",
    "python bench/bench_pml.py": "a minute of timing; tests/test_bench_smoke.py runs its --smoke",
    "python bench/bench_cpu_losses.py --rounds 7": "minutes of timing; tests/test_bench_smoke.py runs its --smoke",
    "python bench/gemm16.py --rounds 5": "minutes of timing; tests/test_bench_smoke.py runs its --smoke",
    "python bench/bench.py --loss-ratios": "minutes of timing; tests/test_bench_smoke.py runs its --smoke",
    "python bench/ab_builds.py --other DIR": "needs a second checkout built in place; tests/test_bench_smoke.py runs "
                                             "it against this checkout on a small shape",
}


def shortened(cmd, scratch):
    """argv of `cmd` with few steps and its outputs in `scratch`."""
    argv = shlex.split(cmd)
    if any(a.endswith("train_xbm.py") for a in argv) and "--help" not in argv:
        if "--steps" in argv:
            argv[argv.index("--steps") + 1] = FEW_STEPS
        else:
            argv += ["--steps", FEW_STEPS]
        argv += ["--cache-dir", os.path.join(APP, "cache"), "--no-progress"]  # the rendered glyphs are shared
        if "--drift-every" in argv:
            argv[argv.index("--drift-every") + 1] = "1"
    if any(a.endswith("study.py") for a in argv):
        # --smoke: digits, a few steps; one seed from scratch is enough to run every code path
        argv += ["--smoke", "--jobs", "1", "--seeds", "0", "--inits", "scratch", "--out-dir",
                 os.path.join(scratch, "study"), "--checkpoint", os.path.join(scratch, "study", "pre.pt")]
    if argv[:2] == ["python", "-m"]:
        argv[0] = sys.executable
    elif argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    return argv


def needs_glyphs(cmd):
    return "train_xbm.py" in cmd and "--dataset" not in cmd and "--help" not in cmd


def _scratch(tmp_path):
    """A directory laid out like the repository for the commands: python/ with links to the
    app's files (so that relative outputs land here), the committed backbone, tests/, bench/."""
    py = tmp_path / "python"
    (py / "results").mkdir(parents=True)
    for name in os.listdir(APP):
        src = os.path.join(APP, name)
        if os.path.isfile(src):
            os.symlink(src, py / name)
    os.symlink(os.path.join(APP, "results", "pretrained-backbone.pt"), py / "results" / "pretrained-backbone.pt")
    for d in ("bench", "tests", "xbm_kernels"):
        os.symlink(os.path.join(ROOT, d), tmp_path / d)
    return tmp_path


def _run(argv, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return out, time.perf_counter() - t0


def _fonts_installed():
    import xbm_data
    return len(xbm_data.find_faces()) >= 12


def _command_params():
    params = []
    cmds = [("README", c) for c in readme_commands()] + [("train_xbm.py", c) for c in app_commands()]
    for where, cmd in dict.fromkeys(cmds):
        if cmd in NOT_RUN or cmd == "bash python/install.sh":
            continue
        marks = [pytest.mark.slow] if needs_glyphs(cmd) else []
        params.append(pytest.param(cmd, id=f"{where}: {cmd[:70]}", marks=marks))
    return params


def test_every_command_is_run_or_excused():
    found = readme_commands() + app_commands()
    assert any("train_xbm.py" in c for c in found) and any("xbm_kernels.check" in c for c in found), found
    ran = {p.values[0] for p in _command_params()}
    unhandled = [c for c in found if c not in NOT_RUN and c != "bash python/install.sh" and c not in ran]
    assert not unhandled, unhandled


@pytest.mark.parametrize("cmd", _command_params())
def test_documented_command_runs(cmd, tmp_path):
    if needs_glyphs(cmd) and not _fonts_installed():
        pytest.skip("the CJK fonts are not installed (python/install_data.sh)")
    scratch = _scratch(tmp_path)
    steps = [cmd]
    if "--init python/checkpoints/pretrained.pt" in cmd:  # the docstring's second step: run the first before it
        steps = [c for c in app_commands() if "--checkpoint python/checkpoints/pretrained.pt" in c] + [cmd]
    for c in steps:
        out, secs = _run(shortened(c, str(scratch)), scratch)
        assert out.returncode == 0, f"{c}\n(exit {out.returncode} after {secs:.0f} s)\n{out.stdout[-3000:]}\n" \
                                    f"{out.stderr[-3000:]}"
    if "--compare-batch-only" in cmd:
        assert "Recall@1 on the held-out classes: batch-only" in out.stdout, out.stdout
    if "xbm_kernels.check" in cmd:
        assert "All checks passed." in out.stdout, out.stdout


def test_help_epilog_is_the_docstring_examples():
    out, _ = _run([sys.executable, os.path.join(APP, "train_xbm.py"), "--help"], ROOT)
    text = " ".join(out.stdout.split())
    for cmd in app_commands():
        assert " ".join(cmd.split()) in text.replace("\\ ", ""), cmd
    assert "default: multi_similarity" in text


# --------------------------------------------------------------------------- the install


def _fake_apt(tmp_path, installed=()):
    """PATH entries standing in for apt-get, apt-cache, dpkg-query and id (root). apt-get
    holds its locks as flock(1) locks on files in tmp_path: `install` waits for the dpkg
    lock up to -oDPkg::Lock::Timeout=N seconds (0 without the option: apt's own default
    fails at once), `update` fails at once when the lists lock is held, as apt does."""
    state = tmp_path / "installed"
    state.write_text("".join(f"{p}\n" for p in installed))
    dpkg_lock, lists_lock = tmp_path / "dpkg.lock", tmp_path / "lists.lock"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "id": 'echo 0',
        "apt-cache": 'exit 0',
        "dpkg-query": f'p="${{@: -1}}"; if grep -qx "$p" {state}; then echo "install ok installed"; else exit 1; fi',
        "apt-get": textwrap.dedent(f"""\
            cmd=$1; shift; wait=0; pkgs=()
            for a in "$@"; do case "$a" in -oDPkg::Lock::Timeout=*) wait=${{a#*=}};; -*) ;; *) pkgs+=("$a");; esac; done
            if [ "$cmd" = update ]; then
              flock -n {lists_lock} true || {{ echo "E: Could not get lock {lists_lock}" >&2; exit 100; }}
              exit 0
            fi
            echo "Waiting for cache lock: Could not get lock {dpkg_lock}. It is held by process 1 (apt-get)..."
            flock -w "$wait" {dpkg_lock} true || {{ echo "E: Could not get lock {dpkg_lock}" >&2; exit 100; }}
            for p in "${{pkgs[@]}}"; do echo "$p" >> {state}; done
            """),
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, state, dpkg_lock, lists_lock


def _hold(lock, seconds):
    return subprocess.Popen(["flock", str(lock), "sleep", str(seconds)])


def _font_packages():
    import xbm_data
    return xbm_data.font_packages() + ["dataset-fashion-mnist"]


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_install_data_waits_for_another_apt_process(tmp_path):
    """Another apt process holds the package-lists lock and the dpkg lock for 3 s at the
    start: the script waits for both and installs everything (exit 0)."""
    env, state, dpkg_lock, lists_lock = _fake_apt(tmp_path, installed=["fonts-mona"])
    holders = [_hold(dpkg_lock, 3), _hold(lists_lock, 3)]
    time.sleep(0.3)  # the holders have their locks
    t0 = time.perf_counter()
    out = subprocess.run(["bash", os.path.join(APP, "install_data.sh")], capture_output=True, text=True,
                         env=dict(env, APT_LOCK_TIMEOUT="30", APT_RETRY_PAUSE="1"), timeout=120)
    secs = time.perf_counter() - t0
    for h in holders:
        h.wait()
    assert out.returncode == 0, out.stdout + out.stderr
    assert secs >= 2.5, f"finished in {secs:.1f} s: did not wait for the lock"
    assert "another apt process holds the package lists lock; waiting" in out.stdout, out.stdout
    assert set(state.read_text().split()) == set(_font_packages())
    last = out.stdout.strip().splitlines()[-1]
    assert f"{len(_font_packages()) - 1} package(s) newly installed; 1 of" in last, last
    # run again: nothing to do, no apt-get at all
    out = subprocess.run(["bash", os.path.join(APP, "install_data.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and "0 package(s) newly installed" in out.stdout, out.stdout


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_install_data_names_what_is_missing_when_the_lock_never_frees(tmp_path):
    env, state, dpkg_lock, _ = _fake_apt(tmp_path)
    holder = _hold(dpkg_lock, 30)
    time.sleep(0.3)
    try:
        out = subprocess.run(["bash", os.path.join(APP, "install_data.sh")], capture_output=True, text=True,
                             env=dict(env, APT_LOCK_TIMEOUT="1", APT_RETRIES="2", APT_RETRY_PAUSE="0"), timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "apt-get install failed (attempt 1 of 2" in out.stdout, out.stdout
    assert "still missing after 2 attempt(s): fonts-ipafont-gothic" in out.stdout, out.stdout
    assert "sudo apt-get install -y --no-install-recommends fonts-ipafont-gothic" in out.stdout, out.stdout
    assert "--pretrain-classes 4000" in out.stdout  # what it means for the quick start


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("XBM_TEST_REAL_APT") != "1" or os.geteuid() != 0 or shutil.which("apt-get") is None,
                    reason="removes and reinstalls a Debian font package: set XBM_TEST_REAL_APT=1 (root, apt)")
def test_install_data_waits_for_the_real_dpkg_lock(tmp_path):
    """The issue's scenario with the real apt: a process holds dpkg's and apt's locks
    (fcntl locks, as apt takes them) for 60 s while one font package is missing."""
    subprocess.run(["apt-get", "remove", "-y", "-q", "fonts-konatu"], capture_output=True, check=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""\
        import fcntl, os, time
        fds = [os.open(p, os.O_RDWR | os.O_CREAT) for p in
               ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock")]
        for fd in fds:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    out = subprocess.run(["bash", os.path.join(APP, "install_data.sh")], capture_output=True, text=True, timeout=900)
    secs = time.perf_counter() - t0
    holder.wait()
    assert out.returncode == 0, out.stdout + out.stderr
    assert secs >= 55 and "1 package(s) newly installed" in out.stdout, (secs, out.stdout)


@pytest.mark.slow
def test_install_again_takes_seconds():
    """bash python/install.sh on an installed checkout: nothing rebuilt (unless csrc/ or
    setup.py changed since the last build, which this run then does)."""
    out, secs = _run(["bash", os.path.join(APP, "install.sh")], ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    if "is up to date" in out.stdout:
        assert secs < 60, (secs, out.stdout)
    out, secs = _run(["bash", os.path.join(APP, "install.sh")], ROOT, timeout=600)
    assert out.returncode == 0 and "xbm_kernels._C is up to date" in out.stdout, out.stdout
    assert "already installed" in out.stdout and secs < 60, (secs, out.stdout)


# --------------------------------------------------------------------------- the data check


def test_a_short_glyph_set_stops_before_rendering_with_the_cause(tmp_path, monkeypatch):
    import xbm_data
    fonts = sorted({f[0] for f in xbm_data.find_faces()})
    if len(fonts) < 3:
        pytest.skip("fewer than 3 CJK font files installed")
    few = tmp_path / "fonts"
    few.mkdir()
    for f in fonts[:3]:
        os.symlink(f, few / os.path.basename(f))
    monkeypatch.setattr(xbm_data, "missing_font_packages", lambda: ["fonts-cwtex-kai", "fonts-wqy-zenhei"])
    with pytest.raises(xbm_data.DataSetTooSmall) as exc:
        xbm_data.glyphs(str(tmp_path / "cache"), font_dirs=(str(few),), quiet=True,
                        need_classes=xbm_data.classes_needed(None, 4000, 8))
    msg = str(exc.value)
    assert "it needs 5008 classes (1000 test + 4000 pretraining (--pretrain-classes) + at least 8 training)" in msg
    assert "sudo apt-get install -y --no-install-recommends fonts-cwtex-kai fonts-wqy-zenhei" in msg, msg
    assert not (tmp_path / "cache").exists()  # nothing was rendered


def test_train_xbm_names_the_flag_and_exits_without_a_traceback():
    out, _ = _run([sys.executable, os.path.join(APP, "train_xbm.py"), "--dataset", "digits", "--steps", "2"], ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--classes-per-batch 8: the digits training split has only 5 classes" in out.stderr, out.stderr


# --------------------------------------------------------------------------- the self-check


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    from xbm_kernels import check
    real = check.compute

    def off_by_a_bit(loss, *args, backend="auto", **kwargs):
        rows, counts = real(loss, *args, backend=backend, **kwargs)
        return (rows * 1.001 if backend == "cpu" and loss == "triplet" else rows), counts
    monkeypatch.setattr(check, "compute", off_by_a_bit)
    assert check.main(["--quick", "--no-bench", "--backends", "reference", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "values cpu/cpu/triplet" in out, out
    monkeypatch.setattr(check, "compute", real)
    assert check.main(["--quick", "--no-bench", "--backends", "reference", "cpu"]) == 0
