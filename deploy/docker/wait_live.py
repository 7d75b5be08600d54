"""Wait until every variant of the registry has a live worker, as the API reports it
(``GET /v1/models``), and say how long that took from START (epoch seconds, default now).

    python3 deploy/docker/wait_live.py [--url http://127.0.0.1:8000] [--start EPOCH] [--timeout S]

Standard library only: it runs with the machine's python3, before any venv exists. Writes
build/compose-up.json (seconds to the API answering and to every variant live) unless every
variant was live at the first look (a stack already up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "build" / "compose-up.json"


def variants(url: str, key: str | None) -> dict[str, int] | None:
    """Live workers per "model/variant", or None while the API does not answer."""
    request = urllib.request.Request(f"{url}/v1/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return {f"{m['id']}/{v['id']}": v["workers"] for m in body["data"] for v in m["variants"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--start", type=float, default=time.time())
    # a worker loads its variants one after the other: six from an empty compile cache took
    # 283 s here, and 747 s with the machine busy with other work (deploy/README.md)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    key = next(iter(os.environ.get("T2I_API_KEYS", "").split(",")), "") or None
    api_s, last, polls = None, None, 0
    while time.time() - args.start < args.timeout:
        live = variants(args.url, key)
        polls += live is None  # the API not answering yet counts as a wait
        if live is not None:
            api_s = api_s or time.time() - args.start
            if live != last:
                print(f"{time.time() - args.start:6.1f} s  live workers: {live}", flush=True)
                last = live
            if live and all(live.values()):
                seconds = round(time.time() - args.start, 1)
                if polls == 0:  # a stack already up at the first look: nothing was measured
                    print("every variant has a live worker")
                    return 0
                print(f"every variant has a live worker {seconds} s after the start")
                OUT.parent.mkdir(exist_ok=True)
                OUT.write_text(
                    json.dumps({"api_answers_s": round(api_s, 1), "all_live_s": seconds}) + "\n"
                )
                return 0
            polls += 1
        time.sleep(1.0)
    print(
        f"not every variant has a live worker after {args.timeout:.0f} s: {last}", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
