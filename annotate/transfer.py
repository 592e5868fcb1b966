"""Files over HTTP: the import upload's cap and form, and the export download, which the pages and the API share.

Plain plumbing, no page: the import page and the API's upload read the same form with the same
bounds, and the export page and the API's export stream the same file.
"""

from __future__ import annotations

import tempfile

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import FileResponse, QueryDict
from django.utils.datastructures import MultiValueDict

from annotate.models import Pair

EXPORT_FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}  # format asked -> the file's suffix


class CappedUpload(FileUploadHandler):
    """Refuses an upload over the cap before it is stored: at once by its Content-Length, else as it grows."""

    FORM_SLACK = 64 * 1024  # the form's other fields and the multipart headers around the file

    def __init__(self, request, cap: int):
        super().__init__(request)
        self.cap, self.received, self.refused = cap, 0, False

    @classmethod
    def install(cls, request) -> CappedUpload:
        """Cap the request's upload at PAIRLOOP_MAX_UPLOAD_BYTES, ahead of Django's handlers; call before the body
        is read."""
        capped = cls(request, settings.PAIRLOOP["MAX_UPLOAD_BYTES"])
        request.upload_handlers.insert(0, capped)
        return capped

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length > self.cap + self.FORM_SLACK:
            self.refused = True
            return QueryDict(encoding=encoding), MultiValueDict()  # parsed as empty: the body is never read
        return None

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.cap:
            self.refused = True
            raise StopUpload(connection_reset=False)
        return raw_data

    def file_complete(self, file_size):
        return None


def readable_size(n: int) -> str:
    """A byte count as a person reads it: bytes, MiB or GiB."""
    if n >= 1024**3:
        return f"{n / 1024**3:.4g} GiB"
    return f"{n / 1024**2:.4g} MiB" if n >= 1024**2 else f"{n} bytes"


def upload_too_large(cap: int) -> str:
    """Why an upload over `cap` bytes was refused."""
    return (f"The file is larger than the upload limit of {readable_size(cap)} (PAIRLOOP_MAX_UPLOAD_BYTES): "
            "nothing was stored.")


def whole_number(value: str | None, what: str, minimum: int | None = None,
                 maximum: int | None = None) -> int | None:
    """A form field's whole number (None when empty); raises ValueError with a message naming the field."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, not {value!r}.") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{what} must be at least {minimum}.")
    if maximum is not None and number > maximum:
        raise ValueError(f"{what} must be at most {maximum}.")
    return number


def import_options(form: QueryDict) -> tuple[int | None, int]:
    """An import form's pairs per prompt (None: every pair) and priority (0 when empty), each in its bounds;
    raises ValueError naming the field."""
    pairs_per_prompt = whole_number(form.get("pairs_per_prompt"), "Pairs per prompt", 1)
    priority = whole_number(form.get("priority"), "Priority", *Pair.PRIORITY_RANGE) or 0
    return pairs_per_prompt, priority


class TempFileDownload(FileResponse):
    """A download of an open temporary file, closed (and so deleted) with the response.

    Under ASGI, Django's FileResponse reads a plain file whole into memory first; this one reads it a
    block at a time there too."""

    def __init__(self, handle, **kwargs):
        self.handle = handle  # file_to_stream is unset when streaming_content is replaced (the test client)
        super().__init__(handle, **kwargs)

    async def __aiter__(self):
        read = sync_to_async(self.handle.read, thread_sensitive=False)
        while chunk := await read(self.block_size):
            yield chunk


class ExportRefused(ValueError):
    """An export asked in a format that is not offered; the message names the option."""


def export_download(campaign, *, format: str, raw: bool, trl_format: str,
                    axis: str | None = None) -> TempFileDownload:
    """The campaign's preference pairs on one axis (None: the first) or, raw, every judgment, as a file
    download, as export_pairs writes them; raises ExportRefused when format, trl_format or axis is not one
    offered."""
    from annotate.exporting import (  # pyarrow: loaded here
        TRL_FORMATS,
        ExportError,
        export_axis,
        export_to_file,
    )

    if format not in EXPORT_FORMATS:
        raise ExportRefused("format must be jsonl or parquet")
    if trl_format not in TRL_FORMATS:
        raise ExportRefused("trl_format must be auto, conversational or standard")
    try:
        export_axis(campaign, axis, raw)
    except ExportError as exc:
        raise ExportRefused(str(exc)) from None
    kind = "judgments" if raw else ("pairs" if axis is None else f"pairs-{axis}")
    name = f"{campaign.slug}-{kind}{EXPORT_FORMATS[format]}"
    handle = tempfile.TemporaryFile(prefix="pairloop-export-")  # unnamed: its space returns when it closes
    try:
        export_to_file(campaign, handle, format=format, raw=raw, trl_format=trl_format, axis=axis)
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return TempFileDownload(handle, as_attachment=True, filename=name)
