//! The default result store: in the front's memory, bounded by bytes, the
//! least recently used entries evicted first. It is charged to no call's
//! in-flight budget: its bound is its own (`--cache-max-bytes`).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hashlink::LruCache;

use super::{CacheStore, Key, StoreError, Stored};

/// What an entry costs beside its output: its key, its task's name and the
/// map's own bookkeeping, roughly.
const ENTRY_OVERHEAD: usize = 128;

/// Results in memory.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_bytes: usize,
    ttl: Duration,
}

#[derive(Debug)]
struct Inner {
    entries: LruCache<Key, Entry>,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    output: Bytes,
    task: &'static str,
    expires: Instant,
}

impl Entry {
    fn size(&self) -> usize {
        self.output.len() + ENTRY_OVERHEAD
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes`, each entry for `ttl`.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self { inner: Mutex::new(Inner { entries: LruCache::new_unbounded(), bytes: 0 }), max_bytes, ttl }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl CacheStore for MemoryStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, StoreError> {
        let mut inner = self.inner();
        let fresh = match inner.entries.get(key) {
            Some(entry) if entry.expires > Instant::now() => return Ok(Some(entry.output.clone())),
            Some(_) => false,
            None => return Ok(None),
        };
        if !fresh && let Some(stale) = inner.entries.remove(key) {
            inner.bytes -= stale.size();
        }
        Ok(None)
    }

    async fn put(&self, key: Key, task: &'static str, output: Bytes) -> Result<Stored, StoreError> {
        let entry = Entry { output, task, expires: Instant::now() + self.ttl };
        let size = entry.size();
        if size > self.max_bytes {
            return Ok(Stored { evicted: Vec::new() });
        }
        let mut inner = self.inner();
        if let Some(old) = inner.entries.remove(&key) {
            inner.bytes -= old.size();
        }
        let mut evicted = Vec::new();
        while inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.entries.remove_lru() else { break };
            inner.bytes -= oldest.size();
            evicted.push((oldest.task, oldest.output.len()));
        }
        inner.bytes += size;
        inner.entries.insert(key, entry);
        Ok(Stored { evicted })
    }

    fn bytes_held(&self) -> Option<usize> {
        Some(self.inner().bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    #[tokio::test]
    async fn the_least_recently_used_go_first_and_the_bound_holds() {
        let entry = 1000;
        let store = MemoryStore::new(3 * (entry + ENTRY_OVERHEAD), Duration::from_secs(60));
        for n in 0..3 {
            let stored = store.put(key(n), "t", Bytes::from(vec![n; entry])).await.unwrap();
            assert!(stored.evicted.is_empty());
        }
        // 0 is used, so 1 is now the least recently used.
        assert!(store.get(&key(0)).await.unwrap().is_some());
        let stored = store.put(key(3), "t", Bytes::from(vec![3; entry])).await.unwrap();
        assert_eq!(stored.evicted, [("t", entry)]);
        assert!(store.get(&key(1)).await.unwrap().is_none(), "evicted");
        for n in [0, 2, 3] {
            assert_eq!(store.get(&key(n)).await.unwrap().unwrap()[0], n);
        }
        assert_eq!(store.bytes_held(), Some(3 * (entry + ENTRY_OVERHEAD)));
        // Larger than the whole store: never kept, and nothing evicted for it.
        let huge = store.put(key(9), "t", Bytes::from(vec![9; 4 * entry])).await.unwrap();
        assert!(huge.evicted.is_empty());
        assert!(store.get(&key(9)).await.unwrap().is_none());
        assert_eq!(store.bytes_held(), Some(3 * (entry + ENTRY_OVERHEAD)));
    }

    #[tokio::test]
    async fn entries_expire() {
        let store = MemoryStore::new(1 << 20, Duration::ZERO);
        store.put(key(1), "t", Bytes::from_static(b"x")).await.unwrap();
        assert!(store.get(&key(1)).await.unwrap().is_none());
        assert_eq!(store.bytes_held(), Some(0), "an expired entry found is dropped");
    }
}
