//! The unit of replication: one committed ZODB transaction, independent of
//! the ZEO wire layer, plus the tid helpers (tids are `ZODB.TimeStamp`s).
//!
//! A [`Txn`] is what the primary's backend iterator reports for a committed
//! transaction, with blob contents attached; the replica replays it with its
//! original tid. [`Txn::digest`] identifies it exactly (every field, records in
//! order) and is how primary and replica tell whether they hold the same
//! transaction under the same tid.

use std::collections::HashSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A transaction id: 8 bytes, big-endian, a `ZODB.TimeStamp`.
pub type Tid = [u8; 8];
/// An object id.
pub type Oid = [u8; 8];
/// The zero tid: "no transaction" (an empty storage's `lastTransaction`).
pub const Z64: Tid = [0; 8];

/// One data record of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(with = "serde_bin::array")]
    pub oid: Oid,
    /// `None` = deletion / undone creation.
    #[serde(with = "serde_bin::opt_bytes")]
    pub data: Option<Bytes>,
    /// Backpointer (undo) as the iterator reports it.
    #[serde(with = "serde_bin::opt_array")]
    pub data_txn: Option<Tid>,
    /// Blob file content, if this is a blob record.
    #[serde(with = "serde_bin::opt_bytes")]
    pub blob: Option<Bytes>,
}

/// One committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    #[serde(with = "serde_bin::array")]
    pub tid: Tid,
    /// `" "`, `"p"` (packed) or `"u"` (undone).
    pub status: String,
    #[serde(with = "serde_bin::bytes")]
    pub user: Bytes,
    #[serde(with = "serde_bin::bytes")]
    pub description: Bytes,
    /// The extension as delivered by ZEO's iterator (a dict), pickled by the
    /// wire layer; opaque here.
    #[serde(with = "serde_bin::bytes")]
    pub extension: Bytes,
    pub records: Vec<Record>,
}

/// Domain separator of the digest encoding; bump it if the encoding changes.
const DIGEST_DOMAIN: &[u8] = b"zrelay.txn.v1\0";

impl Txn {
    /// SHA-256 over an unambiguous encoding of every field: each variable
    /// field is length-prefixed (u64 BE), each optional field tagged
    /// (0 = absent, 1 = present), records counted and hashed in order.
    /// Identity of the transaction for the replication handshake and for
    /// recognising a resend: sha256 over the tid and the metadata a pack
    /// leaves alone (user, description, extension). Status and records are
    /// left out on purpose: packing the primary sets status "p" and drops
    /// unreachable records, and a replica that was in sync must still be
    /// recognised as such afterwards. Record content is compared by
    /// `zrelay verify`.
    pub fn digest(&self) -> [u8; 32] {
        fn put(h: &mut Sha256, b: &[u8]) {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        }
        let mut h = Sha256::new();
        h.update(DIGEST_DOMAIN);
        h.update(self.tid);
        put(&mut h, &self.user);
        put(&mut h, &self.description);
        put(&mut h, &self.extension);
        h.finalize().into()
    }

    /// Approximate payload size: record data + blob content + metadata
    /// (tid, status, user, description, extension, oids and backpointers).
    pub fn size_bytes(&self) -> u64 {
        let meta =
            8 + self.status.len() + self.user.len() + self.description.len() + self.extension.len();
        let recs: usize = self
            .records
            .iter()
            .map(|r| {
                8 + r.data.as_ref().map_or(0, Bytes::len)
                    + r.data_txn.map_or(0, |_| 8)
                    + r.blob.as_ref().map_or(0, Bytes::len)
            })
            .sum();
        (meta + recs) as u64
    }

    /// The oids this transaction touches: unique, in first-seen order.
    pub fn oids(&self) -> Vec<Oid> {
        let mut seen = HashSet::with_capacity(self.records.len());
        self.records
            .iter()
            .filter(|r| seen.insert(r.oid))
            .map(|r| r.oid)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// tids as time stamps

/// Seconds per unit of a tid's low word: a minute split into 2^32 parts.
/// Written exactly as ZODB writes it, so truncation matches bit for bit.
const SCONV: f64 = 60.0 / 65536.0 / 65536.0;
/// Unix time of 1900-01-01 00:00 UTC (the tid epoch).
const TID_EPOCH_UNIX: f64 = -2_208_988_800.0;

/// A tid as a big-endian integer (tid order = integer order).
pub fn tid_to_u64(tid: &Tid) -> u64 {
    u64::from_be_bytes(*tid)
}

/// The tid of a big-endian integer.
pub fn tid_from_u64(v: u64) -> Tid {
    v.to_be_bytes()
}

/// The smallest tid greater than `tid` (saturating); an exclusive lower bound
/// turned into the inclusive `start` of `iterator_start`.
pub fn tid_after(tid: &Tid) -> Tid {
    tid_from_u64(tid_to_u64(tid).saturating_add(1))
}

/// Hex form for logs and errors.
pub fn tid_hex(tid: &Tid) -> String {
    crate::wire::tid::tid_to_hex(tid)
}

/// Whole minutes since the Unix epoch encoded in the tid's high word (an
/// out-of-range day such as Feb 31 counts on into March, as in ZODB).
fn tid_unix_minutes(tid: &Tid) -> i64 {
    use crate::wire::tid::days_from_civil;
    let a = i64::from(u32::from_be_bytes([tid[0], tid[1], tid[2], tid[3]]));
    let minute = a % 60;
    let hour = a / 60 % 24;
    let day = a / (60 * 24) % 31 + 1;
    let month = a / (60 * 24 * 31) % 12 + 1;
    let year = a / (60 * 24 * 31 * 12) + 1900;
    days_from_civil(year, month, day) * 1440 + hour * 60 + minute
}

fn tid_low_secs(tid: &Tid) -> f64 {
    f64::from(u32::from_be_bytes([tid[4], tid[5], tid[6], tid[7]])) * SCONV
}

/// Commit time of a tid as Unix seconds (`TimeStamp(tid).timeTime()`).
pub fn tid_unix_secs(tid: &Tid) -> f64 {
    (tid_unix_minutes(tid) * 60) as f64 + tid_low_secs(tid)
}

/// The tid ZODB would make for Unix time `t` (`TimeStamp(*gmtime(t)[:5],
/// t % 60)`; the seconds part is truncated, as ZODB does). Times before 1900
/// (and NaN) give [`Z64`]; times past the encodable range saturate.
pub fn tid_from_unix_secs(t: f64) -> Tid {
    if t.is_nan() || t <= TID_EPOCH_UNIX {
        return Z64;
    }
    if !t.is_finite() {
        return [0xff; 8];
    }
    let sec = t.rem_euclid(60.0);
    let minutes = ((t - sec) / 60.0).round() as i64;
    let (days, in_day) = (minutes.div_euclid(1440), minutes.rem_euclid(1440));
    let (y, m, d) = crate::wire::tid::civil_from_days(days);
    let a = ((((y - 1900) * 12 + m - 1) * 31 + d - 1) * 24) * 60 + in_day;
    if !(0..=i64::from(u32::MAX)).contains(&a) {
        return if a < 0 { Z64 } else { [0xff; 8] };
    }
    let b = (sec / SCONV).min(f64::from(u32::MAX)) as u32;
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&(a as u32).to_be_bytes());
    out[4..].copy_from_slice(&b.to_be_bytes());
    out
}

/// Seconds by which `newer` is later than `older`, computed from the tid
/// fields (exact even for tids a few units apart, where the difference of two
/// [`tid_unix_secs`] values rounds to 0). Returns 0 if and only if
/// `newer <= older` in tid order; otherwise at least one tid unit (~14 ns).
pub fn tid_delta_secs(newer: &Tid, older: &Tid) -> f64 {
    if newer <= older {
        return 0.0;
    }
    let minutes = (tid_unix_minutes(newer) - tid_unix_minutes(older)) as f64;
    let d = minutes * 60.0 + (tid_low_secs(newer) - tid_low_secs(older));
    d.max(SCONV)
}

/// Serde helpers: byte strings as msgpack `bin`, fixed arrays checked for
/// their exact length. Shared with the stream protocol.
pub(crate) mod serde_bin {
    use std::fmt;

    use ::bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Only bin is produced; a sequence of small ints is accepted for
            // robustness, growing as elements actually arrive.
            let mut v = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v)
        }
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("nil or a byte string")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_bytes(BytesVisitor).map(Some)
        }
    }

    fn to_array<const N: usize, E: Error>(v: Vec<u8>) -> Result<[u8; N], E> {
        let len = v.len();
        v.try_into()
            .map_err(|_| E::invalid_length(len, &format!("{N} bytes").as_str()))
    }

    pub mod bytes {
        use super::*;
        pub fn serialize<S: Serializer>(v: &Bytes, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
            d.deserialize_bytes(BytesVisitor).map(Bytes::from)
        }
    }

    pub mod opt_bytes {
        use super::*;
        pub fn serialize<S: Serializer>(v: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                None => s.serialize_none(),
                Some(b) => s.serialize_some(&BinRef(b)),
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
            Ok(d.deserialize_option(OptVisitor)?.map(Bytes::from))
        }
    }

    pub mod array {
        use super::*;
        pub fn serialize<const N: usize, S: Serializer>(
            v: &[u8; N],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
        pub fn deserialize<'de, const N: usize, D: Deserializer<'de>>(
            d: D,
        ) -> Result<[u8; N], D::Error> {
            to_array(d.deserialize_bytes(BytesVisitor)?)
        }
    }

    pub mod opt_array {
        use super::*;
        pub fn serialize<const N: usize, S: Serializer>(
            v: &Option<[u8; N]>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                None => s.serialize_none(),
                Some(b) => s.serialize_some(&BinRef(b)),
            }
        }
        pub fn deserialize<'de, const N: usize, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<[u8; N]>, D::Error> {
            d.deserialize_option(OptVisitor)?.map(to_array).transpose()
        }
    }

    /// A borrowed byte string that serializes as `bin`.
    struct BinRef<'a>(&'a [u8]);

    impl serde::Serialize for BinRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(hex: &str) -> Tid {
        let v = u64::from_str_radix(hex, 16).unwrap();
        tid_from_u64(v)
    }

    fn sample() -> Txn {
        Txn {
            tid: tid("03f6dd11b5555555"),
            status: " ".into(),
            user: Bytes::from_static(b"/ alice"),
            description: Bytes::from_static(b"edit"),
            extension: Bytes::from_static(b"\x80\x03}q\x00."),
            records: vec![
                Record {
                    oid: [0, 0, 0, 0, 0, 0, 0, 1],
                    data: Some(Bytes::from_static(b"abc")),
                    data_txn: None,
                    blob: None,
                },
                Record {
                    oid: [0, 0, 0, 0, 0, 0, 0, 2],
                    data: None,
                    data_txn: Some(tid("03f6dd11b5555554")),
                    blob: Some(Bytes::from_static(b"blobdata")),
                },
                Record {
                    oid: [0, 0, 0, 0, 0, 0, 0, 1],
                    data: Some(Bytes::new()),
                    data_txn: None,
                    blob: None,
                },
            ],
        }
    }

    // Pairs computed once with ZODB (persistent.TimeStamp):
    // TimeStamp(raw).timeTime() and TimeStamp(*gmtime(t)[:5], t % 60).raw().
    const ZODB_TIMES: &[(&str, f64)] = &[
        ("0000000000000000", -2208988800.0),
        ("023c2b0000000000", 0.0),
        ("03f6dd11b5555555", 1709213862.5),
        ("03398e7ffffee861", 978307199.9990001),
        ("04099f9e34444444", 1781512212.25),
        ("03d5a1b2c3d4e5f6", 1580873445.8980393),
        ("0c3f8c5b80000000", 9896453490.0),
        ("03c56f3b7fffffff", 1518393330.0),
    ];
    const ZODB_TIDS: &[(f64, &str)] = &[
        (0.0, "023c2b0000000000"),
        (1700000000.0, "03f47f9555555555"),
        (1700000000.123456, "03f47f9555dc2e22"),
        (1234567890.5, "037be9e382222222"),
        (1893456000.999, "0426990004432caa"),
    ];

    #[test]
    fn tid_unix_secs_matches_zodb() {
        for (raw, want) in ZODB_TIMES {
            let got = tid_unix_secs(&tid(raw));
            assert!((got - want).abs() < 1e-6, "{raw}: {got} != {want}");
        }
    }

    #[test]
    fn tid_from_unix_secs_matches_zodb() {
        for (t, raw) in ZODB_TIDS {
            assert_eq!(tid_hex(&tid_from_unix_secs(*t)), *raw, "t={t}");
        }
        assert_eq!(tid_from_unix_secs(-3e9), Z64);
        assert_eq!(tid_from_unix_secs(f64::NAN), Z64);
        assert_eq!(tid_from_unix_secs(f64::INFINITY), [0xff; 8]);
        assert_eq!(tid_from_unix_secs(1e15), [0xff; 8]);
    }

    #[test]
    fn tid_time_round_trip_and_order() {
        let mut prev = Z64;
        let mut t = 946_684_800.0; // 2000-01-01
        while t < 4_102_444_800.0 {
            // 2100-01-01
            let x = tid_from_unix_secs(t);
            assert!(x > prev, "tids increase with time at {t}");
            assert!((tid_unix_secs(&x) - t).abs() < 1e-6, "round trip at {t}");
            prev = x;
            t += 86_400.0 * 29.37 + 0.731;
        }
    }

    #[test]
    fn tid_delta_is_exact_and_zero_only_when_equal() {
        let a = tid("03f6dd11b5555555");
        assert_eq!(tid_delta_secs(&a, &a), 0.0);
        let b = tid_from_u64(tid_to_u64(&a) + 1);
        assert!(tid_delta_secs(&b, &a) > 0.0);
        assert_eq!(tid_delta_secs(&a, &b), 0.0);
        let c = tid_from_unix_secs(1709213862.5 + 3600.25);
        assert!((tid_delta_secs(&c, &a) - 3600.25).abs() < 1e-6);
        // across a month boundary (the encoding gives every month 31 days)
        let feb = tid_from_unix_secs(1709251199.0); // 2024-02-29 23:59:59
        let mar = tid_from_unix_secs(1709251201.0); // 2024-03-01 00:00:01
        assert!((tid_delta_secs(&mar, &feb) - 2.0).abs() < 1e-6);
        assert!((tid_delta_secs(&mar, &Z64) - (1709251201.0 + 2208988800.0)).abs() < 1e-3);
    }

    #[test]
    fn tid_after_and_hex() {
        assert_eq!(tid_after(&Z64), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            tid_after(&[0, 0, 0, 0, 0, 0, 0, 0xff]),
            [0, 0, 0, 0, 0, 0, 1, 0]
        );
        assert_eq!(tid_after(&[0xff; 8]), [0xff; 8]);
        assert_eq!(tid_hex(&tid("03f6dd11b5555555")), "03f6dd11b5555555");
    }

    #[test]
    fn digest_covers_identity_not_what_pack_changes() {
        let base = sample();
        let d = base.digest();
        assert_eq!(d, base.clone().digest(), "deterministic");
        let mut variants: Vec<Txn> = Vec::new();
        let mut t = base.clone();
        t.tid[7] ^= 1;
        variants.push(t);
        let mut t = base.clone();
        t.user = Bytes::from_static(b"/ bob");
        variants.push(t);
        let mut t = base.clone();
        t.description = Bytes::new();
        variants.push(t);
        let mut t = base.clone();
        t.extension = Bytes::from_static(b"x");
        variants.push(t);
        for v in &variants {
            assert_ne!(v.digest(), d, "{v:?}");
        }
        // A pack sets status "p" and drops records: same transaction.
        let mut packed = base.clone();
        packed.status = "p".into();
        packed.records.pop();
        assert_eq!(packed.digest(), d);
    }

    #[test]
    fn size_and_oids() {
        let t = sample();
        // meta 8+1+7+4+6, records (8+3) + (8+8+8) + (8+0)
        assert_eq!(t.size_bytes(), 26 + 11 + 24 + 8);
        assert_eq!(
            t.oids(),
            vec![[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 2]]
        );
    }

    #[test]
    fn msgpack_round_trip_uses_bin() {
        let t = sample();
        let enc = rmp_serde::to_vec_named(&t).unwrap();
        let back: Txn = rmp_serde::from_slice(&enc).unwrap();
        assert_eq!(back, t);
        // A tid is one 8-byte bin (0xc4 0x08 ...), not an array of 8 ints.
        let needle = [&[0xc4u8, 8][..], &t.tid[..]].concat();
        assert!(enc.windows(10).any(|w| w == needle.as_slice()));
    }

    #[test]
    fn wrong_tid_length_rejected() {
        #[derive(Serialize)]
        struct Bad<'a> {
            #[serde(with = "serde_bin::bytes")]
            tid: Bytes,
            status: &'a str,
        }
        let enc = rmp_serde::to_vec_named(&Bad {
            tid: Bytes::from_static(b"short"),
            status: " ",
        })
        .unwrap();
        assert!(rmp_serde::from_slice::<Txn>(&enc).is_err());
    }
}
