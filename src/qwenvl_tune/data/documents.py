"""Documents -> page images. A document is one or more input files; each file is an image (one page) or a
PDF (every page, rendered here).

Where a file comes from is a ``Source``: a path on disk (``FileSource``) or an image held in a dataset row
(``formats.CellSource``). ``load_pages`` turns a record's sources into its pages, in order, under the
limits of ``PageLimits`` (from ``data.*``): the decompression-bomb guard per image, the render budget per
PDF page, and the number of pages per document. Every error names the file, the row and the page.

PDF pages are rendered with PDFium (pypdfium2) at the scale that makes a page's area ``data.max_pixels``,
the largest area the processor would keep, so no detail is rendered only to be resized away and none is
lost to rendering below it. The scale is capped at ``MAX_DPI``, so a tiny page is not blown up.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image

from .images import MAX_ASPECT, MIN_SIDE, load_image, load_image_bytes
from .records import ImageError

PDF_MAGIC = b"%PDF-"
MAX_DPI = 300
# PDFium keeps global state and is not thread-safe; the data check decodes on threads.
_PDFIUM = threading.Lock()


class Source(Protocol):
    """One input file of a document."""

    @property
    def name(self) -> str:
        """How errors and reports call it (a path, or dataset:row [column])."""

    def read(self) -> bytes:
        """The file's bytes."""


@dataclass(frozen=True)
class FileSource:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self) -> bytes:
        return self.path.read_bytes()

    def is_pdf(self) -> bool:
        try:
            with open(self.path, "rb") as fh:
                return fh.read(len(PDF_MAGIC)) == PDF_MAGIC
        except OSError:
            return False


@dataclass(frozen=True)
class BytesSource:
    """A file given as bytes: an upload (the service, the OpenAI-compatible route) or a data: URI of a row."""

    data: bytes
    filename: str = "upload"

    @property
    def name(self) -> str:
        return self.filename

    def read(self) -> bytes:
        return self.data

    def is_pdf(self) -> bool:
        return is_pdf(self.data)


@dataclass(frozen=True)
class PageLimits:
    """The limits a document is read under (from ``data.*``)."""

    max_image_pixels: int = 178_956_970  # per image file: decompression-bomb guard
    render_pixels: int = 1280 * 28 * 28  # per PDF page: the area it is rendered at (data.max_pixels)
    max_pages: int = 8  # per document

    @classmethod
    def from_config(cls, data: Any) -> "PageLimits":
        return cls(data.max_image_pixels, data.max_pixels, data.max_pages)


def is_pdf(data: bytes) -> bool:
    return data[: len(PDF_MAGIC)] == PDF_MAGIC


def _where(where: tuple[str | None, int | None], name: str) -> tuple[str, int | None]:
    return (where[0] or name), where[1]


def _open_pdf(data: bytes, name: str, where: tuple[str | None, int | None], field: str) -> Any:
    import pypdfium2 as pdfium

    file, line = _where(where, name)
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code == 4 and b"/Encrypt" in data:  # FPDF_ERR_PASSWORD
            msg = "PDF is encrypted (password-protected); save an unprotected copy"
        elif b"/Count 0" in data and b"/Kids" in data:
            msg = "PDF has no pages"
        else:
            detail = str(e).removeprefix("Failed to load document (").removesuffix(").")
            msg = f"corrupt or unreadable PDF ({detail})"
        raise ImageError(f"{name}: {msg}", file, line, field) from None
    if len(pdf) == 0:
        pdf.close()
        raise ImageError(f"{name}: PDF has no pages", file, line, field)
    return pdf


def render_pdf(data: bytes, name: str, limits: PageLimits, where: tuple[str | None, int | None] = (None, None),
               field: str = "image", first_page: int = 1) -> list[Image.Image]:
    """Every page of a PDF as an RGB image of about ``limits.render_pixels`` pixels."""
    file, line = _where(where, name)
    pages: list[Image.Image] = []
    with _PDFIUM:
        pdf = _open_pdf(data, name, where, field)
        try:
            n = len(pdf)
            if n > limits.max_pages:
                raise ImageError(f"{name}: PDF has {n} pages, over data.max_pages={limits.max_pages}",
                                 file, line, field)
            for i in range(n):
                page = pdf[i]
                try:
                    w, h = page.get_size()  # points (1/72 inch)
                    label = f"{name}: page {i + 1} of {n}"
                    if w <= 0 or h <= 0 or max(w, h) / min(w, h) > MAX_ASPECT:
                        raise ImageError(f"{label}: page size {w:.0f}x{h:.0f} pt cannot be read as an image "
                                         f"(empty, or aspect ratio over {MAX_ASPECT}:1)", file, line,
                                         f"{field} page {first_page + i}")
                    scale = min(math.sqrt(limits.render_pixels / (w * h)), MAX_DPI / 72)
                    bitmap = page.render(scale=scale, may_draw_forms=True)
                    im = bitmap.to_pil().convert("RGB")
                    bitmap.close()
                finally:
                    page.close()
                if min(im.size) < MIN_SIDE:
                    raise ImageError(f"{label}: rendered at {im.size[0]}x{im.size[1]}, under the model's minimum of "
                                     f"{MIN_SIDE} px a side", file, line, f"{field} page {first_page + i}")
                pages.append(im)
        finally:
            pdf.close()
    return pages


def load_document(source: Source, limits: PageLimits, where: tuple[str | None, int | None] = (None, None),
                  field: str = "image", first_page: int = 1) -> list[Image.Image]:
    """The pages of one input file: one for an image, every page for a PDF."""
    if isinstance(source, FileSource):
        if not source.is_pdf():
            try:
                return [load_image(source.path, max_pixels=limits.max_image_pixels, where=where)]
            except ImageError as e:
                raise ImageError(e.reason, e.file, e.line, field) from None
        try:
            data = source.read()
        except OSError as e:
            file, line = _where(where, source.name)
            raise ImageError(f"{source.name}: cannot read: {e.strerror}", file, line, field) from None
    else:
        data = source.read()
    if is_pdf(data):
        return render_pdf(data, source.name, limits, where, field, first_page)
    if where[0] is None:
        return [load_image_bytes(data, source.name, max_pixels=limits.max_image_pixels)]
    return [_load_bytes_at(data, source.name, limits, where, field)]


def _load_bytes_at(data: bytes, name: str, limits: PageLimits, where: tuple[str | None, int | None],
                   field: str) -> Image.Image:
    try:
        return load_image_bytes(data, name, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise ImageError(e.reason, where[0], where[1], field) from None


def load_pages(sources: Sequence[Source], limits: PageLimits, where: tuple[str | None, int | None] = (None, None)
               ) -> list[Image.Image]:
    """A document's pages in order: each source's pages, one after the other, at most ``limits.max_pages``."""
    pages: list[Image.Image] = []
    for k, source in enumerate(sources):
        field = f"images[{k}]" if len(sources) > 1 else "image"
        pages += load_document(source, limits, where, field, first_page=len(pages) + 1)
        if len(pages) > limits.max_pages:
            file, line = _where(where, source.name)
            raise ImageError(f"document has {len(pages)}+ pages (after {source.name}), over data.max_pages="
                             f"{limits.max_pages}", file, line, field)
    return pages


def load_files(paths: Sequence[str | Path], limits: PageLimits) -> list[Image.Image]:
    """The pages of a document given as file paths (images and PDFs), in order."""
    return load_pages([FileSource(Path(p)) for p in paths], limits)


def pdf_bytes_from_images(pages: Sequence[Image.Image]) -> bytes:
    """A PDF holding these images as pages (72 dpi: one pixel a point), for sample data and tests."""
    buf = io.BytesIO()
    first, *rest = [p.convert("RGB") for p in pages]
    first.save(buf, "PDF", save_all=True, append_images=rest, resolution=72.0)
    return buf.getvalue()
