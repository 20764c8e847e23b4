//! The identities of `source` are pinned: every dataset published before (by `palisade publish`,
//! whose code this is since it moved here from the CLI) records them, and a changed value would
//! rewrite all of its partitions. The values below were computed by the `palisade` binary built
//! before the move (its `_manifest.json`), on exactly these files (the Parquet file was written
//! by pyarrow there; rows identities depend on the rows, not on the writer).

use palisade_idempotency::source::{self, Content, IdentityOptions, ScanOptions};
use std::path::Path;

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// `d=1`: CSV in two part files and a subdirectory; `d=2`: JSON lines; `d=3`: Parquet.
fn fixture(with_parquet: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "d=1/part-0.csv", "id,name\n1,x\n2,\n");
    write(d.path(), "d=1/part-1.csv", "id,name\n3,z\n");
    write(d.path(), "d=1/sub/part-2.csv", "id,name\n4,w\n");
    write(
        d.path(),
        "d=2/a.jsonl",
        "{\"id\":1,\"v\":1.5}\n{\"id\":2,\"v\":2}\n",
    );
    write(d.path(), "_SUCCESS", "");
    if with_parquet {
        write_parquet(&d.path().join("d=3/part-0.parquet"));
    }
    d
}

fn write_parquet(path: &Path) {
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(StringArray::from(vec![Some("x"), Some("y"), None])),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn identities(src: &Path, content: Content, names: bool) -> Vec<(String, String)> {
    let parts = source::scan(src, &ScanOptions::default()).unwrap();
    let opts = IdentityOptions {
        content,
        names,
        ..IdentityOptions::default()
    };
    let ids = source::identities(&parts, &opts, &|_| {}).unwrap();
    parts
        .iter()
        .zip(ids)
        .map(|(p, id)| (p.name.clone(), id.to_hex()))
        .collect()
}

fn pinned(values: &[(&str, &str)]) -> Vec<(String, String)> {
    values
        .iter()
        .map(|(p, id)| (p.to_string(), id.to_string()))
        .collect()
}

#[test]
fn bytes_identities_are_the_ones_published_before() {
    let src = fixture(false);
    assert_eq!(
        identities(src.path(), Content::Bytes, false),
        pinned(&[
            (
                "d=1",
                "24d1b36dc650d4b8497afb77becd65254184f3df45dbb9166f28fdeb5de3a453"
            ),
            (
                "d=2",
                "93e91e711885c3560921f3c299fef3e9462358055ae238c72fdc18be45184a67"
            ),
        ])
    );
    assert_eq!(
        identities(src.path(), Content::Bytes, true),
        pinned(&[
            (
                "d=1",
                "3c458307db2cbdae10bb08f00c4f1f58c59d635f646c03d3fa011135c6c4f0c9"
            ),
            (
                "d=2",
                "52b1de348e5739a0f38cc324cf14b18e0fb13feb0ca90599324b8339ee7bc01c"
            ),
        ])
    );
}

#[test]
fn rows_identities_are_the_ones_published_before() {
    let src = fixture(true);
    assert_eq!(
        identities(src.path(), Content::Rows, false),
        pinned(&[
            (
                "d=1",
                "92d3e3ccf08c3ca333f7f0f91d5bf3fae3cb0095e2edd1c6a16d7cb6f8c72538"
            ),
            (
                "d=2",
                "2c3e27d443fde79191d5f5b402d720c07b1dbc8e551415bc4c3a273b28410eb6"
            ),
            (
                "d=3",
                "d6a2493711e14758f7442afc8933725f0b74e8602b2bd7e29855778166359869"
            ),
        ])
    );
}
