"""`google.colab.kernel`: what Colab's proxy answers for a kernel port (the browser side, here a fixed URL)."""


def proxyPort(port: int) -> str:  # noqa: N802 -- Colab's own (JavaScript) name
    return f"https://{port}-fake-colab-proxy.invalid/"
