"""gcp-storage-emulator, completed with the object-generation protocol real GCS speaks, as a server
process for tests: `python gcs_emulator.py PORT BUCKET`.

The emulator stores a generation per object but neither sends it on a media download
(`x-goog-generation`) nor honours the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions.
tensorstore (orbax's array store) relies on both for its OCDBT manifests: it fails with "Malformed
StorageGeneration" without the header. Nor does it have `objects.move` (`.../moveTo/o/...`), which
gcsfs uses to move an object (it retries the 501 for minutes). This adds them as GCS documents them.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert = objects.download, objects.insert


def _query(request, name):
    values = request.query.get(name)
    return values[0] if values else None


def _current_generation(request, storage):
    try:
        return str(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
    except (NotFound, KeyError):
        return None


def _object_name(request):
    return request.params.get("object_id") or _query(request, "name")


def download(request, response, storage, *args, **kwargs):
    generation = _current_generation(request, storage)
    if generation is not None:
        if _query(request, "ifGenerationNotMatch") == generation:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if _query(request, "ifGenerationMatch") not in (None, generation):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"
    return _download(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
    expected = _query(request, "ifGenerationMatch")
    if expected is not None and _object_name(request):
        current = _current_generation(request, storage)
        if (expected == "0" and current is not None) or (expected != "0" and current != expected):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
    return _insert(request, response, storage, *args, **kwargs)


def move(request, response, storage, *args, **kwargs):
    bucket, source = request.params["bucket_name"], request.params["object_id"]
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, request.params["dest_object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return None
    objects._delete(storage, bucket, source)
    response.json(moved)
    return None


objects.download, objects.insert = download, insert  # before server.py builds its routing table

if __name__ == "__main__":
    from gcp_storage_emulator import server, settings

    server.HANDLERS = ((rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                        r"(?P<dest_object_id>.*[^/]+)$", {server.POST: move}), *server.HANDLERS)
    from gcp_storage_emulator.server import create_server

    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
