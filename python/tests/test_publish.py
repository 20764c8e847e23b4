import json
import os
import shutil
import subprocess
from pathlib import Path

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
        (lambda src: write_output(src, [1]), {"content": "lines"}, "expected"),
        (lambda src: write_output(src, [1]), {"unit": "row"}, "expected"),
        (lambda src: write_output(src, [1]), {"format": "xml"}, "expected"),
        (lambda src: write_output(src, [1]), {"include": ["["]}, "include"),
        (lambda src: (write_output(src, [1]), open(os.path.join(src, "top.csv"), "w").close()),
         {}, "not inside a Hive-style"),
        (lambda src: (write_output(src, [1]), open(os.path.join(src, "bucket=1", "x.txt"), "w").close()),
         {"content": "rows"}, "x.txt"),
        (lambda src: write_output(src, [1]), {"dest": "ftp://nowhere/x"}, "ftp"),
    ],
)
def test_bad_input_raises_a_clear_exception(tmp_path, setup, kwargs, match):
    src = tmp_path / "out"
    setup(str(src))
    dest = kwargs.pop("dest", f"file://{tmp_path / 'dest'}")
    with pytest.raises(palisade.ConfigError, match=match):
        palisade.publish(str(src), dest, **kwargs)


def write_rows(root, split, reverse=False, changed=None):
    """Partitions bucket=0..2 of CSV rows, split over `split` part files (named anew each time),
    in reverse order if asked; `changed` alters one row of that bucket."""
    shutil.rmtree(root, ignore_errors=True)
    for b in range(3):
        d = os.path.join(root, f"bucket={b}")
        os.makedirs(d)
        rows = [f"{i},name-{b}-{i}" for i in range(10)]
        if changed == b:
            rows[3] = "3,changed"
        if reverse:
            rows.reverse()
        for n in range(split):
            with open(os.path.join(d, f"part-{n:05}-{split}{reverse}.csv"), "w") as f:
                f.write("id,name\n" + "".join(r + "\n" for r in rows[n::split]))
    open(os.path.join(root, "_SUCCESS"), "w").close()


def test_rows_mode_publishes_and_a_rerun_over_the_same_rows_writes_nothing(tmp_path):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_rows(src, split=1)
    first = palisade.publish(str(src), url, content="rows")
    assert first["written"] == ["bucket=0", "bucket=1", "bucket=2"] and first["bytes_written"] > 0
    assert first["bytes_hashed"] > 0

    write_rows(src, split=3, reverse=True)  # the same rows, re-split and reordered
    again = palisade.publish(str(src), url, content="rows")
    assert again["written"] == [] and again["bytes_written"] == 0 and again["unchanged"] == 3

    write_rows(src, split=3, reverse=True, changed=1)
    one = palisade.publish(str(src), url, content="rows", format="csv", threads=1)
    assert one["written"] == ["bucket=1"] and one["unchanged"] == 2


def test_include_exclude_and_file_units_are_the_commands(tmp_path):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_output(src, range(3))
    with open(os.path.join(src, "bucket=0", "notes.txt"), "w") as f:
        f.write("not data")
    report = palisade.publish(str(src), url, include=["**/*.csv"], exclude=["bucket=2/*"])
    assert report["written"] == ["bucket=0", "bucket=1"]
    files = palisade.publish(str(src), f"file://{tmp_path / 'files'}", unit="file",
                             include=["bucket=1/*"])
    assert files["written"] == ["bucket=1/part-0000-1.csv"]


ROOT = Path(__file__).resolve().parents[2]


def cli_binary():
    """The `palisade` command cargo builds: $PALISADE_BIN, else debug/palisade under
    $CARGO_TARGET_DIR (relative to the workspace, where cargo runs) or the workspace's target/."""
    if os.environ.get("PALISADE_BIN"):
        return Path(os.environ["PALISADE_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    return (target if target.is_absolute() else ROOT / target) / "debug" / "palisade"


CLI = cli_binary()


def cli_publish(src, url, *flags):
    if not (CLI.is_file() and os.access(CLI, os.X_OK)):
        pytest.skip(f"the palisade command is not built at {CLI} (cargo build -p palisade-cli; "
                    f"or set PALISADE_BIN, or CARGO_TARGET_DIR as cargo had it): comparison with "
                    f"the command skipped")
    out = subprocess.run([str(CLI), "publish", str(src), url, "--json", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def write_mixed(root):
    """CSV part files (one in a subdirectory), JSON lines, and Parquet when pyarrow is there."""
    write_rows(root, split=2)
    os.makedirs(os.path.join(root, "bucket=1", "sub"))
    with open(os.path.join(root, "bucket=1", "sub", "part-9.csv"), "w") as f:
        f.write("id,name\n99,nested\n")
    os.makedirs(os.path.join(root, "bucket=3"))
    with open(os.path.join(root, "bucket=3", "part-0.jsonl"), "w") as f:
        f.write('{"id": 1, "v": 1.5}\n{"id": 2, "v": 2}\n')
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    os.makedirs(os.path.join(root, "bucket=4"))
    pq.write_table(pa.table({"id": [1, 2, 3], "name": ["x", "y", None]}),
                   os.path.join(root, "bucket=4", "part-0.parquet"))


MODES = [
    pytest.param({"content": "bytes"}, [], id="bytes"),
    pytest.param({"content": "bytes", "names": True}, ["--names"], id="bytes+names"),
    pytest.param({"content": "rows"}, ["--content", "rows"], id="rows"),
]


@pytest.mark.parametrize("kwargs, flags", MODES)
def test_the_command_then_python_over_the_same_src_writes_nothing(tmp_path, kwargs, flags):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_mixed(src)
    first = cli_publish(src, url, *flags)
    assert first["written"] and first["bytes_written"] > 0
    again = palisade.publish(str(src), url, **kwargs)
    assert again["written"] == [] and again["bytes_written"] == 0
    assert again["unchanged"] == len(first["written"]) and again["generation"] == first["generation"]


@pytest.mark.parametrize("kwargs, flags", MODES)
def test_python_then_the_command_over_the_same_src_writes_nothing(tmp_path, kwargs, flags):
    src, url = tmp_path / "out", f"file://{tmp_path / 'dest'}"
    write_mixed(src)
    first = palisade.publish(str(src), url, **kwargs)
    assert first["written"] and first["bytes_written"] > 0
    again = cli_publish(src, url, *flags)
    assert again["written"] == [] and again["bytes_written"] == 0
    assert again["unchanged"] == len(first["written"])
    # The reports have the same shape.
    assert set(again) == set(first)


def tree(root):
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def published_then_changed(tmp_path):
    """SRC published to DEST as buckets 0 and 1, then changed: bucket 1 grows a row, buckets 2
    and 3 appear, bucket 0 is gone from SRC. Returns (src, dest, DEST's URL)."""
    src, dest = tmp_path / "out", tmp_path / "dest"
    url = f"file://{dest}"
    write_output(src, [0, 1])
    palisade.publish(str(src), url)
    write_output(src, [1, 2, 3])
    with open(os.path.join(src, "bucket=1", "part-0000-1.csv"), "a") as f:
        f.write("10\n")
    return src, dest, url


def test_dry_run_reports_what_would_be_written_and_writes_nothing(tmp_path):
    src, dest, url = published_then_changed(tmp_path)
    before = tree(dest)

    dry = palisade.publish(str(src), url, dry_run=True)
    assert tree(dest) == before
    assert dry["dry_run"] is True and dry["generation"] == 1
    assert dry["written"] == ["bucket=1", "bucket=2", "bucket=3"] and dry["unchanged"] == 0
    assert dry["kept"] == ["bucket=0"] and dry["removed"] == [] and dry["bytes_written"] > 0
    assert [(i["partition"], i["action"]) for i in dry["plan"]["items"]] == [
        ("bucket=1", "changed"), ("bucket=2", "new"), ("bucket=3", "new")]
    assert dry["plan"]["kept"] == ["bucket=0"] and dry["plan"]["removed"] == []
    assert set(dry) - {"plan"} == {"src", "dest", "dry_run", "written", "unchanged", "removed",
                                   "kept", "bytes_written", "bytes_hashed", "generation",
                                   "fencing_token", "seconds"}
    removing = palisade.publish(str(src), url, dry_run=True, remove_missing=True)
    assert removing["removed"] == ["bucket=0"] and removing["kept"] == []
    assert tree(dest) == before

    real = palisade.publish(str(src), url)
    assert real["dry_run"] is False and "plan" not in real
    assert real["written"] == dry["written"] and real["kept"] == dry["kept"]
    assert real["bytes_written"] == dry["bytes_written"] and real["generation"] == 2


def test_the_commands_dry_run_reports_the_same_plan(tmp_path):
    src, dest, url = published_then_changed(tmp_path)
    before = tree(dest)
    dry = palisade.publish(str(src), url, dry_run=True)
    cli = cli_publish(src, url, "--dry-run")  # its --dry-run --json: the same shape and plan
    assert set(cli) == set(dry) and cli["plan"] == dry["plan"]
    assert cli["written"] == dry["written"] and cli["bytes_written"] == dry["bytes_written"]
    assert tree(dest) == before
