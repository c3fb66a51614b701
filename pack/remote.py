"""Packed datasets on remote storage: ``s3://``, ``gs://``, ``file://`` and any fsspec URL.

Writing (``pack-build ... s3://bucket/prefix/``): the dataset is built by the ordinary local
pipeline into a staging directory (``$TMPDIR``), then uploaded: shards and the dataset card
first, ``manifest.json`` last, so a prefix without a manifest is never taken for a dataset. A
prefix that already holds files needs ``--overwrite``; the old manifest is deleted before any
old object is replaced, so a half-replaced dataset never looks complete.

Reading (``pack-info``, ``pack-verify``, ``train-run --shards URL``): a URL resolves to a local
*cache view*, a directory holding the fetched, validated ``manifest.json``. Shards arrive on
first use: each is downloaded to a temporary name, its size and sha256 compared with the
manifest (and, for training, every pack's invariants checked), then renamed into place, so a
shard file under its final name in the cache is always one the manifest vouches for. The view
is ``<cache root>/<hash of URL>-<hash of manifest>``: a second read of an unchanged dataset
fetches only the manifest; a republished dataset gets a fresh view. Cache root: ``--cache-dir``,
else ``$PACKTRAIN_CACHE``, else ``$XDG_CACHE_HOME/packtrain`` or ``~/.cache/packtrain``.
Nothing is evicted: delete the directory to reclaim the space.

Training (``train-run --shards URL``) streams: the preflight checks what the manifest tells
(tokenizer fingerprint, vocabulary, context length, totals) and each shard is checked when it
arrives instead of all of them up front, so step 1 waits only for the shards it reads. The loop
visits packs in a global random order, so the first steps touch many shards; the rest arrive on
a background thread in manifest order (ranks sharing a cache fetch different shards at once).
``train-run --verify`` fetches and checks every shard before the first step instead.

Filesystems: ``pyarrow.fs.FileSystem.from_uri`` first (S3, GCS, HDFS, local, with its URL query
options such as ``?endpoint_override=host:port&scheme=http``), then fsspec for any scheme it
knows. Endpoint and credentials come from the usual environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION``;
``GOOGLE_APPLICATION_CREDENTIALS`` for gs://). Local paths pass through untouched.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from . import format as fmt
from .files import file_sha256, fsync_dir, write_atomic
from .errors import FormatError, PacktrainError
from .format import MANIFEST, PackedDataset

CHUNK = 4 << 20                      # bytes per read/write call while streaming objects
REMOTE_INFO = ".packtrain-remote.json"  # marks a cache view; records the (redacted) URL
CARD = "README.md"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_OURS_RE = re.compile(r"^(shard-\d{5,}\.arrow|README\.md|manifest\.json)$")
# URLs as the user gave them (credentials included), per cache view, for this process only.
_URLS: dict[str, str] = {}


def is_url(path: str | os.PathLike) -> bool:
    """``scheme://...`` (but not a Windows drive such as ``C:\\``)."""
    return isinstance(path, str) and _URL_RE.match(path) is not None


_USERINFO_RE = re.compile(r"(?<=://)[^/@\s'\"]+@")
_QUERY_VALUE_RE = re.compile(r"(?<=[?&])([^=&\s#'\"/]+)=[^&\s#'\"]*")


def redact(text: str) -> str:
    """A URL, or any message that quotes one, without its secrets: user:password become
    ``***@`` and every query value ``***`` (``?access_token=...`` is as secret as a password).
    For every message, log, manifest and card; storage libraries quote the URL they were given,
    so their error texts go through here too."""
    text = _USERINFO_RE.sub("***@", text)
    return _QUERY_VALUE_RE.sub(lambda m: f"{m.group(1)}=***", text)


_SECRET_KEY_RE = re.compile(r"token|secret|key|passw|sig|credential|auth", re.I)


def reopenable(url: str) -> str:
    """The URL as a cache view records it, for other processes (ranks) to open the store again:
    no user:password and no secret-looking query option, but options such as
    ``endpoint_override`` kept (credentials come from the environment there)."""
    parts = urlsplit(url)
    query = "&".join(kv for kv in parts.query.split("&")
                     if kv and not _SECRET_KEY_RE.search(kv.split("=", 1)[0]))
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query=query))


def dataset_name(url: str) -> str:
    """The last path component of a URL (``s3://b/x/ds/?k=v`` -> ``ds``), for default names."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    return parts[-1] if parts else (urlsplit(url).hostname or "dataset")


# ---------------------------------------------------------------- filesystem access

def _explain(e: BaseException) -> str:
    """What to do about a storage error, in one line (secrets redacted)."""
    text = redact(" ".join(str(e).split()) or type(e).__name__)
    low = text.lower()
    if any(k in low for k in ("access_denied", "accessdenied", "invalidaccesskeyid", "forbidden",
                              "signaturedoesnotmatch", "403", "credentials", "unauthorized")):
        return (f"access denied ({text[:160]}); check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS for gs://)")
    if any(k in low for k in ("network_connection", "could not connect", "couldn't connect",
                              "curlcode", "connection refused", "name or service not known",
                              "could not resolve", "timed out")):
        return (f"cannot reach the storage endpoint ({text[:160]}); check the URL, "
                f"AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT, and the network")
    if "bucket" in low and ("not found" in low or "nosuchbucket" in low or "not exist" in low):
        return f"the bucket does not exist ({text[:160]}); create it first or fix the URL"
    return text[:300]


class Stopped(Exception):
    """A background download abandoned because its process is exiting."""


@dataclasses.dataclass
class Store:
    """One dataset prefix on one filesystem: object names are relative to ``root``."""

    url: str            # as given (may hold credentials): never printed, see ``where``
    fs: Any             # a pyarrow.fs.FileSystem
    root: str

    @property
    def where(self) -> str:
        """For messages and manifests: no credentials, no query options, no trailing slash."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=netloc, query="", fragment="")).rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.root else name

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        import pyarrow as pa

        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise PacktrainError(f"{self.where}/{what}: {_explain(e)}") from None

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        info = self._guard(name, lambda: self.fs.get_file_info(self.path(name)))
        return info.type == pafs.FileType.File

    def listing(self) -> list[str]:
        """Names directly under the prefix (files only)."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        infos = self._guard("", lambda: self.fs.get_file_info(sel))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, name: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        return self._guard(name, read)

    def delete(self, name: str) -> None:
        try:
            self._guard(name, lambda: self.fs.delete_file(self.path(name)))
        except FileNotFoundError:
            pass

    def upload(self, local: Path, name: str, bar=None) -> None:
        def put() -> None:
            with open(local, "rb") as src, self.fs.open_output_stream(self.path(name)) as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
                    if bar is not None:
                        bar.update(len(block))
        self._guard(name, put)

    def download(self, name: str, dest: Path, size: int,
                 stop: threading.Event | None = None) -> str:
        """Stream one object to `dest`; return its sha256. Missing -> FormatError; `stop` set
        -> Stopped (between chunks: a process exiting does not wait for a whole shard)."""
        h = hashlib.sha256()

        def get() -> None:
            with self.fs.open_input_stream(self.path(name)) as src, open(dest, "wb") as out:
                while block := src.read(CHUNK):
                    if stop is not None and stop.is_set():
                        raise Stopped(name)
                    h.update(block)
                    out.write(block)
                    if out.tell() > size:  # a larger object can only fail: stop early
                        break
                out.flush()
                os.fsync(out.fileno())
        try:
            self._guard(name, get)
        except FileNotFoundError:
            raise FormatError(f"{self.where}/{name}: no such object; the remote dataset is "
                              f"incomplete — republish it with pack-build ... --overwrite",
                              rule="shard-missing") from None
        return h.hexdigest()


# fsspec's own names for the packages its protocols need (its registry's error texts say the
# same, but not in a form a user can paste).
_FSSPEC_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                    "https": "aiohttp", "abfs": "adlfs", "az": "adlfs", "hf": "huggingface_hub",
                    "sftp": "paramiko", "ssh": "paramiko", "hdfs": "pyarrow"}


def _backend_hint(scheme: str, missing: str) -> str:
    return _FSSPEC_BACKENDS.get(scheme.lower(), missing.split()[0] if missing else "fsspec")


def open_store(url: str) -> Store:
    """A URL as a Store: pyarrow's own filesystems first, then fsspec's."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_url(url):
        raise PacktrainError(f"{url}: not a URL (expected scheme://...)")
    shown = redact(url)
    try:
        fs, root = pafs.FileSystem.from_uri(url)
        return Store(url, fs, root)
    except pa.ArrowInvalid as e:
        pa_error = redact(str(e))
    except (OSError, pa.ArrowException) as e:
        raise PacktrainError(f"{shown}: {_explain(e)}") from None
    try:
        import fsspec
    except ImportError:
        raise PacktrainError(f"{shown}: pyarrow cannot open this URL ({pa_error}) and fsspec "
                             f"is not installed; pip install fsspec") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec knows the protocol; its back-end package is missing
        missing = getattr(e, "name", None) or redact(" ".join(str(e).split()))
        raise PacktrainError(f"{shown}: fsspec needs a package that is not installed for "
                             f"{urlsplit(url).scheme}:// ({missing}); pip install "
                             f"{_backend_hint(urlsplit(url).scheme, missing)}") from None
    except (ValueError, KeyError) as e:  # unknown protocol
        raise PacktrainError(f"{shown}: unsupported storage URL ({pa_error}; fsspec: {e}); use "
                             f"s3://, gs://, file:// or an fsspec protocol") from None
    except Exception as e:  # noqa: BLE001 - fsspec back-ends raise their own types
        raise PacktrainError(f"{shown}: {_explain(e)}") from None
    return Store(url, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root)


# ---------------------------------------------------------------- writing (pack-build)

def check_target(url: str, overwrite: bool) -> Store:
    """Before any slow work: the URL opens, and its prefix is empty unless --overwrite."""
    store = open_store(url)
    names = store.listing()
    if names and not overwrite:
        what = ("holds a packed dataset" if MANIFEST in names
                else f"is not empty ({len(names)} objects)")
        raise PacktrainError(f"{store.where}: {what}; pass --overwrite to replace it, or choose "
                             f"another prefix")
    return store


def upload_dataset(local: Path, store: Store, quiet: bool = False) -> None:
    """Publish a built dataset: old manifest deleted first, old shards removed, new shards and
    card uploaded, manifest.json last (its presence is what makes the prefix a dataset)."""
    from tqdm import tqdm

    manifest = fmt.read_manifest(local)
    names = [s["path"] for s in manifest["shards"]]
    if (local / CARD).is_file():
        names.append(CARD)
    old = store.listing()
    if MANIFEST in old:
        store.delete(MANIFEST)
    for name in old:  # stale shards of the old dataset; same-named ones are simply replaced
        if _OURS_RE.match(name) and name not in names and name != MANIFEST:
            store.delete(name)
    if store.fs.type_name == "local":  # object stores have no directories to make
        store._guard("", lambda: store.fs.create_dir(store.root, recursive=True))
    total = sum((local / n).stat().st_size for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=quiet,
              leave=False) as bar:
        for name in names:
            store.upload(local / name, name, bar)
        store.upload(local / MANIFEST, MANIFEST)


def build_to_url(cfg: Any, build_local: Callable[[Any], dict]) -> dict:
    """pack-build into a URL: check the target, build into a staging directory, upload."""
    store = check_target(cfg.out, bool(cfg.overwrite))
    staging = Path(tempfile.mkdtemp(prefix="packtrain-upload-"))
    try:
        local = staging / "dataset"
        manifest = build_local(dataclasses.replace(cfg, out=str(local), overwrite=False))
        if not (local / MANIFEST).is_file():  # e.g. a dry run: nothing to publish
            return manifest
        # The manifest records where the dataset was published, not the staging directory.
        manifest["arguments"]["out"] = store.where + "/"
        fmt.write_manifest(local, manifest)
        upload_dataset(local, store, quiet=bool(cfg.quiet))
        if not cfg.quiet:
            import sys

            print(f"published {store.where}/ ({len(manifest['shards'])} shards)",
                  file=sys.stderr, flush=True)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- reading

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PACKTRAIN_CACHE"):
        return Path(os.environ["PACKTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packtrain"


def fetch_manifest(store: Store) -> tuple[dict, bytes]:
    """The remote manifest, parsed, version-checked and validated; errors name the URL."""
    where = f"{store.where}/{MANIFEST}"
    try:
        data = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        bucket = store.root.split("/")[0]
        if store.fs.type_name in ("s3", "gcs") and bucket and store._guard(
                "", lambda: store.fs.get_file_info(bucket)).type.name == "NotFound":
            raise PacktrainError(f"{store.where}: bucket {bucket!r} does not exist; check the "
                                 f"URL (and the endpoint: AWS_ENDPOINT_URL)") from None
        raise FormatError(f"{where}: missing; {store.where} is not a complete packed dataset "
                          f"(an interrupted upload?) — rerun pack-build ... {store.where}/ "
                          f"--overwrite", rule="manifest-missing") from None
    manifest = fmt.parse_manifest(data, where)
    # Streaming readers never see all shards at once: the totals are checked here instead.
    for key in ("packs", "tokens"):
        got = sum(int(s[key]) for s in manifest["shards"])
        if got != int(manifest["stats"][key]):
            raise FormatError(f"{where}: shards list {got} {key}, stats.{key} says "
                              f"{manifest['stats'][key]}; the manifest was edited — republish "
                              f"the dataset", rule=f"stats-{key}")
    return manifest, data


def read_manifest(path_or_url: str | os.PathLike) -> dict:
    """format.read_manifest for a directory; the remote manifest (nothing cached) for a URL."""
    if is_url(str(path_or_url)):
        return fetch_manifest(open_store(str(path_or_url)))[0]
    return fmt.read_manifest(path_or_url)


def resolve(path_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A local dataset directory unchanged; a URL -> its local cache view (manifest fetched and
    validated, shards fetched on first use). Costs one manifest GET per call for a URL."""
    if not is_url(str(path_or_url)):
        return str(path_or_url)
    url = str(path_or_url)
    store = open_store(url)
    manifest, data = fetch_manifest(store)
    m_sha = hashlib.sha256(data).hexdigest()
    key = hashlib.sha256(store.where.encode()).hexdigest()[:16]
    view = cache_root(cache_dir) / f"{key}-{m_sha[:16]}"
    try:
        view.mkdir(parents=True, exist_ok=True)
        if not (view / MANIFEST).is_file() or file_sha256(view / MANIFEST) != m_sha:
            write_atomic(view / REMOTE_INFO, json.dumps(
                {"url": reopenable(url), "manifest_sha256": m_sha}, indent=2).encode())
            write_atomic(view / MANIFEST, data)
    except OSError as e:
        raise PacktrainError(f"{view}: cannot write the cache ({e.strerror or e}); pass "
                             f"--cache-dir DIR or set PACKTRAIN_CACHE to a writable "
                             f"directory") from None
    _URLS[str(view.resolve())] = url
    return str(view)


def is_remote(data_dir: str | os.PathLike) -> bool:
    """Whether a directory is a cache view of a remote dataset (made by :func:`resolve`)."""
    return (Path(data_dir) / REMOTE_INFO).is_file()


def _stamp(p: Path) -> dict[str, int]:
    st = p.stat()
    return {"ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


class Fetcher:
    """Downloads the shards of one cache view, each once (a lock file per shard keeps threads,
    ranks and concurrent runs sharing the cache from fetching the same shard twice)."""

    def __init__(self, view: str | os.PathLike, manifest: dict | None = None,
                 check_packs: bool = True):
        self.view = Path(view)
        self.manifest = manifest if manifest is not None else fmt.read_manifest(self.view)
        url = _URLS.get(str(self.view.resolve()))
        if url is None:
            url = json.loads((self.view / REMOTE_INFO).read_text())["url"]
        self.store = open_store(url)
        self.check_packs = check_packs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def present(self, i: int) -> bool:
        """Shard `i` is in the cache and vouched for. A file is trusted while its verified
        marker (sha256 checked, then inode, mtime and size recorded) still matches it; one that
        changed in place, or has no marker, is hashed again, and deleted if it fails (the
        caller then fetches it anew)."""
        info = self.manifest["shards"][i]
        p = self.view / info["path"]
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            return False
        marker = self._side(info["path"], ".verified")
        try:
            seen = json.loads(marker.read_text())
        except (OSError, ValueError):
            seen = None
        want = {**_stamp(p), "sha256": info["sha256"]}
        unchanged = isinstance(seen, dict) and {k: seen.get(k) for k in want} == want
        if unchanged and (seen.get("packs_checked") or not self.check_packs):
            return True
        # hashed again only when changed (or never marked); a shard pack-verify fetched needs
        # just its packs checked before training reads it
        if not unchanged and file_sha256(p) != info["sha256"]:
            marker.unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            return False
        if self.check_packs:
            try:
                self._check_packs(info["path"], p, info)
            except FormatError:
                marker.unlink(missing_ok=True)
                p.unlink(missing_ok=True)
                raise
        self._mark_verified(p, info)
        return True

    def _side(self, name: str, suffix: str) -> Path:
        """A hidden file beside shard `name` (lock, download, verified marker), in the folder
        the shard itself lives in."""
        final = self.view / name
        return final.with_name(f".{final.name}{suffix}")

    def _mark_verified(self, p: Path, info: dict) -> None:
        write_atomic(self._side(info["path"], ".verified"), json.dumps(
            {**_stamp(p), "sha256": info["sha256"], "packs_checked": self.check_packs}).encode())

    def missing(self) -> list[int]:
        return [i for i in range(len(self.manifest["shards"])) if not self.present(i)]

    def ensure(self, i: int, stop: threading.Event | None = None,
               wait: bool = True) -> Path | None:
        """Shard `i` in the cache, downloading and checking it if needed. With ``wait=False``
        return None at once when another thread or process is already fetching it."""
        info = self.manifest["shards"][i]
        name = info["path"]
        fmt.check_relative_path(name)
        final = self.view / name
        if self.present(i):
            return final
        import fcntl  # POSIX only, and only needed here: is_url() etc. work everywhere

        final.parent.mkdir(parents=True, exist_ok=True)  # a shard path may name a subfolder
        with open(self._side(name, ".lock"), "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            try:
                if self.present(i):  # fetched by someone else while we waited
                    return final
                tmp = self._side(name, f".part-{os.getpid()}-{threading.get_ident()}")
                try:
                    digest = self.store.download(name, tmp, int(info["bytes"]), stop)
                    self._check(name, tmp, digest, info)
                    os.replace(tmp, final)
                    fsync_dir(self.view)
                    self._mark_verified(final, info)
                finally:
                    tmp.unlink(missing_ok=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return final

    def _check(self, name: str, tmp: Path, digest: str, info: dict) -> None:
        where = f"{self.store.where}/{name}"
        size = tmp.stat().st_size
        if size != info["bytes"] or digest != info["sha256"]:
            what = (f"{size} bytes, manifest says {info['bytes']}" if size != info["bytes"]
                    else f"sha256 {digest[:16]}… does not match the manifest's "
                         f"{info['sha256'][:16]}…")
            raise FormatError(f"{where}: {what}; the object is corrupt or was replaced since "
                              f"the manifest was read — republish the dataset (pack-build ... "
                              f"--overwrite) or retry if it is being republished",
                              rule="checksum")
        if self.check_packs:
            self._check_packs(name, tmp, info)

    def _check_packs(self, name: str, path: Path, info: dict) -> None:
        """Every pack's invariants, and the token count the manifest gives the shard."""
        where = f"{self.store.where}/{name}"
        table = fmt.open_shard(path.parent, {**info, "path": path.name})
        vocab = self.manifest["tokenizer"].get("vocab_size")
        cols = fmt.table_columns(table)
        bad = next(fmt.pack_problems(cols, int(self.manifest["max_length"]), vocab), None)
        if bad is not None:
            r, rule = bad
            raise FormatError(f"{where}: pack {r}: {rule}; the dataset breaks the format "
                              f"— run pack-verify {self.store.where}/ and republish it",
                              rule=rule.split(":")[0])
        ids_off = cols["input_ids"][0]
        tokens = int(ids_off[-1] - ids_off[0])
        if tokens != info["tokens"]:
            raise FormatError(f"{where}: {tokens} tokens, manifest says {info['tokens']}",
                              rule="shard-tokens")

    def fetch_all(self, progress: bool = False) -> list[str]:
        """Fetch every missing shard in manifest order; return the problems (empty if none)."""
        from tqdm import tqdm

        todo = self.missing()
        problems = []
        total = sum(self.manifest["shards"][i]["bytes"] for i in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="fetch",
                  disable=not progress or not todo, leave=False) as bar:
            for i in todo:
                try:
                    self.ensure(i)
                except FormatError as e:
                    problems.append(str(e))
                bar.update(self.manifest["shards"][i]["bytes"])
        return problems

    def start_prefetch(self) -> None:
        """Fetch the remaining shards in manifest order on a background thread, so that later
        shards are usually local before they are needed. Errors are left for the reader to meet
        (its own ensure() raises them in the training process)."""
        if self._thread is not None:
            return

        def run() -> None:
            # First pass skips shards another rank or thread is fetching (ranks sharing a
            # cache then download different shards at once); the second waits for them.
            for wait in (False, True):
                for i in self.missing():
                    if self._stop.is_set():
                        return
                    try:
                        self.ensure(i, self._stop, wait=wait)
                    except Exception:  # noqa: BLE001 - the reader meets it where it matters
                        return

        self._thread = threading.Thread(target=run, name="packtrain-prefetch", daemon=True)
        self._thread.start()
        # Stopped before pyarrow finalises S3 at exit (atexit runs last-registered first).
        atexit.register(self.stop)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class RemotePackedDataset(PackedDataset):
    """A PackedDataset over a cache view: a shard is fetched (and checked) the first time one of
    its packs is read; the others follow on a background thread."""

    def __init__(self, data_dir: str | os.PathLike, manifest: dict | None = None,
                 prefetch: bool = True):
        super().__init__(data_dir, manifest)
        self.fetcher = Fetcher(data_dir, self.manifest, check_packs=True)
        self.prefetch = prefetch

    def table(self, s: int):
        if s not in self._tables:
            self.fetcher.ensure(s)
            if self.prefetch:
                self.fetcher.start_prefetch()
        return super().table(s)


def open_dataset(data_dir: str | os.PathLike, manifest: dict | None = None) -> PackedDataset:
    """PackedDataset for a local directory, RemotePackedDataset for a cache view."""
    if is_remote(data_dir):
        return RemotePackedDataset(data_dir, manifest)
    return PackedDataset(data_dir, manifest)


def scan_ready(data_dir: str | os.PathLike, fetch_all: bool = False) -> bool:
    """Whether every shard is local for a whole-dataset scan (train-run's preflight). Local
    directories: yes. Cache views stream by default (no: each shard is checked as it arrives);
    with `fetch_all` (train-run --verify) every shard is fetched first, in order."""
    if not is_remote(data_dir):
        return True
    if not fetch_all:
        return False
    problems = Fetcher(data_dir).fetch_all(progress=True)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FormatError(problems[0] + more)
    return True


def verify(path_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
           checksums: bool = True, progress: bool = False, **kw: Any) -> list[str]:
    """format.verify for a directory; for a URL, fetch every shard into the cache (each sha256-
    checked on arrival; refused ones are reported) and verify the cache view."""
    if not is_url(str(path_or_url)):
        return fmt.verify(path_or_url, checksums=checksums, progress=progress, **kw)
    try:
        view = resolve(path_or_url, cache_dir)
    except FormatError as e:
        return [str(e)]
    problems = Fetcher(view, check_packs=False).fetch_all(progress=progress)
    manifest = fmt.read_manifest(view)
    for entry in manifest.get("reference_logps") or ():
        problems += fetch_reference(view, entry, manifest, progress)
    if problems:
        return problems
    return fmt.verify(view, checksums=checksums, progress=progress, **kw)


def fetch_reference(view: str | os.PathLike, entry: dict, manifest: dict | None = None,
                    progress: bool = False) -> list[str]:
    """Fetch the sidecar files of one ``reference_logps`` entry (:mod:`pack.reference`) into a
    cache view, each checked against its size and sha256 like a shard; return the problems.
    A local dataset needs nothing fetched."""
    if not is_remote(view):
        return []
    m = manifest if manifest is not None else fmt.read_manifest(view)
    for info in entry["shards"]:
        fmt.check_relative_path(info["path"])
    return Fetcher(view, {**m, "shards": entry["shards"]}, check_packs=False).fetch_all(progress)

