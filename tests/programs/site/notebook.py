"""Run a program as notebook cells in a fresh Jupyter kernel, as a user of
a notebook would: ``python notebook.py TIMEOUT < cells.json``, the cells a
JSON list of source strings.  The cells' stdout goes to stdout, their
stderr and errors (with "Traceback (most recent call last):") to stderr;
the exit status is 1 when a cell failed, 2 when one ran past TIMEOUT
seconds.  (tests/test_programs.py runs it in a process of its own, so
nothing of the kernel's client outlives the run.)"""

import json
import sys

from jupyter_client.manager import start_new_kernel


def main() -> int:
    timeout = float(sys.argv[1])
    cells = json.load(sys.stdin)
    km, kc = start_new_kernel(kernel_name="python3")
    status = 0

    def show(msg) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            stream = sys.stdout if content["name"] == "stdout" else sys.stderr
            stream.write(content["text"])
        elif msg["msg_type"] == "error":
            sys.stderr.write("Traceback (most recent call last):\n" + "\n".join(content["traceback"]) + "\n")

    try:
        for cell in cells:
            reply = kc.execute_interactive(cell, timeout=timeout, output_hook=show)
            if reply["content"]["status"] != "ok":
                status = 1
                break
    except TimeoutError:
        sys.stderr.write(f"a cell ran longer than {timeout} s\n")
        status = 2
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
