"""Training-data tokenisation: MB/s and peak memory of turning text files into one token stream.

    python3 bench/bench_tokenize.py [--smoke | --quick] [--out DIR] [--mb MB] [--tokenizer qwen2|mistral]

Corpus: the first ``--mb`` megabytes (default 64, i.e. all of it: about 31 MB; quick 16; smoke 1) of
CPython's own standard library sources (``.py`` files, sorted, site-packages left out), with a real
tokenizer: Qwen2.5's byte-level BPE (default), or ``--tokenizer mistral``, Mistral 7B v0.1's
SentencePiece BPE (the ``tokenizer.model`` in ``mistral-common``; Llama 2's kind of tokenizer).
Each provider produces the whole stream (document ids, an end-of-text id after each document) in a
fresh subprocess, so its peak resident memory is its own; all must produce the same ids:

  apr              apr_kernels.train.data.tokenize_files: reading and encoding in a few threads,
                   each document's ids straight into int32 (4 bytes per token)
  apr_1thread      the same with one thread
  apr_cache        apr_kernels.train.data.cached_tokens into an empty cache folder: the stream written
                   to disk as it is produced, then memory-mapped (what ``apr-kernels train`` does)
  hf_tokenizers    Hugging Face ``tokenizers`` (the Rust tokenizer built from the same vocabulary and
                   merges), ``encode_batch`` over the texts (its own thread pool), ids concatenated
                   into an int64 tensor: what a `datasets`-free user script does
  tiktoken_batch   (qwen2) tiktoken's ``encode_ordinary_batch`` (threads) on the same ranks, after the
                   NFC normalisation the Qwen2 tokenizer prescribes, then an int64 tensor
  sentencepiece    (mistral) the ``sentencepiece`` library's batch ``encode`` (threads) on the model
                   file, then an int64 tensor

Rows: op tokenize, provider, mb, tokens, s, mb_per_s, peak_mib (resident-memory growth of the
subprocess while tokenising, the text read in included).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import sysconfig
import time
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PROVIDERS = {"qwen2": ("apr", "apr_1thread", "apr_cache", "hf_tokenizers", "tiktoken_batch"),
             "mistral": ("apr", "apr_1thread", "apr_cache", "hf_tokenizers", "sentencepiece")}


def mistral_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise SystemExit("--tokenizer mistral needs the mistral-common package (it ships the tokenizer.model)")
    return Path(spec.origin).parent / "data" / "tokenizer.model.v1"


def load_tokenizer(name: str):
    from apr_kernels.tokenizer import Tokenizer

    if name == "qwen2":
        return Tokenizer.qwen2()
    from apr_kernels.spm_model import read_spm_model

    return Tokenizer.from_metadata(read_spm_model(mistral_model()))


def corpus(mb: float) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__") and not d.startswith("."))
        for n in sorted(names):
            if n.endswith(".py"):
                p = Path(dirpath) / n
                out.append(p)
                size += p.stat().st_size
                if size >= mb * 1e6:
                    return out
    return out


def run_one(provider: str, mb: float, tokenizer: str) -> dict:
    """Tokenise the corpus with ``provider`` in this process; its numbers as a dict."""
    import torch

    files = corpus(mb)
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_id
    if provider == "hf_tokenizers":
        from tokenizers import Tokenizer as HFTokenizer

        from apr_kernels.convert.hf_tokenizer import hf_tokenizer_files

        # ordinary text only, as the pipeline encodes documents: without its added tokens, HF would
        # also match special-token strings written in the text ("</s>" in the stdlib's sources)
        hf = HFTokenizer.from_str(json.dumps({**hf_tokenizer_files(tok)[0], "added_tokens": []}))
    elif provider == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_model()))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if provider == "apr_cache":
        import tempfile

        from apr_kernels.train.data import cached_tokens

        with tempfile.TemporaryDirectory() as cache:  # the mapping outlives the folder
            stream = cached_tokens(files, tok, cache_dir=cache)
    elif provider in ("apr", "apr_1thread"):
        from apr_kernels.train.data import tokenize_files

        stream = tokenize_files(files, tok, workers=1 if provider == "apr_1thread" else None)
    else:
        texts = [t for t in (_read(f) for f in files) if t]
        if provider == "hf_tokenizers":
            encs = hf.encode_batch(texts, add_special_tokens=False)
            ids = [i for e in encs for i in e.ids + [eos]]
        elif provider == "sentencepiece":
            ids = [i for b in sp.encode(texts, num_threads=os.cpu_count() or 1) for i in b + [eos]]
        else:  # with the tokenizer's NFC normalisation (Qwen2's), which tiktoken itself does not apply
            if tok.nfc:
                texts = [unicodedata.normalize("NFC", t) for t in texts]
            batches = tok._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            ids = [i for b in batches for i in b + [eos]]
        stream = torch.tensor(ids, dtype=torch.int64)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nbytes = sum(f.stat().st_size for f in files)
    checksum = sum(int(c.long().sum()) for c in stream.split(1 << 20))  # in pieces: no 8-byte copy of it all
    return {"op": "tokenize", "tokenizer": tokenizer, "provider": provider, "files": len(files), "mb": nbytes / 1e6,
            "tokens": int(stream.numel()), "checksum": checksum, "s": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "peak_mib": (peak - base) / 1024}


def _read(path: Path) -> str | None:
    try:  # the file's bytes as they are (no newline translation), as the training pipeline reads them
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":  # the child process of one provider
        print(json.dumps(run_one(sys.argv[2], float(sys.argv[3]), sys.argv[4])))
        return

    def options(p):
        p.add_argument("--mb", type=float, default=None, help="corpus size")
        p.add_argument("--tokenizer", choices=sorted(PROVIDERS), default="qwen2")

    args = _common.parse_args(__doc__.splitlines()[0], options)
    mb = args.mb or (1 if args.smoke else 16 if args.quick else 64)
    rows = []
    providers = PROVIDERS[args.tokenizer]
    procs = _common.run_children([[sys.executable, __file__, "--one", provider, str(mb), args.tokenizer]
                                  for provider in providers], smoke=args.smoke, timeout=1800)
    for provider, proc in zip(providers, procs):
        if proc.returncode != 0:
            print(f"  {provider}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {provider}: {r['mb']:.1f} MB -> {r['tokens']} tokens in {r['s']:.2f} s "
              f"({r['mb_per_s']:.2f} MB/s), peak +{r['peak_mib']:.0f} MiB", flush=True)
    sums = {(r["tokens"], r["checksum"]) for r in rows}
    if len(sums) > 1:
        raise SystemExit(f"providers disagree on the token stream: {sorted(sums)}")
    apr = next((r for r in rows if r["provider"] == "apr"), None)
    others = [r for r in rows if not r["provider"].startswith("apr")]
    if apr and others:
        best = min(others, key=lambda r: r["s"])
        for r in rows:
            r["apr_speedup"] = r["s"] / apr["s"]
        print(f"apr vs the fastest other ({best['provider']}): {best['s'] / apr['s']:.2f}x the speed, "
              f"{best['peak_mib'] / max(apr['peak_mib'], 1):.1f}x less peak memory")
    _common.print_table(rows, ["provider", "mb", "tokens", "s", "mb_per_s", "peak_mib", "apr_speedup"])
    name = "tokenize" if args.tokenizer == "qwen2" else f"tokenize_{args.tokenizer}"
    print("wrote", _common.write_results(name, rows, args.out, {"ours": ["apr", "apr_1thread"], "mb": mb,
                                                                "tokenizer": args.tokenizer}))


if __name__ == "__main__":
    main()
