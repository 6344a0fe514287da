"""Download the challenge's published FineWeb shards and tokenizer from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80 [--repo-id OWNER/NAME] [--out data/]

Writes the standard layout: OUT/datasets/<dataset>/fineweb_{val,train}_NNNNNN.bin with a
manifest.json, and OUT/tokenizers/<tokenizer>.model (+ .vocab). In the hub repos every file lives
under datasets/ (datasets/datasets/..., datasets/tokenizers/..., and for sp1024 and CaseOps
datasets/manifest.json). Downloads go through huggingface_hub's cache, which is keyed by repo id,
so a manifest fetched from one repo is never read for another. Without the hub, build a dataset
from local documents with data/prepare_docs.py.

--variant sp8192-caseops is the public CaseOps export (FRONTIER §6): case-transformed text, its own
tokenizer, and the validation byte side-car fineweb_val_bytes_NNNNNN.bin that train_gpt.py needs.
Every download is checked before anything is placed: no validation document may appear in the
training shards (the --val-docs trap), and a CaseOps validation split of fewer than 50,000
documents is flagged in the manifest as not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prepare_docs import BOS_ID, SHARD_HEADER_INTS, LeakCheck, document_hash, document_hashes, not_comparable, sha256_of

REMOTE_ROOT = "datasets"


@dataclass(frozen=True)
class Variant:
    repo_id: str          # default hub repo
    vocab_size: int
    remote_dataset: str   # folder under datasets/datasets/ in the repo
    tokenizer: str        # datasets/tokenizers/<tokenizer>.model (+ .vocab) in the repo
    local_dataset: str    # folder under OUT/datasets/ (the DATASET knob of train_gpt.py)
    caseops: bool = False


VARIANTS = {
    "sp1024": Variant("willdepueoai/parameter-golf", 1024, "fineweb10B_sp1024", "fineweb_1024_bpe", "fineweb10B_sp1024"),
    "sp8192": Variant("kevclark/parameter-golf", 8192, "fineweb10B_sp8192", "fineweb_8192_bpe", "fineweb10B_sp8192"),
    "sp8192-caseops": Variant("romeerp/parameter-golf-caseops-v1", 8192, "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                              "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved", "fineweb10B_sp8192_caseops", caseops=True),
}
NO_HUB_HINT = "to work without the hub, build a dataset from local documents with data/prepare_docs.py"


class DownloadError(Exception):
    """main() prints the one-line message and exits non-zero."""


@dataclass
class RemoteFiles:
    """Paths inside the hub repo."""
    manifest: str
    val: str          # glob of the validation shards (digits only: not the side-car)
    sidecar: str      # glob of the validation byte side-car
    train: list[str]
    tokenizer: str    # glob of the tokenizer files


def remote_files(variant: Variant, train_shards: int) -> RemoteFiles:
    dataset = f"{REMOTE_ROOT}/datasets/{variant.remote_dataset}"
    return RemoteFiles(f"{REMOTE_ROOT}/manifest.json", f"{dataset}/fineweb_val_[0-9]*.bin", f"{dataset}/fineweb_val_bytes_*.bin",
                       [f"{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)],
                       f"{REMOTE_ROOT}/tokenizers/{variant.tokenizer}.*")


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


def check_manifest(snapshot: Path, manifest_path: str, repo_id: str, name: str, train_shards: int) -> None:
    """When the repo publishes a manifest, it must list this dataset with enough training shards."""
    path = snapshot / manifest_path
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        raise DownloadError(f"{repo_id}: its manifest.json lists no {name}; pick the repo that has it with --repo-id")
    available = int((entry.get("stats") or {}).get("files_train", train_shards))
    if train_shards > available:
        raise DownloadError(f"{repo_id}: {name} has {available} training shards, {train_shards} requested; lower --train-shards")


def shard_tokens(path: Path) -> np.ndarray:
    """The tokens of one shard (memory-mapped; the header's count is trusted, train_gpt.py checks it again)."""
    count = int(np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)[2])
    return np.memmap(path, dtype="<u2", mode="r", offset=4 * SHARD_HEADER_INTS, shape=(count,)) if count else np.zeros(0, "<u2")


def stream_document_hashes(paths: list[Path]):
    """Hashes of every document of a split whose documents run across its shards (a document may
    straddle a shard boundary)."""
    carry = np.zeros(0, dtype="<u2")
    for path in paths:
        tokens = shard_tokens(path)
        starts = np.flatnonzero(tokens == BOS_ID)
        if len(starts) == 0:
            carry = np.concatenate((carry, tokens))
            continue
        head = np.concatenate((carry, tokens[:starts[0]]))  # the document the previous shard began
        if len(head):
            yield document_hash(head)
        yield from document_hashes(tokens[starts[0]:starts[-1]])
        carry = np.array(tokens[starts[-1]:])
    if len(carry):
        yield document_hash(carry)


def check_no_leak(val: list[Path], train: list[Path], repo_id: str, allow_overlap: int) -> tuple[int, int]:
    """(validation documents, of which also in training); DownloadError past allow_overlap."""
    leaks = LeakCheck()
    leaks.add_val(list(stream_document_hashes(val)))
    leaks.add_train(list(stream_document_hashes(train)))
    if leaks.leaked > allow_overlap:
        raise DownloadError(f"{repo_id}: {leaks.message()}; use a repo whose splits are disjoint, or pass "
                            f"--allow-overlap {leaks.leaked} if you know these are harmless duplicates")
    return sum(leaks.val.values()), leaks.leaked


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


def shard_entries(paths: list[Path]) -> list[dict]:
    return [{"file": p.name, "tokens": len(shard_tokens(p)), "sha256": sha256_of(p)} for p in paths]


def download(variant_name: str, train_shards: int, repo_id: str, out: Path, allow_overlap: int = 0) -> list[Path]:
    variant = VARIANTS[variant_name]
    remote = remote_files(variant, train_shards)
    snapshot = fetch_snapshot(repo_id, [remote.manifest, remote.val, remote.sidecar, *remote.train, remote.tokenizer])
    check_manifest(snapshot, remote.manifest, repo_id, variant.remote_dataset, train_shards)

    val, sidecar = sorted(snapshot.glob(remote.val)), sorted(snapshot.glob(remote.sidecar))
    if not val:
        raise DownloadError(f"{repo_id}: no {remote.val} found (or cached); check --variant/--repo-id")
    if variant.caseops and len(sidecar) != len(val):
        raise DownloadError(f"{repo_id}: {len(sidecar)} byte side-car files ({remote.sidecar}) for {len(val)} validation "
                            "shards; a CaseOps dataset cannot be scored without them, check --repo-id")
    train = [snapshot / p for p in remote.train]
    missing = [p for p in remote.train if not (snapshot / p).is_file()]
    if missing:
        raise DownloadError(f"{repo_id}: {len(missing)} of {train_shards} requested training shards are missing "
                            f"(first: {missing[0]}); lower --train-shards or reconnect to the hub")
    model = snapshot / f"{REMOTE_ROOT}/tokenizers/{variant.tokenizer}.model"
    if not model.is_file():
        raise DownloadError(f"{repo_id}: tokenizer {model.relative_to(snapshot)} not found; check --variant/--repo-id")
    val_docs, leaked = check_no_leak(val, train, repo_id, allow_overlap)

    dataset_dir = out / "datasets" / variant.local_dataset
    placed = []
    for source in [*val, *sidecar, *train]:
        placed.append(dataset_dir / source.name)
        place(source, placed[-1])
    for source in sorted(snapshot.glob(remote.tokenizer)):
        placed.append(out / "tokenizers" / source.name)
        place(source, placed[-1])
    flag = not_comparable(variant.caseops, val_docs)
    manifest = {
        "name": variant.local_dataset,
        "source": {"kind": "hub", "repo_id": repo_id, "revision": snapshot.name, "dataset": variant.remote_dataset},
        "vocab_size": variant.vocab_size,
        "caseops": variant.caseops,
        "val_docs": val_docs,
        "not_comparable": flag,
        "val_docs_in_train": leaked,
        "tokenizer": {"file": f"tokenizers/{model.name}", "sha256": sha256_of(model)},
        "splits": {"val": {"shards": shard_entries(val), **({"byte_sidecar": shard_entries(sidecar)} if sidecar else {})},
                   "train": {"shards": shard_entries(train)}},
    }
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if flag:
        print(f"cached_challenge_fineweb: warning: {flag}: its scores are not comparable with the challenge's", file=sys.stderr)
    return placed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp8192", help="tokenizer family")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (1e8 tokens each)")
    parser.add_argument("--repo-id", help="hub dataset repo; default: the variant's published repo")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="data folder to fill (default: the data/ folder holding this script)")
    parser.add_argument("--allow-overlap", type=int, default=0,
                        help="accept up to N validation documents that also appear in the training shards (default 0)")
    args = parser.parse_args(argv)
    if args.train_shards < 0 or args.allow_overlap < 0:
        parser.error("--train-shards and --allow-overlap must be >= 0")
    repo_id = args.repo_id or VARIANTS[args.variant].repo_id
    try:
        placed = download(args.variant, args.train_shards, repo_id, args.out, args.allow_overlap)
    except DownloadError as error:
        print(f"cached_challenge_fineweb: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(placed)} files from {repo_id} in {args.out / 'datasets' / VARIANTS[args.variant].local_dataset}", file=sys.stderr)


if __name__ == "__main__":
    main()
