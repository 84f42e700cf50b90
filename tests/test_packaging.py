"""One installed namespace: ``wattserve`` is the only top-level package, loaded once."""

import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import wattserve

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ("bench", "cli", "cluster", "policies", "scheduler", "telemetry", "workers")


def test_the_wheel_installs_only_the_wattserve_package(tmp_path):
    source = tmp_path / "src"  # a copy of the tracked files: the build leaves nothing here
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()  # fmt: skip
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("wattserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"wattserve"}
    for folder in LAYOUT:  # each top-level folder of the repository, under the namespace
        assert f"wattserve/{folder}/__init__.py" in names
    assert "wattserve/policies/builtin_catalog.toml" in names
    assert "wattserve/cli/demo_prompts.txt" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "wattserve = wattserve.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_every_module_imports_under_the_namespace_and_never_under_a_bare_name():
    loaded = []
    for folder in LAYOUT:
        package = __import__(f"wattserve.{folder}", fromlist=["_"])
        for info in pkgutil.iter_modules(package.__path__, f"wattserve.{folder}."):
            if info.name.endswith("__main__"):
                continue
            __import__(info.name)
            loaded.append(info.name)
    assert len(loaded) > 40
    bare = sorted(name for name in sys.modules if name.split(".")[0] in LAYOUT)
    assert bare == [], f"modules loaded outside the wattserve namespace: {bare}"
    assert wattserve.__name__ == "wattserve"
