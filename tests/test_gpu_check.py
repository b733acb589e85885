"""scripts/gpu_check.sh, the one GPU script, in its dry run (no GPU): every step's command line
must match its script's options and the GPU test selection must collect, so that a device
session's few minutes are never lost to a typo. Also: the helper scripts parse (bash -n)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.txt").read_text()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "DRY RUN" in summary, summary
    m = re.search(r"dry run: (\d+) GPU tests collected", summary)
    assert m and int(m.group(1)) >= 200, summary  # (298 on 2026-12-02)
    steps = re.findall(r"^step: (.*): rc=(\d+)", summary, re.M)
    names = {n for n, _ in steps}
    for want in ("GPU tests", "sweep --preset issue3", "bench_tokenweave", "bench_ops", "bench_ipc",
                 "bench_block_attention", "bench_overhead", "sweep peers", "cost model refit", "cost model validate (shipped)",
                 "cost model validate (refit)"):
        assert want in names, (want, summary)
    assert all(rc == "0" for _, rc in steps), summary
    for prof in ("shipped", "refit"):  # the model-vs-run line of each validation (empty in a dry run)
        assert f"-- cost_model_validation_{prof}:" in summary, summary
    assert (tmp_path / "results.tgz").stat().st_size > 0


def test_gpu_check_runs_only_the_selected_steps(tmp_path):
    """GPU_CHECK_STEPS (a second, short device call): the named steps run, the others are listed as
    not selected, and an unselected test step is not a failure."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, GPU_CHECK_STEPS="sweep peers,bench_ops")
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "summary.txt").read_text()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ran = dict(re.findall(r"^step: (.*): rc=(\d+)", summary, re.M))
    assert ran == {"bench_ops": "0", "sweep peers": "0"}, summary
    assert "step: GPU tests: not selected" in summary and "step: bench_tokenweave: not selected" in summary
    assert "tests: not selected" in summary


def test_helper_scripts_parse():
    for name in ("gpu_check.sh", "prebuild_for_device.sh", "setup_env.sh", "source_hash.sh", "test.sh", "demo.sh"):
        path = os.path.join(ROOT, "scripts", name)
        p = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert p.returncode == 0, (name, p.stderr)


def test_source_hash_is_stable():
    """The stamp GPU_CHECK_PREBUILT is compared with: a sha256 of setup.py and csrc/, the same twice."""
    run = lambda: subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--source-hash"],  # noqa: E731
                                 cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    a, b = run(), run()
    assert re.fullmatch(r"[0-9a-f]{64}", a) and a == b, (a, b)
