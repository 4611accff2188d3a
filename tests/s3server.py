"""A real S3-compatible server (moto's server mode) on 127.0.0.1, for tests and benchmarks.

Nothing is mocked inside audiofx: the code under test talks HTTP to this server through
s3fs/botocore exactly as it would to AWS, found through the standard AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(bucket: str = "audiofx-test") -> Iterator[str]:
    """Start the server, point this process's environment at it (subprocesses inherit it),
    create `bucket`, yield the endpoint URL; stop the server and restore the environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.1)
        fs = s3_filesystem()
        fs.mkdir(bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_filesystem():
    """A fresh s3fs filesystem for the current environment (no instance cache: the endpoint
    may have changed since the last one was made)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
