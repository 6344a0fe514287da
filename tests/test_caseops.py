"""CaseOps (FRONTIER §6): the lossless case transform, the CaseOps dataset build and its byte side-car."""
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from test_data import corpus_docs, run_prepare, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import caseops  # noqa: E402

OPERATOR_CHARS = re.compile("[\ue001-\ue004]")


def ascii_lower(text: str) -> str:
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in text)


def check_round_trip(text: str) -> str:
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert not re.search("[A-Z]", encoded)  # the case lives in the operators only
    # Independent of the rules: dropping every operator character leaves the text, lowercased.
    assert OPERATOR_CHARS.sub("", encoded) == OPERATOR_CHARS.sub("", ascii_lower(text))
    return encoded


# --------------------------------------------------------------------------------------------------
# The transform


def test_round_trip_on_corpus_documents(corpus_path):
    docs = corpus_docs(corpus_path, 300)
    encoded = [check_round_trip(text) for text in docs]
    assert sum(e != t for e, t in zip(encoded, docs)) > 250  # nearly every document has capitals
    assert all(any(op in e for e in encoded) for op in (caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT))


@pytest.mark.parametrize("text,expected", [  # FRONTIER §6's rules, spelt out by hand
    ("", ""),
    ("plain words 123", "plain words 123"),
    ("The NASA McDonald iPhone", "\ue001the \ue002nasa \ue001mc\ue003donald i\ue003phone"),
    ("A I a", "\ue001a \ue001i a"),                                   # a single capital is a Title word
    ("ABc aBC", "\ue001a\ue003bc a\ue003b\ue003c"),                    # mixed case: CAPNEXT per later capital
    ("x1Y2z", "x1\ue001y2z"),                                         # digits end a run
    ("Été ÉTÉ Straße", "Été É\ue001tÉ \ue001straße"),                 # only ASCII letters: É and ß are untouched
    ("ǅungla ＡＢ", "ǅungla ＡＢ"),                                    # non-ASCII capitals are untouched
    ("\ue001 \ue004\ue004X", "\ue004\ue001 \ue004\ue004\ue004\ue004\ue001x"),  # literal operators are escaped
    ("ab\ue002CD", "ab\ue004\ue002\ue002cd"),                         # a literal operator ends the run
])
def test_encode_follows_the_rules(text, expected):
    assert check_round_trip(text) == expected


def test_random_strings_round_trip_and_decode_accepts_only_encodings():
    """Bijectivity: every text round-trips, and decode accepts a string exactly when encode makes it."""
    rng = random.Random(0)
    alphabet = "aAbBzZ 1.É\ue001\ue002\ue003\ue004"
    accepted = 0
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        check_round_trip(text)
        try:
            decoded = caseops.decode(text)
        except caseops.CaseOpsError:
            continue
        accepted += 1
        assert caseops.encode(decoded) == text
    assert 1000 < accepted < 19_000  # both branches were exercised


@pytest.mark.parametrize("text,message", [
    ("\ue001", "position 0: TITLE not followed by a lowercase letter"),
    ("\ue002 x", "position 0: ALLCAPS not followed by a lowercase letter"),
    ("x \ue003a", "position 2: CAPNEXT not between two letters of a word"),
    ("a\ue003", "position 1: CAPNEXT not between two letters of a word"),
    ("ok\ue004", "position 2: ESCAPE not followed by an operator character"),
    ("\ue004a", "position 0: ESCAPE not followed by an operator character"),
    ("Abc", "position 0: capital 'A'"),
    ("ab\ue001cd", "position 2: word operator '\\ue001' inside a word"),
    ("\ue002a", "ALLCAPS must be followed by 2+ lowercase letters"),
    ("\ue002a\ue003b", "ALLCAPS must be followed by 2+ lowercase letters"),
    ("\ue001a\ue003b", "an all-capital word is spelt ALLCAPS"),
])
def test_decode_rejects_malformed_input(text, message):
    with pytest.raises(caseops.CaseOpsError, match=re.escape(message)):
        caseops.decode(text)


# --------------------------------------------------------------------------------------------------
# prepare_docs.py --caseops and the byte proof (docs/BYTES.md)

# Documents where NFKC and the transform interact, and literal operators: normalising after the
# transform would break these (™ and fullwidth letters become ASCII capitals; "t" + U+0308 composes).
ADVERSARIAL_DOCS = [
    "Trademark™ and ＦＵＬＬＷＩＤＴＨ text, ﬁne Ⅻ.",
    "J\u030cohn T\u0308 H\u0331 W\u030a Y\u030a: decomposed marks after capitals.",
    "Literal operators \ue001Title \ue002 \ue003x \ue004\ue004\ue001 and a \u2581 mark.",
    "  Leading spaces,\n\ntabs\tand  runs  of\u00a0spaces, CamelCase, iPhone, NASA.  ",
]


@pytest.fixture(scope="module")
def caseops_dataset(tmp_path_factory):
    """Built once for the module (training a tokenizer takes a while): (data folder, documents)."""
    from conftest import _corpus_file

    docs = list(ADVERSARIAL_DOCS) + list(corpus_docs(_corpus_file("docs.jsonl.xz"), 300))
    folder = tmp_path_factory.mktemp("caseops")
    source = write_jsonl(folder / "docs.jsonl", docs)
    run_prepare("--docs", source, "--vocab-size", 512, "--val-docs", 60, "--tokenizer-docs", 300, "--caseops",
                "--workers", 2, "--out", folder / "out")
    return folder / "out", docs


def test_caseops_dataset_layout_and_manifest(caseops_dataset):
    out, docs = caseops_dataset
    dataset = out / "datasets" / "docs_sp512_caseops"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["tokenizer"]["file"] == "tokenizers/docs_sp512_caseops.model"
    assert (manifest["caseops"], manifest["val_docs"], manifest["val_docs_in_train"]) == (True, 60, 0)
    assert "60 documents" in manifest["not_comparable"]
    assert [s["file"] for s in manifest["splits"]["val"]["byte_sidecar"]] == ["fineweb_val_bytes_000000.bin"]
    sp = tg.load_tokenizer(str(out / manifest["tokenizer"]["file"]), 512)
    assert tg.is_caseops(sp, {}) and tg.is_caseops(sp, manifest)  # from the tokenizer alone, too
    for op in caseops.OPERATORS:  # each operator is one piece, never merged into another
        assert sp.encode(f"ab{op}cd") == sp.encode("ab") + [sp.piece_to_id(op)] + sp.encode("cd")


def test_sidecar_counts_the_normalised_original_bytes_of_every_document(caseops_dataset, sp8192_model_path):
    out, docs = caseops_dataset
    dataset = out / "datasets" / "docs_sp512_caseops"
    sp = tg.load_tokenizer(str(out / "tokenizers" / "docs_sp512_caseops.model"), 512)
    # "As the tokenizer normalises it": the challenge tokenizer's own normaliser, not the one the build used.
    challenge_sp = tg.load_tokenizer(str(sp8192_model_path), 8192)
    val = tg.load_validation_tokens(str(dataset), 512)
    sidecar = tg.read_shard(str(dataset / "fineweb_val_bytes_000000.bin")).astype(np.int64)
    starts = [*np.flatnonzero(val.numpy() == tg.BOS_ID), len(val)]
    assert len(starts) - 1 == 60
    for text, a, b in zip(docs, starts, starts[1:]):
        original = challenge_sp.normalize(text).replace("\u2581", " ")
        assert int(sidecar[a:b].sum()) == len(original.encode("utf-8")), text[:60]
        assert caseops.decode(sp.decode(val[a + 1:b].tolist())) == original  # the tokens spell the transformed text
    # train_gpt.py scores exactly these bytes, and warns that 60 documents are not the challenge's split.
    logged = []
    target_bytes = tg.validation_target_bytes(str(dataset), val, tg.build_byte_tables(sp, 512), True, logged.append)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert int(target_bytes.sum()) == manifest["splits"]["val"]["normalized_bytes"] == int(sidecar.sum())
    assert logged[1].startswith("WARNING: CaseOps validation split of 60 documents")
    # The tables would count the transformed text instead: the side-car is not optional.
    tables = tg.build_byte_tables(sp, 512)
    assert int(tables.target_bytes(val[:-1], val[1:]).sum()) != int(sidecar.sum())


def test_caseops_training_split_decodes_to_the_documents(caseops_dataset, sp8192_model_path):
    out, docs = caseops_dataset
    dataset = out / "datasets" / "docs_sp512_caseops"
    sp = tg.load_tokenizer(str(out / "tokenizers" / "docs_sp512_caseops.model"), 512)
    challenge_sp = tg.load_tokenizer(str(sp8192_model_path), 8192)
    train = np.concatenate([tg.read_shard(f, 512) for f in tg.list_shards(str(dataset), "train")])
    starts = [*np.flatnonzero(train == tg.BOS_ID), len(train)]
    assert len(starts) - 1 == len(docs) - 60
    for text, a, b in list(zip(docs[60:], starts, starts[1:]))[:50]:
        assert caseops.decode(sp.decode(train[a + 1:b].tolist())) == challenge_sp.normalize(text).replace("\u2581", " ")


def test_train_gpt_refuses_caseops_data_without_its_sidecar(tmp_path, caseops_dataset):
    out, _ = caseops_dataset
    dataset = out / "datasets" / "docs_sp512_caseops"
    val = tg.load_validation_tokens(str(dataset), 512)
    sp = tg.load_tokenizer(str(out / "tokenizers" / "docs_sp512_caseops.model"), 512)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "fineweb_val_000000.bin").write_bytes((dataset / "fineweb_val_000000.bin").read_bytes())
    with pytest.raises(tg.DataError, match="CaseOps dataset without a byte side-car"):
        tg.validation_target_bytes(str(bare), val, tg.build_byte_tables(sp, 512), tg.is_caseops(sp, {}))
