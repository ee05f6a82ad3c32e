//! What ZEO's own monitoring reads through zrelay: the `connections` count.
//!
//! ZEO's `server_status()` (a call of a registered client), its `ruok` JSON
//! and `python -m ZEO.nagios` (which sends `ruok`) report `connections`: the
//! connections registered with each storage. Clients and monitors must read
//! the number they would read with the same clients connected directly.
//!
//! Decision: **rewrite the counts**; zrelay keeps its registered
//! connections. The count in a `server_status` reply and in the `ruok` JSON
//! is lowered by zrelay's own registered connections to that storage
//! (`own_conns`: the backend monitor's, a primary's observer and history
//! readers, a replica's applier). When zrelay holds none, the reply passes
//! byte for byte.
//!
//! Why not "no registered connection where none is needed": only the backend
//! monitor could do without one (probing with `ruok`, which ZEO never
//! registers), but runzeo logs a `Connected ...` INFO line for every
//! connection, so a probe per second would add 86,400 lines a day to the
//! server's log; the long-lived monitor connection was chosen to keep that
//! log quiet. The observer, history readers and applier need registration
//! (invalidations, iterators, writes), so a rewrite is needed anyway.
//!
//! A registration that is being opened or closed at the very moment a status
//! is computed can make one reply off by one; counts are exact otherwise.

use crate::own_conns;
use crate::wire::{Flag, Message, Value};

/// The `server_status` reply with zrelay's own connections to `storage`
/// taken out; None when nothing needs to change (forward it untouched).
pub fn server_status_reply(reply: &Message, storage: &str) -> Option<Message> {
    let own = own_conns::registered(storage);
    if own == 0 || reply.flag == Flag::Error {
        return None;
    }
    let Value::Dict(items) = &*reply.args else {
        return None;
    };
    let mut items = items.clone();
    let slot = items
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some("connections"))?;
    let n = slot.1.as_int()?;
    slot.1 = Value::int((n - own as i128).max(0));
    let mut out = reply.clone();
    out.args = Value::Dict(items).into();
    Some(out)
}

/// The `ruok` JSON with each storage's count lowered by zrelay's own
/// connections to it; None when nothing needs to change.
pub fn ruok_answer(json: &[u8]) -> Option<Vec<u8>> {
    rewrite_ruok(json, &own_conns::registered)
}

/// Rewrites the digits of each `"connections": N` member of the per-storage
/// objects in place, keeping every other byte of the server's JSON (Python's
/// separators, key order, float formatting) as it was.
///
/// Hand-written rather than parse + re-serialize: serde_json would reformat
/// the whole document (separators, floats), and monitors may compare bytes.
fn rewrite_ruok(json: &[u8], own: &dyn Fn(&str) -> usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(json.len());
    let mut changed = false;
    let mut depth = 0usize;
    let mut storage: Option<String> = None;
    let mut i = 0;
    while i < json.len() {
        let c = json[i];
        match c {
            b'"' => {
                let end = string_end(json, i)?;
                let token = &json[i..end];
                out.extend_from_slice(token);
                i = end;
                let after = skip_ws(json, i);
                if json.get(after) != Some(&b':') {
                    continue;
                }
                // An object key.
                if depth == 1 {
                    storage = serde_json::from_slice::<String>(token).ok();
                } else if depth == 2 && token == b"\"connections\"" {
                    let digits_start = skip_ws(json, after + 1);
                    let digits_end = json[digits_start..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(json.len(), |p| digits_start + p);
                    let subtract = storage.as_deref().map_or(0, own);
                    if digits_end > digits_start && subtract > 0 {
                        let n: u64 = std::str::from_utf8(&json[digits_start..digits_end])
                            .ok()?
                            .parse()
                            .ok()?;
                        out.extend_from_slice(&json[i..digits_start]);
                        let fixed = n.saturating_sub(subtract as u64);
                        out.extend_from_slice(fixed.to_string().as_bytes());
                        i = digits_end;
                        changed = true;
                    }
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
        out.push(c);
        i += 1;
    }
    changed.then_some(out)
}

/// Index just past the closing quote of the string starting at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while i < json.len() && json[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    // As runzeo answers (ZEO 6.2, json.dumps defaults), two storages.
    const RUOK: &str = r#"{"1": {"last-transaction": "03ea", "connections": 4, "loads": 7, "lock_time": 1.5e-05, "start": "Mon Nov 30 08:00:00 2026", "waiting": 0}, "a \"b\"": {"connections": 2, "x": [1, {"connections": 9}]}}"#;

    fn own(s: &str) -> usize {
        match s {
            "1" => 3,
            "a \"b\"" => 1,
            _ => 0,
        }
    }

    #[test]
    fn ruok_counts_lowered_per_storage_and_nothing_else_changes() {
        let out = rewrite_ruok(RUOK.as_bytes(), &own).unwrap();
        let want = RUOK
            .replace(r#""connections": 4"#, r#""connections": 1"#)
            .replace(r#""connections": 2"#, r#""connections": 1"#);
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[test]
    fn ruok_untouched_without_own_connections() {
        assert_eq!(rewrite_ruok(RUOK.as_bytes(), &|_| 0), None);
    }

    #[test]
    fn ruok_never_below_zero_and_garbage_is_left_alone() {
        let out = rewrite_ruok(br#"{"1": {"connections": 1}}"#, &|_| 5).unwrap();
        assert_eq!(out, br#"{"1": {"connections": 0}}"#);
        for junk in [
            &b"{\"1\": {\"connections\": 1}}}"[..],
            b"\"unterminated",
            b"",
        ] {
            assert_eq!(rewrite_ruok(junk, &|_| 1), None, "{junk:?}");
        }
    }

    #[test]
    fn server_status_reply_rewritten_only_for_own_connections() {
        let _guard = own_conns::Registration::new("transparency-test");
        let status = Value::Dict(vec![
            (Value::str("storage"), Value::str("transparency-test")),
            (Value::str("connections"), Value::Int(3)),
            (Value::str("loads"), Value::Int(9)),
        ]);
        let reply = Message::reply(Value::Int(7), status);
        let out = server_status_reply(&reply, "transparency-test").unwrap();
        let Value::Dict(items) = &*out.args else {
            panic!("{out:?}")
        };
        assert_eq!(items[1].1, Value::Int(2));
        assert_eq!(items[2].1, Value::Int(9));
        assert_eq!(out.msgid, Value::Int(7));
        assert!(server_status_reply(&reply, "no-such-storage").is_none());
    }
}
