"""Math-Verify worker process: JSON lines {"gold": str, "pred": str} in, {"ok": bool} out.

Run as a script (`python math_worker.py TIMEOUT`), not as part of the package, so it starts without
importing torch. Being the main thread of its own process, it can use Math-Verify's signal-based timeouts;
the parent also kills it if an answer takes too long (C code such as a huge power ignores signals).
"""
from __future__ import annotations

import json
import logging
import sys
from functools import lru_cache

logging.disable(logging.WARNING)  # math_verify logs a warning per unparsable string

from math_verify import parse, verify  # noqa: E402


def main() -> int:
    timeout = max(1, int(float(sys.argv[1]))) if len(sys.argv) > 1 else 5

    @lru_cache(maxsize=4096)
    def parsed(text: str):  # a group's samples share one gold answer
        return parse(text, parsing_timeout=timeout)

    for line in sys.stdin:
        item = json.loads(line)
        try:
            ok = bool(verify(parsed(item["gold"]), parsed(item["pred"]), timeout_seconds=timeout))
        except Exception:  # noqa: BLE001 - an answer Math-Verify cannot handle is not equal
            ok = False
        sys.stdout.write(json.dumps({"ok": ok}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
