//! The readers: each file's rows as Arrow record batches, handed to [`add_batch`]. Errors are
//! one line naming the file.

use super::encode::add_batch;
use crate::ContentHasher;
use arrow::datatypes::{DataType, Field, Schema};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

/// Rows per record batch.
const BATCH: usize = 8192;

fn open(path: &Path) -> Result<std::fs::File, String> {
    std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
}

pub(super) fn hash_parquet(path: &Path, hasher: &mut ContentHasher) -> Result<(), String> {
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

pub(super) fn hash_csv(path: &Path, hasher: &mut ContentHasher) -> Result<(), String> {
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

pub(super) fn hash_jsonl(paths: &[&Path], hasher: &mut ContentHasher) -> Result<(), String> {
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
