"""The documented install: a wheel built with `python -m build` installs into a fresh venv, with the shim."""

import os
import shutil
import subprocess
import sys
import sysconfig
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


def test_a_built_wheel_installs_into_a_fresh_venv_and_upft_plugin_resolves_through_the_shim(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT)
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("axolotl_upft-*.whl")

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
    import json

    found = json.loads(run(python, "-c", CHECK, cwd=tmp_path, env=env).splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site), "axolotl_upft comes from the wheel"
    assert Path(found["shim"]) == site / "axolotl" / "integrations" / "upft" / "__init__.py"
    assert "axolotl_upft.plugin.UPFTPlugin" in found["plugin"] and found["same_class"]
    version = run(sys.executable, "-c", "import axolotl_upft; print(axolotl_upft.__version__)", cwd=ROOT)
    assert found["version"] == version.strip()
    assert found["commands"] == ["upft-eval", "upft-sample"]
    assert "convert-gguf" in run(venv / "bin" / "axolotl-upft", "--help", cwd=tmp_path, env=env)
