"""Outside-in check of patchlm's hub client against Python's huggingface_hub (run by hand).

Serves a model directory and a dataset from a small stand-in hub (this file's own, written apart
from the Rust tests' one), lets huggingface_hub and `cargo xtask` each download them into a cache
of their own, and checks that
  1. both caches hold the same entries (blobs by the same names, snapshot links to the same
     blobs, refs naming the same commit, trees/<commit>.json listings) with the same bytes;
  2. each client reads the other's cache offline (HF_HUB_OFFLINE=1): xtask scores text with
     the model huggingface_hub downloaded; huggingface_hub finds every file xtask downloaded and
     scan_cache_dir reports no warnings;
  3. they share the download lock: while huggingface_hub holds it on a blob, xtask waits;
  4. a listing huggingface_hub kept is whole offline: with one of a folder's two files
     downloaded, xtask stops naming the other instead of training on one.

    python3 scripts/hub_check.py --xtask target/release/xtask --model runs/pretrain/model \
        --data data/corpus/corpus.jsonl
Needs huggingface_hub (pip install huggingface_hub).
"""
import argparse, hashlib, http.server, json, os, subprocess, sys, tempfile, threading, time

COMMIT = "a" * 40


def git_blob_sha1(b):
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


class Repo:
    def __init__(self, files, lfs):
        self.files = files  # path -> bytes
        self.lfs = lfs  # set of paths stored in LFS


def make_handler(repos, cdn_url, log):
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, code, headers=(), body=b""):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            if not any(k.lower() == "content-length" for k, _ in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def body(self, data, headers):
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                part = data[start:]
                self.send(206, headers + [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")], part)
            else:
                self.send(200, headers, data)

        def route(self):
            log.append((self.command, self.path))
            path = self.path.split("?")[0]
            if path.startswith("/cdn/"):
                sha = path[5:]
                for r in repos.values():
                    for p, b in r.files.items():
                        if hashlib.sha256(b).hexdigest() == sha:
                            return self.body(b, [])
                return self.send(404)
            parts = path.strip("/").split("/")
            if parts[0] == "api":
                # /api/<kind>s/<org>/<name>[/revision/<rev>] or .../tree/<rev>[/<folder>]
                kind, org, name = parts[1], parts[2], parts[3]
                verb, rev = (parts[4], parts[5]) if len(parts) >= 6 else ("revision", "main")
                key = ("datasets/" if kind == "datasets" else "") + f"{org}/{name}"
                r = repos.get(key)
                if r is None or verb not in ("revision", "tree"):
                    return self.send(404, [("X-Error-Code", "RepoNotFound")])
                if verb == "tree":
                    from urllib.parse import unquote
                    folder = unquote("/".join(parts[6:]))
                    entries = []
                    for p, b in sorted(r.files.items()):
                        if folder and not p.startswith(folder + "/"):
                            continue
                        e = {"type": "file", "path": p, "size": len(b), "oid": git_blob_sha1(b)}
                        if p in r.lfs:
                            e["lfs"] = {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}
                        entries.append(e)
                    if folder and not entries:
                        return self.send(404, [("X-Error-Code", "EntryNotFound")])
                    body = json.dumps(entries).encode()
                    return self.send(200, [("Content-Type", "application/json")], body)
                sib = []
                for p, b in sorted(r.files.items()):
                    e = {"rfilename": p, "size": len(b)}
                    if p in r.lfs:
                        e["lfs"] = {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}
                    sib.append(e)
                body = json.dumps({"id": key, "sha": COMMIT, "siblings": sib}).encode()
                return self.send(200, [("Content-Type", "application/json")], body)
            prefix = ""
            if parts[0] == "datasets":
                prefix, parts = "datasets/", parts[1:]
            key = prefix + f"{parts[0]}/{parts[1]}"
            r = repos.get(key)
            if r is None or parts[2] != "resolve":
                return self.send(404, [("X-Error-Code", "RepoNotFound")])
            if parts[3] not in ("main", COMMIT):
                return self.send(404, [("X-Error-Code", "RevisionNotFound")])
            f = "/".join(parts[4:])
            if f not in r.files:
                return self.send(404, [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", COMMIT)])
            b = r.files[f]
            if f in r.lfs:
                sha = hashlib.sha256(b).hexdigest()
                return self.send(302, [("X-Repo-Commit", COMMIT), ("X-Linked-Etag", f'"{sha}"'),
                                       ("X-Linked-Size", str(len(b))), ("ETag", '"pointer"'),
                                       ("Location", f"{cdn_url}/cdn/{sha}")])
            return self.body(b, [("X-Repo-Commit", COMMIT), ("ETag", f'"{git_blob_sha1(b)}"')])

        do_GET = do_HEAD = route

    return H


def serve(repos):
    log = []
    cdn = http.server.ThreadingHTTPServer(("127.0.0.1", 0), None)
    cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
    cdn.RequestHandlerClass = make_handler(repos, cdn_url, log)
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(repos, cdn_url, log))
    for s in (hub, cdn):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{hub.server_address[1]}", log


def tree(cache):
    """Every entry under the cache: relative path -> ('link', target) or ('file', sha256)."""
    out = {}
    for root, dirs, files in os.walk(cache):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, cache)
            if f.endswith(".lock") or "/.locks/" in "/" + rel or rel.startswith(".locks"):
                continue
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = ("file", hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xtask", required=True)
    ap.add_argument("--model", required=True, help="an HF-format model directory to serve")
    ap.add_argument("--data", required=True, help="a JSONL file to serve as a dataset")
    a = ap.parse_args()
    a.xtask = os.path.abspath(a.xtask)
    model_files = {f: open(os.path.join(a.model, f), "rb").read()
                   for f in ("config.json", "model.safetensors", "tokenizer.json")}
    data = open(a.data, "rb").read()
    half = data.rfind(b"\n", 0, len(data) // 2) + 1
    repos = {
        "org/model": Repo(model_files, {"model.safetensors"}),
        "datasets/org/corpus": Repo({"README.md": b"# card\n", "data/train-0.jsonl": data[:half],
                                     "data/train-1.jsonl": data[half:]}, {"data/train-0.jsonl"}),
    }
    url, log = serve(repos)
    work = tempfile.mkdtemp(prefix="hub-check-")
    py_cache, rs_cache = os.path.join(work, "py"), os.path.join(work, "rs")
    env = dict(os.environ, HF_ENDPOINT=url, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=os.path.join(work, "home"))
    env.pop("HF_TOKEN", None)

    # huggingface_hub fills py_cache.
    code = f"""
import huggingface_hub as h
print(h.__version__)
h.snapshot_download("org/model", cache_dir={py_cache!r})
h.snapshot_download("org/corpus", repo_type="dataset", cache_dir={py_cache!r}, allow_patterns=["data/*"])
h.hf_hub_download("org/model", "tokenizer.json", cache_dir={py_cache!r})
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    print("huggingface_hub", r.stdout.strip(), r.stderr.strip()[-2000:])
    assert r.returncode == 0
    # xtask fills rs_cache.
    env_rs = dict(env, HF_HUB_CACHE=rs_cache)
    def xtask(*args, e=env_rs):
        r = subprocess.run([a.xtask, *args], env=e, capture_output=True, text=True, cwd=work)
        if r.returncode != 0:
            print(r.stdout, r.stderr)
        assert r.returncode == 0, args
        return r.stdout
    xtask("data", "--input", "hf://datasets/org/corpus", "--tokenizer", "org/model", "--out", "shards")
    want = xtask("score", "--model", "org/model", "--text", "To be, or not to be", "--json")

    t_py, t_rs = tree(py_cache), tree(rs_cache)
    print(f"cache entries: huggingface_hub {len(t_py)}, xtask {len(t_rs)}")
    for k in sorted(set(t_py) | set(t_rs)):
        mark = "same" if t_py.get(k) == t_rs.get(k) else f"DIFFERS py={t_py.get(k)} rs={t_rs.get(k)}"
        if k == "CACHEDIR.TAG" and k in t_py and k in t_rs:
            mark = "each its own (checked below)"
        print(f"  {k}: {mark}")
    only_py = set(t_py) - set(t_rs)
    # Both tag their cache for backup tools (CACHEDIR.TAG, the standard's signature first; the
    # comment below it names who wrote it); the entries that hold data must agree.
    signature = "Signature: 8a477f597d28d172789f06886806bc55\n"
    for cache in (py_cache, rs_cache):
        with open(os.path.join(cache, "CACHEDIR.TAG")) as f:
            assert f.read().startswith(signature), cache
    print("0. both caches carry a CACHEDIR.TAG with the standard's signature")
    data_keys = [k for k in t_py
                 if len(k.split(os.sep)) > 2 and k.split(os.sep)[1] in ("blobs", "snapshots", "refs", "trees")]
    assert sum(k.split(os.sep)[1] == "trees" for k in data_keys) == 2, data_keys
    assert all(t_py[k] == t_rs.get(k) for k in data_keys), "the caches differ"
    print("1. same blobs, snapshot links, refs and kept listings in both caches" + (f" (py only: {sorted(only_py)})" if only_py else ""))

    # Each reads the other's cache offline.
    off = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    got = xtask("score", "--model", "org/model", "--text", "To be, or not to be", "--json", e=dict(off, HF_HUB_CACHE=py_cache))
    assert got == want, "xtask read huggingface_hub's cache differently"
    code = f"""
import huggingface_hub as h
for f in ["config.json", "model.safetensors", "tokenizer.json"]:
    h.hf_hub_download("org/model", f, cache_dir={rs_cache!r}, local_files_only=True)
for f in ["data/train-0.jsonl", "data/train-1.jsonl"]:
    h.hf_hub_download("org/corpus", f, repo_type="dataset", cache_dir={rs_cache!r}, local_files_only=True)
info = h.scan_cache_dir({rs_cache!r})
assert not info.warnings, info.warnings
print(sorted((r.repo_type, r.repo_id, r.nb_files) for r in info.repos))
listed = sorted(f.path for f in h.get_cached_repo_tree("org/corpus", repo_type="dataset", cache_dir={rs_cache!r}))
assert listed == ["README.md", "data/train-0.jsonl", "data/train-1.jsonl"], listed
"""
    r = subprocess.run([sys.executable, "-c", code], env=off, capture_output=True, text=True)
    print(r.stdout.strip(), r.stderr.strip()[-2000:])
    assert r.returncode == 0
    print("2. xtask scored offline from huggingface_hub's cache (same output); huggingface_hub found every")
    print("   file in xtask's cache offline, scan_cache_dir reported no warnings and get_cached_repo_tree")
    print("   read xtask's listing")

    # 3. The download lock is huggingface_hub's: while Python holds the lock on the weights' blob,
    # xtask waits for it before downloading into the same cache.
    lk_cache = os.path.join(work, "locked")
    sha = hashlib.sha256(model_files["model.safetensors"]).hexdigest()
    lock = os.path.join(lk_cache, ".locks", "models--org--model", f"{sha}.lock")
    code = f"""
import os, sys, time
from huggingface_hub.utils import WeakFileLock
os.makedirs(os.path.dirname({lock!r}), exist_ok=True)
with WeakFileLock({lock!r}):
    print("locked", flush=True)
    time.sleep(3)
"""
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    r = subprocess.run([a.xtask, "score", "--model", "org/model", "--text", "To be", "--json"],
                       env=dict(env, HF_HUB_CACHE=lk_cache), capture_output=True, text=True, cwd=work)
    waited = time.time() - t0
    holder.wait()
    assert r.returncode == 0, r.stderr
    assert "waiting for another download" in r.stderr, r.stderr
    assert waited > 1.5, f"xtask did not wait for huggingface_hub's lock ({waited:.2f} s)"
    print(f"3. xtask waited {waited:.1f} s for the lock huggingface_hub held on the blob, then downloaded it")

    # 4. huggingface_hub downloads one of the folder's two files; its kept listing names both.
    part_cache = os.path.join(work, "part")
    code = f"""
import huggingface_hub as h
h.snapshot_download("org/corpus", repo_type="dataset", cache_dir={part_cache!r}, allow_patterns=["data/train-0.jsonl"])
h.hf_hub_download("org/model", "tokenizer.json", cache_dir={part_cache!r})
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([a.xtask, "data", "--input", "hf://datasets/org/corpus/data", "--tokenizer", "org/model",
                        "--out", "part-shards"], env=dict(off, HF_HUB_CACHE=part_cache), capture_output=True,
                       text=True, cwd=work)
    assert r.returncode != 0 and "data/train-1.jsonl: not in the cache" in r.stderr, r.stderr
    print("4. offline, xtask listed the folder from huggingface_hub's kept listing and stopped on the file")
    print("   the cache lacks:", r.stderr.strip().splitlines()[-1][:160])
    print(f"requests served: {len(log)}; work dir {work}")


if __name__ == "__main__":
    main()
