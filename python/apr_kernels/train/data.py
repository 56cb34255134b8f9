"""Training data: text files and folders -> one token stream -> fixed-length sequences.

* Files are read in the order given; folders are walked recursively in sorted order, keeping files
  with a text suffix (``TEXT_SUFFIXES``, also gzip-compressed as ``NAME.SUFFIX.gz``) and skipping
  hidden folders and ``__pycache__``. Files that are not valid UTF-8 are skipped.
* Documents: a text file is one document. A JSON Lines file (``.jsonl``, ``.jsonl.gz``: the usual
  export of corpora and datasets) holds one document per line, the string field ``text_field``
  (default ``"text"``) of each line's JSON object, or a supervised record (``chat.py``: ``messages``
  or ``prompt``/``completion``) whose non-answer tokens are no loss targets; a line that is none of
  these is an error naming the file and line (blank lines are skipped). A Parquet file (``.parquet``,
  Hugging Face datasets' format; needs ``pyarrow``) holds one document per row, from the column
  ``text_field`` or the ``messages`` / ``prompt`` + ``completion`` (or Alpaca's) columns, read a row
  group at a time; an Arrow IPC stream file (``.arrow``: the shards of a ``datasets`` ``save_to_disk``
  folder, whose two metadata JSON files a folder walk leaves out) likewise, a record batch at a time.
  A ``.json`` file holding a JSON array of records is read as JSON Lines are.
* Pre-tokenised corpora: a ``.bin`` file (also ``.bin.gz``) is a shard of aprender's corpus format
  (``apr tokenize encode-corpus``: little-endian u32 token ids, documents already separated by its
  end-of-text ids), taken as it is: no tokenising, no ids added. A folder of shards is read in sorted
  order, as aprender's ``ShardBatchIter`` reads it, leaving out its ``manifest.json``. Every id must be
  below the tokenizer's vocabulary size (an error names the file, the position and the id). A source
  of uncompressed shards only is read in place (``token_stream``, ``shard_stream.py``): mapped, not
  copied into the token cache.
  ``write_shards`` writes a stream in this format (``tokenize --shards DIR``).
* Loss targets: the int32 stream stores a token that is not a target as ``-1 - id`` (prompts and
  chat turns other than the assistant's); ``split_targets`` turns rows back into ids and targets
  with -100 there. Plain text has no such tokens.
* Each document is tokenised and followed by the tokenizer's end-of-text id, so documents are packed
  back to back with no padding. Special-token strings inside the text (``<|endoftext|>`` in a file
  about tokenizers) are encoded as ordinary text: only the pipeline's own ids end documents. The stream is int32 (4 bytes per token); files are tokenised by a
  few threads, in order.
* Sequence i is ``tokens[i*T : i*T + T + 1]`` (inputs are the first T, targets the last T), so every
  token except the first is a target exactly once.
* Record packing (optional, ``pack_records``; ``--packing records``): instead of cutting the stream
  every T tokens, each document (a supervised record: prompt and answer) is placed whole in one
  sequence, best-fit decreasing, the rest of the sequence padded with non-target end-of-text ids, so
  no answer is cut from its prompt. A document longer than a sequence still spans several.
* Document masking (optional, ``eos_id`` below): each batch also carries its document spans, found
  from the end-of-text ids on the host (``apr_kernels.model.Documents``), so that the model attends
  only within each document.
* Held-out split: the last ``eval_fraction`` of the sequences (at least one), taken from the end of
  the stream, unless separate eval data is given.
* Batches: sequence order is a fresh permutation per epoch from ``seed``; the only state is the number
  of sequences consumed so far (``position``), so resuming at a position replays the same batches.
  Several sources in set proportions: ``mixture.py``.
* Token cache (``cached_tokens``): the stream of a (files, tokenizer, max_tokens, text field) is saved once
  as an APR file (``tokens``, int32) in a cache folder, written to disk as it is produced (the corpus
  is never whole in memory, even the first time), and memory-mapped on this and later runs and
  ``--resume``s, by every rank of a torchrun job (zero-copy, one page cache per machine). The
  key covers each file's path, size and modification time and the tokenizer's fingerprint, so an
  edited file or another tokenizer makes a new entry.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

TEXT_SUFFIXES = frozenset({
    ".py", ".pyi", ".txt", ".md", ".rst", ".json", ".jsonl", ".toml", ".cfg", ".ini", ".yaml", ".yml",
    ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".js", ".ts", ".java", ".sh", ".html", ".css",
    ".tex", ".csv",
})


TEXT_FIELD = "text"  # the document field of JSON Lines records (Hugging Face datasets, most corpora)
TOKEN_SUFFIX = ".bin"  # a shard of pre-tokenised ids (aprender's corpus format: little-endian u32)
SHARD_MANIFEST = "manifest.json"  # written beside the shards by `apr tokenize encode-corpus`: not a document
DATA_SUFFIXES = TEXT_SUFFIXES | {".parquet", ".arrow", TOKEN_SUFFIX}  # what folder walks collect
# the metadata files of a `datasets` save_to_disk folder (beside its .arrow shards): not documents
DATASETS_METADATA = ("dataset_info.json", "state.json")


def _suffix(name: str) -> tuple[str, bool]:
    """(the suffix under an optional .gz, whether gzip-compressed): 'a.jsonl.gz' -> ('.jsonl', True)."""
    name = name.lower()
    gz = name.endswith(".gz")
    return Path(name[:-3] if gz else name).suffix, gz


def find_text_files(paths: Iterable[str | os.PathLike], suffixes=DATA_SUFFIXES) -> list[Path]:
    """Files named directly (any suffix) plus text files found under folders (sorted walk)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                saved = all(m in files for m in DATASETS_METADATA) and any(f.endswith(".arrow") for f in files)
                shards = any(_suffix(f)[0] == TOKEN_SUFFIX for f in files)
                out.extend(Path(root) / f for f in sorted(files)
                           if _suffix(f)[0] in suffixes and not f.startswith(".")
                           and not (saved and f in DATASETS_METADATA) and not (shards and f == SHARD_MANIFEST))
        else:
            raise FileNotFoundError(f"{p}: data path does not exist; expected a text file or a folder")
    if not out:
        raise ValueError(f"{', '.join(map(str, paths))}: no text files found (suffixes: "
                         f"{' '.join(sorted(suffixes))})")
    return out


def read_documents(files: Iterable[Path], text_field: str = TEXT_FIELD) -> Iterator[tuple[Path, str]]:
    """``(path, text)`` for each document of each UTF-8 file (others are skipped: binary data is not
    text): the whole file, or each line's ``text_field`` of a JSON Lines file."""
    for f in files:
        for text in documents_of(f, text_field):
            yield Path(f), text


def documents_of(path, text_field: str = TEXT_FIELD) -> Iterator[str | tuple[str, dict]]:
    """The non-empty documents of one file, in order: texts, and for supervised JSON Lines records
    ``("file:line", record)``. A text file is one document (none if it is not UTF-8: binary data is
    not text); JSON Lines and Parquet files are read a line / a row group at a time, so a file of any
    size streams. ValueError, naming the file and line, for a JSON Lines line that is not UTF-8 or
    neither an object with a string ``text_field`` nor a supervised record."""
    suffix, gz = _suffix(Path(path).name)
    if suffix == ".parquet" and not gz:
        yield from _parquet_documents(path, text_field)
        return
    if suffix == ".arrow" and not gz:
        yield from _arrow_documents(path, text_field)
        return
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field, gz)
        return
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if gz else Path(path).read_bytes()
        text = raw.decode("utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        return
    records = json_array_records(text, text_field) if suffix == ".json" else None
    if records is not None:  # a JSON array of records: each one a document, as JSON Lines lines are
        for i, record in enumerate(records):
            doc = _record_document(f"{path}[{i}]", record, text_field)
            if doc:
                yield doc
        return
    if text:
        yield text


def _jsonl_documents(path, text_field: str, gz: bool) -> Iterator[str | tuple[str, dict]]:
    """One document per line (lines split at "\\n" only: JSON strings may hold U+2028 and friends)."""
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                doc = _jsonl_line(path, lineno, raw, text_field)
                if doc:
                    yield doc
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from None


def _jsonl_line(path, lineno: int, raw: bytes, text_field: str) -> str | tuple[str, dict] | None:
    """The document of one JSON Lines line (None for a blank line or an empty text)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{lineno}: not UTF-8; expected one JSON object per line") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per "
                         f"line with a string field {text_field!r}") from None
    return _record_document(f"{path}:{lineno}", record, text_field)


def _record_document(where: str, record, text_field: str) -> str | tuple[str, dict] | None:
    """The document of one JSON record found at ``where`` (a JSON Lines line, an element of a JSON
    array): its ``text_field`` string, or ``(where, record)`` for a supervised record (ShareGPT and
    Alpaca forms read as ours, ``chat.normalised``); None for an empty text."""
    from .chat import is_supervised, normalised

    try:
        record = normalised(record)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str) and is_supervised(record):
        return where, record
    if not isinstance(value, str):
        got = (f"an object with fields {sorted(record)[:6]}" if isinstance(record, dict)
               else f"a JSON {type(record).__name__}")
        raise ValueError(f"{where}: expected a JSON object with a string field {text_field!r} "
                         f"(--text-field), or a 'messages', 'prompt'/'completion' or Alpaca record; got {got}")
    return value or None


def json_array_records(text: str, text_field: str = "text") -> list | None:
    """The records of a ``.json`` file that holds a JSON array of them (Alpaca's ``alpaca_data.json``,
    ``datasets``' ``to_json(lines=False)``): the array when it is a non-empty list of objects of which
    at least one is a document (a string ``text_field`` or a supervised record); None for any other
    JSON or non-JSON text (such a file is a text document, as before)."""
    from .chat import is_supervised, normalised

    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not (isinstance(data, list) and data and all(isinstance(r, dict) for r in data)):
        return None
    for r in data:
        try:
            r = normalised(r)
        except ValueError:
            return data  # an Alpaca record with a bad field: records after all (the reader names it)
        if isinstance(r.get(text_field), str) or is_supervised(r):
            return data
    return None


def _parquet_documents(path, text_field: str) -> Iterator[str | tuple[str, dict]]:
    """Documents of a Parquet file, row group by row group (see the module docstring)."""
    pq = _pyarrow(path, "Parquet").parquet
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 -- pyarrow's errors vary; any is a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    columns, kind = _table_columns(path, names, text_field)
    chunks = (_checked_rows(path, f"row group {g}", lambda g=g: pf.read_row_group(g, columns=columns))
              for g in range(pf.num_row_groups))
    yield from _table_documents(path, chunks, kind, text_field)


def _arrow_documents(path, text_field: str) -> Iterator[str | tuple[str, dict]]:
    """Documents of an Arrow IPC stream file (a shard of a ``datasets`` ``save_to_disk`` folder,
    ``data-00000-of-00001.arrow``), memory-mapped, record batch by record batch; columns as Parquet's."""
    pa = _pyarrow(path, "Arrow")
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        names = reader.schema.names
    except Exception as exc:  # noqa: BLE001 -- pyarrow's errors vary; any is a bad file
        raise ValueError(f"{path}: not a readable Arrow stream file ({type(exc).__name__}: {exc})") from None
    columns, kind = _table_columns(path, names, text_field)

    def chunks():
        for i in itertools.count():
            rows = _checked_rows(path, f"record batch {i}", lambda: next(reader, None), columns)
            if rows is None:
                return
            yield rows

    yield from _table_documents(path, chunks(), kind, text_field)


def _checked_rows(path, what: str, read, columns: list[str] | None = None) -> list[dict] | None:
    """``read()``'s table or record batch (None: the end) as row dicts, validated in full first: the
    files are input, and pyarrow trusts a damaged Arrow file's offsets and lengths (reading its rows
    crashed the process with SIGSEGV or SIGBUS) until ``validate(full=True)`` has checked them."""
    try:
        data = read()
        if data is None:
            return None
        if columns is not None:
            data = data.select(columns)
        data.validate(full=True)
        return data.to_pylist()
    except Exception as exc:  # noqa: BLE001 -- pyarrow's errors vary (ArrowInvalid, OSError, ...): a bad file
        raise ValueError(f"{path}: {what} is not readable ({type(exc).__name__}: {exc})") from None


def _pyarrow(path, what: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (pyarrow.parquet for Parquet files)
    except ImportError:
        raise ValueError(f"{path}: reading {what} needs pyarrow (pip install 'apr-kernels[data]')") from None
    return pyarrow


def _table_columns(path, names: list[str], text_field: str) -> tuple[list[str], str]:
    """(the columns to read, "text" or "record") of a table file with these column ``names``."""
    if text_field in names:
        return [text_field], "text"
    if "messages" in names or "conversations" in names:  # (ShareGPT's: read as messages)
        return ["messages" if "messages" in names else "conversations"], "record"
    if "prompt" in names and "completion" in names:
        return ["prompt", "completion"], "record"
    if "instruction" in names and "output" in names:  # Alpaca's (yahma/alpaca-cleaned and its kin)
        return [c for c in ("instruction", "input", "output", "system", "history") if c in names], "record"
    raise ValueError(f"{path}: expected a column {text_field!r} (--text-field), 'messages' (or ShareGPT's "
                     f"'conversations'), 'prompt' and 'completion', or Alpaca's 'instruction' and 'output'; "
                     f"got columns {names[:8]}")


def _table_documents(path, chunks, kind: str, text_field: str) -> Iterator[str | tuple[str, dict]]:
    """The documents of a table file's rows, read in ``chunks`` (lists of row dicts)."""
    from .chat import normalised

    row = 0
    for chunk in chunks:
        for rec in chunk:
            row += 1
            if kind == "record":
                try:
                    yield f"{path}:row {row}", normalised(rec)
                except ValueError as exc:
                    raise ValueError(f"{path}:row {row}: {exc}") from None
                continue
            value = rec[text_field]
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}:row {row}: column {text_field!r} holds {type(value).__name__}; "
                                 f"expected strings")
            if value:
                yield value


def marked_ids(record: dict, tokenizer, where: str) -> list[int]:
    """A supervised record (``chat.py``) as stream ids: non-targets as ``-1 - id``, then the end-of-text
    id (a target after a completion)."""
    from . import chat

    eos = getattr(tokenizer, "eos_id", None)
    text, spans, eos_target = chat.render(record, tokenizer, where)
    tokens, targets = chat.encode_with_targets(tokenizer, text, spans, where)
    ids = [t if ok else -1 - t for t, ok in zip(tokens, targets)]
    if eos is not None:
        ids.append(eos if eos_target else -1 - eos)
    return ids


def default_workers() -> int:
    """Tokenising threads: the CPUs shared among this machine's torchrun ranks, at most 8."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks))


def document_bos(tokenizer) -> int | None:
    """The id put before each document: the begin-of-text id when the tokenizer adds one, as Hugging
    Face tokenizers do (``tokenizer.add_bos_token``), else None."""
    extra = getattr(tokenizer, "extra", {}) or {}
    return getattr(tokenizer, "bos_id", None) if extra.get("tokenizer.add_bos_token") is True else None


def tokenize_files(files: Iterable[Path], tokenizer, *, max_tokens: int | None = None,
                   workers: int | None = None, text_field: str = TEXT_FIELD) -> torch.Tensor:
    """One int32 stream: each document's ids followed by the end-of-text id, and preceded by the
    begin-of-text id when the tokenizer adds one (``tokenizer.add_bos_token``: Llama 2/3, Mistral; a
    chat record's template writes its own). Stops after ``max_tokens``. (:func:`token_parts` yields
    the same stream in pieces; :func:`cached_tokens` writes them to disk as they come.)"""
    parts = list(token_parts(files, tokenizer, max_tokens=max_tokens, workers=workers, text_field=text_field))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def token_stream(files: Iterable[Path], tokenizer, *, max_tokens: int | None = None,
                 text_field: str = TEXT_FIELD, log=None):
    """:func:`tokenize_files`'s stream, except that a source of uncompressed shards only is read in
    place (``shard_stream.map_shards``: mapped, not copied; a ``SegmentedTokens`` when it spans
    several shards, which ``sequences`` and the held-out split take as they take a tensor)."""
    from .shard_stream import in_place, map_shards

    files = list(files)
    if in_place(files):
        stream = map_shards(files, getattr(tokenizer, "vocab_size", None), max_tokens)
        if log:
            log(f"{stream.numel()} tokens of {len(files)} pre-tokenised shard(s) read in place")
        return stream
    return tokenize_files(files, tokenizer, max_tokens=max_tokens, text_field=text_field)


BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this much text


SHARD_READ = 1 << 20  # bytes of a token shard read at a time


def token_shard(path, vocab_size: int | None = None, read_bytes: int = SHARD_READ) -> Iterator[torch.Tensor]:
    """The ids of a pre-tokenised shard (little-endian u32, optionally gzip-compressed) as int32
    pieces, ``read_bytes`` at a time. ValueError naming the file for a size that is no whole number of
    ids, and the position for an id at or above ``vocab_size`` (the int32 stream's limit when None)."""
    import numpy as np

    limit = shard_id_limit(vocab_size)
    opener = gzip.open if _suffix(Path(path).name)[1] else open
    done, rest = 0, b""
    with opener(path, "rb") as f:
        while block := f.read(read_bytes):
            block = rest + block
            whole = len(block) - len(block) % 4
            block, rest = block[:whole], block[whole:]
            ids = np.frombuffer(block, dtype="<u4")
            bad = np.flatnonzero(ids >= limit)
            if bad.size:
                i = int(bad[0])
                raise shard_id_error(path, done + i, int(ids[i]), vocab_size)
            done += ids.size
            if ids.size:
                yield torch.from_numpy(ids.astype(np.int32))
    if rest:
        raise shard_size_error(path, 4 * done + len(rest))


def shard_id_limit(vocab_size: int | None) -> int:
    """The ids a shard may hold are below this: the vocabulary, and the int32 stream's 2**31."""
    return min(vocab_size, 1 << 31) if vocab_size is not None else 1 << 31


def shard_id_error(path, position: int, token_id: int, vocab_size: int | None) -> ValueError:
    what = f"the tokenizer's vocabulary size {vocab_size}" if vocab_size is not None else "2**31"
    return ValueError(f"{path}: token {position} is id {token_id}, not below {what}; expected a corpus of "
                      f"little-endian u32 ids from this model's tokenizer")


def shard_size_error(path, nbytes: int) -> ValueError:
    return ValueError(f"{path}: {nbytes} bytes is no whole number of token ids; expected a pre-tokenised "
                      f"shard of little-endian u32 ids (4 bytes each)")


SHARD_TOKENS = 1 << 27  # tokens per shard written by write_shards (512 MiB of u32 ids)


def write_shards(parts: Iterable[torch.Tensor], folder, *, shard_tokens: int = SHARD_TOKENS,
                 manifest: dict | None = None) -> tuple[int, list[Path]]:
    """The token stream ``parts`` as aprender's pre-tokenised corpus in the new ``folder``:
    ``shard-00000.bin``... of at most ``shard_tokens`` little-endian u32 ids each, plus a
    ``manifest.json`` (``manifest`` and the shards' names and token counts; aprender's reader reads
    only the ``.bin`` files). Written into a temporary folder renamed at the end, so a failed run
    leaves nothing. ValueError for an existing ``folder`` and for tokens marked as no loss target
    (supervised records: the format has no such mark). Returns (tokens, shard paths)."""
    import json
    import shutil
    import tempfile

    folder = Path(folder)
    if folder.exists():
        raise ValueError(f"{folder}: already exists; expected a new folder for the shards (never overwritten)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens}; expected at least 1")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # (mkdtemp's 0700 would hide the corpus from the other users of a machine)
    shards: list[dict] = []
    total, out = 0, None
    try:
        for part in parts:
            if part.numel() and int(part.min()) < 0:
                raise ValueError("supervised records (prompts, chats) mark the tokens that are no loss targets, "
                                 "which aprender's shards cannot hold; expected plain text, JSON Lines text or "
                                 "pre-tokenised data")
            ids = part.numpy().astype("<u4")
            while ids.size:
                if out is None or shards[-1]["tokens"] == shard_tokens:
                    if out is not None:
                        out.close()
                    shards.append({"filename": f"shard-{len(shards):05d}.bin", "tokens": 0})
                    out = open(tmp / shards[-1]["filename"], "wb")
                take = ids[: shard_tokens - shards[-1]["tokens"]]
                out.write(take.tobytes())
                shards[-1]["tokens"] += take.size
                total += take.size
                ids = ids[take.size:]
        if out is not None:
            out.close()
        record = {**(manifest or {}), "format": "little-endian u32 token ids", "tokens": total,
                  "shards": shards}
        (tmp / SHARD_MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, folder)
    except BaseException:
        if out is not None:
            out.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total, [folder / s["filename"] for s in shards]


def _document_batches(files: Iterable[Path], text_field: str, batch_chars: int,
                      vocab_size: int | None = None) -> Iterator[list]:
    batch: list = []
    size = 0
    for path in files:
        shard = _suffix(Path(path).name)[0] == TOKEN_SUFFIX
        for doc in token_shard(path, vocab_size) if shard else documents_of(path, text_field):
            batch.append(doc)  # a text, a (where, record), or a shard's ids (counted as their bytes)
            size += len(doc) if isinstance(doc, str) else 4 * doc.numel() if shard else 1024
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def token_parts(files: Iterable[Path], tokenizer, *, max_tokens: int | None = None, workers: int | None = None,
                text_field: str = TEXT_FIELD, batch_chars: int = BATCH_CHARS) -> Iterator[torch.Tensor]:
    """The stream of :func:`tokenize_files` as int32 pieces, in order.

    Files are read one document at a time (JSON Lines and Parquet files stream) into batches of
    about ``batch_chars`` characters, which ``workers`` threads (default ``default_workers()``; the
    tiktoken and sentencepiece encoders release the GIL) encode a bounded window ahead: memory stays
    a few batches whatever the corpus size, and one big file is encoded in parallel too."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    eos = getattr(tokenizer, "eos_id", None)
    bos = document_bos(tokenizer)

    def encode(batch: list) -> torch.Tensor:
        pieces: list[torch.Tensor] = []
        ids: list[int] = []
        for doc in batch:
            if isinstance(doc, torch.Tensor):  # a shard's ids, as they are
                pieces += [torch.tensor(ids, dtype=torch.int32), doc]
                ids = []
                continue
            if isinstance(doc, str):
                if bos is not None:
                    ids.append(bos)
                ids += tokenizer.encode(doc, special=False)  # a "<|endoftext|>" in the text is just text
                if eos is not None:
                    ids.append(eos)
                continue
            ids += marked_ids(doc[1], tokenizer, doc[0])
        if not pieces:
            return torch.tensor(ids, dtype=torch.int32)
        return torch.cat([*pieces, torch.tensor(ids, dtype=torch.int32)])

    workers = workers or default_workers()
    total = 0
    batches = _document_batches(files, text_field, batch_chars, getattr(tokenizer, "vocab_size", None))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        try:
            while True:
                while len(pending) < 2 * workers:  # a bounded window of batches in flight
                    batch = next(batches, None)
                    if batch is None:
                        break
                    pending.append(pool.submit(encode, batch))
                if not pending:
                    return
                ids = pending.popleft().result()
                if max_tokens is not None and total + ids.numel() >= max_tokens:
                    yield ids[: max_tokens - total].clone()
                    return
                total += ids.numel()
                if ids.numel():
                    yield ids
        finally:
            for fut in pending:
                fut.cancel()


CACHE_ENV = "APR_KERNELS_CACHE"
# v2: JSON Lines documents, supervised records (non-targets stored as -1 - id), special-token
# strings in text encoded as text
_CACHE_VERSION = "apr-kernels token cache v3"  # v3: .json arrays of records, Alpaca records


def default_cache_dir() -> Path:
    """``$APR_KERNELS_CACHE/tokens``, else ``~/.cache/apr-kernels/tokens``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "tokens" if root else Path.home() / ".cache" / "apr-kernels" / "tokens"


def token_cache_key(files: list[Path], tokenizer, max_tokens: int | None, text_field: str = TEXT_FIELD) -> str:
    import hashlib

    from .chat import chat_template

    # the chat template renders chat records: two files of one vocabulary with other templates (a base
    # model's and its instruct model's default system prompts) give other streams
    template = hashlib.sha256((chat_template(tokenizer) or "").encode()).hexdigest()
    h = hashlib.sha256(f"{_CACHE_VERSION}\x00{tokenizer.fingerprint()}\x00{max_tokens}\x00{text_field}"
                       f"\x00{document_bos(tokenizer)}\x00{template}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"\x00{os.path.abspath(f)}\x00{st.st_size}\x00{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_tokens(files: Iterable[Path], tokenizer, *, max_tokens: int | None = None,
                  cache_dir: str | os.PathLike | None = None, log=None, text_field: str = TEXT_FIELD) -> torch.Tensor:
    """:func:`tokenize_files` through the token cache in ``cache_dir`` (created if missing): a hit is
    a memory-mapped int32 view of the cached file, a miss tokenises and saves the stream atomically.
    A tokenizer without ``fingerprint()`` or an unreadable entry falls back to tokenising (an
    unreadable entry is rewritten).

    Processes that miss the same entry at once (the ranks of a torchrun job on one machine) take
    turns on a lock file: the first tokenises with all the machine's CPUs while the others wait, then
    map its file. The lock is the operating system's (``flock``), released if its holder dies, so a
    crashed rank hands the work on instead of leaving the others waiting. No collective is involved,
    so a long first tokenisation cannot run into a process-group timeout."""
    import fcntl

    from .shard_stream import in_place

    files = list(files)
    if not hasattr(tokenizer, "fingerprint") or in_place(files):  # (shards: read in place, not cached)
        return token_stream(files, tokenizer, max_tokens=max_tokens, text_field=text_field, log=log)
    key = token_cache_key(files, tokenizer, max_tokens, text_field)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"tokens-{key[:32]}.apr"
    hit = _cache_hit(path, key, log)
    if hit is not None:
        return hit
    meta = {"token_cache.key": key, "token_cache.files": len(files), "token_cache.max_tokens": max_tokens}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process writes this entry
            hit = _cache_hit(path, key, log)  # it may have, meanwhile
            if hit is not None:
                return hit
            workers = max(1, min(8, os.cpu_count() or 1))  # the waiting ranks leave their CPUs to this one
            n = _stream_to_cache(token_parts(files, tokenizer, max_tokens=max_tokens, text_field=text_field,
                                             workers=workers), path, meta)
    except OSError as exc:  # a read-only or full cache folder costs the cache, not the run
        if log:
            log(f"token cache: could not write {path} ({exc}); tokenising in memory")
        return tokenize_files(files, tokenizer, max_tokens=max_tokens, text_field=text_field)
    if log:
        log(f"token cache: {n} tokens saved to {path}")
    return _cache_hit(path, key, None)


def _cache_hit(path: Path, key: str, log) -> torch.Tensor | None:
    """The cached stream of ``key`` mapped from ``path``, or None (missing, another key, unreadable)."""
    import apr_kernels
    from apr_kernels.errors import AprFormatError

    if not path.exists():
        return None
    try:
        with apr_kernels.open(path) as f:
            if f.metadata.get("token_cache.key") == key and f.info("tokens").dtype == "I32":
                tokens = f.get_tensor("tokens")
                if log:
                    log(f"token cache: {tokens.numel()} tokens from {path}")
                return tokens
    except (AprFormatError, KeyError, OSError) as exc:
        if log:
            log(f"token cache: {path} unreadable ({exc}); tokenising again")
    return None


def _stream_to_cache(parts: Iterator[torch.Tensor], path: Path, meta: dict) -> int:
    """Write the pieces to a raw int32 file next to ``path`` as they come, then the APR cache file from
    it in 16 MiB reads (a ``LazyTensor`` with ``chunks``): the stream is never whole in memory.
    Returns the token count."""
    import apr_kernels
    from apr_kernels.io import LazyTensor

    raw = path.with_name(f".{path.name}.{os.getpid()}.raw")
    n = 0
    try:
        with open(raw, "wb") as f:
            for part in parts:
                f.write(part.numpy())
                n += part.numel()

        def chunks():
            with open(raw, "rb") as f:
                while block := f.read(16 << 20):
                    yield block

        def whole():
            return torch.frombuffer(bytearray(raw.read_bytes()), dtype=torch.int32) if n else \
                torch.empty(0, dtype=torch.int32)

        apr_kernels.save({"tokens": LazyTensor("I32", (n,), whole, chunks)}, path, metadata=meta)
    finally:
        raw.unlink(missing_ok=True)
    return n


def num_sequences(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def sequences(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View [n, seq_len + 1] of the packed sequences (consecutive rows share one token); of shards read
    in place (``shard_stream.SegmentedTokens``) the same rows, read when indexed."""
    if not isinstance(tokens, torch.Tensor):
        return tokens.sequences(seq_len)
    n = num_sequences(tokens.numel(), seq_len)
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len) if n else tokens.new_empty(0, seq_len + 1)


PACKINGS = ("stream", "records")


def pack_records(tokens: torch.Tensor, seq_len: int, eos_id: int) -> torch.Tensor:
    """The stream re-laid so that ``sequences(out, seq_len)`` holds every document whole in one row.

    Documents end at ``eos_id`` (target or not). Consecutive rows share one token, so row r is
    ``[pad, content (seq_len - 1 tokens), pad]`` with the shared pads a non-target ``eos_id``: a
    document of up to ``seq_len - 1`` tokens fits in one row, a longer one is cut into pieces of that
    size (its last piece packed like a short document). Pieces go to rows best-fit decreasing (each
    into the fullest row with room, longest first; ties in stream order), so rows are few and full;
    the rest of a row is non-target ``eos_id`` padding (each pad, being an end-of-text id, is a
    document of its own under document masking). Deterministic; int32 out."""
    cap = seq_len - 1
    if cap < 1:
        raise ValueError(f"pack_records: seq_len={seq_len}; expected >= 2")
    if not isinstance(tokens, torch.Tensor):  # shards read in place: the new layout needs them whole
        tokens = tokens.tensor()
    flat = tokens.reshape(-1)  # int32 (the mapped cache: not copied)
    n = flat.numel()
    if n == 0:
        return tokens.new_empty(0, dtype=torch.int32)
    ends = ((flat == eos_id) | (flat == -1 - eos_id)).nonzero().flatten() + 1
    if ends.numel() == 0 or int(ends[-1]) != n:
        ends = torch.cat([ends, torch.tensor([n])])  # a last document without its end-of-text id
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
    lengths = ends - starts
    # pieces of at most cap tokens: whole rows for long documents, then their remainder
    per = (lengths + cap - 1) // cap
    doc = torch.repeat_interleave(torch.arange(len(lengths)), per)
    first = torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
    k = torch.arange(len(doc)) - first  # piece index within its document
    p_start = starts[doc] + k * cap
    p_len = torch.minimum(lengths[doc] - k * cap, torch.tensor(cap))
    sizes = p_len.tolist()
    order = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)  # stable: ties keep stream order
    row_of, offset = _best_fit([sizes[i] for i in order], cap)
    rows = max(row_of) + 1
    out = torch.full((rows * seq_len + 1,), -1 - eos_id, dtype=torch.int32)
    sel = torch.tensor(order)
    dest0 = torch.tensor(row_of) * seq_len + 1 + torch.tensor(offset)  # after the row's leading pad
    lens, src0 = p_len[sel], p_start[sel]
    # copy the pieces a few million tokens at a time (the index arithmetic is int64 per token)
    ends_at = torch.cumsum(lens, 0)
    a = 0
    while a < len(lens):
        b = int(torch.searchsorted(ends_at, ends_at[a] - lens[a] + (1 << 23), right=True))
        b = max(b, a + 1)
        ln = lens[a:b]
        before = torch.cumsum(ln, 0) - ln  # tokens of the chunk ahead of each piece
        idx = torch.arange(int(ln.sum())) - torch.repeat_interleave(before, ln)
        out[torch.repeat_interleave(dest0[a:b], ln) + idx] = flat[torch.repeat_interleave(src0[a:b], ln) + idx]
        a = b
    return out


def _best_fit(lengths: list[int], cap: int) -> tuple[list[int], list[int]]:
    """Best-fit bin packing of ``lengths`` (in the order given) into bins of ``cap``: (bin, offset)
    of each. Open bins are bucketed by free space; a tree of bucket counts finds the smallest free
    space >= a length in O(log cap)."""
    size = 1 << (cap + 1).bit_length()
    tree = [0] * (2 * size)  # tree[size + free] = open bins with that much room; parents: sums
    buckets: list[list[int]] = [[] for _ in range(cap + 1)]
    used: list[int] = []  # tokens placed per bin

    def add(free: int, delta: int) -> None:
        i = size + free
        while i:
            tree[i] += delta
            i >>= 1

    def smallest_at_least(x: int) -> int | None:
        # walk up from leaf x until a right sibling subtree has bins, then down to its leftmost leaf
        i = size + x
        if tree[i]:
            return x
        while i > 1:
            if i & 1 == 0 and tree[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] else 2 * i + 1
                return i - size
            i >>= 1
        return None

    row_of, offset = [], []
    for n in lengths:
        free = smallest_at_least(n)
        if free is None:  # a new bin
            b = len(used)
            used.append(0)
        else:
            b = buckets[free].pop()
            add(free, -1)
        row_of.append(b)
        offset.append(used[b])
        used[b] += n
        left = cap - used[b]
        if left > 0:
            buckets[left].append(b)
            add(left, 1)
    return row_of, offset


def split_holdout(tokens: torch.Tensor, seq_len: int, eval_fraction: float = 0.05,
                  max_eval_sequences: int | None = None, *, where: str = "data"):
    """``(train_tokens, eval_tokens)``: the last sequences of the stream are held out."""
    n = num_sequences(tokens.numel(), seq_len)
    if n < 2:
        raise ValueError(f"{where}: {tokens.numel()} tokens make {n} sequence(s) of {seq_len}+1 tokens; "
                         f"expected at least 2 (one to train on, one held out): add data or lower --seq-len")
    n_eval = max(1, int(round(n * eval_fraction)))
    if max_eval_sequences is not None:
        n_eval = max(1, min(n_eval, max_eval_sequences))
    n_eval = min(n_eval, n - 1)
    cut = (n - n_eval) * seq_len
    tail = tokens[cut:]
    # (of shards read in place, the held-out tail joined: it is small, and eval data are tensors)
    return tokens[: cut + 1], tail if isinstance(tail, torch.Tensor) else tail.tensor()


@dataclass
class BatchStream:
    """Batches of sequence indices: per-epoch permutations of ``range(n)`` seeded by ``seed + epoch``.

    ``position`` counts sequences consumed; batches may straddle an epoch boundary.
    """

    n: int
    seed: int = 0
    position: int = 0

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError("training data holds no complete sequence")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def next(self, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=torch.int64)
        for j in range(count):
            epoch, i = divmod(self.position + j, self.n)
            out[j] = self._permutation(epoch)[i]
        self.position += count
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.n


def split_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[B, T + 1]`` of the stream -> int64 inputs ``[B, T]`` and next-token targets ``[B, T]``,
    a target being -100 (ignored by the loss) where the stream marks a non-target token (``-1 - id``)."""
    rows = rows.long()  # the token cache keeps int32; the loss wants int64 targets
    marked = rows < 0
    ids = torch.where(marked, -1 - rows, rows)
    return ids[:, :-1], ids[:, 1:].masked_fill(marked[:, 1:], -100)


def batch(seqs: torch.Tensor, index: torch.Tensor, device=None, eos_id: int | None = None):
    """``(x, y, documents)``: inputs and next-token targets [B, T] for the given sequence rows
    (``split_targets``), and with ``eos_id`` the inputs' document spans (``Documents``, computed on the
    host before the move to ``device``), else None."""
    x, y = split_targets(seqs[index])
    documents = None
    if eos_id is not None:
        from apr_kernels.model.documents import Documents

        documents = Documents.from_eos(x, eos_id)
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        documents = documents.to(device, non_blocking=True) if documents is not None else None
    return x, y, documents


@torch.no_grad()
def eval_sequences(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The packed evaluation sequences: the first ``max_tokens // seq_len`` (at least one, all when
    ``max_tokens`` is None); an error when there is not even one."""
    seqs = sequences(tokens, seq_len)
    if max_tokens is not None:
        seqs = seqs[: max(1, max_tokens // seq_len)]
    if len(seqs) == 0:
        raise ValueError(f"evaluation data: {tokens.numel()} tokens; expected at least {seq_len + 1} "
                         f"(one sequence of --seq-len {seq_len} plus its target)")
    return seqs


def target_bytes(tokens: torch.Tensor, seq_len: int, tokenizer, max_tokens: int | None = None) -> int:
    """The UTF-8 bytes of the text the targets ``evaluate`` scores stand for (``tokenizer.token_bytes``;
    special tokens such as the end-of-text id stand for none): the denominator of bits per byte,
    the loss measure that compares models across tokenizers."""
    seqs = eval_sequences(tokens, seq_len, max_tokens)
    lengths, total = byte_lengths(tokenizer), 0
    for start in range(0, len(seqs), 4096):  # (rows a few at a time: shards read in place stay unread)
        _, y = split_targets(seqs[start:start + 4096])
        total += int(lengths[y[y != -100].long()].sum())
    return total


def byte_lengths(tokenizer) -> torch.Tensor:
    """``[vocab]`` int64: each token's length in bytes of text (special tokens 0). Cached on the tokenizer."""
    cached = getattr(tokenizer, "_byte_lengths", None)
    if cached is None:
        special = set((getattr(tokenizer, "special_tokens", None) or {}).values())
        cached = torch.tensor([0 if i in special else len(tokenizer.token_bytes(i))
                               for i in range(tokenizer.vocab_size)], dtype=torch.int64)
        tokenizer._byte_lengths = cached
    return cached


@torch.no_grad()  # no autograd graph (and no fused-loss gradients) during evaluation
def evaluate(model, tokens: torch.Tensor, seq_len: int, *, batch_size: int = 8, device=None,
             autocast_dtype: torch.dtype | None = None, max_tokens: int | None = None,
             eos_id: int | None = None, env=None) -> tuple[float, int]:
    """Mean next-token loss over all packed sequences of ``tokens`` (in order) and the target count.

    ``max_tokens`` keeps the first ``max_tokens // seq_len`` sequences (at least one); ``eos_id``:
    document masking (as in training with it). ``env``: under torchrun, this rank scores every N-th
    batch (``rank_share.rank_batches``) and the sums are taken over the ranks.
    """
    from .rank_share import rank_batches, summed

    seqs = eval_sequences(tokens, seq_len, max_tokens)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in rank_batches(len(seqs), batch_size, env)[0]:
        x, y, docs = batch(seqs, torch.arange(start, min(start + batch_size, len(seqs))), None, eos_id)
        count += int((y != -100).sum())  # counted on the host, before the move
        x, y = x.to(device), y.to(device)
        docs = docs.to(device) if docs is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            total += model.loss(x, y, reduction="sum", documents=docs).double()
    model.train(was_training)
    total, count = summed(env, torch.stack([total.cpu(), torch.tensor(float(count), dtype=torch.float64)])).tolist()
    count = int(count)
    return (total / count if count else float("nan")), count  # NaN: no targets (all prompt)
