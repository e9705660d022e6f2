"""Data: the authors' copy of the end-task data, pinned to a commit, each file checked against its SHA-256."""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request

from .common import ReproduceError, atomic_path, progress_bar, warn
from .paper import DAPT_FILES, TASKS



DATA_URL = "https://raw.githubusercontent.com/ldery/TARTAN/471b8f21c006c443fca5db5678d283326534465c/datasets"
SHA256 = {  # ../shared/data/SHA256SUMS. No pinned hash is known for domain.10xTAPT.txt: it is not verified.
    "chemprot/dev.jsonl": "bfe8f39e5146ad4bb16b23707dade850546a305047bc666f6f6824c6a7e3df2f",
    "chemprot/domain.1xTAPT.txt": "7106a37fdaa02e62d060ae1d93dc7863349615d87a9115e4f65830f73e9d06ac",
    "chemprot/test.jsonl": "372249c85ffea6d9a18dc5168cf45841b3d79b03412d6c620381cfc0dd3d6d49",
    "chemprot/train.jsonl": "ab17b85c4fb869b2338d7c9617414e63f3c7225e5005920b18d9cd996f1049d8",
    "chemprot/train.txt": "56737b9918b8f48544474effd6891ab6a054f506716f1f4fe60b4fdb46aed350",
    "citation_intent/dev.jsonl": "bc456ac8caf40829dc2d3a44801a385ad8463c80682cbf002c19329b35812b5f",
    "citation_intent/domain.1xTAPT.txt": "a2caa22a5bf7aa0a0cab9d1d2ea56090200948adb5adfc30eae1b46f325fc69f",
    "citation_intent/test.jsonl": "749d083cc3141d54a2bf1475c02a5a1c020c664601d55fe2829bdf85f06db4bb",
    "citation_intent/train.jsonl": "58eef60d2bbfdabefc3de25191714f769db03134523ef67e87d864112c67908c",
    "citation_intent/train.txt": "7d98e80e195dd7618e851b55f5d2df6e283e0e19b825c5a5c554bc0d7257dda9",
    "hyperpartisan/dev.jsonl": "46e57a9e9a457804cf14af48bdb82723cb6dde887e082c8937122ebfc0f2dc4e",
    "hyperpartisan/dev.txt": "06344ed0d4430a0d40415cfe0cff51d737a9db129a998929d52d3ab1f6e3d96a",
    "hyperpartisan/test.jsonl": "055a0adfe0b6556068a3feabef6ba7fd011a7da07f75c316141c7a485ca3b63c",
    "hyperpartisan/test.txt": "8eededc90afd2ef9c50305b123f863f662bb14f87ece18bd84a8520c8784f0b5",
    "hyperpartisan/train.jsonl": "180cc9b1dad0e05b8dbc3ce866e6b371d5da0fccf41d249552d59c30c233e8f2",
    "hyperpartisan/train.txt": "d6948a06b9514160f257b5e8a931f9b29b50008bf5f273844e4b2c76a65a7736",
    "sciie/dev.jsonl": "9500a8e561f1ce50d972b8473525fe24ebae732bde653c381a4c65945965567a",
    "sciie/domain.1xTAPT.txt": "2114f88a2d3f6af976908da223215650fda7a9636f402291922af4e230a1aa77",
    "sciie/test.jsonl": "be4c06d2b8903783818a5e4cba08c71b954a86f00021907706f66ac3e26c58bd",
    "sciie/train.jsonl": "83d395d97de2c02dcb4898af3c6e34b5f5aa19771298fbc9f69ae435fa1258fb",
    "sciie/train.txt": "a8f11091d7167a6842e6d4eaabce6911db5d1ed49775d7bbc1cb6394cbf8ad11",
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NOT_PUBLIC = {"domain.full.txt"}  # never downloaded: the paper's full DAPT corpora are not public


def file_digest(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str, sha256: str | None = None, md5: str | None = None, timeout: float = 60,
             progress: bool = False) -> str:
    """Fetch url to dest through a temporary file in the same folder, check its digest, then rename: an interrupted
    or bad download leaves nothing at dest. Errors name the URL and say how to place the file by hand."""
    by_hand = f"Place it by hand as {dest} (curl -L -o FILE URL, or a copy): files there are used as they are."
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    try:
        with atomic_path(dest, ".part") as tmp:
            with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0)
                bar = progress_bar(total, progress and total > (1 << 22), f"download {os.path.basename(dest)}",
                                   unit="B")
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    for h in digests.values():
                        h.update(chunk)
                    bar.update(len(chunk))
                bar.close()
            for name, want in (("sha256", sha256), ("md5", md5)):
                got = digests[name].hexdigest()
                if want is not None and got != want:
                    raise ReproduceError(f"{url}: checksum mismatch ({name.upper()} {got}, expected {want}); the file "
                                         f"was not kept. {by_hand}")
    except urllib.error.URLError as e:
        raise ReproduceError(f"could not download {url}: {e.reason}. {by_hand}") from None
    except (OSError, ValueError) as e:
        where = "write" if isinstance(e, PermissionError) else "download"
        hint = "; choose a writable --data-dir" if where == "write" else ""
        raise ReproduceError(f"could not {where} {url if where == 'download' else dest}: {e}{hint}. {by_hand}") from None
    return dest


def ensure_file(data_dir: str, rel: str, base_url: str = DATA_URL, hashes: dict | None = None,
                progress: bool = False) -> str:
    """data_dir/rel, downloaded from base_url/rel on first use. A file already there is used as it is (a warning says
    when it differs from the pinned SHA-256)."""
    hashes = SHA256 if hashes is None else hashes
    path = os.path.join(data_dir, *rel.split("/"))
    want = hashes.get(rel)
    if os.path.isfile(path):
        if want is not None and file_digest(path) != want:
            warn(f"{path} differs from the authors' copy (SHA-256 {want}); using it as it is")
        return path
    if os.path.basename(rel) in NOT_PUBLIC:
        raise ReproduceError(f"{path} not found. The paper's full DAPT corpora are not public; place your own domain "
                             f"text there (one example per line), or pass --dapt-corpus 1x, 10x or a file.")
    download(f"{base_url}/{rel}", path, sha256=want, progress=progress)
    if want is None:
        warn(f"{rel}: no pinned SHA-256 is known for this file, so it was not verified (its SHA-256, "
             f"{file_digest(path)}, is recorded in each result file)")
    return path


# Text end-tasks and auxiliary MLM corpora ------------------------------------------------------------------------------


def corpus_file(task: str, label: str, extra: dict) -> str:
    """Relative path (under the data folder) or absolute path of an auxiliary corpus: tapt = the end-task's own
    training text (train.txt); dapt1x / dapt10x / daptfull = in-domain text of n = 1x / 10x |Train| / all."""
    folder = TASKS[task]["folder"]
    if label == "tapt":
        return f"{folder}/train.txt"
    if label.startswith("dapt") and label[4:] in DAPT_FILES:
        if task == "hyperpartisan":
            raise ReproduceError("hyperpartisan has no domain corpus in the authors' release: pass one with "
                                 "--dapt-corpus FILE")
        return f"{folder}/{DAPT_FILES[label[4:]]}"
    if label in extra:
        return os.path.abspath(extra[label])
    raise ReproduceError(f"unknown auxiliary corpus '{label}'")


def model_identity(name: str) -> str:
    """How a result file names its model, so that it travels between machines: a Hub id as it is; a local folder by
    the installed package that ships it ("package==version/subfolder") where there is one, else by a SHA-256 over
    its weight, config and tokenizer files; never by the path where it happens to sit."""
    path = os.path.realpath(os.path.expanduser(name))  # a symlink to the package's folder is that folder
    if not os.path.isdir(path):
        return name
    from importlib.metadata import packages_distributions, version
    for root in sys.path:  # a folder inside an installed package: name that package and its version
        root = os.path.realpath(root or ".")
        # pip installs into site-packages, Debian's system Python into dist-packages
        if root != path and path.startswith(root + os.sep) and ("site-packages" in root or "dist-packages" in root):
            top, *rest = os.path.relpath(path, root).split(os.sep)
            dists = packages_distributions().get(top)
            if dists:
                return f"{dists[0]}=={version(dists[0])}" + "".join("/" + r for r in rest)
    weights = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".h5", ".msgpack")))
    if not weights:
        return f"local folder without weight files: {os.path.basename(path)}"
    h = hashlib.sha256()  # the weights, and the config and tokenizer files beside them (a dropout edited in place)
    for f in weights + sorted(f for f in os.listdir(path) if f.endswith((".json", ".txt", ".model"))):
        h.update(f.encode() + b"\0" + file_digest(os.path.join(path, f)).encode())
    return f"local weights sha256:{h.hexdigest()}"
