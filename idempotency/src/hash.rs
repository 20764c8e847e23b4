//! Content hashes: BLAKE3 of bytes, and a canonical, typed hash of serde rows.
//!
//! # The canonical row encoding (version 1)
//!
//! Every value is written as a one-byte type tag followed by its payload; every variable-length
//! payload is prefixed by its length, so the encoding is unambiguous: `["ab","c"]` and
//! `["a","bc"]` differ, and so do the string `"1"` and the number `1`.
//!
//! | tag | value | payload |
//! |---|---|---|
//! | `0` | null: `()`, `None`, unit structs | none |
//! | `1` | bool | one byte, 0 or 1 |
//! | `2` | integer (any width, signed or not) | the value as a 16-byte big-endian `i128` |
//! | `3` | unsigned integer above `i128::MAX` | 16-byte big-endian `u128` |
//! | `4` | float (`f32` is widened to `f64`) | 8-byte big-endian IEEE bits, with `-0.0` written as `0.0` and every NaN as the one quiet NaN `0x7ff8000000000000` |
//! | `5` | string, char | `u64` length, UTF-8 bytes |
//! | `6` | bytes | `u64` length, bytes |
//! | `7` | sequence, tuple, tuple struct | `u64` count, elements |
//! | `8` | map, struct | `u64` count, entries sorted by the encoded key, each key then value |
//!
//! `Some(x)` encodes as `x` and a newtype struct as its content. A struct is a map from field
//! names to values, so a struct and a `serde_json::Value` object with the same fields hash the
//! same, whatever the field order. Enum variants follow serde_json's external tagging: a unit
//! variant is the string of its name, the others are a one-entry map from the name to the
//! content. Integers and floats stay distinct types: `1` and `1.0` differ.
//!
//! Any change to this table bumps [`CANONICAL_ENCODING_VERSION`], which every manifest records.

use std::fmt;
use std::str::FromStr;

use serde::ser::{self, Serialize};

use crate::error::{Error, Result};

/// The name of the hash algorithm, as recorded in manifests.
pub const HASH_ALGORITHM: &str = "blake3";

/// The version of the canonical row encoding described in this module, as recorded in manifests.
pub const CANONICAL_ENCODING_VERSION: u32 = 1;

/// How much [`ContentHash::of_reader`] reads at a time (1 MiB).
pub const READ_CHUNK: usize = 1 << 20;

/// A 256-bit BLAKE3 content hash; shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of `bytes` (plain BLAKE3, the same as `b3sum`).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The hash of everything `reader` yields (plain BLAKE3, as `b3sum` gives for a file), read
    /// [`READ_CHUNK`] bytes at a time; `each_chunk` sees every chunk as it is hashed (to copy it,
    /// upload it or count it) and can stop the read with an error. Returns the hash and the size.
    ///
    /// This is the one read-and-hash loop of palisade: the writer's staging copies, uploads and
    /// file hashes and the CLI's `publish` all use it.
    ///
    /// ```
    /// use palisade_idempotency::ContentHash;
    /// let mut copy = Vec::new();
    /// let (hash, size) = ContentHash::of_reader(&b"abc"[..], |chunk| {
    ///     copy.extend_from_slice(chunk);
    ///     Ok(())
    /// })?;
    /// assert_eq!((hash, size), (ContentHash::of_bytes(b"abc"), 3));
    /// assert_eq!(copy, b"abc");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn of_reader(
        mut reader: impl std::io::Read,
        mut each_chunk: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<(Self, u64)> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            each_chunk(&buf[..n])?;
            size += n as u64;
        }
        Ok((hasher.finalize().into(), size))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hex form.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        s
    }
}

impl From<blake3::Hash> for ContentHash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

/// The reason a string is not a [`ContentHash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseHashError;

impl fmt::Display for ParseHashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected 64 lowercase hex digits")
    }
}

impl std::error::Error for ParseHashError {}

impl FromStr for ContentHash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, ParseHashError> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(ParseHashError);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(ParseHashError),
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
        }
        Ok(Self(out))
    }
}

impl Serialize for ContentHash {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ContentHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether the order of rows counts in a [`ContentHasher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// The same rows in another order hash differently.
    Ordered,
    /// The hash depends only on the multiset of rows: the same rows in any order, or split
    /// into several hashers and [merged](ContentHasher::merge), hash the same. Duplicates count.
    Unordered,
}

/// Hashes serde rows canonically (see the [module docs](self) for the encoding).
///
/// In [`RowOrder::Unordered`] mode each row is hashed on its own and the row hashes are added as
/// 256-bit integers (a multiset hash); this needs no memory per row and makes hashers mergeable,
/// so part files read in any order, by any number of readers, give the same partition hash. The
/// sum detects accidental differences as well as BLAKE3 does, but it is not meant to resist an
/// adversary who chooses rows to forge a collision.
///
/// ```
/// use palisade_idempotency::ContentHasher;
/// #[derive(serde::Serialize)]
/// struct Sale { id: u32, amount: f64 }
///
/// let mut a = ContentHasher::unordered();
/// a.add_row(&Sale { id: 1, amount: 9.5 })?;
/// a.add_row(&Sale { id: 2, amount: 3.0 })?;
/// let mut b = ContentHasher::unordered();
/// b.add_row(&serde_json::json!({"amount": 3.0, "id": 2}))?;
/// b.add_row(&serde_json::json!({"id": 1, "amount": 9.5}))?;
/// assert_eq!(a.finish(), b.finish());
/// # Ok::<(), palisade_idempotency::Error>(())
/// ```
#[derive(Clone)]
pub struct ContentHasher {
    order: RowOrder,
    ordered: blake3::Hasher,
    sum: [u64; 4],
    rows: u64,
    buf: Vec<u8>,
}

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentHasher")
            .field("order", &self.order)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl ContentHasher {
    /// A hasher in which row order counts.
    pub fn ordered() -> Self {
        Self::new(RowOrder::Ordered)
    }

    /// A hasher in which row order does not count.
    pub fn unordered() -> Self {
        Self::new(RowOrder::Unordered)
    }

    /// A hasher in the given mode.
    pub fn new(order: RowOrder) -> Self {
        Self {
            order,
            ordered: blake3::Hasher::new_derive_key("palisade rows v1 ordered"),
            sum: [0; 4],
            rows: 0,
            buf: Vec::new(),
        }
    }

    /// The mode.
    pub fn order(&self) -> RowOrder {
        self.order
    }

    /// The number of rows added so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds one row.
    pub fn add_row<T: Serialize + ?Sized>(&mut self, row: &T) -> Result<()> {
        self.buf.clear();
        row.serialize(Encoder { out: &mut self.buf })?;
        self.rows += 1;
        match self.order {
            RowOrder::Ordered => {
                self.ordered.update(&self.buf);
            }
            RowOrder::Unordered => {
                let h = blake3::hash(&self.buf);
                add_256(&mut self.sum, h.as_bytes());
            }
        }
        Ok(())
    }

    /// Adds the rows of another unordered hasher (for rows split over several files or threads).
    pub fn merge(&mut self, other: &ContentHasher) -> Result<()> {
        if self.order != RowOrder::Unordered || other.order != RowOrder::Unordered {
            return Err(Error::Encoding {
                what: "merged hashers",
                reason: "only unordered hashers can be merged".into(),
            });
        }
        let mut bytes = [0u8; 32];
        for (i, lane) in other.sum.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
        }
        add_256(&mut self.sum, &bytes);
        self.rows += other.rows;
        Ok(())
    }

    /// The hash of the rows added so far.
    pub fn finish(&self) -> ContentHash {
        match self.order {
            RowOrder::Ordered => {
                let inner = self.ordered.finalize();
                let mut h = blake3::Hasher::new_derive_key("palisade rows v1 ordered final");
                h.update(&self.rows.to_be_bytes());
                h.update(inner.as_bytes());
                h.finalize().into()
            }
            RowOrder::Unordered => {
                let mut h = blake3::Hasher::new_derive_key("palisade rows v1 unordered final");
                h.update(&self.rows.to_be_bytes());
                for lane in self.sum {
                    h.update(&lane.to_le_bytes());
                }
                h.finalize().into()
            }
        }
    }
}

fn add_256(sum: &mut [u64; 4], bytes: &[u8; 32]) {
    let mut carry = 0u64;
    for (i, lane) in sum.iter_mut().enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        let (a, c1) = lane.overflowing_add(u64::from_le_bytes(word));
        let (b, c2) = a.overflowing_add(carry);
        *lane = b;
        carry = u64::from(c1) + u64::from(c2);
    }
}

/// The canonical encoding of one value (see the [module docs](self)).
///
/// ```
/// use palisade_idempotency::canonical_bytes;
/// assert_ne!(canonical_bytes(&("ab", "c"))?, canonical_bytes(&("a", "bc"))?);
/// assert_ne!(canonical_bytes(&"1")?, canonical_bytes(&1)?);
/// assert_eq!(canonical_bytes(&1u8)?, canonical_bytes(&1i64)?);
/// # Ok::<(), palisade_idempotency::Error>(())
/// ```
pub fn canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    value.serialize(Encoder { out: &mut out })?;
    Ok(out)
}

/// A fingerprint of a request for [`IdempotencyStore::once`](crate::IdempotencyStore::once):
/// the hex hash of its canonical encoding.
pub fn fingerprint<T: Serialize + ?Sized>(request: &T) -> Result<String> {
    let bytes = canonical_bytes(request)?;
    let mut h = blake3::Hasher::new_derive_key("palisade request fingerprint v1");
    h.update(&bytes);
    Ok(ContentHash::from(h.finalize()).to_hex())
}

const NULL: u8 = 0;
const BOOL: u8 = 1;
const INT: u8 = 2;
const BIG_UINT: u8 = 3;
const FLOAT: u8 = 4;
const STR: u8 = 5;
const BYTES: u8 = 6;
const SEQ: u8 = 7;
const MAP: u8 = 8;

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::Encoding {
            what: "row",
            reason: msg.to_string(),
        }
    }
}

struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(STR);
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_int(out: &mut Vec<u8>, v: i128) {
    out.push(INT);
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_float(out: &mut Vec<u8>, v: f64) {
    let bits = if v.is_nan() {
        0x7ff8_0000_0000_0000u64
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    };
    out.push(FLOAT);
    out.extend_from_slice(&bits.to_be_bytes());
}

/// Collects the elements of a sequence, then writes count and elements.
struct SeqEncoder<'a> {
    out: &'a mut Vec<u8>,
    body: Vec<u8>,
    count: usize,
}

impl SeqEncoder<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        v.serialize(Encoder {
            out: &mut self.body,
        })?;
        self.count += 1;
        Ok(())
    }

    fn end(self) {
        self.out.push(SEQ);
        put_len(self.out, self.count);
        self.out.extend_from_slice(&self.body);
    }
}

/// Collects encoded (key, value) entries, sorts them, then writes the map; `variant` wraps the
/// map in a one-entry map from the variant name (struct variants).
struct MapEncoder<'a> {
    out: &'a mut Vec<u8>,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending_key: Option<Vec<u8>>,
    variant: Option<&'static str>,
}

impl MapEncoder<'_> {
    fn encode_map(entries: &mut [(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) {
        entries.sort();
        out.push(MAP);
        put_len(out, entries.len());
        for (k, v) in entries.iter() {
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
    }

    fn finish(mut self) {
        match self.variant {
            None => Self::encode_map(&mut self.entries, self.out),
            Some(name) => {
                let mut inner = Vec::new();
                Self::encode_map(&mut self.entries, &mut inner);
                let mut key = Vec::new();
                put_str(&mut key, name);
                Self::encode_map(&mut [(key, inner)], self.out);
            }
        }
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, v: &T) -> Result<()> {
        let mut k = Vec::new();
        put_str(&mut k, name);
        let mut val = Vec::new();
        v.serialize(Encoder { out: &mut val })?;
        self.entries.push((k, val));
        Ok(())
    }
}

/// A sequence inside a one-entry map from the variant name (tuple variants).
struct VariantSeqEncoder<'a> {
    seq: SeqEncoder<'a>,
    name: &'static str,
}

impl<'a> ser::Serializer for Encoder<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = SeqEncoder<'a>;
    type SerializeTuple = SeqEncoder<'a>;
    type SerializeTupleStruct = SeqEncoder<'a>;
    type SerializeTupleVariant = VariantSeqEncoder<'a>;
    type SerializeMap = MapEncoder<'a>;
    type SerializeStruct = MapEncoder<'a>;
    type SerializeStructVariant = MapEncoder<'a>;

    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out.push(BOOL);
        self.out.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<()> {
        put_int(self.out, v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result<()> {
        put_int(self.out, v.into());
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<()> {
        match i128::try_from(v) {
            Ok(i) => put_int(self.out, i),
            Err(_) => {
                self.out.push(BIG_UINT);
                self.out.extend_from_slice(&v.to_be_bytes());
            }
        }
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<()> {
        put_float(self.out, f64::from(v));
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<()> {
        put_float(self.out, v);
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<()> {
        put_str(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<()> {
        put_str(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        self.out.push(BYTES);
        put_len(self.out, v.len());
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<()> {
        self.out.push(NULL);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<()> {
        self.out.push(NULL);
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<()> {
        self.out.push(NULL);
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<()> {
        put_str(self.out, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<()> {
        let mut m = MapEncoder {
            out: self.out,
            entries: Vec::new(),
            pending_key: None,
            variant: None,
        };
        m.field(variant, value)?;
        m.finish();
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<SeqEncoder<'a>> {
        Ok(SeqEncoder {
            out: self.out,
            body: Vec::new(),
            count: 0,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqEncoder<'a>> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqEncoder<'a>> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSeqEncoder<'a>> {
        Ok(VariantSeqEncoder {
            seq: self.serialize_seq(Some(len))?,
            name: variant,
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapEncoder<'a>> {
        Ok(MapEncoder {
            out: self.out,
            entries: Vec::new(),
            pending_key: None,
            variant: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<MapEncoder<'a>> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<MapEncoder<'a>> {
        Ok(MapEncoder {
            out: self.out,
            entries: Vec::new(),
            pending_key: None,
            variant: Some(variant),
        })
    }
}

impl ser::SerializeSeq for SeqEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        self.element(v)
    }
    fn end(self) -> Result<()> {
        SeqEncoder::end(self);
        Ok(())
    }
}

impl ser::SerializeTuple for SeqEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        self.element(v)
    }
    fn end(self) -> Result<()> {
        SeqEncoder::end(self);
        Ok(())
    }
}

impl ser::SerializeTupleStruct for SeqEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        self.element(v)
    }
    fn end(self) -> Result<()> {
        SeqEncoder::end(self);
        Ok(())
    }
}

impl ser::SerializeTupleVariant for VariantSeqEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<()> {
        self.seq.element(v)
    }
    fn end(self) -> Result<()> {
        let mut inner = Vec::new();
        inner.push(SEQ);
        put_len(&mut inner, self.seq.count);
        inner.extend_from_slice(&self.seq.body);
        let mut key = Vec::new();
        put_str(&mut key, self.name);
        MapEncoder::encode_map(&mut [(key, inner)], self.seq.out);
        Ok(())
    }
}

impl ser::SerializeMap for MapEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        let mut k = Vec::new();
        key.serialize(Encoder { out: &mut k })?;
        self.pending_key = Some(k);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let k = self.pending_key.take().ok_or_else(|| Error::Encoding {
            what: "map",
            reason: "value without a key".into(),
        })?;
        let mut v = Vec::new();
        value.serialize(Encoder { out: &mut v })?;
        self.entries.push((k, v));
        Ok(())
    }
    fn end(self) -> Result<()> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeStruct for MapEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, name: &'static str, v: &T) -> Result<()> {
        self.field(name, v)
    }
    fn end(self) -> Result<()> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeStructVariant for MapEncoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, name: &'static str, v: &T) -> Result<()> {
        self.field(name, v)
    }
    fn end(self) -> Result<()> {
        self.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn encoding_is_unambiguous_and_typed() {
        let a = canonical_bytes(&vec!["ab", "c"]).unwrap();
        let b = canonical_bytes(&vec!["a", "bc"]).unwrap();
        assert_ne!(a, b);
        assert_ne!(canonical_bytes("1").unwrap(), canonical_bytes(&1).unwrap());
        assert_ne!(canonical_bytes(&1.0).unwrap(), canonical_bytes(&1).unwrap());
        assert_eq!(
            canonical_bytes(&1u8).unwrap(),
            canonical_bytes(&1i64).unwrap()
        );
        assert_eq!(
            canonical_bytes(&Some(3)).unwrap(),
            canonical_bytes(&3).unwrap()
        );
    }

    #[test]
    fn floats_are_normalised() {
        assert_eq!(
            canonical_bytes(&-0.0f64).unwrap(),
            canonical_bytes(&0.0f64).unwrap()
        );
        assert_eq!(
            canonical_bytes(&f64::NAN).unwrap(),
            canonical_bytes(&(-f64::NAN)).unwrap()
        );
        assert_eq!(
            canonical_bytes(&1.5f32).unwrap(),
            canonical_bytes(&1.5f64).unwrap()
        );
    }

    #[test]
    fn map_key_order_does_not_count() {
        #[derive(serde::Serialize)]
        struct Row {
            b: i32,
            a: &'static str,
        }
        let mut m = HashMap::new();
        m.insert("a", serde_json::json!("x"));
        m.insert("b", serde_json::json!(7));
        let s = canonical_bytes(&Row { b: 7, a: "x" }).unwrap();
        assert_eq!(s, canonical_bytes(&m).unwrap());
        assert_eq!(
            s,
            canonical_bytes(&serde_json::json!({"b": 7, "a": "x"})).unwrap()
        );
    }

    #[test]
    fn enums_match_json_tagging() {
        #[derive(serde::Serialize)]
        enum E {
            Unit,
            New(i32),
            Tup(i32, i32),
            Rec { x: i32 },
        }
        let j = |v: serde_json::Value| canonical_bytes(&v).unwrap();
        assert_eq!(
            canonical_bytes(&E::Unit).unwrap(),
            j(serde_json::json!("Unit"))
        );
        assert_eq!(
            canonical_bytes(&E::New(1)).unwrap(),
            j(serde_json::json!({"New": 1}))
        );
        assert_eq!(
            canonical_bytes(&E::Tup(1, 2)).unwrap(),
            j(serde_json::json!({"Tup": [1, 2]}))
        );
        assert_eq!(
            canonical_bytes(&E::Rec { x: 1 }).unwrap(),
            j(serde_json::json!({"Rec": {"x": 1}}))
        );
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = ContentHash::of_bytes(b"hello");
        assert_eq!(h.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(h.to_hex().parse::<ContentHash>().unwrap(), h);
        assert!("xyz".parse::<ContentHash>().is_err());
    }

    #[test]
    fn ordered_mode_sees_order() {
        let mut a = ContentHasher::ordered();
        let mut b = ContentHasher::ordered();
        a.add_row(&1).unwrap();
        a.add_row(&2).unwrap();
        b.add_row(&2).unwrap();
        b.add_row(&1).unwrap();
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn unordered_counts_duplicates() {
        let mut a = ContentHasher::unordered();
        let mut b = ContentHasher::unordered();
        a.add_row(&1).unwrap();
        b.add_row(&1).unwrap();
        b.add_row(&1).unwrap();
        assert_ne!(a.finish(), b.finish());
        assert_ne!(ContentHasher::unordered().finish(), a.finish());
    }

    proptest! {
        #[test]
        fn unordered_ignores_order_and_splits(
            rows in proptest::collection::vec((any::<i64>(), "[a-z]{0,6}", any::<f64>()), 0..40),
            split in 0usize..40,
            seed in any::<u64>(),
        ) {
            let mut whole = ContentHasher::unordered();
            for r in &rows { whole.add_row(r).unwrap(); }
            // Shuffle deterministically by sorting on a keyed hash, then split in two hashers.
            let mut shuffled = rows.clone();
            shuffled.sort_by_key(|r| blake3::hash(&[canonical_bytes(r).unwrap(), seed.to_be_bytes().to_vec()].concat()).to_hex().to_string());
            let cut = split.min(shuffled.len());
            let mut left = ContentHasher::unordered();
            let mut right = ContentHasher::unordered();
            for r in &shuffled[..cut] { left.add_row(r).unwrap(); }
            for r in &shuffled[cut..] { right.add_row(r).unwrap(); }
            left.merge(&right).unwrap();
            prop_assert_eq!(whole.finish(), left.finish());
        }

        #[test]
        fn string_splits_never_collide(a in "[a-c]{0,5}", b in "[a-c]{0,5}", c in "[a-c]{0,5}", d in "[a-c]{0,5}") {
            prop_assume!((a.clone(), b.clone()) != (c.clone(), d.clone()));
            prop_assert_ne!(canonical_bytes(&(a, b)).unwrap(), canonical_bytes(&(c, d)).unwrap());
        }

        #[test]
        fn btreemap_and_hashmap_agree(m in proptest::collection::hash_map("[a-z]{1,4}", any::<i32>(), 0..10)) {
            let b: BTreeMap<_, _> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
            prop_assert_eq!(canonical_bytes(&m).unwrap(), canonical_bytes(&b).unwrap());
        }
    }
}
