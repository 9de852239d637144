"""Run directories on local disk or in a bucket behind one path type.

A `gs://` (or other fsspec URL) workdir is an `etils.epath.Path` — the path type orbax itself uses,
backed by gcsfs — so the code that writes config.json, metrics.jsonl, curves.png and the checkpoints
is the same for both. What an object store cannot do is decided here once: it has no `flock`, no
append and no free-space figure, and a single object upload is already atomic (it appears whole or
not at all), so no temporary-file rename is needed there.
"""
from __future__ import annotations

import functools
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from jaxtune.errors import JaxtuneError

BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")  # GCS: lowercase letters, digits, - _ .
PROBE_TIMEOUT_S = 15


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def run_path(path: str | os.PathLike):
    """A pathlib.Path for a local path, an epath.Path for a URL such as gs://bucket/run (whose bucket is
    checked once per process, see `check_bucket`)."""
    if not is_remote(path):
        return Path(path)
    path = str(path)
    if not path.startswith("gs://"):
        raise JaxtuneError(f"{path}: jaxtune reads and writes local paths and Google Cloud Storage, written "
                           f"gs://BUCKET/PATH; not {path.split('://')[0]}://")
    try:
        import gcsfs  # noqa: F401 - epath's gs:// backend when TensorFlow is absent
    except ImportError:
        raise JaxtuneError(f"{path}: a gs:// path needs gcsfs; pip install 'jaxtune[gcs]' (or gcsfs)") from None
    check_bucket(path.split("/")[2], os.environ.get("STORAGE_EMULATOR_HOST"))
    from etils import epath

    return epath.Path(path)


@functools.lru_cache(maxsize=None)
def check_bucket(bucket: str, emulator: str | None = None) -> None:
    """One listing request with a deadline and no retries, before anything else touches the bucket: no
    network, no credentials, a bad or missing bucket are one line within seconds (gcsfs retries each
    for a minute and then prints a page of tracebacks). The answers are GCS's own (its JSON API), or
    `emulator`'s (STORAGE_EMULATOR_HOST, as gcsfs reads it)."""
    url = f"gs://{bucket}"
    if not BUCKET_NAME.fullmatch(bucket):
        raise JaxtuneError(f"{url}: {bucket!r} is not a bucket name (lowercase letters, digits, '-', '_' and '.', "
                           "starting and ending with a letter or digit)")
    endpoint = (emulator or "https://storage.googleapis.com").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket)}/o?maxResults=1",
                                     headers={} if emulator else _authorization(url))
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        try:
            said = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not GCS's JSON error: its status line says enough
            said = e.reason
        if e.code == 404:
            raise JaxtuneError(f"{url}: no such bucket ({said}); create it (gcloud storage buckets create {url}) "
                               "or fix the name") from None
        if e.code in (401, 403):
            raise JaxtuneError(f"{url}: access denied ({e.code}: {said}); log in with `gcloud auth "
                               "application-default login`, or give this machine's service account access to the "
                               "bucket") from None
        raise JaxtuneError(f"{url}: Cloud Storage answered {e.code} ({said}); try again later") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise JaxtuneError(f"{url}: cannot reach {endpoint} ({reason}); check the network, or use a local "
                           "workdir") from None


def _authorization(url: str) -> dict:
    """The bearer header of the application default credentials, as gcsfs will use them; none (anonymous,
    as gcsfs falls back to) when this machine has none."""
    import google.auth
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        credentials.refresh(Request())
    except google.auth.exceptions.DefaultCredentialsError:
        return {}
    except Exception as e:  # noqa: BLE001 - TransportError (no network), RefreshError (a revoked login)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise JaxtuneError(f"{url}: the Google credentials of this machine do not work ({first}); log in again "
                           "with `gcloud auth application-default login`, or check the network") from None
    return {"Authorization": f"Bearer {credentials.token}"}
