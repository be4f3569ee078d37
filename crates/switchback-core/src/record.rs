//! The stored form of transactions: a versioned bincode envelope.
//!
//! Every value switchback writes to a queue starts with one byte, the format
//! version ([`FORMAT_VERSION`]), followed by the bincode 2 (standard config,
//! serde) encoding of the value. A reader refuses a version it does not know
//! instead of misreading it. The layout is documented in `schemas/record-format.md`.

use serde::{de::DeserializeOwned, Serialize};

/// Version of the stored record format. Bump on any change to the serialized types.
pub const FORMAT_VERSION: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("stored record has format version {found}, this switchback reads version {FORMAT_VERSION}: use the switchback release that wrote the queue, or drain it first")]
    Version { found: u8 },
    #[error("stored record is empty")]
    Empty,
    #[error("stored record is corrupt: {0}")]
    Decode(String),
    #[error("cannot encode record: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![FORMAT_VERSION];
    let body = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| FormatError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Appends the encoding of one element of a sequence to `out` (no version byte).
/// [`encode_seq`] assembles such parts into what [`encode`] gives for the whole
/// `Vec`, so a writer can drop elements without encoding again.
pub fn encode_element<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), FormatError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| FormatError::Encode(e.to_string()))
}

/// The envelope of a sequence of `count` elements encoded by [`encode_element`];
/// equal to [`encode`] of the `Vec` of those elements.
pub fn encode_seq<'a>(
    count: usize,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![FORMAT_VERSION];
    // bincode writes a sequence's length as a u64 (varint in the standard config).
    encode_element(&(count as u64), &mut out)?;
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(out)
}

/// Decodes one element encoded by [`encode_element`].
pub fn decode_element<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| FormatError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(FormatError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let (&version, body) = bytes.split_first().ok_or(FormatError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    decode_element(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::lsn::Lsn;

    #[test]
    fn roundtrip_and_version_check() {
        let h = TxnHeader {
            xid: 7,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: 1,
            origin: Some("o".into()),
            records: 2,
            bytes: 3,
        };
        let enc = encode(&h).unwrap();
        assert_eq!(decode::<TxnHeader>(&enc).unwrap(), h);
        let mut bad = enc.clone();
        bad[0] = 99;
        assert!(matches!(
            decode::<TxnHeader>(&bad),
            Err(FormatError::Version { found: 99 })
        ));
        let recs = vec![Record::Change(Change::Insert {
            rel: 1,
            new: vec![Value::Null, Value::Unchanged, Value::Text(b"x".to_vec())],
        })];
        assert_eq!(
            decode::<Vec<Record>>(&encode(&recs).unwrap()).unwrap(),
            recs
        );
    }

    #[test]
    fn sequence_from_parts_equals_whole_encoding() {
        for n in [0usize, 1, 2, 250, 251, 300, 70_000] {
            let recs: Vec<Record> = (0..n)
                .map(|i| {
                    Record::Change(Change::Insert {
                        rel: i as u32,
                        new: vec![Value::Text(format!("{i}").into_bytes())],
                    })
                })
                .collect();
            let mut parts = Vec::new();
            for r in &recs {
                let mut p = Vec::new();
                encode_element(r, &mut p).unwrap();
                assert_eq!(decode_element::<Record>(&p).unwrap(), *r);
                parts.push(p);
            }
            let whole = encode_seq(n, parts.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(whole, encode(&recs).unwrap(), "{n} elements");
        }
    }
}
