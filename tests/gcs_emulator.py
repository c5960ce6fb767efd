"""`gcp-storage-emulator` with GCS's object generations on downloads and its preconditions; run as a script
with the emulator's own arguments (`python tests/gcs_emulator.py start --host=... --port=... --in-memory`).

The emulator as released has two gaps that tensorstore's GCS driver (the array writer under orbax) trips
over, and this wrapper closes exactly those, nothing else:

1. A media download (`GET .../o/NAME?alt=media`, also a ranged one, 206) carries no `x-goog-generation`
   header. Real GCS sends it, and tensorstore's GCS driver takes a downloaded object's generation from it
   alone (`SetObjectMetadataFromHeaders`: missing -> 0). OCDBT creates its manifest with
   `ifGenerationMatch=0` and chains its commits on the generation in each upload's JSON response (which
   the emulator gets right); but while a save is under way it also revalidates its cached manifest with
   `GET ...manifest.ocdbt?alt=media&ifGenerationNotMatch=G`. The emulator ignores the condition (gap 2)
   and answers 200 with the body and no generation header, so the manifest is stamped generation 0. The
   next read (`if_not_equal`) or commit (`if_equal`) conditioned on that stamp is refused inside
   tensorstore, before any request, since a GCS generation must be > 0 (`IsValidStorageGeneration`):
   "Malformed StorageGeneration". Whether a revalidation falls between two commits depends on timing:
   about half of orbax's saves of 20 to 100 arrays failed. Added here: `x-goog-generation` and
   `x-goog-metageneration` on every 200/206 download, from the object resource.
2. Preconditions are ignored: `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch`,
   `ifMetagenerationNotMatch` never produce GCS's 412 (Precondition Failed) or 304 (Not Modified), so a
   conditional write always succeeds and a conditional read always returns the body. OCDBT's manifest
   commit (`ifGenerationMatch=0` for a new manifest, `=G` to replace generation G) relies on them; with
   them honoured here, the test exercises the protocol production relies on instead of a write that
   cannot lose. Checked on object GET (metadata or media), single-request uploads (`uploadType=media` /
   `multipart`, tensorstore's kind) and DELETE, as GCS does: a failed match -> 412; a held
   `...NotMatch` on a read -> 304, on a write -> 412; `ifGenerationMatch=0` means "does not exist yet".
   Resumable uploads (gcsfs's large-file path, sent without preconditions) are left as they are.

The rest (the routes, storage, object resources) is the released emulator, unchanged.
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from typing import Optional

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_PRECONDITION_FAILED = {"error": {
    "code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
    "errors": [{"domain": "global", "reason": "conditionNotMet", "locationType": "header",
                "location": "If-Match",
                "message": "At least one of the pre-conditions you specified did not hold."}]}}


def _query(request, name: str) -> Optional[int]:
    values = request.query.get(name)
    return int(values[0]) if values else None


def _current(storage, bucket: str, name: Optional[str]) -> Optional[dict]:
    """The object resource of `bucket/name`, or None when there is none."""
    if not name:
        return None
    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def precondition_status(request, obj: Optional[dict], read: bool) -> Optional[HTTPStatus]:
    """GCS's answer to the request's preconditions against `obj` (None: no object): 412, 304 (reads
    only) or None when they hold. A missing object has generation 0 and no metageneration."""
    generation = int(obj["generation"]) if obj else 0
    metageneration = int(obj["metageneration"]) if obj else None
    if_generation, if_not_generation = _query(request, "ifGenerationMatch"), _query(request, "ifGenerationNotMatch")
    if_meta, if_not_meta = _query(request, "ifMetagenerationMatch"), _query(request, "ifMetagenerationNotMatch")
    if if_generation is not None and if_generation != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if if_meta is not None and if_meta != metageneration:
        return HTTPStatus.PRECONDITION_FAILED
    held = ((if_not_generation is not None and if_not_generation == generation)
            or (if_not_meta is not None and metageneration is not None and if_not_meta == metageneration))
    if held:
        return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None


def _refuse(response, status: HTTPStatus) -> None:
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json(_PRECONDITION_FAILED)


def _with_read_preconditions(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is not None:  # a missing object answers 404 through the emulator itself
            status = precondition_status(request, obj, read=True)
            if status is not None:
                return _refuse(response, status)
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _download(original):
    def wrapped(request, response, storage, *args, **kwargs):
        obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
        result = original(request, response, storage, *args, **kwargs)
        if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return result
    return _with_read_preconditions(wrapped)


def _insert(original):
    def wrapped(request, response, storage, *args, **kwargs):
        kind = (request.query.get("uploadType") or [""])[0]
        if kind in ("media", "multipart"):
            name = request.query["name"][0] if "name" in request.query else (
                request.data["meta"].get("name") if kind == "multipart" else None)
            status = precondition_status(request, _current(storage, request.params["bucket_name"], name), read=False)
            if status is not None:
                return _refuse(response, status)
        return original(request, response, storage, *args, **kwargs)
    return wrapped


def _delete(original):
    def wrapped(request, response, storage, *args, **kwargs):
        obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is not None:
            status = precondition_status(request, obj, read=False)
            if status is not None:
                return _refuse(response, status)
        return original(request, response, storage, *args, **kwargs)
    return wrapped


def _get(original):
    checked = _with_read_preconditions(original)

    def wrapped(request, response, storage, *args, **kwargs):
        if (request.query.get("alt") or [""])[0] == "media":  # delegates to the module's (fixed) download
            return original(request, response, storage, *args, **kwargs)
        return checked(request, response, storage, *args, **kwargs)
    return wrapped


def install() -> None:
    """Replaces the emulator's download / get / insert / delete handlers (module and route table)."""
    replaced = {
        objects.download: _download(objects.download),
        objects.get: _get(objects.get),
        objects.insert: _insert(objects.insert),
        objects.delete: _delete(objects.delete),
    }
    objects.download = replaced[objects.download]  # what `objects.get` calls for `alt=media`
    server.HANDLERS = tuple((regex, {method: replaced.get(fn, fn) for method, fn in handlers.items()})
                            for regex, handlers in server.HANDLERS)


if __name__ == "__main__":
    install()
    main(sys.argv[1:])
