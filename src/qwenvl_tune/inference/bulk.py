"""Bulk extraction: a folder or list of documents -> one JSON line per document, resumable, data-parallel.

    qwenvl-tune predict --run runs/NAME --input scans/ --output out.jsonl [--devices 2]

- Inputs: every image file and PDF in a folder (sorted; a PDF is one document of all its pages), or a
  ``.jsonl`` list whose lines are ``{"image": path, "prompt": optional}``, ``{"images": [page paths],
  "id": optional}`` or a bare path string (paths relative to the list's folder).
- Output lines are appended as batches finish (under a file lock, so several processes share one
  file), each ``{"input", "pages", "json", "valid", "output", "truncated"}`` (plus ``images`` for a
  document of several files) or ``{"input", "error"}`` for an input that could not be read. Nothing
  stops on a bad file. ``input`` is the file, the line's ``id``, or the page files joined by ``+``.
- Resumable: inputs already in the output are skipped; a line cut off by a crash is discarded
  first. So an input is written exactly once, also across kills and restarts.
- One command per output: an exclusive lock (``OUTPUT.lock``, holding the pid) makes a second command on
  the same output refuse; the kernel drops it when the command dies.
- ``devices > 1`` starts one worker process per device (GPU ``cuda:i``, or CPU processes), each
  taking every N-th pending input; the kernel kills the workers when the command dies, so none writes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from ..data.records import DataError, loads_json, read_text_file
from ..errors import QwenVLTuneError
from ..rundir import RunDir, held

DOCUMENT_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".pdf"}


def list_inputs(source: str | Path) -> list[dict[str, Any]]:
    """Inputs as [{"input": name, "files": [paths], "prompt": str|None}] from a folder or a .jsonl list.

    Raises:
        DataError: the source is missing, holds no document, or (a list) has bad lines: every bad line is named
            by line and field, before anything is extracted.
    """
    source = Path(source)
    if source.is_dir():
        found = [{"input": str(p), "files": [str(p)], "prompt": None} for p in sorted(source.rglob("*"))
                 if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES]
        if not found:
            raise DataError(f"no image or PDF files in this folder or below it (looked for "
                            f"{', '.join(sorted(DOCUMENT_SUFFIXES))})", source)
        return found
    if source.suffix != ".jsonl":
        raise DataError("--input takes a folder of images and PDFs or a .jsonl list of documents "
                        "(to extract single files: qwenvl-tune predict --run RUN FILE ...)", source)
    out, names, bad = [], {}, []
    for n, line in enumerate(read_text_file(source).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(_list_item(line, n, source, names))
        except DataError as e:
            bad.append(e)
    if bad:
        listing = "\n".join(f"  {e}" for e in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} bad line(s) of {len(bad) + len(out)}; nothing was extracted:\n{listing}", source)
    if not out:
        raise DataError("the list names no document", source)
    return out


def _list_item(line: str, n: int, source: Path, names: dict[str, int]) -> dict[str, Any]:
    try:
        item = loads_json(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at column {e.colno}: {e.msg}", source, n) from None
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict):
        raise DataError("each line must be a path or an object with 'image' or 'images'", source, n)
    files = item.get("images", [item.get("image")] if "image" in item else None)
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise DataError("each line needs an 'image' path or an 'images' list of page paths", source, n,
                        "images" if "images" in item else "image")
    if item.get("prompt") is not None and not isinstance(item["prompt"], str):
        raise DataError(f"'prompt' must be a string, got {type(item['prompt']).__name__}", source, n, "prompt")
    if "id" in item and not isinstance(item["id"], (str, int)):
        raise DataError(f"'id' must be a string or a number, got {type(item['id']).__name__}", source, n, "id")
    paths = [str(Path(f) if Path(f).is_absolute() else source.parent / f) for f in files]
    name = str(item["id"]) if item.get("id") not in (None, "") else "+".join(paths)
    if name in names:
        raise DataError(f"input '{name}' is listed twice (line {names[name]} too; give each line its own 'id')",
                        source, n, "id")
    names[name] = n
    return {"input": name, "files": paths, "prompt": item.get("prompt")}


def completed_inputs(output: Path) -> set[str]:
    """Inputs already written; a trailing partial line (from a crash mid-write) is removed first."""
    if not output.exists():
        return set()
    with open(output, "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        data = fh.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            fh.truncate(cut)
            data = data[:cut]
        fcntl.flock(fh, fcntl.LOCK_UN)
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(json.loads(line)["input"])
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def _append(output: Path, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(output, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh, fcntl.LOCK_UN)


class OutputLocked(QwenVLTuneError):
    """Another bulk extraction holds the output file."""


def output_lock(output: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``output`` for the whole command (``OUTPUT.lock`` beside it, naming its holder, removed
    when done); the kernel drops it when its process dies, so a killed command never leaves the output locked."""
    return held(output.with_name(output.name + ".lock"), lambda holder: OutputLocked(
        f"{output} is being written by another qwenvl-tune predict ({holder}); wait for it to finish, or choose "
        f"another --output"), remove=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the command that started it dies (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the parent's exit still ends the workers' pipes
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker(rank: int, world: int, run_dir: str, items: list[dict], output: str, which: str, batch_size: int,
            constrained: bool | None, counter: Any, overrides: dict[str, Any] | None = None,
            parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    import torch

    from .session import Predictor

    device = f"cuda:{rank}" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "cpu"
    if device == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    run = RunDir.open(run_dir).with_overrides(overrides)
    predictor = Predictor.from_run(run, which, constrained=constrained, device=device)
    mine = items[rank::world]

    def read(chunk: list[dict]) -> tuple[list[dict], list, list[dict[str, Any]]]:
        ok_items, images, errors = [], [], []
        for it in chunk:
            try:
                images.append(predictor.load_pages(it["files"]))
                ok_items.append(it)
            except Exception as e:  # noqa: BLE001 - recorded per input; the others go on
                errors.append({"input": it["input"], "error": str(e)})
        return ok_items, images, errors

    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    # the next batch's images are decoded on a thread while the GPU generates the current one
    pool = ThreadPoolExecutor(max_workers=1)
    ahead = pool.submit(read, chunks[0]) if chunks else None
    for i, chunk in enumerate(chunks):
        ok_items, images, rows = ahead.result()
        ahead = pool.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
        if images:
            results = predictor.predict(images, [it["prompt"] for it in ok_items], batch_size=len(images))
            rows += [{"input": it["input"], **({"images": it["files"]} if len(it["files"]) > 1 else {}), **res}
                     for it, res in zip(ok_items, results)]
        _append(Path(output), rows)
        if counter is not None:
            with counter.get_lock():
                counter.value += len(chunk)
    pool.shutdown()


def bulk_predict(run_dir: str | Path, source: str | Path, output: str | Path, *, devices: int = 1,
                 batch_size: int | None = None, which: str = "best", constrained: bool | None = None,
                 progress: bool = True, overrides: dict[str, Any] | None = None) -> dict[str, int]:
    """Extract every input not yet in ``output``. Returns counts: total, skipped (already done), written, errors."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    items = list_inputs(source)
    with output_lock(output):
        done = completed_inputs(output)
        pending = [it for it in items if it["input"] not in done]
        batch_size = batch_size or RunDir.open(run_dir).with_overrides(overrides).config.generate.batch_size
        devices = max(1, min(devices, len(pending))) if pending else 1
        if pending:
            _extract(str(run_dir), pending, str(output), which, batch_size, constrained, overrides, devices, progress)
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"total": len(items), "skipped": len(items) - len(pending), "written": len(pending),
            "errors": sum(1 for r in written if "error" in r), "lines": len(written)}


def _extract(run_dir: str, pending: list[dict], output: str, which: str, batch_size: int, constrained: bool | None,
             overrides: dict[str, Any] | None, devices: int, progress: bool) -> None:
    """Run the workers (in this process for one device) with one progress bar over all of them."""
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="extracting", unit="doc")
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(0.5):
            if bar is not None:
                bar.n = counter.value
                bar.refresh()

    ticker = threading.Thread(target=refresh, daemon=True)
    ticker.start()
    try:
        if devices == 1:
            _worker(0, 1, run_dir, pending, output, which, batch_size, constrained, counter, overrides)
            return
        procs = [ctx.Process(target=_worker, args=(r, devices, run_dir, pending, output, which, batch_size,
                                                     constrained, counter, overrides, os.getpid()))
                 for r in range(devices)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} worker process(es) failed (exit codes {failed}); "
                               f"run the same command again to continue where they stopped")
    finally:
        stop.set()
        if bar is not None:
            bar.n = counter.value
            bar.close()
