"""The hub loaders on local files shaped like the hub's (PG19 parquet, proof-pile and C4 jsonl.gz, BookSum
parquet), read through the same `datasets` builders as the hub copies."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infini_bench.data import hub_documents, is_arxiv
from infini_bench.errors import ConfigError


def jsonl_gz(path, rows):
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_proof_pile_keeps_only_its_arxiv_rows(tmp_path):
    # As proof-pile's build script writes them: meta is a JSON object, not a string.
    rows = [{"text": f"\\begin{{theorem}} {i} \\end{{theorem}} " * 20, "meta": {"config": c, "file": f"{c}/{i}.tex"}}
            for i, c in enumerate(["arxiv", "books", "arxiv", "stack-exchange", "wiki"])]
    files = jsonl_gz(tmp_path / "proofpile_dev_0.jsonl.gz", rows)
    docs = hub_documents("arxiv_math", "validation", max_docs=10, data_files=files)
    assert [d.text for d in docs] == [rows[0]["text"], rows[2]["text"]]
    loaded = {"meta": {"config": "arxiv", "file": "x"}}  # datasets loads meta as a dict, whose str() uses '
    assert "'arxiv'" in str(loaded["meta"]) and '"arxiv"' not in str(loaded["meta"]) and is_arxiv(loaded)
    assert is_arxiv({"meta": json.dumps({"config": "arxiv"})}) and not is_arxiv({"meta": "arxiv, but not JSON"})


def test_pg19_parquet_named_by_title_and_filtered_by_length(tmp_path):
    table = pa.table({"short_book_title": ["Short", "Long A", "Long B"], "publication_date": [1900, 1901, 1902],
                      "url": ["u0", "u1", "u2"], "text": ["tiny", "a" * 5000, "b" * 6000]})
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    docs = hub_documents("pg19", "test", max_docs=10, min_bytes=1000,
                         data_files=str(tmp_path / "test-00000-of-00001.parquet"))
    assert [(d.name, len(d.text)) for d in docs] == [("Long A", 5000), ("Long B", 6000)]
    assert [d.name for d in hub_documents("pg19", "test", max_docs=1, data_files=str(tmp_path / "*.parquet"))] == ["Short"]


def test_c4_json_named_by_url(tmp_path):
    rows = [{"text": f"web page {i} " * 50, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
            for i in range(3)]
    docs = hub_documents("c4", "validation", max_docs=2, data_files=jsonl_gz(tmp_path / "c4-validation.json.gz", rows))
    assert [d.name for d in docs] == ["https://example.org/0", "https://example.org/1"]


def test_no_matching_rows_is_one_config_error(tmp_path):
    files = jsonl_gz(tmp_path / "x.jsonl.gz", [{"text": "t", "meta": {"config": "books", "file": "f"}}])
    with pytest.raises(ConfigError, match="returned no documents"):
        hub_documents("arxiv_math", "test", max_docs=5, data_files=files)


def test_booksum_parquet_rows(tmp_path):
    from tasks.booksum import group_by_book, hub_rows

    table = pa.table({"bid": [7, 7, 9], "title": ["A", "A", "B"], "book": ["book a", "book a", "book b"],
                      "summary": ["s1", "s2", "s3"], "source": ["gradesaver", "sparknotes", "cliffnotes"]})
    pq.write_table(table, tmp_path / "test.parquet")
    rows = hub_rows("test", data_files=str(tmp_path / "test.parquet"))
    assert rows[0] == {"bid": 7, "title": "A", "book": "book a", "summary": "s1"}
    books = group_by_book(rows)
    assert [(b.bid, b.references) for b in books] == [("7", ("s1", "s2")), ("9", ("s3",))]
