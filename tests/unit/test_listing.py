"""Listing inputs: trees, globs, brace ranges, lists and list files, locally and with stable ids."""

from __future__ import annotations

import pytest

from clipbatch.errors import UserError
from clipbatch.spec import InputSpec
from clipbatch.pipeline.listing import list_images


def listed(path, **kw):
    table = list_images(InputSpec(path=path, **kw))
    return dict(zip(table["id"].to_pylist(), table["source"].to_pylist()))


def test_directory_tree_ids_are_relative_paths(images):
    rows = listed(str(images))
    assert len(rows) == 24
    assert rows["group0/img000.jpg"] == str(images / "group0" / "img000.jpg")
    assert all(not i.startswith("/") for i in rows)


def test_directory_skips_non_images_and_hidden_files(tmp_path, images):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.JPG").write_bytes((images / "group0" / "img000.jpg").read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("caption")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"")
    assert list(listed(str(tmp_path))) == ["a/x.JPG"]


def test_glob_root_is_the_part_before_the_wildcard(images):
    rows = listed(str(images / "group1" / "*.jpg"))
    assert rows and all("/" not in i and i.endswith(".jpg") for i in rows)
    deep = listed(str(images) + "/**/*.png")
    assert all(i.startswith("group") and i.endswith(".png") for i in deep)


def test_brace_range_and_list(images):
    rows = listed(str(images / "group{0..1}"))
    assert {i.split("/")[0] for i in rows} == {"group0", "group1"}
    both = listed([str(images / "group0"), str(images / "group2")])
    assert {i.split("/")[0] for i in both} == {"group0", "group2"}


def test_list_file_with_relative_and_absolute_entries(tmp_path, images):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# my images\n{images}/group0/img000.jpg\n\n{images}/group1/img001.png\n")
    rows = listed(str(listing))
    assert set(rows) == {"group0/img000.jpg", "group1/img001.png"}
    (images / "rel.txt").write_text("group2/img002.webp\n")
    try:
        assert list(listed(str(images / "rel.txt"))) == ["img002.webp"]
    finally:
        (images / "rel.txt").unlink()


def test_single_file(images):
    assert list(listed(str(images / "group0" / "img000.jpg"))) == ["img000.jpg"]


def test_duplicates_listed_once(images):
    rows = list_images(InputSpec(path=[str(images / "group0"), str(images / "group0" / "img000.jpg")]))
    assert rows.num_rows == len(set(rows["source"].to_pylist()))


@pytest.mark.parametrize("path, message", [("/no/such/dir", "does not exist"),
                                           ("/no/such/*.jpg", "no images found")])
def test_missing_inputs(path, message):
    with pytest.raises(UserError, match=message):
        list_images(InputSpec(path=path))


def test_mixed_protocols_refused(images):
    with pytest.raises(UserError, match="mixes storage protocols"):
        list_images(InputSpec(path=[str(images), "s3://bucket/x"]))


def test_list_file_of_remote_uris_is_not_read(tmp_path):
    """A million-URI list is planned without touching the store: entries are taken as written."""
    listing = tmp_path / "uris.txt"
    listing.write_text("s3://bucket/shards/a/1.jpg\ns3://bucket/shards/b/2.jpg\n")
    rows = listed(str(listing), storage_options={"endpoint_url": "http://127.0.0.1:9"})
    assert rows == {"a/1.jpg": "s3://bucket/shards/a/1.jpg", "b/2.jpg": "s3://bucket/shards/b/2.jpg"}
