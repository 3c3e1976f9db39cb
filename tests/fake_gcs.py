"""A local stand-in for Google Cloud Storage, so that gs:// workdirs are tested without network.

`start()` runs gcp-storage-emulator (an in-memory server of the GCS JSON API) on a free port
of 127.0.0.1 and points every client at it, in this process and (through the environment)
in subprocesses:
- tensorstore, which orbax writes arrays with: TENSORSTORE_GCS_HTTP_URL and a test token;
- google-cloud-storage (orbax's checkpoint deletion, tensorboardX's event files) and gcsfs:
  STORAGE_EMULATOR_HOST;
- etils.epath (orbax's directories, and `nfnets_jax.files` for URLs): its fsspec backend
  (gcsfs) instead of tf.io.gfile, which has no endpoint setting. `use_fsspec()` does that in
  a process; `python tests/fake_gcs.py script.py args...` runs a script with it.
So the code under test is the code a TPU VM runs, with one backend of epath swapped.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys

BUCKET = "nfnets-test"


def use_fsspec() -> None:
    """Makes etils.epath reach gs:// through gcsfs (honours STORAGE_EMULATOR_HOST)."""
    import logging

    import fsspec
    from etils.epath import gpath

    for name in ("gcsfs", "google.auth._default"):  # "Could not determine bucket type",
        logging.getLogger(name).setLevel(logging.ERROR)  # "unavailable metadata server"

    gpath._is_tf_installed = lambda: False  # epath's own switch between its two backends.
    # Objects written by tensorstore behind gcsfs's back must show up in listings.
    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def _quiet(server) -> None:
    """Drops the tracebacks the emulator prints when a client closes a connection early."""
    httpd = server._api._httpd  # The emulator's http.server (one request at a time).
    handle_error = httpd.handle_error

    def quiet(request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            handle_error(request, client_address)

    httpd.handle_error = quiet


def start() -> tuple[object, dict[str, str]]:
    """Starts the emulator with an empty `BUCKET`; (server, the environment set for it)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    _quiet(server)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GOOGLE_CLOUD_PROJECT": "test",
        # No metadata server: region and credential lookups fail at once, not after retries.
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "NFNETS_FAKE_GCS": "1",
    }
    os.environ.update(env)
    use_fsspec()
    return server, env


def wipe(server) -> None:
    """Empties the store; the bucket stays."""
    server.wipe(keep_buckets=True)


if __name__ == "__main__":  # python tests/fake_gcs.py scripts/train.py --workdir=gs://...
    use_fsspec()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
