"""Write bench/results/deploy.json: what the last ``make images`` and ``make compose-up``
measured (build/images.json, build/compose-up.json), the images' sizes now, and the engine.

    python3 deploy/docker/report.py     (make deploy-report; standard library only)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results" / "deploy.json"


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    images_file, up_file = ROOT / "build" / "images.json", ROOT / "build" / "compose-up.json"
    if not images_file.exists() or not up_file.exists():
        print("run make compose-up first (it writes build/images.json, build/compose-up.json)")
        return 1
    images = json.loads(images_file.read_text())
    for name, record in images.items():
        record.pop("id", None)
        size = _run("docker", "image", "inspect", "-f", "{{.Size}}", name)
        record["size_bytes"] = int(size)
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{_run('nproc')} cores",
        "engine": _run("docker", "version", "-f", "{{.Server.Version}}"),
        "compose": _run("docker", "compose", "version", "--short"),
        "images": images,
        "compose_up": json.loads(up_file.read_text()),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
