//! `--content rows`: the rows of Parquet, CSV and JSON-lines files, read with arrow-rs and fed
//! to palisade-idempotency's order-insensitive [`ContentHasher`].
//!
//! A row is hashed as a map from column name to value (the canonical encoding sorts map
//! entries), so neither the order of rows, nor their split into part files, nor the order of
//! columns counts. Values keep their type: integers (any width) as integers, floats as floats,
//! strings, bytes, booleans, nulls; every other Arrow type (dates, timestamps, decimals, lists,
//! structs) as its display string.
//!
//! - **Parquet**: the file's own schema.
//! - **CSV** (with a header row): every column is a string (empty is null), so the hash does not
//!   depend on type inference, which can differ between part files.
//! - **JSON lines**: the schema is inferred over all the partition's files together, so the same
//!   rows split differently infer the same types.

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Float64Array, Int64Array, StringArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use palisade_idempotency::ContentHasher;
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

const BATCH: usize = 8192;

/// The file formats `--content rows` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// By extension: `.parquet`/`.pq`, `.csv`, `.json`/`.jsonl`/`.ndjson`.
    Auto,
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format of `path`: `self`, or by extension for `Auto`.
    pub fn of(self, path: &Path) -> Result<Format, String> {
        if self != Format::Auto {
            return Ok(self);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match ext.as_str() {
            "parquet" | "pq" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            "json" | "jsonl" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(format!(
                "{}: --content rows reads .parquet, .csv and .json/.jsonl/.ndjson files; set \
                 --format, or hash bytes with --content bytes",
                path.display()
            )),
        }
    }
}

/// Hashes the rows of `files` (one partition) into one unordered hasher.
///
/// Errors are one line naming the file.
pub fn hash_partition(
    files: &[&Path],
    format: Format,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<ContentHasher, String> {
    let mut hasher = ContentHasher::unordered();
    let mut json: Vec<&Path> = Vec::new();
    for &path in files {
        match format.of(path)? {
            Format::Parquet => hash_parquet(path, &mut hasher)?,
            Format::Csv => hash_csv(path, &mut hasher)?,
            Format::Jsonl | Format::Auto => json.push(path),
        }
        on_bytes(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
    }
    if !json.is_empty() {
        hash_jsonl(&json, &mut hasher)?;
    }
    Ok(hasher)
}

fn open(path: &Path) -> Result<std::fs::File, String> {
    std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn hash_parquet(path: &Path, hasher: &mut ContentHasher) -> Result<(), String> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let invalid =
        |e: &dyn std::fmt::Display| format!("{} is not a valid Parquet file: {e}", path.display());
    let reader = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| invalid(&e))?
        .with_batch_size(BATCH)
        .build()
        .map_err(|e| invalid(&e))?;
    for batch in reader {
        add_batch(&batch.map_err(|e| invalid(&e))?, hasher)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn hash_csv(path: &Path, hasher: &mut ContentHasher) -> Result<(), String> {
    let invalid = |e: &dyn std::fmt::Display| format!("{} is not valid CSV: {e}", path.display());
    let mut header = String::new();
    BufReader::new(open(path)?)
        .read_line(&mut header)
        .map_err(|e| invalid(&e))?;
    if header.trim().is_empty() {
        return Ok(()); // an empty file has no rows
    }
    let (inferred, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(header.as_bytes(), Some(0))
        .map_err(|e| invalid(&e))?;
    let schema = Schema::new(
        inferred
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema))
        .with_header(true)
        .with_batch_size(BATCH)
        .build(open(path)?)
        .map_err(|e| invalid(&e))?;
    for batch in reader {
        add_batch(&batch.map_err(|e| invalid(&e))?, hasher)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn hash_jsonl(paths: &[&Path], hasher: &mut ContentHasher) -> Result<(), String> {
    let invalid = |path: &Path, e: &dyn std::fmt::Display| {
        format!("{} is not valid JSON lines: {e}", path.display())
    };
    // One schema for the whole partition: inference must not depend on how rows are split.
    let mut values: Vec<serde_json::Value> = Vec::new();
    let mut schema: Option<Schema> = None;
    for &path in paths {
        for value in serde_json::Deserializer::from_reader(BufReader::new(open(path)?))
            .into_iter::<serde_json::Value>()
        {
            values.push(value.map_err(|e| invalid(path, &e))?);
            if values.len() >= BATCH {
                merge_schema(&mut schema, &values).map_err(|e| invalid(path, &e))?;
                values.clear();
            }
        }
    }
    merge_schema(&mut schema, &values).map_err(|e| invalid(paths[0], &e))?;
    let Some(schema) = schema else { return Ok(()) };
    let schema = Arc::new(schema);
    for &path in paths {
        let reader = arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(BATCH)
            .build(BufReader::new(open(path)?))
            .map_err(|e| invalid(path, &e))?;
        for batch in reader {
            add_batch(&batch.map_err(|e| invalid(path, &e))?, hasher)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Widens `schema` by the types inferred from `values` (inference is order-insensitive).
fn merge_schema(
    schema: &mut Option<Schema>,
    values: &[serde_json::Value],
) -> Result<(), arrow::error::ArrowError> {
    if values.is_empty() {
        return Ok(());
    }
    let previous = schema.take();
    let iter = values.iter().map(Ok::<_, arrow::error::ArrowError>);
    let inferred = match &previous {
        // Re-infer over the previous schema's shape and the new values: infer the new batch,
        // then let arrow's own coercion merge them through a synthetic "union" of both.
        None => arrow::json::reader::infer_json_schema_from_iterator(iter)?,
        Some(prev) => {
            let batch = arrow::json::reader::infer_json_schema_from_iterator(iter)?;
            merge_two(prev, &batch)?
        }
    };
    *schema = Some(inferred);
    Ok(())
}

/// Merges two inferred JSON schemas the way inference itself coerces: a field present in one
/// only is kept; int and float widen to float; any other disagreement becomes a string.
fn merge_two(a: &Schema, b: &Schema) -> Result<Schema, arrow::error::ArrowError> {
    let mut fields: Vec<Field> = a.fields().iter().map(|f| f.as_ref().clone()).collect();
    for fb in b.fields() {
        match fields.iter_mut().find(|f| f.name() == fb.name()) {
            None => fields.push(fb.as_ref().clone()),
            Some(fa) if fa.data_type() == fb.data_type() => {}
            Some(fa) => {
                let merged = match (fa.data_type(), fb.data_type()) {
                    (DataType::Null, t) | (t, DataType::Null) => t.clone(),
                    (DataType::Int64, DataType::Float64) | (DataType::Float64, DataType::Int64) => {
                        DataType::Float64
                    }
                    _ => DataType::Utf8,
                };
                *fa = Field::new(fa.name(), merged, true);
            }
        }
    }
    Ok(Schema::new(fields))
}

/// One column, cast to the few types the canonical encoding distinguishes.
enum Column {
    Null,
    Bool(BooleanArray),
    Int(Int64Array),
    UInt(UInt64Array),
    Float(Float64Array),
    Str(StringArray),
    Bytes(BinaryArray),
    /// Anything else, shown as text.
    Shown(ArrayRef),
}

impl Column {
    fn new(array: &ArrayRef) -> Result<Column, arrow::error::ArrowError> {
        use arrow::compute::cast;
        let array = match array.data_type() {
            DataType::Dictionary(_, value) => cast(array, value)?,
            _ => array.clone(),
        };
        Ok(match array.data_type() {
            DataType::Null => Column::Null,
            DataType::Boolean => Column::Bool(array.as_boolean().clone()),
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                Column::Int(cast(&array, &DataType::Int64)?.as_primitive().clone())
            }
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                Column::UInt(cast(&array, &DataType::UInt64)?.as_primitive().clone())
            }
            DataType::Float16 | DataType::Float32 | DataType::Float64 => {
                Column::Float(cast(&array, &DataType::Float64)?.as_primitive().clone())
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                Column::Str(cast(&array, &DataType::Utf8)?.as_string::<i32>().clone())
            }
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => {
                Column::Bytes(cast(&array, &DataType::Binary)?.as_binary::<i32>().clone())
            }
            _ => Column::Shown(array),
        })
    }
}

struct Cell<'a> {
    column: &'a Column,
    formatter: Option<&'a ArrayFormatter<'a>>,
    row: usize,
}

impl Serialize for Cell<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.row;
        let null = |a: &dyn Array| a.is_null(i);
        match self.column {
            Column::Null => s.serialize_none(),
            Column::Bool(a) if !null(a) => s.serialize_bool(a.value(i)),
            Column::Int(a) if !null(a) => s.serialize_i64(a.value(i)),
            Column::UInt(a) if !null(a) => s.serialize_u64(a.value(i)),
            Column::Float(a) if !null(a) => s.serialize_f64(a.value(i)),
            Column::Str(a) if !null(a) => s.serialize_str(a.value(i)),
            Column::Bytes(a) if !null(a) => s.serialize_bytes(a.value(i)),
            Column::Shown(a) if !null(a.as_ref()) => match self.formatter {
                Some(f) => s.collect_str(&f.value(i)),
                None => s.serialize_none(),
            },
            _ => s.serialize_none(),
        }
    }
}

struct Row<'a> {
    names: &'a [String],
    columns: &'a [Column],
    formatters: &'a [Option<ArrayFormatter<'a>>],
    row: usize,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for ((name, column), formatter) in self.names.iter().zip(self.columns).zip(self.formatters)
        {
            map.serialize_entry(
                name,
                &Cell {
                    column,
                    formatter: formatter.as_ref(),
                    row: self.row,
                },
            )?;
        }
        map.end()
    }
}

/// Adds every row of `batch`.
fn add_batch(batch: &RecordBatch, hasher: &mut ContentHasher) -> Result<(), String> {
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let columns: Vec<Column> = batch
        .columns()
        .iter()
        .map(Column::new)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let options = FormatOptions::default();
    let formatters: Vec<Option<ArrayFormatter<'_>>> = columns
        .iter()
        .map(|c| match c {
            Column::Shown(a) => ArrayFormatter::try_new(a.as_ref(), &options).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    for row in 0..batch.num_rows() {
        hasher
            .add_row(&Row {
                names: &names,
                columns: &columns,
                formatters: &formatters,
                row,
            })
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array as I64, StringArray as Str};
    use parquet::arrow::ArrowWriter;

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
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
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
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&p32).unwrap(), schema, None).unwrap();
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
        let e = hash_partition(&[&p], Format::Auto, &|_| {}).unwrap_err();
        assert!(
            e.contains("bad.parquet") && e.contains("not a valid Parquet"),
            "{e}"
        );
        let odd = d.path().join("x.txt");
        std::fs::write(&odd, "").unwrap();
        let e = hash_partition(&[&odd], Format::Auto, &|_| {}).unwrap_err();
        assert!(e.contains("x.txt"), "{e}");
    }
}
