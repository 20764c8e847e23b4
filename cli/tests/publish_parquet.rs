//! `palisade publish --content rows` on real Parquet part files (written here with the parquet
//! crate, snappy-compressed as Spark writes them), through the built binary.

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

type Row = (i64, String, f64);

fn rows(partition: usize) -> Vec<Row> {
    (0..300)
        .map(|i| (i, format!("customer-{partition}-{i}"), i as f64 * 1.25))
        .collect()
}

/// Writes `rows` into `files` Parquet part files under `dir` with `codec`, replacing what was there.
fn write_parts(dir: &Path, rows: &[Row], files: usize, codec: Compression) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
    ]));
    let props = WriterProperties::builder().set_compression(codec).build();
    for (i, chunk) in rows.chunks(rows.len().div_ceil(files)).enumerate() {
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| &r.1))),
                Arc::new(Float64Array::from_iter_values(chunk.iter().map(|r| r.2))),
            ],
        )
        .unwrap();
        let file = std::fs::File::create(dir.join(format!("part-{i:05}-{files}.parquet"))).unwrap();
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props.clone())).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    std::fs::write(dir.join("_SUCCESS"), "").unwrap();
}

fn publish(src: &Path, dest: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["publish", "--json", "--content", "rows"])
        .arg(src)
        .arg(dest)
        .env_remove("PALISADE_FENCING_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn parquet_rows_resplit_and_reordered_write_nothing_and_one_changed_row_rewrites_one_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("out");
    let dest = format!("file://{}", tmp.path().join("dest").display());
    for p in 0..3 {
        write_parts(
            &src.join(format!("date={p}")),
            &rows(p),
            2,
            Compression::SNAPPY,
        );
    }
    let first = publish(&src, &dest);
    assert_eq!(first["written"].as_array().unwrap().len(), 3, "{first}");

    // The same rows, reversed, in 5 part files per partition, compressed with zstd (Polars'
    // default) instead of snappy (Spark's and pyarrow's): the rows are what count.
    for p in 0..3 {
        let mut r = rows(p);
        r.reverse();
        let zstd = Compression::ZSTD(parquet::basic::ZstdLevel::default());
        write_parts(&src.join(format!("date={p}")), &r, 5, zstd);
    }
    let resplit = publish(&src, &dest);
    assert_eq!(resplit["bytes_written"], 0, "{resplit}");
    assert_eq!(resplit["unchanged"], 3, "{resplit}");

    // One changed row in date=2.
    let mut r = rows(2);
    r[123].2 += 0.5;
    write_parts(&src.join("date=2"), &r, 5, Compression::LZ4_RAW);
    let one = publish(&src, &dest);
    assert_eq!(one["written"], serde_json::json!(["date=2"]), "{one}");
}
