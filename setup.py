"""The package build bundles the browser runtime (browser/src + its npm dependencies) into
src/pocketlm/web/static/worker.js, so that `pocketlm web` works from an installed wheel. Needs
Node.js and npm on the build machine; without them the wheel is built without the runtime, with a
warning, and `pocketlm web` says so."""

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
WORKER = ROOT / "src" / "pocketlm" / "web" / "static" / "worker.js"


class BuildWithBrowserRuntime(build_py):
    def run(self):
        sources = ROOT / "browser" / "package.json"
        if sources.exists() and shutil.which("npm"):
            stale = not WORKER.exists() or any(
                f.stat().st_mtime > WORKER.stat().st_mtime for f in (ROOT / "browser" / "src").glob("*.js")
            )
            if stale:
                npm = {"cwd": ROOT / "browser", "check": True}
                subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], **npm)
                subprocess.run(["npm", "run", "--silent", "build"], **npm)
        elif not WORKER.exists():
            print(
                "warning: npm not found: building pocketlm without its browser runtime (pocketlm web)",
                file=sys.stderr,
            )
        super().run()


setup(cmdclass={"build_py": BuildWithBrowserRuntime})
