"""A tokenizing process: `python -m jaxtune.data.tokenize_worker TOKENIZER_DIR OPTIONS_JSON`.

It reads pickled chunks of (where, record) pairs from stdin and writes back, for each, the pickled
("ok", Tokenized) or ("error", exception), until stdin closes. jaxtune.data.loader starts one per core for
data of more than one chunk: the chat templates are rendered in Python and the Rust tokenizer's own threads
scale poorly past one core, so processes are what use a machine's cores. A plain subprocess rather than
multiprocessing: a spawned multiprocessing child re-runs the user's script when it lacks an
`if __name__ == "__main__"` guard, and a forked one can deadlock on JAX's threads.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from typing import Iterator

from jaxtune.data.formats import Formatter, FormatOptions, Tokenized


def serve(tokenizer_dir: str, opts: FormatOptions) -> None:
    from transformers import AutoTokenizer

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # whatever a library prints must not land in the stream of results
    # the parent loaded this tokenizer already (jaxtune.models.hf.load_tokenizer: no code from the directory
    # runs); without JAX, which that module imports, a process starts in half the time
    formatter = Formatter(AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False), opts)
    while True:
        try:
            chunk = pickle.load(stdin)
        except EOFError:
            return
        try:
            wheres, records = zip(*chunk)
            reply = ("ok", formatter.tokenize(list(records), wheres=list(wheres)))
        except Exception as e:  # the parent raises it, as if it had tokenized the chunk itself
            reply = ("error", e)
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


def tokenized(chunks: Iterator[list], tokenizer_dir: str, opts: FormatOptions,
              workers: int) -> Iterator[tuple[list, Tokenized]]:
    """(chunk, Tokenized) for each chunk, in order, tokenized by `workers` processes. A process is given its
    next chunk only once its last result has been read, so neither side can block the other on a full pipe."""
    import dataclasses

    command = [sys.executable, "-m", __name__, tokenizer_dir, json.dumps(dataclasses.asdict(opts))]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(workers)]
    busy = []  # (process, its chunk), in the order the chunks came
    try:
        for chunk in chunks:
            if len(busy) == workers:
                yield _result(*busy.pop(0))
            proc = next(p for p in procs if p not in (q for q, _ in busy))
            pickle.dump(chunk, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            busy.append((proc, chunk))
        while busy:
            yield _result(*busy.pop(0))
    finally:  # stopped early (an error, Ctrl-C): the processes still working are killed
        for proc in procs:
            if busy:
                proc.kill()
            proc.stdin.close()
            proc.wait()


def _result(proc: subprocess.Popen, chunk: list) -> tuple[list, Tokenized]:
    try:
        status, value = pickle.load(proc.stdout)
    except EOFError:
        raise RuntimeError(f"a tokenizing process died (exit code {proc.wait()}); its error is above") from None
    if status == "error":
        raise value
    return chunk, value


if __name__ == "__main__":
    serve(sys.argv[1], FormatOptions(**json.loads(sys.argv[2])))
