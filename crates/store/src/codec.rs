//! On-disk encoding of records and log entries: little-endian, versioned
//! by a leading byte so the format can change without a migration guess.

use bytes::Bytes;

use crate::{Event, KeyValue, LeaseId, Revision};

const FORMAT: u8 = 1;
const PUT: u8 = 1;
const DELETE: u8 = 2;

/// A key's stored record (the key itself is the table key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
    pub value: Bytes,
}

pub(crate) fn encode_record(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(25 + r.value.len());
    out.push(FORMAT);
    out.extend_from_slice(&r.create_revision.to_le_bytes());
    out.extend_from_slice(&r.mod_revision.to_le_bytes());
    out.extend_from_slice(&r.lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&r.value);
    out
}

pub(crate) fn decode_record(b: &[u8]) -> Option<Record> {
    let (&format, rest) = b.split_first()?;
    if format != FORMAT || rest.len() < 24 {
        return None;
    }
    let lease = u64_at(rest, 16)?;
    Some(Record {
        create_revision: u64_at(rest, 0)?,
        mod_revision: u64_at(rest, 8)?,
        lease: (lease != 0).then_some(lease),
        value: Bytes::copy_from_slice(&rest[24..]),
    })
}

/// A log entry: the event at a revision (the revision is the table key).
pub(crate) fn encode_event(e: &Event) -> Vec<u8> {
    match e {
        Event::Put(kv) => {
            let mut out = Vec::with_capacity(29 + kv.key.len() + kv.value.len());
            out.push(PUT);
            out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
            out.extend_from_slice(kv.key.as_bytes());
            out.extend_from_slice(&encode_record(&Record {
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                lease: kv.lease,
                value: kv.value.clone(),
            }));
            out
        }
        Event::Delete { key, prev, .. } => {
            let mut out = Vec::with_capacity(30 + key.len() + prev.value.len());
            out.push(DELETE);
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&encode_record(&Record {
                create_revision: prev.create_revision,
                mod_revision: prev.mod_revision,
                lease: prev.lease,
                value: prev.value.clone(),
            }));
            out
        }
    }
}

pub(crate) fn decode_event(revision: Revision, b: &[u8]) -> Option<Event> {
    let (&kind, rest) = b.split_first()?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(rest.get(4..4 + len)?).ok()?.to_string();
    let rest = &rest[4 + len..];
    match kind {
        PUT => {
            let r = decode_record(rest)?;
            Some(Event::Put(KeyValue {
                key,
                value: r.value,
                create_revision: r.create_revision,
                mod_revision: r.mod_revision,
                lease: r.lease,
            }))
        }
        DELETE => {
            let r = decode_record(rest)?;
            let prev = KeyValue {
                key: key.clone(),
                value: r.value,
                create_revision: r.create_revision,
                mod_revision: r.mod_revision,
                lease: r.lease,
            };
            Some(Event::Delete {
                key,
                revision,
                prev,
            })
        }
        _ => None,
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_events_round_trip() {
        let r = Record {
            create_revision: 3,
            mod_revision: 9,
            lease: Some(7),
            value: Bytes::from_static(b"{\"a\":1}"),
        };
        assert_eq!(decode_record(&encode_record(&r)), Some(r.clone()));
        let put = Event::Put(KeyValue {
            key: "/a/b".into(),
            value: r.value,
            create_revision: 3,
            mod_revision: 9,
            lease: None,
        });
        assert_eq!(decode_event(9, &encode_event(&put)), Some(put));
        let prev = KeyValue {
            key: "/a/b".into(),
            value: Bytes::from_static(b"old"),
            create_revision: 3,
            mod_revision: 9,
            lease: Some(2),
        };
        let del = Event::Delete {
            key: "/a/b".into(),
            revision: 10,
            prev,
        };
        assert_eq!(decode_event(10, &encode_event(&del)), Some(del));
        assert_eq!(decode_record(&[9, 1, 2]), None);
        assert_eq!(decode_event(1, &[1, 255, 255, 255, 255]), None);
    }
}
