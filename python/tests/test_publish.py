import os
import shutil

import pytest

import palisade


def write_output(root, buckets, salt=""):
    """What Spark's partitionBy("bucket") leaves: part files, _SUCCESS, .crc files."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    open(os.path.join(root, "_SUCCESS"), "w").close()
    for b in buckets:
        d = os.path.join(root, f"bucket={b}")
        os.makedirs(d)
        with open(os.path.join(d, f"part-0000-{salt}{b}.csv"), "w") as f:
            f.write(f"id\n{b}\n")
        open(os.path.join(d, f".part-0000-{salt}{b}.csv.crc"), "w").close()


def test_publish_writes_changed_partitions_only_and_reports_like_the_cli(tmp_path):
    src, dest = tmp_path / "out", tmp_path / "dest"
    url = f"file://{dest}"
    write_output(src, range(3))
    first = palisade.publish(str(src), url, fencing_token=5)
    assert first["written"] == ["bucket=0", "bucket=1", "bucket=2"] and first["unchanged"] == 0
    assert first["generation"] == 1 and first["fencing_token"] == 5 and first["bytes_written"] > 0
    assert set(first) == {"src", "dest", "dry_run", "written", "unchanged", "removed", "kept",
                          "bytes_written", "bytes_hashed", "generation", "fencing_token", "seconds"}

    write_output(src, range(3), salt="rerun-")  # new part-file names, same bytes
    again = palisade.publish(str(src), url, fencing_token=6)
    assert again["written"] == [] and again["bytes_written"] == 0 and again["unchanged"] == 3

    pq = pytest.importorskip("pyarrow.dataset")
    table = pq.dataset(str(dest), format="csv", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == [0, 1, 2]

    write_output(src, [0, 1])
    kept = palisade.publish(str(src), url, fencing_token=6)
    assert kept["kept"] == ["bucket=2"] and kept["removed"] == []
    removed = palisade.publish(str(src), url, fencing_token=6, remove_missing=True)
    assert removed["removed"] == ["bucket=2"]


def test_an_older_fencing_token_is_refused(tmp_path):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_output(src, [1])
    palisade.publish(str(src), url, fencing_token=7)
    write_output(src, [1, 2])
    with pytest.raises(palisade.Fenced, match="lower than the token 7"):
        palisade.publish(str(src), url, fencing_token=6)
    with pytest.raises(palisade.Fenced, match="records fencing token 7"):
        palisade.publish(str(src), url)


def test_publish_under_run_exclusive_uses_the_lock_token(tmp_path):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_output(src, [1])
    c = palisade.Coordinator.file(str(tmp_path / "locks"))
    ran = c.run_exclusive(
        "publish", lambda: palisade.publish(str(src), url,
                                            fencing_token=palisade.current_job().fencing_token))
    assert ran.value["fencing_token"] == ran.fencing_token and ran.value["written"] == ["bucket=1"]


@pytest.mark.parametrize(
    "setup, kwargs, match",
    [
        (lambda src: write_output(src, []), {}, "holds no data files"),
        (lambda src: write_output(src, [1]), {"content": "rows"}, "not available from Python"),
        (lambda src: write_output(src, [1]), {"content": "lines"}, "expected"),
        (lambda src: (write_output(src, [1]), open(os.path.join(src, "top.csv"), "w").close()),
         {}, "top of SRC"),
        (lambda src: write_output(src, [1]), {"dest": "ftp://nowhere/x"}, "ftp"),
    ],
)
def test_bad_input_raises_a_clear_exception(tmp_path, setup, kwargs, match):
    src = tmp_path / "out"
    setup(str(src))
    dest = kwargs.pop("dest", f"file://{tmp_path / 'dest'}")
    with pytest.raises(palisade.ConfigError, match=match):
        palisade.publish(str(src), dest, **kwargs)
