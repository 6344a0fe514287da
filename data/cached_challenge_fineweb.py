"""Download the challenge's published FineWeb shards and tokenizer from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80 [--repo-id OWNER/NAME] [--out data/]

Writes the standard layout: OUT/datasets/fineweb10B_sp{V}/fineweb_{val,train}_NNNNNN.bin and
OUT/tokenizers/fineweb_{V}_bpe.model (+ .vocab). In the hub repos every file lives under datasets/
(datasets/datasets/..., datasets/tokenizers/..., and for sp1024 datasets/manifest.json).
Downloads go through huggingface_hub's cache, which is keyed by repo id, so a manifest fetched
from one repo is never read for another. Without the hub, build a dataset from local documents
with data/prepare_docs.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REMOTE_ROOT = "datasets"
VARIANTS = {  # variant -> (default hub repo, vocabulary size)
    "sp1024": ("willdepueoai/parameter-golf", 1024),
    "sp8192": ("kevclark/parameter-golf", 8192),
}
NO_HUB_HINT = "to work without the hub, build a dataset from local documents with data/prepare_docs.py"


class DownloadError(Exception):
    """main() prints the one-line message and exits non-zero."""


def remote_paths(vocab_size: int, train_shards: int) -> tuple[str, str, list[str], str]:
    """(manifest, val-shard pattern, train shard paths, tokenizer pattern) inside the hub repo."""
    dataset = f"{REMOTE_ROOT}/datasets/fineweb10B_sp{vocab_size}"
    train = [f"{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return (f"{REMOTE_ROOT}/manifest.json", f"{dataset}/fineweb_val_*.bin", train,
            f"{REMOTE_ROOT}/tokenizers/fineweb_{vocab_size}_bpe.*")


def fetch_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The repo's files matching patterns, downloaded (or found in the local hub cache when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise DownloadError(f"hub dataset repo {repo_id} is missing or gated ({type(error).__name__}); "
                            "check --repo-id, or log in with `hf auth login` for a gated repo") from None
    except (LocalEntryNotFoundError, OSError) as error:  # OSError covers connection failures not wrapped by the hub
        cause = error.__cause__ or error  # the hub wraps the connection error; show that, on one line
        cause = " ".join(f"{type(cause).__name__}: {cause}".split())[:200]
        raise DownloadError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {repo_id} and it is not "
                            f"in the local hub cache ({cause}); {NO_HUB_HINT}") from None


def check_manifest(snapshot: Path, manifest_path: str, repo_id: str, vocab_size: int, train_shards: int) -> None:
    """When the repo publishes a manifest, it must list this dataset with enough training shards."""
    path = snapshot / manifest_path
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    name = f"fineweb10B_sp{vocab_size}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        raise DownloadError(f"{repo_id}: its manifest.json lists no {name}; pick the repo that has it with --repo-id")
    available = int((entry.get("stats") or {}).get("files_train", train_shards))
    if train_shards > available:
        raise DownloadError(f"{repo_id}: {name} has {available} training shards, {train_shards} requested; lower --train-shards")


def place(source: Path, destination: Path) -> None:
    """Hard-link the cached file into the data folder (copy across file systems); replace anything stale."""
    source = source.resolve(strict=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() and os.path.samefile(source, destination):
        return
    temporary = destination.with_name(destination.name + ".partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, destination)


def download(variant: str, train_shards: int, repo_id: str, out: Path) -> list[Path]:
    vocab_size = VARIANTS[variant][1]
    manifest, val_pattern, train_paths, tokenizer_pattern = remote_paths(vocab_size, train_shards)
    snapshot = fetch_snapshot(repo_id, [manifest, val_pattern, *train_paths, tokenizer_pattern])
    check_manifest(snapshot, manifest, repo_id, vocab_size, train_shards)

    val = sorted(snapshot.glob(val_pattern))
    if not val:
        raise DownloadError(f"{repo_id}: no {val_pattern} found (or cached); check --variant/--repo-id")
    missing = [p for p in train_paths if not (snapshot / p).is_file()]
    if missing:
        raise DownloadError(f"{repo_id}: {len(missing)} of {train_shards} requested training shards are missing "
                            f"(first: {missing[0]}); lower --train-shards or reconnect to the hub")
    model = snapshot / f"{REMOTE_ROOT}/tokenizers/fineweb_{vocab_size}_bpe.model"
    if not model.is_file():
        raise DownloadError(f"{repo_id}: tokenizer {model.relative_to(snapshot)} not found; check --variant/--repo-id")

    dataset_dir = out / "datasets" / f"fineweb10B_sp{vocab_size}"
    placed = []
    for source in [*val, *(snapshot / p for p in train_paths)]:
        placed.append(dataset_dir / source.name)
        place(source, placed[-1])
    for source in sorted(snapshot.glob(tokenizer_pattern)):
        placed.append(out / "tokenizers" / source.name)
        place(source, placed[-1])
    return placed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp8192", help="tokenizer family")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (1e8 tokens each)")
    parser.add_argument("--repo-id", help="hub dataset repo; default: the variant's published repo")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="data folder to fill (default: the data/ folder holding this script)")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    repo_id = args.repo_id or VARIANTS[args.variant][0]
    try:
        placed = download(args.variant, args.train_shards, repo_id, args.out)
    except DownloadError as error:
        print(f"cached_challenge_fineweb: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(placed)} files from {repo_id} in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
