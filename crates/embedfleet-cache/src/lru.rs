//! [`ByteBoundedLru`]: the in-process tier, a least-recently-used map bounded by bytes.
//!
//! Vectors differ tenfold in width across the model set (384-d to 4096-d), so an entry count
//! says little about memory; the bound is on bytes instead. An entry weighs its encoded value
//! (see [`crate::codec`]) plus its key, and inserting past the bound evicts least recently used
//! entries until the total fits again, so [`ByteBoundedLru::used_bytes`] never exceeds
//! [`ByteBoundedLru::capacity_bytes`]. (Bookkeeping around each entry, roughly a hundred bytes
//! of pointers and hash slots, is not counted: the bound is on what is cached.)
//!
//! Values are kept encoded, not as `Vec<f32>`: the weight is then exactly what is held, an f16
//! cache holds twice the vectors, and a hit returns the same numbers whichever tier served it.
//! They sit behind an `Arc` so a hit clones a pointer under the lock and decodes after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;

use crate::CacheKey;

/// A thread-safe LRU map from [`CacheKey`] to an encoded vector, bounded by bytes.
#[derive(Debug)]
pub struct ByteBoundedLru {
    capacity_bytes: usize,
    inner: Mutex<Entries>,
    evictions: AtomicU64,
}

#[derive(Debug)]
struct Entries {
    /// Unbounded by count: the byte bound below does the evicting.
    map: LruCache<CacheKey, Arc<[u8]>>,
    /// Sum of [`weight`] over `map`.
    used_bytes: usize,
}

/// What an entry counts against the bound.
fn weight(key: &CacheKey, value: &[u8]) -> usize {
    key.as_str().len() + value.len()
}

impl ByteBoundedLru {
    /// An empty cache that will hold at most `capacity_bytes`; `0` holds nothing.
    pub fn new(capacity_bytes: usize) -> Self {
        ByteBoundedLru {
            capacity_bytes,
            inner: Mutex::new(Entries {
                map: LruCache::unbounded(),
                used_bytes: 0,
            }),
            evictions: AtomicU64::new(0),
        }
    }

    /// The value under `key`, marking it most recently used.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<[u8]>> {
        self.lock().map.get(key).cloned()
    }

    /// Stores `value` under `key` (replacing any previous value) and evicts least recently used
    /// entries until the bound holds. A value that alone exceeds the bound is not stored, and a
    /// previous value under its key is dropped so the tiers cannot disagree.
    pub fn insert(&self, key: CacheKey, value: Arc<[u8]>) {
        let entry_weight = weight(&key, &value);
        let mut entries = self.lock();
        if entry_weight > self.capacity_bytes {
            if let Some(old) = entries.map.pop(&key) {
                entries.used_bytes -= weight(&key, &old);
            }
            return;
        }
        // The map is unbounded, so `push` only ever hands back the value it replaced.
        if let Some((old_key, old_value)) = entries.map.push(key, value) {
            entries.used_bytes -= weight(&old_key, &old_value);
        }
        entries.used_bytes += entry_weight;
        let mut evicted = 0;
        while entries.used_bytes > self.capacity_bytes {
            let Some((old_key, old_value)) = entries.map.pop_lru() else {
                break;
            };
            entries.used_bytes -= weight(&old_key, &old_value);
            evicted += 1;
        }
        drop(entries);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Bytes held now (never more than [`Self::capacity_bytes`]).
    pub fn used_bytes(&self) -> usize {
        self.lock().used_bytes
    }

    /// The bound.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted to keep the bound, since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// A panic while the lock was held cannot leave the map inconsistent (every update of
    /// `used_bytes` follows its map operation without an intervening call that can panic), so a
    /// poisoned lock is taken over rather than spreading the panic to every request.
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use embedfleet_proto::{ContentKey, Input};

    use super::*;

    fn key(i: usize) -> CacheKey {
        let content = ContentKey::new(
            &Input::Text(format!("input {i}")),
            None,
            embedfleet_proto::InputType::Document,
            "m",
            "r",
        );
        CacheKey::partial("m", "r", &content)
    }

    fn value(len: usize) -> Arc<[u8]> {
        vec![0x10; len].into()
    }

    #[test]
    fn the_byte_bound_holds_and_evicts_the_least_recently_used() {
        let key_len = key(0).as_str().len();
        let entry = key_len + 100;
        let lru = ByteBoundedLru::new(3 * entry);
        for i in 0..3 {
            lru.insert(key(i), value(100));
        }
        assert_eq!(lru.used_bytes(), 3 * entry);
        assert!(lru.get(&key(0)).is_some()); // 0 is now more recent than 1
        lru.insert(key(3), value(100));
        assert_eq!(lru.len(), 3);
        assert!(
            lru.get(&key(1)).is_none(),
            "least recently used entry survived"
        );
        assert!(lru.get(&key(0)).is_some());
        assert_eq!(lru.evictions(), 1);
        assert!(lru.used_bytes() <= lru.capacity_bytes());
    }

    #[test]
    fn replacing_a_value_keeps_the_account_exact() {
        let lru = ByteBoundedLru::new(10_000);
        lru.insert(key(0), value(100));
        lru.insert(key(0), value(300));
        assert_eq!(lru.len(), 1);
        assert_eq!(lru.used_bytes(), key(0).as_str().len() + 300);
    }

    #[test]
    fn a_value_larger_than_the_bound_is_not_kept() {
        let lru = ByteBoundedLru::new(500);
        lru.insert(key(0), value(100));
        lru.insert(key(0), value(1_000));
        assert!(lru.is_empty());
        assert_eq!(lru.used_bytes(), 0);
        let disabled = ByteBoundedLru::new(0);
        disabled.insert(key(1), value(1));
        assert!(disabled.is_empty());
    }
}
