"""A real S3-compatible server on localhost for tests and benchmarks (moto's server mode).

``with local_s3_server() as s3:`` starts moto's standalone server on a free port,
creates a bucket and sets the environment a :class:`~diffeat.store.FeatureStore` reads
(``AWS_ENDPOINT_URL``, test credentials) for the duration; ``s3.url("feats.zarr")`` is a
store URL in that bucket. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from diffeat.core.errors import DiffeatError

__all__ = ["LocalS3", "local_s3_server"]


@dataclass(frozen=True)
class LocalS3:
    """A running local S3 server: its endpoint, bucket and the environment to reach it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def url(self, name: str | None = None) -> str:
        """``s3://<bucket>/<name>`` (a fresh unique name when none is given)."""
        return f"s3://{self.bucket}/{name or uuid.uuid4().hex[:12] + '.zarr'}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_s3_server(bucket: str = "diffeat-test") -> Iterator[LocalS3]:
    """Run moto's S3 server on localhost with one (new, empty) bucket; the environment
    points at it while the ``with`` block runs."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise DiffeatError(
            "a local S3 server needs moto's server mode: pip install 'moto[server]' "
            "(it is in diffeat's test extra)"
        ) from None
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield LocalS3(endpoint, bucket, env)
    finally:
        # moto keeps its buckets in this process, not in the server: forget them, so the
        # next server starts empty
        with contextlib.suppress(OSError):
            request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
