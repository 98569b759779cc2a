//! The result cache: identical work done once. A task that declares itself
//! cacheable (its output a pure function of its name, version, params and
//! input) is answered from stored results when the same call comes again,
//! without admission or an executor; and identical calls arriving while the
//! first runs wait for its result instead of running again (coalescing).
//!
//! - [`Key`]: what identifies a result.
//! - [`Directives`]: a call's `offload-cache` metadata (`no-store`,
//!   `no-cache`).
//! - [`CacheStore`]: where results are kept, behind a narrow trait;
//!   [`memory`] is the default, [`postgres`] is shared by fronts.
//! - [`Cache`]: lookups, coalescing and storing, for the handlers.

pub mod memory;
pub mod postgres;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::error::CallError;
use offload_worker::TaskSpec;

/// The request metadata key of a call's cache directives, and the response
/// metadata key saying whether it was a hit.
pub const HEADER: &str = "offload-cache";

/// A result's identity: a 256-bit BLAKE3 hash over the task's name and
/// version, its params with defaults filled in (sorted by name), and the
/// input. Each part is length-prefixed, so no two different calls share an
/// encoding. BLAKE3 rather than SHA-256: a hit hashes its whole input, and
/// with SHA-256 a hit of `hash.sha256` cost as much as the hash it saves
/// (bench scenario 15); BLAKE3 is faster, with SHA-256's collision
/// resistance.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", hex::encode(&self.0[..8]))
    }
}

/// Inputs up to this size are keyed where the call is read (a fraction of a
/// millisecond, cheaper than a hand-off to another thread and back); larger
/// ones on a blocking thread, so that hashing them never stalls an I/O
/// thread for long (64 MiB take over ten milliseconds).
const KEY_INLINE_BYTES: usize = 1 << 20;

impl Key {
    /// The key of a call of `spec` with `params` (checked against the spec:
    /// no unknown ones) and `input`.
    pub fn of(spec: &TaskSpec, params: &HashMap<String, String>, input: &[u8]) -> Self {
        Self::hash(spec.name, spec.version, &filled(spec, params), input)
    }

    /// [`Key::of`], hashing a large input on a blocking thread.
    pub async fn of_call(spec: &TaskSpec, params: &HashMap<String, String>, input: &Bytes) -> Self {
        if input.len() <= KEY_INLINE_BYTES {
            return Self::of(spec, params, input);
        }
        let (name, version, owned, bytes) = (spec.name, spec.version, filled(spec, params), input.clone());
        let hashed = tokio::task::spawn_blocking(move || Self::hash(name, version, &owned, &bytes));
        // A hash cannot fail; a runtime shutting down can (then: inline).
        match hashed.await {
            Ok(key) => key,
            Err(_) => Self::of(spec, params, input),
        }
    }

    fn hash(name: &str, version: u32, params: &BTreeMap<&'static str, String>, input: &[u8]) -> Self {
        let mut hash = blake3::Hasher::new();
        let mut part = |bytes: &[u8]| {
            hash.update(&(bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        part(name.as_bytes());
        part(&version.to_be_bytes());
        part(&(params.len() as u64).to_be_bytes());
        for (name, value) in params {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        part(input);
        Self(hash.finalize().into())
    }
}

/// `params` with the spec's defaults filled in, sorted by name.
fn filled(spec: &TaskSpec, params: &HashMap<String, String>) -> BTreeMap<&'static str, String> {
    spec.params
        .iter()
        .filter_map(|p| Some((p.name, params.get(p.name).map(String::as_str).or(p.default)?.to_string())))
        .collect()
}

/// What a call asks of the cache, from its `offload-cache` metadata: a
/// comma-separated list as in HTTP's Cache-Control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`: its result is not stored.
    pub no_store: bool,
    /// `no-cache`: no stored result (nor another call's) answers it; its
    /// own is stored.
    pub no_cache: bool,
}

impl Directives {
    /// The directives of `metadata`; an unknown one is INVALID_ARGUMENT.
    pub fn of(metadata: &MetadataMap) -> Result<Self, CallError> {
        let mut directives = Self::default();
        for value in metadata.get_all(HEADER) {
            let bad = |detail: String| CallError::BadMetadata { key: HEADER, detail };
            let value = value.to_str().map_err(|_| bad(format!("{value:?} is not text")))?;
            for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                match directive.to_ascii_lowercase().as_str() {
                    "no-store" => directives.no_store = true,
                    "no-cache" => directives.no_cache = true,
                    _ => {
                        return Err(bad(format!(
                            "{directive:?} is not a cache directive; use no-store, no-cache or both, comma-separated"
                        )));
                    }
                }
            }
        }
        Ok(directives)
    }
}

/// Why a store failed. A cache that fails never fails a call: the call runs
/// as if nothing were stored.
#[derive(Debug, thiserror::Error)]
#[error("result cache: {0}")]
pub struct StoreError(pub String);

/// What a store dropped to make room.
#[derive(Debug, Default)]
pub struct Stored {
    /// The task and output size of each entry evicted.
    pub evicted: Vec<(&'static str, usize)>,
}

/// Where results are kept.
#[async_trait::async_trait]
pub trait CacheStore: Send + Sync + std::fmt::Debug + 'static {
    /// The result stored under `key`, unless absent or expired.
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, StoreError>;

    /// Stores `output` of `task` under `key`.
    async fn put(&self, key: Key, task: &'static str, output: Bytes) -> Result<Stored, StoreError>;

    /// Bytes held, if the store holds them itself.
    fn bytes_held(&self) -> Option<usize> {
        None
    }
}

/// A call's answer from the cache.
#[derive(Debug)]
pub enum Lookup {
    /// The result: stored, or made meanwhile by an identical call.
    Hit(Bytes, HitKind),
    /// No result: run the call, then give its output to [`Leader::finish`].
    Miss(Leader),
}

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    /// The store.
    Stored,
    /// An identical call that ran while this one waited.
    Coalesced,
}

impl HitKind {
    /// Its metrics label.
    pub fn label(self) -> &'static str {
        match self {
            HitKind::Stored => "hit",
            HitKind::Coalesced => "coalesced",
        }
    }
}

/// An identical call's run, as its followers see it.
#[derive(Debug, Clone)]
enum Flight {
    Running,
    Done(Bytes),
    /// It failed or was cancelled: one follower runs the call instead.
    Gone,
}

/// Results of cacheable tasks, and the runs of them under way.
#[derive(Debug)]
pub struct Cache {
    store: Arc<dyn CacheStore>,
    /// Larger outputs are never stored.
    max_entry_bytes: usize,
    /// The run under way of each key, for identical calls to wait on.
    flights: Mutex<HashMap<Key, watch::Sender<Flight>>>,
    /// Calls waiting for an identical call's result now.
    waiting: AtomicUsize,
}

/// Counts a call among those waiting while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cache {
    /// A cache over `store`, storing outputs of up to `max_entry_bytes`.
    pub fn new(store: Arc<dyn CacheStore>, max_entry_bytes: usize) -> Arc<Self> {
        Arc::new(Self { store, max_entry_bytes, flights: Mutex::default(), waiting: AtomicUsize::new(0) })
    }

    /// Bytes the store holds, if it holds them itself.
    pub fn bytes_held(&self) -> Option<usize> {
        self.store.bytes_held()
    }

    /// Calls waiting now for an identical call's result.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<Key, watch::Sender<Flight>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks `key` (a call of `task`) up in the store only, never waiting
    /// for an identical call under way: for a call whose answer's headers
    /// go out before it runs (a stream). A miss stores the call's result.
    pub async fn lookup_stored(self: &Arc<Self>, key: Key, task: &'static str, directives: Directives) -> Lookup {
        if !directives.no_cache {
            match self.store.get(&key).await {
                Ok(Some(output)) => return Lookup::Hit(output, HitKind::Stored),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "cannot read the result cache; the call runs"),
            }
        }
        Lookup::Miss(Leader { cache: Arc::clone(self), key, task, store: !directives.no_store, flight: None })
    }

    /// Looks `key` (a call of `task`) up: a stored result, else the result
    /// of an identical call under way (waited for; if that call fails or is
    /// cancelled, this one or another waiter runs it instead), else a miss,
    /// which this call then runs. The caller's own deadline and cancellation
    /// bound the wait: dropping the future stops it.
    pub async fn lookup(self: &Arc<Self>, key: Key, task: &'static str, directives: Directives) -> Lookup {
        if directives.no_cache {
            // Runs by itself, neither reading nor leading others.
            return Lookup::Miss(Leader {
                cache: Arc::clone(self),
                key,
                task,
                store: !directives.no_store,
                flight: None,
            });
        }
        loop {
            match self.store.get(&key).await {
                Ok(Some(output)) => return Lookup::Hit(output, HitKind::Stored),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "cannot read the result cache; the call runs"),
            }
            let mut flight = {
                let mut flights = self.flights();
                match flights.get(&key) {
                    Some(running) => running.subscribe(),
                    None => {
                        let (sender, _) = watch::channel(Flight::Running);
                        flights.insert(key, sender.clone());
                        let store = !directives.no_store;
                        return Lookup::Miss(Leader {
                            cache: Arc::clone(self),
                            key,
                            task,
                            store,
                            flight: Some(sender),
                        });
                    }
                }
            };
            // Follow the run under way until it ends.
            let _waiting = Waiting::new(&self.waiting);
            loop {
                match &*flight.borrow_and_update() {
                    Flight::Done(output) => return Lookup::Hit(output.clone(), HitKind::Coalesced),
                    Flight::Gone => break,
                    Flight::Running => {}
                }
                if flight.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The one call of its key that runs; identical calls wait for it. Dropped
/// without [`Leader::finish`] (the call failed or was cancelled), it lets
/// one of them run instead.
#[derive(Debug)]
pub struct Leader {
    cache: Arc<Cache>,
    key: Key,
    task: &'static str,
    /// Whether its result is stored.
    store: bool,
    /// Its followers' view, if it leads any.
    flight: Option<watch::Sender<Flight>>,
}

impl Leader {
    /// Gives the run's `output` to the calls waiting for it, and stores it
    /// (unless the call asked not to, or it is too large). Returns what the
    /// store evicted for it.
    pub async fn finish(mut self, output: &Bytes) -> Stored {
        if let Some(flight) = &self.flight {
            flight.send_replace(Flight::Done(output.clone()));
        }
        let mut stored = Stored::default();
        if self.store && output.len() <= self.cache.max_entry_bytes {
            match self.cache.store.put(self.key, self.task, output.clone()).await {
                Ok(done) => stored = done,
                Err(err) => tracing::warn!(error = %err, "cannot store a result in the cache"),
            }
        }
        // Only now: a call arriving meanwhile found the run's result on it.
        self.forget_flight();
        stored
    }

    fn forget_flight(&mut self) {
        let Some(flight) = self.flight.take() else { return };
        let mut flights = self.cache.flights();
        if flights.get(&self.key).is_some_and(|current| current.same_channel(&flight)) {
            flights.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(flight) = &self.flight {
            // Unfinished: a follower takes over (a Done already sent stays).
            flight.send_if_modified(|state| match state {
                Flight::Running => {
                    *state = Flight::Gone;
                    true
                }
                _ => false,
            });
        }
        self.forget_flight();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use offload_worker::{Mode, ParamSpec};

    const SPEC: TaskSpec = TaskSpec {
        name: "image.thumbnail",
        description: "",
        default_mode: Mode::Pool,
        allowed_modes: &[Mode::Pool],
        params: &[ParamSpec::optional("width", "", "128"), ParamSpec::optional("height", "", "128")],
        cacheable: true,
        version: 1,
    };

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_key_covers_name_version_filled_params_and_input() {
        let key = Key::of(&SPEC, &params(&[]), b"img");
        assert_eq!(key, Key::of(&SPEC, &params(&[("width", "128")]), b"img"), "a default is as if given");
        assert_eq!(key, Key::of(&SPEC, &params(&[("height", "128"), ("width", "128")]), b"img"));
        assert_ne!(key, Key::of(&SPEC, &params(&[("width", "64")]), b"img"));
        assert_ne!(key, Key::of(&SPEC, &params(&[]), b"img2"));
        assert_ne!(key, Key::of(&TaskSpec { version: 2, ..SPEC }, &params(&[]), b"img"), "a new version");
        assert_ne!(key, Key::of(&TaskSpec { name: "image.other", ..SPEC }, &params(&[]), b"img"));
        // Parts are length-prefixed: moving bytes between them changes the key.
        const ONE: &[ParamSpec] = &[ParamSpec::optional("a", "", "")];
        let a = TaskSpec { params: ONE, ..SPEC };
        assert_ne!(Key::of(&a, &params(&[("a", "xy")]), b"z"), Key::of(&a, &params(&[("a", "x")]), b"yz"));
    }

    #[tokio::test]
    async fn a_large_input_is_keyed_off_the_calling_thread_to_the_same_key() {
        for size in [10, KEY_INLINE_BYTES + 1] {
            let input = Bytes::from(vec![5u8; size]);
            let params = params(&[("width", "64")]);
            assert_eq!(Key::of_call(&SPEC, &params, &input).await, Key::of(&SPEC, &params, &input), "{size}");
        }
    }

    #[test]
    fn directives_are_read_as_in_cache_control() {
        let read = |value: &str| {
            let mut metadata = MetadataMap::new();
            metadata.insert(HEADER, value.parse().unwrap());
            Directives::of(&metadata)
        };
        assert_eq!(Directives::of(&MetadataMap::new()).unwrap(), Directives::default());
        assert_eq!(read("no-store, no-cache").unwrap(), Directives { no_store: true, no_cache: true });
        assert_eq!(read("No-Cache").unwrap(), Directives { no_store: false, no_cache: true });
        let err = read("no-store, max-age=5").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("max-age=5"), "{err}");
    }

    fn cache() -> Arc<Cache> {
        Cache::new(Arc::new(memory::MemoryStore::new(1 << 20, Duration::from_secs(60))), 1 << 10)
    }

    #[tokio::test]
    async fn identical_calls_wait_for_the_first_and_a_failed_leader_hands_over() {
        let cache = cache();
        let key = Key([1; 32]);
        let Lookup::Miss(leader) = cache.lookup(key, "t", Directives::default()).await else { panic!("a miss") };
        let follow = || {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.lookup(key, "t", Directives::default()).await })
        };
        let (first, second) = (follow(), follow());
        let both_wait = async {
            while cache.waiting() < 2 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), both_wait).await.expect("they wait for the leader");
        assert!(!first.is_finished() && !second.is_finished(), "they wait for the leader");
        // The leader fails: one follower leads now, the other follows it.
        drop(leader);
        let raced = tokio::time::timeout(Duration::from_secs(5), futures::future::select(first, second));
        let (new_leader, follower) = match raced.await.expect("one takes over") {
            futures::future::Either::Left((a, b)) => (a.unwrap(), b),
            futures::future::Either::Right((b, a)) => (b.unwrap(), a),
        };
        let Lookup::Miss(new_leader) = new_leader else { panic!("one takes over: {new_leader:?}") };
        new_leader.finish(&Bytes::from_static(b"out")).await;
        match tokio::time::timeout(Duration::from_secs(5), follower).await.expect("it follows").unwrap() {
            Lookup::Hit(output, HitKind::Coalesced) => assert_eq!(output, "out"),
            other => panic!("the other gets its result: {other:?}"),
        }
        match cache.lookup(key, "t", Directives::default()).await {
            Lookup::Hit(output, HitKind::Stored) => assert_eq!(output, "out"),
            other => panic!("stored: {other:?}"),
        }
        assert!(cache.flights().is_empty(), "no run under way is left behind");
        assert_eq!(cache.waiting(), 0);
    }

    #[tokio::test]
    async fn no_store_and_no_cache_and_large_outputs() {
        let cache = cache();
        let (key, out) = (Key([2; 32]), Bytes::from_static(b"out"));
        let no_store = Directives { no_store: true, no_cache: false };
        let Lookup::Miss(leader) = cache.lookup(key, "t", no_store).await else { panic!("a miss") };
        leader.finish(&out).await;
        assert!(matches!(cache.lookup(key, "t", no_store).await, Lookup::Miss(_)), "not stored");
        let no_cache = Directives { no_store: false, no_cache: true };
        let Lookup::Miss(leader) = cache.lookup(key, "t", no_cache).await else { panic!("a miss") };
        leader.finish(&out).await;
        assert!(matches!(cache.lookup(key, "t", no_cache).await, Lookup::Miss(_)), "not read");
        assert!(matches!(cache.lookup(key, "t", Directives::default()).await, Lookup::Hit(..)), "but stored");
        let big = Key([3; 32]);
        let Lookup::Miss(leader) = cache.lookup(big, "t", Directives::default()).await else { panic!("a miss") };
        leader.finish(&Bytes::from(vec![0; 2 << 10])).await;
        assert!(matches!(cache.lookup(big, "t", Directives::default()).await, Lookup::Miss(_)), "over the entry cap");
    }
}
