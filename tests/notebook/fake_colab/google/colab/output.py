"""`google.colab.output`: eval_js and serve_kernel_port_as_iframe, each call logged as a JSON line."""

import json
import os
import re

from . import kernel


def _log(**call) -> None:
    path = os.environ.get("FAKE_COLAB_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(call) + "\n")


def eval_js(script: str, ignore_result: bool = False, timeout_sec=None):
    _log(call="eval_js", script=script, timeout_sec=timeout_sec)
    port = re.fullmatch(r"google\.colab\.kernel\.proxyPort\((\d+)\)", script.strip())
    if port is None:
        raise NotImplementedError(f"the fake Colab evaluates only proxyPort(), not {script!r}")
    return kernel.proxyPort(int(port[1]))


def serve_kernel_port_as_iframe(port: int, path: str = "/", height: int = 400, cache_in_notebook: bool = False):
    _log(call="serve_kernel_port_as_iframe", port=port, path=path, height=height)
    from IPython.display import HTML, display

    url = kernel.proxyPort(port).rstrip("/") + path
    display(HTML(f'<div data-fake-colab="serve_kernel_port_as_iframe"><iframe src="{url}" height="{height}">'
                 "</iframe></div>"))


def serve_kernel_port_as_window(port: int, path: str = "/", anchor_text=None):
    raise DeprecationWarning("serve_kernel_port_as_window is deprecated upstream: browser security updates broke it")
