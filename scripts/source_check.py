"""Outside-in check of the data stage's readers against Python's: random records (text with
quotes, backslashes, control characters, every kind of escape, characters outside the BMP
written raw or as surrogate pairs; other fields before and after the text, nested objects and
arrays whose strings hold braces and quotes, numbers in every JSON form, keys in any order,
compact or spaced) written by `json.dumps` as JSONL, as a pretty-printed JSON array and gzipped,
and by pyarrow as Parquet (each codec, random row-group and page sizes, plain or dictionary
encoded, string, large_string or string_view, the text also inside a struct column);
`cargo xtask data` builds shards from each, and the documents decoded from the shards must be
exactly the texts `json.loads` / pyarrow read (empty and blank ones left out).

    python3 scripts/source_check.py [--records 3000] [--seed 1]    # needs tokenizers, pyarrow

Needs a release build of xtask."""
import argparse, gzip, json, os, random, shutil, subprocess, tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--records", type=int, default=3000)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()
rng = random.Random(a.seed)

POOL = (list("abcdefghij XYZ0123456789.,;:!?-") + ['"', "\\", "/", "{", "}", "[", "]", "\n", "\t", "\r", "\b",
        "\f", "\x01", "\x1f", "\x7f", "é", "ß", "中", "文", "\u2028", "\u00a0", "😀", "🎉", "𝄞", "\ufeff", "\u0000"])


# Unicode's White_Space (Rust's char::is_whitespace; Python's isspace adds U+001C..U+001F): a
# document of only these is blank and left out.
WHITE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200b)}


def blank(t):
    return t is None or all(c in WHITE for c in t)


def text():
    return "".join(rng.choice(POOL) for _ in range(rng.randint(0, 60)))


def value(depth=0):
    r = rng.random()
    if depth < 3 and r < 0.15:
        return {text()[:8]: value(depth + 1) for _ in range(rng.randint(0, 3))}
    if depth < 3 and r < 0.3:
        return [value(depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice([text(), rng.randint(-10**12, 10**12), rng.uniform(-1e6, 1e6), rng.choice([1e-300, -2.5e17, 0.0]),
                       True, False, None])


records, want = [], []
for i in range(a.records):
    t = rng.choice([text(), text() + text(), "", "   ", " \r\n\t\u3000", None]) if rng.random() < 0.1 else text() + f" #{i}"
    fields = {f"f{j}": value() for j in range(rng.randint(0, 3))}
    fields["text"] = t
    keys = list(fields)
    rng.shuffle(keys)
    records.append({k: fields[k] for k in keys})
    if not blank(t):
        want.append(t)

work = tempfile.mkdtemp(prefix="jsonl_check.")
inputs = {"records.jsonl": "".join(json.dumps(r, ensure_ascii=rng.random() < 0.5,
                                              separators=rng.choice([(",", ":"), (", ", ": ")])) + "\n"
                                   for r in records).encode(),
          "records.json": json.dumps(records, indent=rng.choice([1, 2, 4]), ensure_ascii=False).encode()}
inputs["records.jsonl.gz"] = gzip.compress(inputs["records.jsonl"])
texts = [r["text"] for r in records]
for codec in ["snappy", "zstd", "gzip", "brotli", "lz4", "none"]:
    kind = rng.choice([pa.string(), pa.large_string(), pa.string_view()])
    col = pa.array(texts, kind)
    if rng.random() < 0.3:
        col = col.cast(pa.string()).dictionary_encode()
    table = pa.table({"n": pa.array(range(len(texts))), "text": col,
                      "meta": pa.StructArray.from_arrays([pa.array(texts), pa.array(range(len(texts)))], ["body", "i"])})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=codec, row_group_size=rng.randint(1, 700),
                   data_page_size=rng.choice([64, 4096, 1 << 20]), use_dictionary=rng.random() < 0.5)
    inputs[f"records-{codec}.parquet"] = buf.getvalue().to_pybytes()


def shards_texts(path, field):
    """The documents xtask data makes of `path` (its `field`), decoded from the shards."""
    out = path + "." + field + ".shards"
    r = subprocess.run([a.xtask, "data", "--input", path, "--out", out, "--vocab-size", "400", "--val-fraction", "0.1",
                        "--text-field", field], capture_output=True, text=True, env=dict(os.environ, RUST_BACKTRACE="0"))
    if r.returncode != 0:
        raise SystemExit(f"xtask data failed on {path} ({r.returncode}):\n{r.stderr[-3000:]}")
    man = json.load(open(os.path.join(out, "manifest.json")))
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    bos, eos = man["special_tokens"]["bos"], man["special_tokens"]["eos"]
    got = []
    for s in man["shards"]:
        rows = pa.ipc.open_file(pa.memory_map(os.path.join(out, s["file"]))).read_all().column("tokens").to_pylist()
        for ids in rows:
            assert ids[0] == bos and ids[-1] == eos
            got.append(tok.decode(ids[1:-1], skip_special_tokens=False))
    return got, man["source"]


ok = True
for name, body in inputs.items():
    # The texts Python reads back from the very bytes given to xtask.
    raw = gzip.decompress(body) if name.endswith(".gz") else body
    fields = ["text"]
    if name.endswith(".parquet"):
        t = pq.read_table(pa.BufferReader(body))
        back = t.column("text").to_pylist()
        assert t.column("meta").combine_chunks().field("body").to_pylist() == back
        fields.append("meta.body")
    else:
        back = [r["text"] for r in (json.loads(raw) if name.endswith(".json") else map(json.loads, raw.splitlines()))]
    assert [t for t in back if not blank(t)] == want
    path = os.path.join(work, name)
    open(path, "wb").write(body)
    for field in fields:
        got, source = shards_texts(path, field)
        same = sorted(got) == sorted(want)
        print(f"{name:<24} {field:<10} {len(want)} texts: {'identical' if same else 'DIFFERENT'} "
              f"({source['documents']} documents, {source['skipped_empty']} empty left out)")
        if not same:
            missing, extra = set(want) - set(got), set(got) - set(want)
            print("  e.g. Python", [m[:40] for m in list(missing)[:2]], "xtask", [e[:40] for e in list(extra)[:2]])
        ok &= same
shutil.rmtree(work)
assert ok, "xtask data and Python read different texts"
print("OK")
