"""The documented install: the sdist builds a wheel that installs into a fresh venv with the shim, both pass
`twine check`, and the README's GPU install resolves for Linux x86_64 / CPython 3.12 / CUDA from metadata."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".whl",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "runs",
    "models",
    "last_run_prepared",
    ".pytest_cache",
)
CHECK = """
import importlib.metadata, json, sys
import axolotl_upft, axolotl.integrations.upft as shim
from axolotl.integrations.base import PluginManager
manager = PluginManager.get_instance()
manager.register("upft.UPFTPlugin", required=True)
print(json.dumps({
    "package": axolotl_upft.__file__, "shim": shim.__file__,
    "plugin": [f"{type(p).__module__}.{type(p).__name__}" for p in manager.plugins.values()],
    "same_class": shim.UPFTPlugin is axolotl_upft.UPFTPlugin,
    "version": importlib.metadata.version("axolotl-upft"),
    "commands": sorted(e.name for e in importlib.metadata.entry_points(group="axolotl.cli_commands")
                       if e.value.startswith("axolotl_upft")),
}))
"""


def run(*args, **kwargs) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600, check=False, **kwargs
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build` as a release does: the sdist first, then the wheel built from the sdist."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", source)
    return tmp / "dist"


def test_the_wheel_and_the_sdist_pass_twine_check(dist):
    files = sorted(dist.glob("axolotl_upft-*"))
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], "one sdist, and the wheel built from it"
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", *files)


def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=15):
            return True
    except OSError:
        return False


def readme_gpu_extras() -> str:
    """The extras of the README's GPU install line (`pip install ".[vllm]"  # GPU ...`)."""
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines() if re.search(r"# GPU\b", line)]
    return re.search(r"\.\[([\w,]+)\]", line).group(1)


def test_the_readme_gpu_install_resolves_for_linux_cuda_and_cpython_312_from_metadata(dist, tmp_path):
    if not pypi_reachable():
        pytest.skip("pypi.org cannot be reached: the resolver test reads the packages' metadata from it")
    (wheel,) = dist.glob("*.whl")
    extras = readme_gpu_extras()
    (tmp_path / "gpu.in").write_text(f"axolotl-upft[{extras}] @ {wheel.as_uri()}\n")
    command = [sys.executable, "-m", "uv", "pip", "compile", tmp_path / "gpu.in", "--no-header", "-q"]
    platform = ["--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.12"]
    pins = dict(
        line.split("==", 1)
        for line in run(*command, *platform, "--index-url", "https://pypi.org/simple").splitlines()
        if "==" in line
    )
    assert pins["vllm"].startswith("0.30."), "the vllm extra's range: the releases that fit axolotl 0.21"
    assert pins["axolotl"].startswith("0.21.")
    assert "+cpu" not in pins["torch"] and any(name.startswith("nvidia-") for name in pins), "CUDA wheels"


def test_the_wheel_built_from_the_sdist_installs_into_a_fresh_venv_and_upft_plugin_resolves(dist, tmp_path):
    (wheel,) = dist.glob("axolotl_upft-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # Offline and quick: the venv sees this environment's packages through a plain path entry (no editable
    # finder comes with it), and holds its own copy of axolotl, as a user's venv with axolotl installed does,
    # so the wheel's axolotl/integrations/upft lands inside it.
    ours = Path(sysconfig.get_paths()["purelib"])
    (site / "dependencies.pth").write_text(str(ours) + "\n")
    shutil.copytree(ours / "axolotl", site / "axolotl", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = json.loads(run(python, "-c", CHECK, cwd=tmp_path, env=env).splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site), "axolotl_upft comes from the wheel"
    assert Path(found["shim"]) == site / "axolotl" / "integrations" / "upft" / "__init__.py"
    assert "axolotl_upft.plugin.UPFTPlugin" in found["plugin"] and found["same_class"]
    version = run(sys.executable, "-c", "import axolotl_upft; print(axolotl_upft.__version__)", cwd=ROOT)
    assert found["version"] == version.strip()
    assert found["commands"] == ["upft-eval", "upft-sample"]
    assert "convert-gguf" in run(venv / "bin" / "axolotl-upft", "--help", cwd=tmp_path, env=env)
