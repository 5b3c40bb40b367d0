"""The product around the kernels: the wheel path, the CI workflows, bench/gpu_check.sh, the gpu_smoke
selection, and documentation that never points outside the repository."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import posattn

from conftest import HAS_CUDA, requires_ext

ROOT = pathlib.Path(__file__).resolve().parent.parent


def repo_files():
    """Tracked and untracked-but-not-ignored files (what a commit would hold)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return [ROOT / f for f in out if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):     # not a git checkout (an sdist)
        skip = {".venv", "build", "dist", ".git", "__pycache__", ".pytest_cache"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


# ---------------------------------------------------------------------------------------------
# the wheel: built once from this tree, installed into a scratch venv that borrows this torch

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build", reason="python -m build is needed (make test installs it)")
    out = tmp_path_factory.mktemp("dist")
    # the CMake build folder under build/ is shared with `make install`: only a relink here
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    wheels = list(out.glob("posattn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@requires_ext
def test_wheel_contents_and_metadata(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"posattn/_C\..*\.so", n) for n in names), names
    assert "posattn/triton_kernels/attention.py" in names and "posattn/reference.py" in names
    assert "posattn/integrations/transformers.py" in names and "posattn/nn.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names), "triton_kernels must live under posattn/"
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    import posattn
    assert f"Version: {posattn.__version__}" in meta
    assert "Requires-Python: >=3.10" in meta and "Requires-Dist: torch>=2.5" in meta
    assert re.search(r"^License(-Expression)?: MIT", meta, re.M)
    for extra in ("triton", "test", "hf"):
        assert f"Provides-Extra: {extra}" in meta


@requires_ext
def test_wheel_installs_elsewhere_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # borrow this environment's torch through a .pth (appended after the venv's own site-packages,
    # and .pth files inside that folder are not executed: posattn's editable hook stays out)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    torch_site = pathlib.Path(torch.__file__).resolve().parent.parent
    pathlib.Path(site, "zz_borrowed_torch.pth").write_text(f"{torch_site}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check = ("import posattn, torch; q = torch.randn(1, 4, 37, 16); "
             "out = posattn.attention(q, q, q, causal=True, backend='cpu'); "
             "ref = posattn.reference.attention(q.double(), q.double(), q.double(), causal=True); "
             "err = (out.double() - ref).abs().max().item(); assert err < 1e-5, err; "
             "print(posattn.__file__); print(torch.ops.posattn.cpu_isa())")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    where, isa = done.stdout.split()
    assert pathlib.Path(where).is_relative_to(venv), f"imported {where}, not the installed wheel"
    # the installed wheel picks the same kernel path as this checkout's build
    assert isa == posattn.ops.cpu_isa(), (isa, posattn.ops.cpu_isa())


# ---------------------------------------------------------------------------------------------
# CI workflows

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_pass_the_schema_linter():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema lints the workflows (make test installs it)")
    assert {p.name for p in WORKFLOWS} >= {"cpu.yml", "gpu.yml"}
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflows_do_what_the_readme_says():
    yaml = pytest.importorskip("yaml")
    cpu = yaml.safe_load((ROOT / ".github/workflows/cpu.yml").read_text())
    assert any("make test" in s.get("run", "") for s in cpu["jobs"]["test"]["steps"])
    gpu = yaml.safe_load((ROOT / ".github/workflows/gpu.yml").read_text())
    on = gpu[True] if True in gpu else gpu["on"]        # YAML 1.1 reads the key `on` as true
    assert "schedule" in on
    job = gpu["jobs"]["test"]
    assert "self-hosted" in job["runs-on"] and set(job["strategy"]["matrix"]["arch"]) == {"sm80", "sm90"}
    stacks = {(i["python"], i["torch"], i["triton"]) for i in job["strategy"]["matrix"]["include"]}
    assert stacks == {("3.12", "2.11.0", "3.6.0"), ("3.11", "2.13.0", "3.9.0")}
    runs = " ".join(s.get("run", "") for s in job["steps"])
    assert "-m gpu_smoke" in runs and "SYSTEM=1" in runs
    assert any(s.get("uses", "").startswith("actions/cache") and "triton" in s["with"]["key"] for s in job["steps"])
    assert "TRITON_CACHE_DIR" in job["env"]


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.sh and the gpu_smoke selection

def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the failure without a GPU")
def test_gpu_check_fails_fast_and_clearly_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch sees no CUDA device" in done.stdout
    assert "torch sees no CUDA device" in (tmp_path / "gpu_check.log").read_text()
    assert not (tmp_path / "bench.csv").exists()


def test_gpu_smoke_selection_is_small_and_triton_only():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu_smoke", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert 20 <= len(ids) <= 80, len(ids)
    assert not any("[cpu" in i or "-cpu" in i for i in ids), [i for i in ids if "cpu" in i]
    for module in ("test_attention.py", "test_sdpa.py", "test_kernelized.py"):
        assert any(module in i for i in ids), module


# ---------------------------------------------------------------------------------------------
# the repository owns its documentation

OUTSIDE = re.compile(r"\.\./shared|\bshared/|/work/|\b(?:DESIGN|MATH|STYLE|GPU_AUDIT|WAVE2_ANCHORS)\.md\b")
TEXT = {".py", ".md", ".h", ".cpp", ".txt", ".toml", ".yml", ".yaml", ".sh", ".in", ".cfg"}


def test_no_reference_points_outside_the_repository():
    bad = []
    for path in repo_files():
        if path.suffix not in TEXT and path.name not in ("Makefile", "run"):
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != pathlib.Path(__file__).resolve():
                bad.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()[:120]}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_documentation_links_resolve():
    missing = []
    for path in repo_files():
        text = path.read_text(errors="replace") if path.suffix in TEXT else ""
        if path.suffix == ".md":
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if "://" in target:
                    continue
                if not (path.parent / target).exists() and not (target.startswith("../bench/results/")
                                                                or target.startswith("bench/results/")):
                    missing.append(f"{path.relative_to(ROOT)} -> {target}")
        for doc in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            if not (ROOT / doc).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {doc}")
    assert not missing, "\n".join(missing)


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.index("make demo") < readme.index("## ") and readme.index("make test") < readme.index("## ")
    for doc in ("design", "math", "semantics", "benchmarks"):
        assert f"docs/{doc}.md" in readme and (ROOT / "docs" / f"{doc}.md").is_file()
    assert "## CI on GPU runners" in readme
    assert not re.search(r"\bbefore commit\b|\bat commit [0-9a-f]{7}", readme), "historical numbers belong elsewhere"


def test_one_benchmark_harness():
    for gone in ("cpu_targets.py", "kernelized_scaling.py", "gpu_positions.py"):
        assert not (ROOT / "bench" / gone).exists(), gone
    assert shutil.which("bash")
