//! The unpickler's memo, copy-on-read.
//!
//! Python's memo shares objects; our values are owned trees, so a GET
//! copies the object's *current* state. While the memoized object is still
//! on the stack (the usual case: PUT right after EMPTY_LIST, filled, then
//! referenced) the copy is exact. Once it has been moved into a container
//! we can no longer see it: the lazy pass gives up and the decoder reruns in
//! eager mode, where every memoized object is snapshotted as it leaves the
//! stack. Mutations made through a GET copy do not reach the original
//! (only self-referencing pickles would notice). ZEO pickles with `fast = 1`
//! and never emits memo opcodes, so none of this runs on ZEO traffic.

use std::collections::HashMap;

use super::decode::Item;
use crate::wire::{Value, WireError};

/// Most memo entries a pickle may create.
pub const MAX_MEMO: usize = 100_000;

/// Value nodes memo copies may create whatever the payload's size, on top
/// of two per payload byte. Small on purpose: copies are the one way a
/// pickle makes more values than it has bytes, and the decoder's memory
/// must stay a fixed multiple of its input (tests/decoder_bounds.rs).
/// At ~50 bytes per node this is ~200 KiB; ZEO itself never uses the memo.
const COPY_ALLOWANCE: usize = 4096;

pub(super) struct Memo {
    entries: HashMap<u32, Entry>,
    /// Memoized items still on the stack: item id -> memo indices.
    live: HashMap<u64, Vec<u32>>,
    eager: bool,
    /// Value nodes and string bytes copies may still create, so repeated
    /// GETs cannot double a value until memory runs out.
    budget: usize,
    /// Set when the lazy pass met a reference it cannot resolve.
    pub needs_eager: bool,
}

enum Entry {
    /// Still on the stack, at this position (stable while it stays there).
    Live {
        pos: usize,
        id: u64,
    },
    Done {
        value: Value,
        depth: usize,
    },
    Gone,
}

impl Memo {
    pub fn new(payload_len: usize, eager: bool) -> Memo {
        Memo {
            entries: HashMap::new(),
            live: HashMap::new(),
            eager,
            budget: payload_len.saturating_mul(2).saturating_add(COPY_ALLOWANCE),
            needs_eager: false,
        }
    }

    /// The index MEMOIZE uses.
    pub fn next_index(&self) -> Result<u32, WireError> {
        u32::try_from(self.entries.len()).map_err(|_| WireError::LimitExceeded("memo entries"))
    }

    /// Memoizes the item at stack position `pos`.
    pub fn put(&mut self, idx: u32, pos: usize, item: &Item) -> Result<(), WireError> {
        if !self.entries.contains_key(&idx) && self.entries.len() >= MAX_MEMO {
            return Err(WireError::LimitExceeded("memo entries"));
        }
        let id = item.id;
        self.entries.insert(idx, Entry::Live { pos, id });
        self.live.entry(id).or_default().push(idx);
        Ok(())
    }

    /// A copy of entry `idx` and its depth.
    pub fn get(&mut self, idx: u32, stack: &[Item]) -> Result<(Value, usize), WireError> {
        let (value, depth) = match self.entries.get(&idx) {
            None => return Err(WireError::malformed("GET of a missing memo entry")),
            Some(Entry::Live { pos, id }) => match stack.get(*pos) {
                Some(item) if item.id == *id => (&item.value, item.depth),
                _ => return Err(WireError::malformed("stale memo entry")),
            },
            Some(Entry::Done { value, depth }) => (value, *depth),
            Some(Entry::Gone) => {
                self.needs_eager = true;
                return Err(WireError::LimitExceeded("memo reference to a moved object"));
            }
        };
        let cost = weight(value);
        let value = value.clone();
        self.charge(cost)?;
        Ok((value, depth))
    }

    /// Must see every item that leaves the stack. Inlined fast path: ZEO's
    /// pickles have no memo, and this runs for every value decoded.
    #[inline(always)]
    pub fn leaving(&mut self, item: &Item) -> Result<(), WireError> {
        if self.live.is_empty() {
            return Ok(());
        }
        self.leaving_memoized(item)
    }

    fn leaving_memoized(&mut self, item: &Item) -> Result<(), WireError> {
        let Some(indices) = self.live.remove(&item.id) else {
            return Ok(());
        };
        let cost = if self.eager { weight(&item.value) } else { 0 };
        for idx in indices {
            // A later PUT may have reused this index for another object.
            if !matches!(self.entries.get(&idx), Some(Entry::Live { id, .. }) if *id == item.id) {
                continue;
            }
            let entry = if self.eager {
                self.charge(cost)?;
                Entry::Done {
                    value: item.value.clone(),
                    depth: item.depth,
                }
            } else {
                Entry::Gone
            };
            self.entries.insert(idx, entry);
        }
        Ok(())
    }

    fn charge(&mut self, cost: usize) -> Result<(), WireError> {
        self.budget = self
            .budget
            .checked_sub(cost)
            .ok_or(WireError::LimitExceeded("memo copy budget"))?;
        Ok(())
    }
}

/// Nodes plus string bytes: what cloning `v` costs.
fn weight(v: &Value) -> usize {
    let mut total = 0usize;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        total = total.saturating_add(1);
        match v {
            Value::Str(s) => total = total.saturating_add(s.len()),
            Value::Global { module, name } => {
                total = total
                    .saturating_add(module.len())
                    .saturating_add(name.len());
            }
            Value::Tuple(xs) | Value::List(xs) => todo.extend(xs),
            Value::Dict(kv) => todo.extend(kv.iter().flat_map(|(k, v)| [k, v])),
            Value::Reduce(b) | Value::NewObj(b) | Value::Build(b) => todo.extend([&b.0, &b.1]),
            _ => {}
        }
    }
    total
}
