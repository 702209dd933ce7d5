//! The pgoutput protocol (version 1) messages the logical tier reads: Relation, Type, Origin,
//! Insert, Update, Delete and Truncate, parsed from the bytes of one `XLogData` message.
//! Begin and Commit are parsed by `pgwire-replication`. Pure: unit-tested below.
//!
//! Everything here comes from the server but is still read as hostile input: a short or
//! malformed message is an error naming what was wrong, never a panic. A change's values
//! borrow the message's bytes (no copy per column; only text that is not UTF-8 is copied,
//! with the invalid bytes replaced).

use std::borrow::Cow;

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// Part of the replica identity (flag 1).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

/// A table's description, sent before its first change on a connection and after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub id: u32,
    pub schema: String,
    pub table: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub identity: u8,
    pub columns: Vec<Column>,
}

/// One column's value in a tuple, borrowed from the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datum<'a> {
    Null,
    /// A TOASTed value the UPDATE left unchanged: not sent.
    Unchanged,
    /// The value's text form (binary is not requested).
    Text(Cow<'a, str>),
}

/// A row as pgoutput sends it: one datum per column of its relation, in table order.
pub(crate) type Tuple<'a> = Vec<Datum<'a>>;

/// A decoded pgoutput message; a change's values borrow the message's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        relation: u32,
        /// The old key ('K') or the whole old row ('O'), when the replica identity sends one.
        old: Option<(u8, Tuple<'a>)>,
        new: Tuple<'a>,
    },
    Delete {
        relation: u32,
        /// The old key ('K') or the whole old row ('O').
        old: (u8, Tuple<'a>),
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin, Begin, Commit, Message and anything newer: nothing the tier uses.
    Other(u8),
}

/// Reads big-endian fields off a message, failing instead of panicking when it is short.
struct Reader<'a> {
    bytes: &'a [u8],
    what: char,
}

impl<'a> Reader<'a> {
    fn short(&self) -> String {
        format!("pgoutput message {:?} is truncated", self.what)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(self.short());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<String, String> {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.short())?;
        let s = std::str::from_utf8(&self.bytes[..end])
            .map_err(|_| {
                format!(
                    "pgoutput message {:?} has a name that is not UTF-8",
                    self.what
                )
            })?
            .to_string();
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, String> {
        let n = self.u16()?;
        let mut tuple = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            tuple.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    if kind == b'b' {
                        return Err("pgoutput sent a binary value, which was not requested".into());
                    }
                    // `from_utf8` first: its check is several times faster than the lossy
                    // one's, and a server's text is UTF-8 unless the database's encoding is not
                    Datum::Text(match std::str::from_utf8(bytes) {
                        Ok(text) => Cow::Borrowed(text),
                        Err(_) => String::from_utf8_lossy(bytes),
                    })
                }
                other => {
                    return Err(format!(
                        "pgoutput message {:?} has an unknown column kind {:?}",
                        self.what, other as char
                    ))
                }
            });
        }
        Ok(tuple)
    }

    /// An old tuple's marker ('K' or 'O') and the tuple.
    fn old(&mut self, marker: u8) -> Result<(u8, Tuple<'a>), String> {
        match marker {
            b'K' | b'O' => Ok((marker, self.tuple()?)),
            other => Err(format!(
                "pgoutput message {:?} has an unknown tuple marker {:?}",
                self.what, other as char
            )),
        }
    }

    fn expect(&mut self, marker: u8) -> Result<(), String> {
        match self.u8()? {
            m if m == marker => Ok(()),
            other => Err(format!(
                "pgoutput message {:?}: expected {:?}, got {:?}",
                self.what, marker as char, other as char
            )),
        }
    }
}

/// Parses one pgoutput message.
pub(crate) fn parse(bytes: &[u8]) -> Result<Message<'_>, String> {
    let Some((&tag, rest)) = bytes.split_first() else {
        return Err("an empty pgoutput message".into());
    };
    let mut r = Reader {
        bytes: rest,
        what: tag as char,
    };
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let mut schema = r.cstr()?;
            if schema.is_empty() {
                schema = "pg_catalog".into();
            }
            let table = r.cstr()?;
            let identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name,
                    type_oid,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                table,
                identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N')?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let marker = r.u8()?;
            let old = match marker {
                b'N' => None,
                m => {
                    let old = r.old(m)?;
                    r.expect(b'N')?;
                    Some(old)
                }
            };
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let marker = r.u8()?;
            Message::Delete {
                relation,
                old: r.old(marker)?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::new();
            for _ in 0..n.min(1 << 16) {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput bytes, for tests here and in `changes.rs`.
    #[derive(Default)]
    pub(crate) struct Bytes(pub Vec<u8>);

    impl Bytes {
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn u16(mut self, v: u16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend(s.as_bytes());
            self.0.push(0);
            self
        }
        pub fn tuple(mut self, values: &[Option<&str>]) -> Self {
            self = self.u16(values.len() as u16);
            for v in values {
                self = match v {
                    None => self.u8(b'n'),
                    Some("\u{0}unchanged") => self.u8(b'u'),
                    Some(text) => {
                        let s = self.u8(b't').u32(text.len() as u32);
                        let mut s = s;
                        s.0.extend(text.as_bytes());
                        s
                    }
                };
            }
            self
        }
    }

    pub(crate) fn relation_bytes(id: u32, identity: u8, cols: &[(&str, u32, bool)]) -> Vec<u8> {
        let mut b = Bytes::default()
            .u8(b'R')
            .u32(id)
            .cstr("public")
            .cstr("t")
            .u8(identity)
            .u16(cols.len() as u16);
        for (name, oid, key) in cols {
            b = b.u8(u8::from(*key)).cstr(name).u32(*oid).u32(u32::MAX);
        }
        b.0
    }

    #[test]
    fn a_relation_and_its_changes_are_parsed() {
        let rel = relation_bytes(7, b'd', &[("id", 23, true), ("v", 25, false)]);
        let Message::Relation(r) = parse(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.id, r.schema.as_str(), r.table.as_str(), r.identity),
            (7, "public", "t", b'd')
        );
        assert_eq!(
            r.columns[0],
            Column {
                key: true,
                name: "id".into(),
                type_oid: 23
            }
        );
        let ins = Bytes::default()
            .u8(b'I')
            .u32(7)
            .u8(b'N')
            .tuple(&[Some("1"), None])
            .0;
        assert_eq!(
            parse(&ins).unwrap(),
            Message::Insert {
                relation: 7,
                new: vec![Datum::Text("1".into()), Datum::Null]
            }
        );
        let upd = Bytes::default()
            .u8(b'U')
            .u32(7)
            .u8(b'O')
            .tuple(&[Some("1"), Some("a")])
            .u8(b'N')
            .tuple(&[Some("1"), Some("\u{0}unchanged")])
            .0;
        let Message::Update {
            old: Some((b'O', old)),
            new,
            ..
        } = parse(&upd).unwrap()
        else {
            panic!("not an update with an old row")
        };
        assert_eq!(old[1], Datum::Text("a".into()));
        assert_eq!(new[1], Datum::Unchanged);
        let del = Bytes::default()
            .u8(b'D')
            .u32(7)
            .u8(b'K')
            .tuple(&[Some("1"), None])
            .0;
        assert!(matches!(
            parse(&del).unwrap(),
            Message::Delete { old: (b'K', _), .. }
        ));
        let trunc = Bytes::default().u8(b'T').u32(2).u8(0).u32(7).u32(8).0;
        assert_eq!(
            parse(&trunc).unwrap(),
            Message::Truncate {
                relations: vec![7, 8]
            }
        );
        assert_eq!(parse(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }

    #[test]
    fn text_is_borrowed_and_bytes_that_are_not_utf8_are_replaced() {
        let mut ins = Bytes::default()
            .u8(b'I')
            .u32(7)
            .u8(b'N')
            .tuple(&[Some("é1")]);
        let Message::Insert { new, .. } = parse(&ins.0).unwrap() else {
            panic!("not an insert")
        };
        assert!(matches!(&new[0], Datum::Text(Cow::Borrowed("é1"))));
        // the same column with its first byte not UTF-8
        let at = ins.0.len() - 3;
        ins.0[at] = 0xff;
        let Message::Insert { new, .. } = parse(&ins.0).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(new[0], Datum::Text(Cow::Owned("\u{fffd}\u{fffd}1".into())));
    }

    #[test]
    fn hostile_bytes_are_errors_never_panics() {
        let ins = Bytes::default()
            .u8(b'I')
            .u32(7)
            .u8(b'N')
            .tuple(&[Some("hello")])
            .0;
        for cut in 0..ins.len() {
            assert!(parse(&ins[..cut]).is_err(), "cut at {cut}");
        }
        let rel = relation_bytes(7, b'd', &[("id", 23, true)]);
        for cut in 1..rel.len() {
            assert!(parse(&rel[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(&Bytes::default().u8(b'I').u32(1).u8(b'X').0).is_err());
        assert!(parse(&Bytes::default().u8(b'D').u32(1).u8(b'N').u16(0).0).is_err());
        let huge = Bytes::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX)
            .0;
        assert!(parse(&huge).is_err());
        let mut rng = 0x2545_f491_u64;
        for _ in 0..2000 {
            let len = (rng % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng % 256) as u8
                })
                .collect();
            let _ = parse(&bytes);
        }
    }
}
