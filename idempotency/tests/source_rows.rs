//! `source::rows`: rows identities of Parquet, CSV and JSON-lines files (moved here with the
//! code from the palisade CLI).

use arrow::array::{Int32Array, Int64Array as I64, RecordBatch, StringArray as Str};
use arrow::datatypes::{DataType, Field, Schema};
use palisade_idempotency::source::Format;
use palisade_idempotency::source::rows::hash_partition;
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;

fn write_parquet(path: &Path, ids: &[i64], names: &[&str]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(I64::from(ids.to_vec())),
            Arc::new(Str::from(names.to_vec())),
        ],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn hash(files: &[&Path]) -> palisade_idempotency::ContentHash {
    hash_partition(files, Format::Auto, &|_| {})
        .unwrap()
        .finish()
}

#[test]
fn parquet_rows_resplit_and_reordered_hash_the_same() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        d.path().join("a.parquet"),
        d.path().join("b.parquet"),
        d.path().join("c.parquet"),
    );
    write_parquet(&a, &[1, 2, 3], &["x", "y", "z"]);
    write_parquet(&b, &[3, 1], &["z", "x"]);
    write_parquet(&c, &[2], &["y"]);
    assert_eq!(hash(&[&a]), hash(&[&b, &c]));
    assert_eq!(hash(&[&a]), hash(&[&c, &b]));
    write_parquet(&c, &[2], &["changed"]);
    assert_ne!(hash(&[&a]), hash(&[&b, &c]));
}

#[test]
fn integer_widths_and_column_order_do_not_count() {
    let d = tempfile::tempdir().unwrap();
    let p32 = d.path().join("a.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("id", DataType::Int32, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Str::from(vec!["x", "y"])),
            Arc::new(Int32Array::from(vec![1, 2])),
        ],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(&p32).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let p64 = d.path().join("b.parquet");
    write_parquet(&p64, &[2, 1], &["y", "x"]);
    assert_eq!(hash(&[&p32]), hash(&[&p64]));
}

#[test]
fn csv_and_jsonl_resplit_hash_the_same() {
    let d = tempfile::tempdir().unwrap();
    let w = |n: &str, s: &str| {
        let p = d.path().join(n);
        std::fs::write(&p, s).unwrap();
        p
    };
    let all = w("all.csv", "id,name\n1,x\n2,\n3,z\n");
    let p1 = w("p1.csv", "name,id\nz,3\n");
    let p2 = w("p2.csv", "id,name\n2,\n1,x\n");
    assert_eq!(hash(&[&all]), hash(&[&p1, &p2]));

    let all = w("all.jsonl", "{\"id\":1,\"v\":1.5}\n{\"id\":2,\"v\":2}\n");
    let p1 = w("p1.jsonl", "{\"v\":2,\"id\":2}\n");
    let p2 = w("p2.jsonl", "{\"id\":1,\"v\":1.5}\n");
    assert_eq!(hash(&[&all]), hash(&[&p2, &p1]));
    let changed = w("p3.jsonl", "{\"id\":1,\"v\":1.25}\n");
    assert_ne!(hash(&[&all]), hash(&[&changed, &p1]));
}

#[test]
fn invalid_parquet_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.parquet");
    std::fs::write(&p, "this is not parquet").unwrap();
    let e = hash_partition(&[&p], Format::Auto, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.parquet") && e.contains("not a valid Parquet"),
        "{e}"
    );
    let odd = d.path().join("x.txt");
    std::fs::write(&odd, "").unwrap();
    let e = hash_partition(&[&odd], Format::Auto, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.txt"), "{e}");
}
