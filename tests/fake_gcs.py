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
So the code under test is the code a TPU VM runs, with one backend of epath swapped. The
emulator does not enforce preconditions (ifGenerationMatch); each object here has one writer.
"""

from __future__ import annotations

import logging
import os
import runpy
import socket
import sys

BUCKET = "nfnets-test"


def use_fsspec() -> None:
    """Makes etils.epath reach gs:// through gcsfs (honours STORAGE_EMULATOR_HOST)."""
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
    # "Resource not found" for every probe of an absent object (orbax, gcsfs) is normal.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)


def _send_generations() -> None:
    """Makes the emulator's downloads carry x-goog-generation, as GCS's do.

    tensorstore takes an object's generation from that header; without it a read reports
    generation 0, and OCDBT's next conditional write of its manifest (`ifGenerationMatch`
    on that generation) fails with "Malformed StorageGeneration".
    """
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "sends_generation", False):
        return

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # Not found: the response already says so.
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    download_with_generation.sends_generation = True
    objects.download = download_with_generation  # objects.get (alt=media) calls it too.
    for _, handlers in emulator.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = download_with_generation


_STARTED: list[tuple[object, dict[str, str]]] = []


def start() -> tuple[object, dict[str, str]]:
    """Starts the emulator with `BUCKET`; (server, the environment set for it).

    Once per process: clients (tensorstore, gcsfs) keep the endpoint they first saw, so later
    calls return the same server; tests keep apart by using their own prefixes in `BUCKET`.
    """
    if _STARTED:
        return _STARTED[0]
    from gcp_storage_emulator.server import create_server

    _send_generations()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server._api.daemon = True  # Its serving thread must not keep the process alive at exit.
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
    _STARTED.append((server, env))
    return server, env


if __name__ == "__main__":  # python tests/fake_gcs.py scripts/train.py --workdir=gs://...
    use_fsspec()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
