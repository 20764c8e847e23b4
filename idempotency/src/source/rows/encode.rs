//! A record batch's rows as serde maps from column name to value, for the canonical row hash:
//! values keep their type (integers of any width as integers, floats, strings, bytes,
//! booleans, nulls); every other Arrow type as its display string.

use crate::ContentHasher;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Float64Array, Int64Array, StringArray,
    UInt64Array,
};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::ser::{Serialize, SerializeMap, Serializer};

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
pub(super) fn add_batch(batch: &RecordBatch, hasher: &mut ContentHasher) -> Result<(), String> {
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
